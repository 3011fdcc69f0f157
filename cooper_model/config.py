"""Configuration of the COOPER/BAGEL model, read from and written to a checkpoint directory.

A checkpoint directory holds upstream's two config files (`llm_config.json`, `vit_config.json`,
Qwen2 and SigLIP fields before the loader's overrides) and, optionally, `cooper_config.json` with
what upstream hard-codes in its loader (latent patch size, table sizes, transforms) plus what this
project adds (depth range and kind, segmentation palette, pipeline defaults, whether the weights are
trained). Released checkpoints have no `cooper_config.json`; then the upstream loader's values are used.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Qwen2Config, SiglipVisionConfig

LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
COOPER_CONFIG_FILE = "cooper_config.json"
# "metric": the depth pseudo-image is metres scaled by one fixed `depth_range` (the project's
# synthetic data). "relative": it is not; released COOPER learned each dataset normalised by its own
# range (vKITTI to 80 m, Hypersim to 65 m) under one prompt, and upstream evaluates it only after a
# least-squares scale and shift.
DEPTH_KINDS = ("metric", "relative")


@dataclass
class AutoencoderConfig:
    """The FLUX autoencoder (`modeling/autoencoder.py` upstream); scale and shift are constants."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    # FLUX: GroupNorm(32) over 128 channels, 4 channels a group. A narrow autoencoder keeps that
    # ratio: at 32 channels, 32 groups would be instance norm, which erases every image's mean
    # level before the output convolution (a flat wall at 1 m and at 3 m would decode alike).
    norm_num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class ImageTransformConfig:
    """Upstream `ImageTransform(max_size, min_size, stride)`: long edge <= max, short edge >= min."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


@dataclass
class CooperConfig:
    llm: Qwen2Config
    vit: SiglipVisionConfig  # as stored: `num_hidden_layers` counts the layer the loader drops
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    # COOPER's evaluation transforms (VLMEvalKit `bagel_inference.py`): VAE 1024/512/16, ViT 518/224/14.
    vae_transform: ImageTransformConfig = field(default_factory=lambda: ImageTransformConfig(1024, 512, 16))
    vit_transform: ImageTransformConfig = field(default_factory=lambda: ImageTransformConfig(518, 224, 14))
    # Metric range of the depth pseudo-image. Released COOPER mixes Hypersim [1e-5, 65] (45% of
    # stage 1) and vKITTI [1e-5, 80]; Hypersim's range is the default for released checkpoints.
    depth_range: tuple[float, float] = (1e-5, 65.0)
    depth_kind: str = "relative"
    # Segmentation classes, one colour each. Released checkpoints declare none: their maps are
    # colour images without labels.
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    pipeline_defaults: dict = field(default_factory=dict)
    trained: bool = True
    # Which training stages the weights went through, e.g. ["stage1"]: maps are trained, answers
    # not yet. None = all of them (released checkpoints).
    trained_stages: list[str] | None = None
    name: str = "bagel"

    def __post_init__(self):
        if self.depth_kind not in DEPTH_KINDS:
            raise ValueError(f"depth_kind must be one of {DEPTH_KINDS}, got {self.depth_kind!r}")
        if self.class_names is not None and self.palette is None:
            raise ValueError("class_names without a palette: a label needs its colour")
        if self.class_names is not None and len(self.class_names) != len(self.palette):
            raise ValueError(f"{len(self.class_names)} class names for {len(self.palette)} palette colours")

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def num_vit_layers(self) -> int:
        # Upstream uses the penultimate SigLIP layer by instantiating one layer fewer.
        return self.vit.num_hidden_layers - 1

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    # Files ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CooperConfig":
        path = Path(path)
        for name in (LLM_CONFIG_FILE, VIT_CONFIG_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing checkpoint config file")
        llm = Qwen2Config.from_json_file(str(path / LLM_CONFIG_FILE))
        vit = SiglipVisionConfig.from_json_file(str(path / VIT_CONFIG_FILE))
        extra = {}
        if (path / COOPER_CONFIG_FILE).is_file():
            extra = json.loads((path / COOPER_CONFIG_FILE).read_text())
        return cls._build(llm, vit, extra)

    @classmethod
    def _build(cls, llm: Qwen2Config, vit: SiglipVisionConfig, extra: dict) -> "CooperConfig":
        extra = dict(extra)
        if "vae" in extra:
            vae = dict(extra.pop("vae"))
            vae["ch_mult"] = tuple(vae["ch_mult"])
            extra["vae"] = AutoencoderConfig(**vae)
        for key in ("vae_transform", "vit_transform"):
            if key in extra:
                extra[key] = ImageTransformConfig(**extra[key])
        if "depth_range" in extra:
            extra["depth_range"] = tuple(extra["depth_range"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"{COOPER_CONFIG_FILE}: unknown keys {sorted(unknown)}")
        try:
            return cls(llm=llm, vit=vit, **extra)
        except ValueError as e:
            raise ValueError(f"{COOPER_CONFIG_FILE}: {e}") from None

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.llm.to_json_file(str(path / LLM_CONFIG_FILE), use_diff=False)
        self.vit.to_json_file(str(path / VIT_CONFIG_FILE), use_diff=False)
        extra = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("llm", "vit")}
        extra["vae"] = dataclasses.asdict(self.vae)
        extra["vae_transform"] = dataclasses.asdict(self.vae_transform)
        extra["vit_transform"] = dataclasses.asdict(self.vit_transform)
        (path / COOPER_CONFIG_FILE).write_text(json.dumps(extra, indent=2) + "\n")


# Presets ---------------------------------------------------------------------------------------

def _qwen2(**kw) -> Qwen2Config:
    base = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=False, attention_dropout=0.0)
    base.update(kw)
    return Qwen2Config(**base)


def _siglip(**kw) -> SiglipVisionConfig:
    base = dict(num_channels=3, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                attention_dropout=0.0)
    base.update(kw)
    return SiglipVisionConfig(**base)


def preset(name: str) -> CooperConfig:
    """Known sizes: `bagel-7b` (the released BAGEL-7B-MoT / COOPER), `bagel-tiny` (upstream's
    test configuration, `reference/bagel-tiny-ckpt`) and `cooper-small` (the bundled checkpoint)."""
    if name == "bagel-7b":
        return CooperConfig(
            llm=_qwen2(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, bos_token_id=151643, eos_token_id=151645),
            vit=_siglip(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=980),
            name=name,
        )
    if name == "bagel-tiny":
        return CooperConfig(
            llm=_qwen2(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=256, eos_token_id=258),
            vit=_siglip(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=98),
            vae=AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
            max_latent_size=8,
            vit_max_num_patch_per_side=7,
            vae_transform=ImageTransformConfig(128, 64, 16),
            vit_transform=ImageTransformConfig(98, 42, 14),
            name=name,
            trained=False,
        )
    if name == "cooper-small":
        # The bundled checkpoint, trained by `training/` on the synthetic data engine (model card:
        # checkpoints/cooper-small/README.md). Sized from measured CPU throughput: a 192 px map
        # in well under a second on 2 cores, yet wide enough to learn the scenes. Vocabulary: a
        # 2,048-entry byte-level BPE trained on the project's text (`training.tokenizer`).
        return CooperConfig(
            llm=_qwen2(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=6, num_key_value_heads=2, bos_token_id=1, eos_token_id=2),
            vit=_siglip(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                        image_size=224),
            vae=AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=8),
            max_latent_size=16,
            vit_max_num_patch_per_side=16,
            vae_transform=ImageTransformConfig(192, 96, 16),
            vit_transform=ImageTransformConfig(168, 84, 14),
            depth_range=(1e-3, 10.0),  # NYUv2's indoor range, as the synthetic data engine
            depth_kind="metric",  # the synthetic data is metric, under that one range
            pipeline_defaults=dict(num_steps=8, max_new_tokens=96),
            name=name,
            trained=False,
        )
    raise ValueError(f"unknown preset {name!r}; known: bagel-7b, bagel-tiny, cooper-small")

