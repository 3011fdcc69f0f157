"""Stage 2a of COOPER: supervised fine-tuning on interleaved reasoning traces.

    python -m training.sft --config training/configs/sft_small.yaml [key=value ...]
    accelerate launch --config_file training/configs/accelerate/fsdp.yaml -m training.sft --config CFG \
        init_from=runs/stage1/export data_dir=/data/COOPER_reasoning_train_set lr=5e-6 total_steps=600

A row of `Interleaved_SFT.jsonl` is a conversation: the input image, the question, the model's
turns (`need_loss: "true"`), the maps it asked for and the reflection prompt. The loss is the
next-token cross-entropy on the model's turns only (each turn's tokens after <|im_start|>, and its
<|im_end|>); the system prompt, question, reflection prompt and images are context.

The sequence is the one the inference loop builds (`cooper_model.reasoning.Reasoner`, mode
`interleave`): system prompt, input image as VAE latents then ViT patches, question, turn,
map as ViT patches only, reflection prompt, next turn, ... with the same <|im_start|>/<|im_end|>
wrapping, image resizing and RoPE positions; `tests/test_training_sft.py` checks token ids,
positions, attention splits and logits against the Reasoner's own contexts. Upstream's SFT
dataset (`interleave_reason.py`) gives the fed-back maps VAE and ViT copies while its inference
loop feeds them back as ViT only; `map_vae: true` reproduces upstream's training sequence, the
default trains on what inference shows. `InterleavedSequenceBuilder` is shared with GRPO.

A row may name another mode of the loop (`"mode": "perception"`, `"text"` or `"direct"`); its sequence
is then that mode's context: `perception` has its own system prompt, the input image as VAE then ViT,
the depth prompt and map, the segmentation prompt and map, and `<answer>` before the trained answer;
`text` and `direct` have the thinking system prompt or none, and the input image as ViT patches only.
`trace_modes` picks which of the file's rows train (the data engine writes `interleave`,
`perception` and `text` rows for the same questions; upstream's file holds `interleave` only).
`direct_rows: N` mixes N direct question-answer rows, drawn from the split's `questions.jsonl`, into
the traces: the small model has no pretrained VQA ability, which BAGEL brings to COOPER's SFT and
which its `direct` baseline measures, so the recipe trains it here.

`stage1_replay: N` trains N stage-1 examples (a depth or segmentation map generated from the RGB,
the flow-matching loss of `training.stage1`) in every step beside the text, the two losses summed
(`stage1_replay_weight` on the second). Every map reads its prompt and image through the
understanding expert, which the text loss moves; without replay the small model's SFT trial took
its maps from aligned AbsRel 0.254 to 0.291 and mIoU 0.110 to 0.066 (training/README.md).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cooper_model import image_processor as ip
from cooper_model import prompts
from cooper_model.checkpoint import load_autoencoder, load_model
from cooper_model.inference import Inferencer
from cooper_model.packing import PackedSequence, forward_packed
from cooper_model.tokenizer import load_tokenizer

from .engine import Trainer, TrainConfig, example_rng, torch_generator
from .stage1 import LatentCache

DEFAULTS = dict(
    data_dir=None,  # directory with Interleaved_SFT.jsonl
    init_from=None,  # the stage-1 checkpoint (release layout)
    autoencoder=None,  # default: init_from's
    tokenizer=None,  # default: init_from's
    freeze_vit=True,  # upstream freezes the ViT (and the autoencoder, always frozen here)
    freeze_generation=False,  # freeze *_moe_gen, the time embedder and vae2llm (see load_stage2)
    map_vae=False,  # also give fed-back maps a VAE copy (upstream's SFT sequence; not what inference does)
    export_dir=None,
    export_weights="ema",  # ema | live: which weights export_dir receives
    dtype="float32",
    trace_modes=["interleave", "perception", "text"],  # the modes of Interleaved_SFT.jsonl's rows that train
    direct_rows=0,  # direct question-answer rows from questions.jsonl mixed into the traces (base VQA)
    stage1_replay=0,  # stage-1 examples per step (all processes together) trained beside the text
    stage1_replay_weight=1.0,  # weight of their flow-matching loss (a mean per latent token)
    stage1_replay_tasks=["depth", "segmentation"],
    stage1_replay_data_dir=None,  # split with stage1.jsonl (default: data_dir)
    stage1_replay_options={},  # stage-1 options of the replayed examples, e.g. {one_step_fraction: 0.75}
)

# What a mode's context holds before the question: its system prompt, and whether the input image
# also enters as VAE latents (as `Reasoner._prefix` builds it).
SEQUENCE_MODES = {
    "interleave": (prompts.INTERLEAVE_REASON_SYSTEM_PROMPT, True),
    "perception": (prompts.IMAGE_REASON_SYSTEM_PROMPT, True),
    "text": (prompts.VLM_THINK_SYSTEM_PROMPT, False),
    "direct": (None, False),
}


# ---- the interleaved sequence ------------------------------------------------------------------------


@dataclass
class Item:
    """One entry of an interleaved conversation."""

    kind: str  # "text" | "image"
    value: object  # str, or an image (PIL or uint8 HxWx3)
    loss: bool = False  # text the model generated: a training target
    eos_label: bool = True  # whether <|im_end|> is a target too (not for a turn cut at the token limit)


def row_mode(row: dict) -> str:
    mode = row.get("mode", "interleave")
    if mode not in SEQUENCE_MODES:
        raise ValueError(f"SFT row {row.get('data_id', '?')}: mode {mode!r} is not one of {sorted(SEQUENCE_MODES)}")
    return mode


def decode_image(value: str) -> Image.Image:
    if "base64," in value:  # data-URL prefix, as COOPER's loader tolerates
        value = value.split("base64,")[1]
    return Image.open(io.BytesIO(base64.b64decode(value, validate=True))).convert("RGB")


def row_items(row: dict) -> list[Item]:
    """An `Interleaved_SFT.jsonl` row as items; malformed rows are a clear error naming the row."""
    name = row.get("data_id", "?")
    entries = row.get("interleaved_reason")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"SFT row {name}: no interleaved_reason list")
    items = []
    for k, entry in enumerate(entries):
        kind, value = entry.get("type"), entry.get("value")
        need_loss = entry.get("need_loss", "false")
        loss = need_loss is True or str(need_loss).lower() == "true"
        if kind == "text" and isinstance(value, str):
            items.append(Item("text", value, loss=loss))
        elif kind == "image" and isinstance(entry.get("path"), str):
            try:
                items.append(Item("image", Image.open(entry["path"]).convert("RGB")))
            except OSError as e:
                raise ValueError(f"SFT row {name}, item {k}: cannot read image {entry['path']} ({e})") from e
        elif kind == "image" and isinstance(value, str):
            try:
                items.append(Item("image", decode_image(value)))
            except Exception as e:
                raise ValueError(f"SFT row {name}, item {k}: not a base64 image ({e})") from e
        else:
            raise ValueError(f"SFT row {name}, item {k}: type must be text, or image with a base64 value or a path")
    if not any(i.kind == "image" for i in items):
        raise ValueError(f"SFT row {name}: no input image")
    if not any(i.loss for i in items):
        raise ValueError(f"SFT row {name}: no text with need_loss true, nothing to train on")
    return items


class InterleavedSequenceBuilder:
    """Packs a conversation as the `Reasoner` puts it into its main context (mode `interleave` by
    default). The first image is the input (VAE latents in `interleave`, then ViT patches of the
    VAE-sized image, as `Inferencer.add_image`); later images are fed-back maps (ViT only unless
    `map_vae`), resized to the VAE size first as `Reasoner._feed_back` does."""

    def __init__(self, inferencer: Inferencer, map_vae: bool = False, transforms=(None, None)):
        self.inf = inferencer
        self.map_vae = map_vae
        ctx = inferencer.new_context(*transforms)
        self.vae_transform, self.vit_transform = ctx.vae_transform, ctx.vit_transform
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:  # prompts repeat in every example
            if len(self._ids) > 4096:
                self._ids.clear()
            self._ids[text] = self.inf.encode_text(text)
        return self._ids[text]

    def build(self, items: list[Item], latent_fn, mode: str = "interleave") -> tuple[PackedSequence, list[tuple[int, int]]]:
        """`latent_fn(pixels, k)` gives the scaled VAE latent [C, h, w] of item k's pixels [3, H, W]
        in [-1, 1]. Returns the sequence and, per loss text item, its slice of `seq.label_ids`."""
        c = self.inf.config
        system_prompt, input_vae = SEQUENCE_MODES[mode]
        seq = PackedSequence(self.inf.tokens)
        spans = []
        if system_prompt is not None:
            seq.add_text(self.ids(system_prompt))
        seen_image = False
        for k, item in enumerate(items):
            if item.kind == "text":
                start = len(seq.label_ids)
                seq.add_text(self.ids(item.value), loss=item.loss)
                if item.loss:
                    if not item.eos_label:
                        seq.label_ids.pop()
                        seq.label_index.pop()
                    spans.append((start, len(seq.label_ids)))
                continue
            image = ip.resize(ip.as_pil_rgb(item.value), self.vae_transform)
            if (input_vae and not seen_image) or (seen_image and self.map_vae):
                latent = latent_fn(ip.to_tensor(image), k)
                p = c.latent_patch_size
                latent = latent[:, : latent.shape[1] // p * p, : latent.shape[2] // p * p]
                seq.add_latent_image(latent, p, c.vae.downsample, c.max_latent_size)
            seq.add_vit_image(ip.to_tensor(ip.resize(image, self.vit_transform)), c.vit.patch_size,
                              c.vit_max_num_patch_per_side)
            seen_image = True
        return seq, spans


# ---- training ------------------------------------------------------------------------------------------


class SFTObjective(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pack: dict) -> dict:
        out = forward_packed(self.model, pack["seq"])
        if "target" in pack:  # a replayed stage-1 example: the velocity error, per latent token of the share
            err = (out["velocity"].float() - pack["target"].to(out["velocity"].device)).pow(2).mean(dim=-1)
            mse = err.sum() / pack["replay_tokens"]
            return {"loss_sum": err.new_zeros(()), "loss_mean": pack["replay_weight"] * mse, "count": 0,
                    "tokens": float(pack["seq"].length), "replay_mse": mse.detach()}
        loss = F.cross_entropy(out["logits"].float(), out["labels"], reduction="sum")
        return {"loss_sum": loss, "count": out["labels"].numel(), "tokens": float(pack["seq"].length)}


def read_rows(data_dir: str | Path) -> list[dict]:
    path = Path(data_dir) / "Interleaved_SFT.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no SFT traces")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


class Stage1Replay:
    """The stage-1 examples of a step: `count` drawn from the stage-1 rows as a pure function of
    (seed, step), each process taking its share, each in a pack of its own (the packed mask is dense,
    so packing them together only costs attention), built exactly as `training.stage1` builds them."""

    def __init__(self, model, vae, tokenizer, cfg: TrainConfig, x: dict):
        from accelerate import PartialState

        from .stage1 import DEFAULTS as STAGE1_DEFAULTS
        from .stage1 import Stage1Batches
        from .stage1_data import Stage1Dataset

        options = {**STAGE1_DEFAULTS, **(x["stage1_replay_options"] or {}), "freeze_vae": True}
        unknown = set(x["stage1_replay_options"] or {}) - set(STAGE1_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown stage1_replay_options {sorted(unknown)}")
        dataset = Stage1Dataset.for_model(x["stage1_replay_data_dir"] or x["data_dir"], model.config,
                                          tasks=tuple(x["stage1_replay_tasks"]))
        state = PartialState()
        self.rank, self.world = state.process_index, state.num_processes
        self.count, self.weight, self.seed = int(x["stage1_replay"]), float(x["stage1_replay_weight"]), cfg.seed
        if self.count % self.world:
            raise ValueError(f"stage1_replay={self.count} must be a multiple of the {self.world} processes")
        # another seed than the SFT rows', so a row and a replayed example never share their noise
        self.batches = Stage1Batches(dataset, model, vae, tokenizer,
                                     dataclasses.replace(cfg, seed=cfg.seed + 1, extra=options))

    def packs(self, step: int) -> list[dict]:
        n = len(self.batches.dataset)
        chosen = np.random.default_rng([self.seed, step, 13]).choice(n, size=min(self.count, n), replace=False)
        examples = [self.batches.example(int(i), step) for i in chosen[self.rank::self.world]]
        tokens = sum(target.shape[0] for _, target in examples)
        return [{"seq": seq, "target": target, "replay_tokens": tokens, "replay_weight": self.weight}
                for seq, target in examples]


class SFTBatches:
    def __init__(self, rows: list[dict], builder: InterleavedSequenceBuilder, vae, cfg: TrainConfig,
                 replay: Stage1Replay | None = None):
        self.rows, self.builder, self.cfg, self.replay = rows, builder, cfg, replay
        self.cache = LatentCache(vae)  # each image is encoded once; every use samples the posterior

    def example(self, index: int, step: int) -> PackedSequence:
        g = torch_generator(example_rng(self.cfg.seed, step, index))
        row = self.rows[index]
        seq, _ = self.builder.build(row_items(row), lambda pixels, k: self.cache.sample((index, k), pixels, g),
                                    mode=row_mode(row))
        return seq

    def __call__(self, indices: list[int], step: int):
        packs, count, seq = [], 0, None
        for i in indices:
            one = self.example(i, step)
            if seq is not None and seq.length + one.length > self.cfg.max_tokens_per_pack:
                packs.append({"seq": seq})
                seq = None
            if seq is None:
                seq = PackedSequence(one.tokens)
            seq.extend(one)
            count += len(one.label_ids)
        packs.append({"seq": seq})
        if self.replay is not None:
            packs += self.replay.packs(step)
        return packs, count


def direct_rows(data_dir: str | Path, count: int, seed: int) -> list[dict]:
    """`count` questions of the split as direct-mode rows (image, question, the answer as the
    judge reads it), drawn without replacement in a seeded order."""
    from training.data.questions import answer_text, load_questions

    data_dir = Path(data_dir)
    questions = load_questions(data_dir)
    if count > len(questions):
        raise ValueError(f"direct_rows={count}, but {data_dir} has {len(questions)} questions")
    order = np.random.default_rng(seed).permutation(len(questions))[:count]
    return [{"data_id": f"direct_{q['qid']}", "mode": "direct", "category": q["category"], "tool": None,
             "interleaved_reason": [{"type": "image", "path": str(data_dir / q["image"])},
                                    {"type": "text", "value": q["question"]},
                                    {"type": "text", "value": answer_text(q), "need_loss": "true"}]}
            for q in (questions[i] for i in sorted(order))]


def load_stage2(x: dict):
    """Model, autoencoder and tokenizer of a stage-2 run, with the frozen parts frozen."""
    if not x["init_from"]:
        raise ValueError("init_from is required: stage 2 starts from a stage-1 checkpoint")
    model = load_model(x["init_from"], dtype=x["dtype"])
    vae = load_autoencoder(x["autoencoder"] or x["init_from"])
    tokenizer = load_tokenizer(x["tokenizer"] or x["init_from"])
    if len(tokenizer) > model.config.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.llm.vocab_size}")
    vae.requires_grad_(False)
    vae.eval()
    if x["freeze_vit"]:
        model.vit_model.requires_grad_(False)
    if x["freeze_generation"]:
        # The text loss reaches the generation expert only through the input image's latents; at
        # the small preset's from-scratch rate that would trade stage 1's maps for little. (The
        # maps still read the context through the understanding expert, which does train.)
        for name, param in model.named_parameters():
            if model.is_generation_parameter(name):
                param.requires_grad_(False)
    # fixed sin-cos tables; the velocity head takes no part in a text loss (only in stage-1 replay)
    model.latent_pos_embed.pos_embed.requires_grad_(False)
    model.vit_pos_embed.pos_embed.requires_grad_(False)
    if not x.get("stage1_replay"):
        model.llm2vae.requires_grad_(False)
    model.train()
    return model, vae, tokenizer


def options(cfg: TrainConfig, defaults: dict, what: str) -> dict:
    unknown = set(cfg.extra) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {what} options {sorted(unknown)}")
    cfg.extra = {**defaults, **cfg.extra}
    if cfg.extra["export_weights"] not in ("ema", "live"):
        raise ValueError("export_weights must be ema or live")
    return cfg.extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML of TrainConfig fields and SFT options")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML values), after the file")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    x = options(cfg, DEFAULTS, "SFT")
    if not x["data_dir"]:
        raise ValueError("data_dir is required")
    torch.manual_seed(cfg.seed)
    unknown = set(x["trace_modes"]) - set(SEQUENCE_MODES)
    if unknown:
        raise ValueError(f"trace_modes {sorted(unknown)} are not among {sorted(SEQUENCE_MODES)}")
    rows = [r for r in read_rows(x["data_dir"]) if row_mode(r) in x["trace_modes"]]
    if not rows:
        raise ValueError(f"{x['data_dir']} has no rows of the modes {x['trace_modes']}")
    traces = len(rows)
    if x["direct_rows"]:
        rows += direct_rows(x["data_dir"], int(x["direct_rows"]), cfg.seed)
    for row in rows[:16] + rows[traces:traces + 16]:  # fail on a malformed file now, not hours into the run
        row_items(row)
        row_mode(row)
    model, vae, tokenizer = load_stage2(x)
    trainer = Trainer(cfg, SFTObjective(model), len(rows))
    acc = trainer.accelerator
    vae.to(acc.device)
    acc.print(f"SFT: {traces} traces + {len(rows) - traces} direct rows + {x['stage1_replay']} stage-1 examples a step, "
              f"{trainer.num_parameters / 1e6:.2f} M trainable parameters, "
              f"{acc.num_processes} process(es), start at step {trainer.step}")
    builder = InterleavedSequenceBuilder(Inferencer(model, vae, tokenizer), map_vae=x["map_vae"])
    replay = Stage1Replay(model, vae, tokenizer, cfg, x) if x["stage1_replay"] else None
    trainer.fit(SFTBatches(rows, builder, vae, cfg, replay))
    trainer.finish(vae, tokenizer, x["export_dir"], stage="stage2a-sft", weights=x["export_weights"])

if __name__ == "__main__":
    main()
