"""COOPER's reasoning modes over an `Inferencer`, each a faithful port of an upstream routine
(COOPER `inferencer.py`; the evaluation's `reasoning_mode` in brackets):

- `interleave` (interleave, = COOPER): `interleave_reason_tool_condition`. Each turn generates text;
  `<answer>` ends it, `<depth-estimation>` / `<segmentation>` generate that map, which is fed back as
  ViT tokens (depth coloured with Spectral) followed by the reflection prompt; at most `max_turns`.
- `perception` (image, = BAGEL-PE): `image_reason_tool_condition`. Always depth, then segmentation,
  then "<answer>" and the answer.
- `text` (text, = BAGEL-RE): `text_reason` with the think system prompt, image as ViT tokens only.
- `direct`: `text_reason` without a system prompt: plain BAGEL question answering.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import image_processor as ip
from . import prompts
from .codecs import colorize_depth
from .inference import Context, ImageGenerationSettings, Inferencer, decode_depth01

MODES = ("interleave", "text", "perception", "direct")


@dataclass
class TextSettings:
    max_new_tokens: int = 4096
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0


@dataclass
class ReasoningResult:
    turns: list[str] = field(default_factory=list)
    tools_used: list[str] = field(default_factory=list)
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)
    answer: str = ""
    timings: dict = field(default_factory=dict)
    generated: list[dict] = field(default_factory=list)  # per turn, with record_tokens: sampled ids, log-probs


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None


class Reasoner:
    def __init__(self, inferencer: Inferencer, image_settings: ImageGenerationSettings, text_settings: TextSettings,
                 generator: torch.Generator | None = None, transforms=(None, None), on_event=None,
                 record_tokens: bool = False, given_maps: dict[str, np.ndarray] | None = None):
        self.inf = inferencer
        # maps the caller already has (a depth camera's, or ground truth in an evaluation), as shown
        # to the model (uint8 RGB): a tool call of that kind feeds it back instead of generating one
        self.given_maps = given_maps or {}
        self.record_tokens = record_tokens  # RL: keep each turn's sampled token ids and log-probs
        self.on_event = on_event or (lambda kind, value: None)
        self.transforms = transforms
        self.image_settings = image_settings
        self.text_settings = text_settings
        self.generator = generator
        self.result = ReasoningResult()

    def _timed(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.result.timings[name] = self.result.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def _gen_text(self, ctx: Context) -> str:
        s = self.text_settings
        trace = {"trace": {}} if self.record_tokens else {}  # only passed when recording
        text = self._timed("text_generation", self.inf.generate_text, ctx, s.max_new_tokens, s.do_sample,
                           s.temperature, s.top_p, self.generator, **trace)
        if trace:
            self.result.generated.append(trace["trace"])
        return text

    def _turn(self, text: str) -> None:
        self.result.turns.append(text)
        self.on_event("turn", text)

    def _gen_map(self, kind: str, ctx: Context, cfg_text: Context, cfg_img: Context, size) -> np.ndarray:
        """Generate a depth or segmentation map (or take the given one); returns what is shown to the
        model (uint8 RGB)."""
        if kind in self.given_maps:
            shown = self.given_maps[kind]
        else:
            h, w = size
            latents = self._timed("denoise", self.inf.generate_latents, ctx, h, w, self.image_settings, cfg_text,
                                  cfg_img, self.generator)
            image = self._timed("vae_decode", self.inf.decode_latents, latents, h, w)
            shown = colorize_depth(decode_depth01(image).cpu().numpy()) if kind == "depth" else ip.to_uint8(image)
        self.result.tools_used.append(kind)
        self.result.images.append((kind, shown))
        self.on_event("tool", kind)
        return shown

    def _feed_back(self, shown: np.ndarray, *contexts: Context) -> None:
        resized = ip.resize(ip.as_pil_rgb(shown), contexts[0].vae_transform)
        for ctx in contexts:
            self._timed("prefill", ctx.add_image, resized, vit=True, vae=False)

    def run(self, image, question: str, mode: str, max_turns: int) -> ReasoningResult:
        image = ip.resize(ip.as_pil_rgb(image), self.inf.new_context(*self.transforms).vae_transform)
        size = (image.height, image.width)
        getattr(self, f"_{mode}")(image, question, size, max_turns)
        return self.result

    def _prefix(self, system_prompt: str | None, image, question: str, vae: bool, guidance: bool = True):
        """System prompt, image, question into the main context and (for image generation) the
        image-free context; the text-free context is the main one before the question."""
        ctx = self.inf.new_context(*self.transforms)
        cfg_img = self.inf.new_context(*self.transforms) if guidance else None
        for target in (ctx, cfg_img) if guidance else (ctx,):
            if system_prompt is not None:
                self._timed("prefill", target.add_text, system_prompt)
        self._timed("prefill", ctx.add_image, image, vit=True, vae=vae, generator=self.generator)
        cfg_text = ctx.copy()
        for target in (ctx, cfg_img) if guidance else (ctx,):
            self._timed("prefill", target.add_text, question)
        return ctx, cfg_text, cfg_img

    def _interleave(self, image, question, size, max_turns):
        ctx, cfg_text, cfg_img = self._prefix(prompts.INTERLEAVE_REASON_SYSTEM_PROMPT, image, question, vae=True)
        for turn in range(1, max_turns + 1):
            text = self._gen_text(ctx)
            self._turn(text)
            if re.search(prompts.ANSWER_PATTERN, text, re.DOTALL) or turn >= max_turns:
                break
            depth = re.search(prompts.DEPTH_PATTERN, text, re.DOTALL)
            seg = re.search(prompts.SEGMENTATION_PATTERN, text, re.DOTALL)
            if not (depth or seg):
                # Upstream would regenerate from the same context; greedy decoding would repeat itself.
                if not self.text_settings.do_sample:
                    break
                continue
            call = depth or seg
            cfg_text = ctx.copy()
            self._timed("prefill", cfg_text.add_text, text.replace(call.group(0), ""))
            self._timed("prefill", ctx.add_text, text)
            self._timed("prefill", cfg_img.add_text, text)
            shown = self._gen_map("depth" if depth else "segmentation", ctx, cfg_text, cfg_img, size)
            self._feed_back(shown, ctx, cfg_img)
            self._timed("prefill", ctx.add_text, prompts.REFLECTION_PROMPT)
            self._timed("prefill", cfg_img.add_text, prompts.REFLECTION_PROMPT)
        self.result.answer = self.result.turns[-1].strip() if self.result.turns else ""

    def _perception(self, image, question, size, max_turns):
        ctx, cfg_text, cfg_img = self._prefix(prompts.IMAGE_REASON_SYSTEM_PROMPT, image, question, vae=True)
        for kind, prompt in (("depth", prompts.DEPTH_PROMPT), ("segmentation", prompts.SEGMENTATION_PROMPT)):
            cfg_text = ctx.copy()
            self._timed("prefill", cfg_img.add_text, prompt)
            self._timed("prefill", ctx.add_text, prompt)
            shown = self._gen_map(kind, ctx, cfg_text, cfg_img, size)
            self._feed_back(shown, ctx, cfg_img)
        self._timed("prefill", ctx.add_text, "<answer>")
        text = "<answer>" + self._gen_text(ctx)
        self._turn(text)
        self.result.answer = text.strip()

    def _text(self, image, question, size, max_turns, system_prompt=prompts.VLM_THINK_SYSTEM_PROMPT):
        ctx, _, _ = self._prefix(system_prompt, image, question, vae=False, guidance=False)
        text = self._gen_text(ctx)
        self._turn(text)
        self.result.answer = text.split("</think>")[-1].strip()

    def _direct(self, image, question, size, max_turns):
        self._text(image, question, size, max_turns, system_prompt=None)
