"""Loading and saving checkpoint directories in the released layout.

    ema.safetensors | model.safetensors | model.safetensors.index.json   the network (bf16 upstream)
    ae.safetensors                                                       the FLUX autoencoder (fp32)
    llm_config.json, vit_config.json [, cooper_config.json]              configs
    tokenizer.json / vocab.json + merges.txt, tokenizer_config.json      Qwen2 tokenizer files

Only safetensors are read (nothing is unpickled), and nothing is fetched from a hub. The model is
built on the meta device and its tensors are assigned straight from the files, so a 14B model
never exists twice in memory. Names and shapes are checked before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .autoencoder import FluxAutoencoder, infer_autoencoder_config
from .config import COOPER_CONFIG_FILE, CooperConfig
from .modeling import CooperModel

WEIGHT_FILES = ("ema.safetensors", "model.safetensors")
INDEX_FILE = "model.safetensors.index.json"
AE_FILE = "ae.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the keys."""


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return table[dtype]


def weight_map(path: Path) -> dict[str, Path]:
    """Which file holds each tensor of the network."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return {k: path / f for k, f in index["weight_map"].items()}
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            with safe_open(str(path / name), "pt") as f:
                return {k: path / name for k in f.keys()}
    raise CheckpointError(f"{path}: no network weights: expected one of {', '.join(WEIGHT_FILES + (INDEX_FILE,))}")


def _shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    out = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                out[key] = (tuple(f.get_slice(key).get_shape()), file)
    return out


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], Path]],
               optional: tuple[str, ...] = (), where: str = "") -> None:
    problems = []
    for key, shape in expected.items():
        if key not in found:
            if key not in optional:
                problems.append(f"missing tensor {key!r} (expected shape {list(shape)}) in {where}")
        elif found[key][0] != shape:
            problems.append(f"{found[key][1]}: tensor {key!r} has shape {list(found[key][0])}, expected {list(shape)}")
    for key in found:
        if key not in expected:
            problems.append(f"{found[key][1]}: unexpected tensor {key!r}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError("; ".join(problems[:10]) + more)


def _read(found, keys, dtype, device_of) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(found[key][1], []).append(key)
    state = {}
    for file, file_keys in by_file.items():
        with safe_open(str(file), "pt", device="cpu") as f:
            for key in file_keys:
                state[key] = f.get_tensor(key).to(dtype=dtype).to(device_of(key))
    return state


def read_config(path: str | Path) -> CooperConfig:
    """The checkpoint's config. Released checkpoints have no `cooper_config.json`: then the sizes
    upstream's loader hard-codes are read off the files instead (table sizes, autoencoder), and the
    transforms are capped to what those tables cover."""
    path = Path(path)
    config = CooperConfig.from_pretrained(path)
    if (path / COOPER_CONFIG_FILE).is_file():
        return config
    found = {k: v[0] for k, v in _shapes(weight_map(path)).items()}
    for key, attr in (("latent_pos_embed.pos_embed", "max_latent_size"), ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
        if key in found:
            side = math.isqrt(found[key][0])
            if side * side != found[key][0]:
                raise CheckpointError(f"{path}: {key} has {found[key][0]} rows, not a square grid")
            setattr(config, attr, side)
    if (path / AE_FILE).is_file():
        with safe_open(str(path / AE_FILE), "pt") as f:
            config.vae = infer_autoencoder_config({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    vae_max = min(config.vae_transform.max_size, config.max_latent_size * config.latent_downsample)
    vit_max = min(config.vit_transform.max_size, config.vit.image_size)
    config.vae_transform = dataclasses.replace(config.vae_transform, max_size=vae_max,
                                               min_size=min(config.vae_transform.min_size, vae_max))
    config.vit_transform = dataclasses.replace(config.vit_transform, max_size=vit_max,
                                               min_size=min(config.vit_transform.min_size, vit_max))
    return config


def load_model(path: str | Path, config: CooperConfig | None = None, device="cpu", dtype="float32",
               device_map: str | dict | None = None, max_memory: dict | None = None) -> CooperModel:
    """Build on the meta device, check every name and shape, then assign tensors from the files.
    `device_map`: None (everything on `device`), "auto" (accelerate spreads the layers over the
    visible GPUs) or a dict {module name: device} (see `resolve_device_map`)."""
    path = Path(path)
    config = config or read_config(path)
    dtype = _dtype(dtype)
    with torch.device("meta"):
        model = CooperModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = _shapes(weight_map(path))
    check_keys(expected, found, optional=CooperModel.POSITION_TABLES, where=str(path))

    if device_map is not None:
        device_map = resolve_device_map(model, device_map, dtype, max_memory)

        def device_of(key):
            return device_map[max((p for p in device_map if _covers(p, key)), key=len)]
    else:
        def device_of(key):
            return device

    state = _read(found, [k for k in expected if k in found], dtype, device_of)
    for key in CooperModel.POSITION_TABLES:
        if key not in state:  # upstream's training loader drops them; they are fixed functions
            state[key] = torch.zeros(expected[key], dtype=dtype, device=device_of(key))
    model.load_state_dict(state, strict=True, assign=True)
    for key in CooperModel.POSITION_TABLES:
        if key not in found:
            model.get_submodule(key.rsplit(".", 1)[0]).reset_table()
    _rebuild_rotary(model)
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    return model.eval()


def _covers(prefix: str, key: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def resolve_device_map(model: CooperModel, device_map, dtype=torch.float32, max_memory: dict | None = None) -> dict:
    """The placement of every module: "auto" asks accelerate (whole decoder layers, the embeddings,
    heads and tables beside the first layer, since they are used together); a dict is checked to
    place every tensor. Anything else is an error."""
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=_dtype(dtype),
                                           no_split_module_classes=CooperModel.NO_SPLIT_MODULES)
        first = device_map.get("language_model.model.layers.0", next(iter(device_map.values())))
        for name in ("language_model.model.embed_tokens", "time_embedder", "vae2llm", "llm2vae",
                     "latent_pos_embed", "connector", "vit_pos_embed"):
            device_map[name] = first
        return device_map
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be None, 'auto' or a dict {{module name: device}}, got {device_map!r}")
    names = list(model.state_dict())
    unknown = [p for p in device_map if not any(_covers(p, k) for k in names)]
    unplaced = sorted({k.rsplit(".", 1)[0] for k in names if not any(_covers(p, k) for p in device_map)})
    if unknown or unplaced:
        more = f" (and {len(unplaced) - 5} more)" if len(unplaced) > 5 else ""
        raise ValueError(f"device_map: unknown modules {unknown}; modules placed nowhere {unplaced[:5]}{more}")
    return dict(device_map)


def _rebuild_rotary(model: CooperModel) -> None:
    """`inv_freq` is a non-persistent buffer created on meta; compute it for real."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    old = model.language_model.model.rotary_emb
    device = model.language_model.model.embed_tokens.weight.device
    with torch.device(device):
        model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=old.config)


