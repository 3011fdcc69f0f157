"""`CooperPipeline`: the one API the ROS node, the benchmarks and the evaluation use.

    pipe = CooperPipeline.from_pretrained(path, device="cuda", dtype="bfloat16")
    pipe.depth(rgb).relative        # HxW float32 in [0, 1], larger = farther, input resolution
    pipe.depth(rgb).depth           # metres (HxW float32) if `pipe.depth_is_metric`, else None
    pipe.segment(rgb).raw           # HxWx3 uint8 colours as generated
    pipe.segment(rgb).labels        # class ids (HxW uint16) if `pipe.has_palette`, else None
    pipe.ask(rgb, "How far is the chair from the table?", mode="interleave").boxed_answer

Inputs are uint8 HxWx3 RGB arrays (or PIL images) of any size; resizing to the model's sizes and
back is done here. Settings default to COOPER's evaluation setup, then to the checkpoint's own
`pipeline_defaults`, then to what the call overrides.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import image_processor as ip
from . import prompts
from .checkpoint import CheckpointError, load_autoencoder, load_model, read_config
from .codecs import DepthCodec, SegmentationCodec, colorize_depth
from .config import CooperConfig, ImageTransformConfig
from .image_processor import CooperInputError
from .inference import GenerationInterrupted, ImageGenerationSettings, Inferencer, check_stop, decode_depth01
from .reasoning import MODES, Reasoner, TextSettings, extract_boxed
from .tokenizer import load_tokenizer

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "cooper-small"

# COOPER's own settings per task: its depth evaluation (`depth_map_generation`), its ADE20K
# evaluation (`image_generation_edit`, 50 steps), and the VLMEvalKit config for question answering
# (`BagelInference` defaults: 4,096 tokens a turn for COOPER and BAGEL-RE).
TASK_DEFAULTS = {
    "depth": dict(num_steps=50, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "segment": dict(num_steps=50, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "ask": dict(num_steps=50, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
}
# Token budget a turn per reasoning mode, as a cap on the defaults a call does not override: the
# evaluation config gives BAGEL-PE (perception mode) `max_think_token_n` 256.
MODE_MAX_NEW_TOKENS = {"perception": 256}


@dataclass
class Settings(ImageGenerationSettings):
    """Everything one call may override: the image-generation settings plus these."""

    seed: int | None = 0
    vae_resolution: int | None = None  # long-edge limit; None = the checkpoint's transform
    vit_resolution: int | None = None
    max_new_tokens: int = 4096
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0

    def validate(self) -> None:
        if not 2 <= self.num_steps <= 1000:
            raise CooperInputError(f"num_steps must be in [2, 1000], got {self.num_steps}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise CooperInputError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.cfg_renorm_type not in ("global", "channel", "text_channel"):
            raise CooperInputError(f"unknown cfg_renorm_type {self.cfg_renorm_type!r}")
        if self.timestep_shift <= 0 or self.cfg_text_scale < 0 or self.cfg_img_scale < 0:
            raise CooperInputError("timestep_shift must be > 0 and CFG scales >= 0")
        if self.max_new_tokens < 1:
            raise CooperInputError("max_new_tokens must be >= 1")
        try:
            self.check_knobs()
        except ValueError as exc:
            raise CooperInputError(str(exc)) from None


@dataclass
class DepthOutput:
    relative: np.ndarray  # float32 HxW in [0, 1], the decoded pseudo-image; larger = farther
    depth: np.ndarray | None  # float32 HxW metres, -inf/+inf nearer/farther than the range (REP 118);
    #                           None unless the checkpoint's depth is metric
    colored: np.ndarray  # uint8 HxWx3 Spectral visualisation of `relative`
    timings: dict = field(default_factory=dict)


@dataclass
class SegmentationOutput:
    raw: np.ndarray  # uint8 HxWx3 colours as generated (NEAREST-resized to the input)
    labels: np.ndarray | None  # uint16 HxW class ids (nearest palette colour); None without a palette
    color: np.ndarray | None  # uint8 HxWx3 palette colours of `labels`; None without a palette
    timings: dict = field(default_factory=dict)


@dataclass
class AskOutput:
    answer: str
    boxed_answer: str | None
    turns: list[str]
    tools_used: list[str]
    images: list[tuple[str, np.ndarray]]
    mode: str
    timings: dict = field(default_factory=dict)


class CooperPipeline:
    def __init__(self, inferencer: Inferencer, config: CooperConfig):
        self.inferencer = inferencer
        self.config = config
        self.depth_codec = DepthCodec(*config.depth_range)
        # Released checkpoints declare no palette: their segmentation is colours without labels.
        self.segmentation_codec = None if config.palette is None else SegmentationCodec(
            np.asarray(config.palette, dtype=np.uint8), config.class_names)
        self.max_question_chars = 8192
        self.max_image_pixels = 40_000_000
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path = BUNDLED_CHECKPOINT, device: str | torch.device = "cpu",
                        dtype="float32", backend: str | list[str] = "eager", device_map=None, tokenizer=None,
                        vae_dtype=None, backend_options: dict | None = None) -> "CooperPipeline":
        """Load a checkpoint directory (see `checkpoint.py`). `backend`: what runs the denoise
        loop and the VAE decode, one of `backends.BACKENDS` or a fallback chain such as
        "tensorrt,onnxruntime,eager" (a list works too): the first that runs here is used
        (`pipe.backend`), the reasons for skipping the others are logged (`pipe.backend_notes`).
        `backend_options`: {backend name: keyword arguments}. `device_map`: None, "auto" or a
        dict {module name: device}."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = read_config(path)
        model = load_model(path, config, device=device, dtype=dtype, device_map=device_map)
        vae = load_autoencoder(path, device=model.device, dtype=vae_dtype or dtype)
        tokenizer = tokenizer or load_tokenizer(path)
        pipe = cls(Inferencer(model, vae, tokenizer), config)
        pipe.use_backend(backend, backend_options)
        return pipe

    def use_backend(self, backend: str | list[str] = "eager", options: dict | None = None) -> str:
        """Switch what runs the denoise loop and the VAE decode (see `from_pretrained`)."""
        from .backends import select_backend

        chosen = select_backend(backend, self.inferencer, options)
        with self._lock:  # never under a call that is running
            self.inferencer.backend = chosen
        return self.backend

    @property
    def backend(self) -> str:
        return self.inferencer.backend.name

    @property
    def backend_notes(self) -> list[str]:
        return list(self.inferencer.backend.notes)

    # Properties the node shows -----------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return bool(self.config.trained)

    @property
    def reasoning_trained(self) -> bool:
        """Whether answers mean anything: the weights went through stage 2 (or are released ones)."""
        stages = self.config.trained_stages
        return self.is_trained and (stages is None or any(s.startswith("stage2") for s in stages))

    @property
    def depth_range(self) -> tuple[float, float]:
        return tuple(self.config.depth_range)

    @property
    def depth_is_metric(self) -> bool:
        """Whether `DepthOutput.depth` is metres (else None: only the relative map exists)."""
        return self.config.depth_kind == "metric"

    @property
    def has_palette(self) -> bool:
        """Whether the checkpoint declares segmentation classes (else no labels, names, palette)."""
        return self.segmentation_codec is not None

    @property
    def class_names(self) -> list[str] | None:
        return self.segmentation_codec.class_names if self.has_palette else None

    @property
    def palette(self) -> np.ndarray | None:
        """uint8 [K, 3]: the colour of class k in row k."""
        return self.segmentation_codec.palette if self.has_palette else None

    @property
    def device(self) -> torch.device:
        return self.inferencer.device

    # Settings -----------------------------------------------------------------------------------
    def settings(self, task: str, **overrides) -> Settings:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise CooperInputError(f"unknown settings {sorted(unknown)}")
        values = dict(TASK_DEFAULTS[task])
        values.update(self.config.pipeline_defaults)
        values.update({k: v for k, v in overrides.items() if v is not None or k == "seed"})
        values["cfg_interval"] = tuple(values["cfg_interval"])
        s = Settings(**values)
        s.validate()
        return s

    def _transforms(self, s: Settings) -> tuple[ImageTransformConfig, ImageTransformConfig]:
        vae, vit = self.config.vae_transform, self.config.vit_transform
        if s.vae_resolution:
            vae = dataclasses.replace(vae, max_size=int(s.vae_resolution), min_size=min(vae.min_size, int(s.vae_resolution)))
        if s.vit_resolution:
            vit = dataclasses.replace(vit, max_size=int(s.vit_resolution), min_size=min(vit.min_size, int(s.vit_resolution)))
        return vae, vit

    def _check_image(self, rgb) -> Image.Image:
        image = ip.as_pil_rgb(rgb)
        if image.width * image.height > self.max_image_pixels:
            raise CooperInputError(f"image {image.width}x{image.height} exceeds {self.max_image_pixels} pixels")
        return image

    def _run(self, s: Settings, fn):
        """One call: its own seeded generator; calls from several threads take turns on the device."""
        generator = torch.Generator().manual_seed(int(s.seed)) if s.seed is not None else None
        with self._lock, torch.inference_mode():
            return fn(generator)

    def _generate_map(self, image: Image.Image, prompt: str, s: Settings, generator, should_stop=None):
        """Upstream `depth_map_generation` / `segmentation_generation`: [image, prompt] -> image.
        ``should_stop()`` is asked after the prefill, before each denoising step and before the
        decode; when it says True the call raises `GenerationInterrupted` (nothing is returned)."""
        inf, timings = self.inferencer, {}
        start = time.perf_counter()
        ctx, cfg_img = inf.new_context(*self._transforms(s)), inf.new_context(*self._transforms(s))
        resized = ip.resize(image, ctx.vae_transform)
        ctx.add_image(resized, vit=True, vae=True, generator=generator)
        cfg_text = ctx.copy()
        ctx.add_text(prompt)
        cfg_img.add_text(prompt)
        timings["prefill"] = time.perf_counter() - start
        start = time.perf_counter()
        latents = inf.generate_latents(ctx, resized.height, resized.width, s, cfg_text,
                                       cfg_img, generator, should_stop=should_stop)
        timings["denoise"] = time.perf_counter() - start
        check_stop(should_stop)
        start = time.perf_counter()
        decoded = inf.decode_latents(latents, resized.height, resized.width)
        timings["vae_decode"] = time.perf_counter() - start
        return decoded, timings

    # Tasks ----------------------------------------------------------------------------------------
    def depth(self, rgb, should_stop=None, **overrides) -> DepthOutput:
        """Depth of an RGB image. ``should_stop``: an optional callable asked between the stages of
        the generation; True stops it with `GenerationInterrupted` (e.g. a question is waiting)."""
        image = self._check_image(rgb)
        s = self.settings("depth", **overrides)
        start = time.perf_counter()
        decoded, timings = self._run(s, lambda g: self._generate_map(image, prompts.DEPTH_PROMPT, s, g, should_stop))
        relative = decode_depth01(decoded)[None, None]
        relative = torch.nn.functional.interpolate(relative, size=(image.height, image.width), mode="bilinear",
                                                   align_corners=False)[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32)
        metres = self.depth_codec.from_unit(relative) if self.depth_is_metric else None
        timings["total"] = time.perf_counter() - start
        return DepthOutput(relative, metres, colorize_depth(relative), timings)

    def segment(self, rgb, should_stop=None, **overrides) -> SegmentationOutput:
        """Segmentation colour map of an RGB image; ``should_stop`` as in :meth:`depth`."""
        image = self._check_image(rgb)
        s = self.settings("segment", **overrides)
        start = time.perf_counter()
        decoded, timings = self._run(s, lambda g: self._generate_map(image, prompts.SEGMENTATION_PROMPT, s, g, should_stop))
        raw = np.asarray(Image.fromarray(ip.to_uint8(decoded)).resize(image.size, Image.NEAREST))
        labels = color = None
        if self.has_palette:
            labels = self.segmentation_codec.decode(raw)
            color = self.segmentation_codec.encode(labels)
        timings["total"] = time.perf_counter() - start
        return SegmentationOutput(raw, labels, color, timings)

    def ask(self, rgb, question: str, mode: str = "interleave", max_turns: int = 3, on_event=None,
            depth_m: np.ndarray | None = None, labels: np.ndarray | None = None, **overrides) -> AskOutput:
        """Answer a question about an image. `on_event(kind, value)`, if given, is called as the
        reasoning goes: ("turn", text) after each generated turn, ("tool", "depth"|"segmentation")
        after each map; clients that stream progress use it. Perception mode thinks at most 256
        tokens a turn (`MODE_MAX_NEW_TOKENS`) unless the call sets `max_new_tokens`.
        `depth_m` (metres, HxW as the image, non-finite = unknown) and `labels` (class ids, HxW):
        maps the caller already has, from a depth camera or ground truth; a tool call shows them,
        coloured as a generated map would be, instead of generating one."""
        image = self._check_image(rgb)
        given = {}
        for kind, value in (("depth", depth_m), ("segmentation", labels)):
            if value is None:
                continue
            value = np.asarray(value)
            if value.shape != (image.height, image.width):
                raise CooperInputError(f"{kind} map is {value.shape}; the image is {(image.height, image.width)}")
            if kind == "segmentation" and not self.has_palette:
                raise CooperInputError("this checkpoint has no segmentation palette to show labels with")
            given[kind] = (colorize_depth(self.depth_codec.normalize(value))
                           if kind == "depth" else self.segmentation_codec.encode(value.astype(np.int64)))
        if not isinstance(question, str) or not question.strip():
            raise CooperInputError("question is empty")
        if len(question) > self.max_question_chars:
            raise CooperInputError(f"question has {len(question)} characters; the limit is {self.max_question_chars}")
        if mode not in MODES:
            raise CooperInputError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if not 1 <= int(max_turns) <= 16:
            raise CooperInputError(f"max_turns must be in [1, 16], got {max_turns}")
        s = self.settings("ask", **overrides)
        if mode in MODE_MAX_NEW_TOKENS and overrides.get("max_new_tokens") is None:
            s.max_new_tokens = min(s.max_new_tokens, MODE_MAX_NEW_TOKENS[mode])
        text = TextSettings(s.max_new_tokens, s.do_sample, s.temperature, s.top_p)
        start = time.perf_counter()
        result = self._run(s, lambda g: Reasoner(self.inferencer, s, text, g, self._transforms(s), on_event,
                                                 given_maps=given).run(image, question, mode, int(max_turns)))
        result.timings["total"] = time.perf_counter() - start
        return AskOutput(result.answer, extract_boxed(result.answer), result.turns, result.tools_used,
                         result.images, mode, result.timings)