def load_autoencoder(path: str | Path, device="cpu", dtype="float32") -> FluxAutoencoder:
    file = Path(path) / AE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing autoencoder weights")
    with safe_open(str(file), "pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), file) for k in f.keys()}
    try:
        config = infer_autoencoder_config({k: v[0] for k, v in found.items()})
        # the group count is not in the tensor shapes; small checkpoints record it in their config
        extra = Path(path) / COOPER_CONFIG_FILE
        if extra.is_file():
            config.norm_num_groups = json.loads(extra.read_text()).get("vae", {}).get("norm_num_groups", 32)
    except (KeyError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{file}: not a FLUX autoencoder layout (missing {exc})") from None
    with torch.device("meta"):
        ae = FluxAutoencoder(config)
    check_keys(ae.flux_shapes(), found, where=str(file))
    state = _read(found, list(found), _dtype(dtype), lambda _: device)
    ae.load_flux_state_dict(state, assign=True)
    return ae.eval()


def save_checkpoint(path: str | Path, model: CooperModel, vae: FluxAutoencoder, tokenizer=None,
                    dtype="bfloat16", weights_file: str = "ema.safetensors") -> None:
    """Write the released layout: network in `dtype` (bf16 like upstream), autoencoder in fp32."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = _dtype(dtype)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / weights_file), metadata={"format": "pt"})
    ae_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vae.flux_state_dict().items()}
    save_file(ae_state, str(path / AE_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
