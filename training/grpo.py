"""Stage 2b of COOPER: GRPO with the CPR reward (upstream `train/grpo/interleave_grpo.py` and
`bagel_interleave_grpo_trainer.py`).

    python -m training.grpo --config training/configs/grpo_small.yaml [key=value ...]

A step takes `batch_size` questions of `RL_data.jsonl`. For each, `num_generations` rollouts run
the real interleaved loop (`Reasoner`, mode `interleave`) with temperature sampling; a rollout that
asks for depth or segmentation generates the map inside the rollout and reasons over it. Each
rollout is scored (`training.rewards`: answer judge + format + group-level exploration), and its
advantage is (r - group mean) / (group std + 1e-4).

The policy is the text the model wrote: the rollout is rebuilt as one packed sequence, exactly as
the loop's context held it (`InterleavedSequenceBuilder`, the same VAE sample of the input image,
the fed-back maps as ViT patches), and one forward recomputes the log-probabilities of the model's
turns at the sampling temperature. Images are context, never actions. The loss per token is
TRL's clipped surrogate -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) (+ beta KL to the initial
model when beta > 0; upstream beta = 0), summed over tokens and divided by the step's token count
(TRL's "bnpo"). With one optimisation pass per batch of rollouts (upstream's num_iterations = 1),
the old log-probabilities are the recomputed ones, detached (rho = 1 in value). The sampling
log-probabilities recorded during the rollout are compared with the recomputed ones and the mean
gap is logged: it is what proves the recomputation is the rollout's policy.

Turns the loop discards (neither a tool call nor an answer, regenerated from the same context) are
scored by the format reward but carry no gradient: no later turn saw them. Rollouts whose
advantage is 0 (all rewards of the group equal) are not forwarded when beta = 0: their gradient is
exactly 0, and their tokens still count in the normaliser, as in TRL.

Every process takes whole questions, so group statistics need no communication; the logged
rollout statistics are summed over processes. Rollouts run on the unwrapped model, so this trainer
runs on one process or DDP; FSDP and ZeRO-3 would need their parameters gathered for generation,
which is not implemented (see training/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cooper_model import prompts
from cooper_model.inference import ImageGenerationSettings, Inferencer
from cooper_model.packing import PackedSequence, forward_packed
from cooper_model.reasoning import Reasoner, TextSettings

from . import rewards as R
from .engine import Trainer, TrainConfig, example_rng
from .sft import InterleavedSequenceBuilder, Item, load_stage2, options

DEFAULTS = dict(
    data_dir=None,  # RL_data.jsonl (and questions.jsonl for the rule judge)
    image_root=None,  # images of RL_data.jsonl are relative to it (default: data_dir)
    init_from=None,  # the SFT checkpoint
    autoencoder=None,
    tokenizer=None,
    freeze_vit=True,
    freeze_generation=False,  # as SFT: freeze the generation expert, so rollouts draw stage 1's maps
    dtype="float32",
    # rollouts (upstream: 8 generations, temperature 1, top-p 1, 4096 tokens a turn, 3 turns, 30 steps)
    num_generations=8,
    temperature=1.0,
    top_p=1.0,
    max_think_tokens=4096,
    max_turns=3,
    num_steps=30,
    timestep_shift=3.0,
    cfg_text_scale=4.0,
    cfg_img_scale=2.0,
    cfg_interval=[0.4, 1.0],
    cfg_renorm_type="global",
    # objective
    epsilon=0.2,
    epsilon_high=None,  # None: symmetric clip
    beta=0.0,
    # reward
    reward_weights={"answer": 1.0, "format": 1.0, "exploration": 1.0},
    exploration_threshold=3,
    exploration_bonus=0.2,
    judge="rule",  # rule | llm
    judge_base_url=None,
    judge_model=None,
    judge_api_key_env="OPENAI_API_KEY",
    judge_retries=5,
    judge_timeout=30.0,
    export_dir=None,
    export_weights="live",  # TRL keeps no EMA; the live weights are the trained policy
    log_rollouts=True,  # rollouts.jsonl: every rollout of the main process, text and rewards
)

STATS = ("reward", "reward_answer", "reward_format", "reward_exploration", "reward_std", "accuracy",
         "tool_call_rate", "depth_per_rollout", "segmentation_per_rollout", "explore_called_rate",
         "answered_rate", "turns_per_rollout", "discarded_turns_per_rollout", "truncated_turn_rate",
         "retokenized_turn_rate", "completion_tokens", "zero_advantage_groups", "judge_failures", "rollout_seconds")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                   vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(logits / T)[label] over the first `vocab_size` ids: the distribution the rollout
    sampled from (`Inferencer.generate_text` samples among the tokenizer's ids only)."""
    logits = logits[:, :vocab_size] if vocab_size else logits
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[:, None])[:, 0]


def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                 epsilon_high: float, ref_logp: torch.Tensor | None = None, beta: float = 0.0):
    """Per-token GRPO loss (TRL): -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta KL, with
    rho = exp(logp - old_logp) and KL the k3 estimate exp(ref - logp) - (ref - logp) - 1.
    Returns the per-token loss and a mask of the clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if beta:
        delta = ref_logp - logp
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    is_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, is_clipped


class GRPOObjective(nn.Module):
    def __init__(self, model, x: dict, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size  # the sampler's candidates: the tokenizer's ids
        self.temperature = x["temperature"]
        self.epsilon = x["epsilon"]
        self.epsilon_high = x["epsilon_high"] if x["epsilon_high"] is not None else x["epsilon"]
        self.beta = x["beta"]

    def forward(self, pack: dict) -> dict:
        out = forward_packed(self.model, pack["seq"])
        if "logits" not in out:  # a rollout cut before its first token: nothing to learn, still one backward
            return {"loss_sum": out["hidden"].sum() * 0.0, "count": 0, "logprob_gap": 0.0, "clip_fraction": 0.0,
                    **pack.get("stats", {})}
        logp = token_logprobs(out["logits"], out["labels"], self.temperature, self.vocab_size)
        old = logp.detach()  # one pass over each batch of rollouts (num_iterations = 1)
        adv = pack["advantages"].to(logp.device)
        loss, is_clipped = clipped_loss(logp, old, adv, self.epsilon, self.epsilon_high,
                                        pack.get("ref_logp"), self.beta)
        result = {"loss_sum": loss.sum(), "count": logp.numel()}
        # partial means over this process's step, so that summing over its packs gives the mean
        sampled = pack["sampled_logp"].to(logp.device)
        matched = ~torch.isnan(sampled)
        result["logprob_gap"] = float((logp.detach()[matched] - sampled[matched]).abs().sum()) / pack["step_matched"]
        result["clip_fraction"] = float(is_clipped.sum()) / pack["step_tokens"]
        result.update(pack.get("stats", {}))
        return result


# ---- rollouts -----------------------------------------------------------------------------------------


def read_rl_rows(data_dir: str | Path) -> list[dict]:
    path = Path(data_dir) / "RL_data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no RL questions")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"question", "answer", "image", "data_id"} - set(row)
            if missing:
                raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
            row.setdefault("flag", "boundary")
            if row["flag"] not in R.FLAGS:
                raise ValueError(f"{path}:{n}: flag {row['flag']!r} is not one of {R.FLAGS}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def rollout_items(image, question: str, result, events: list[str]) -> tuple[list[Item], int]:
    """The conversation the loop's main context held, from the Reasoner's result and event order:
    a turn followed by a map was added with the map and the reflection prompt; the final turn is
    the last action; any other turn was discarded. Returns the items and the discarded count."""
    items = [Item("image", image), Item("text", question)]
    maps = iter(shown for _, shown in result.images)
    turns = iter(zip(result.turns, result.generated))
    discarded = 0
    for j, kind in enumerate(events):
        if kind != "turn":
            continue
        text, trace = next(turns)
        following = events[j + 1] if j + 1 < len(events) else None
        if following == "tool":
            items += [Item("text", text, loss=True, eos_label=trace["finished"]), Item("image", next(maps)),
                      Item("text", prompts.REFLECTION_PROMPT)]
        elif following is None:
            items.append(Item("text", text, loss=True, eos_label=trace["finished"]))
        else:
            discarded += 1
    return items, discarded


class GRPOBatches:
    """Rollouts, rewards and advantages of a step's questions, and the packed sequences to train on."""

    def __init__(self, rows: list[dict], model, ref_model, vae, tokenizer, judge, cfg: TrainConfig):
        self.rows, self.model, self.ref_model, self.vae, self.judge, self.cfg = rows, model, ref_model, vae, judge, cfg
        self.x = x = cfg.extra
        self.image_root = Path(x["image_root"] or x["data_dir"])
        self.inferencer = Inferencer(model, vae, tokenizer)
        self.builder = InterleavedSequenceBuilder(self.inferencer)
        self.image_settings = ImageGenerationSettings(
            num_steps=x["num_steps"], timestep_shift=x["timestep_shift"], cfg_text_scale=x["cfg_text_scale"],
            cfg_img_scale=x["cfg_img_scale"], cfg_interval=tuple(x["cfg_interval"]), cfg_renorm_type=x["cfg_renorm_type"])
        self.text_settings = TextSettings(max_new_tokens=x["max_think_tokens"], do_sample=True,
                                          temperature=x["temperature"], top_p=x["top_p"])
        self.weights = {"answer": 1.0, "format": 1.0, "exploration": 1.0, **x["reward_weights"]}
        self.accelerator = None  # set by main(): statistics are summed over processes
        self.rollout_log = None

    def image(self, row: dict) -> Image.Image:
        path = self.image_root / row["image"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image of RL question {row['data_id']} (check image_root)")
        return Image.open(path).convert("RGB")

    @torch.no_grad()
    def rollout(self, image, question: str, seed: int):
        events = []
        reasoner = Reasoner(self.inferencer, self.image_settings, self.text_settings,
                            torch.Generator().manual_seed(seed), on_event=lambda kind, value: events.append(kind),
                            record_tokens=True)
        return reasoner.run(image, question, "interleave", self.x["max_turns"]), events

    @torch.no_grad()
    def input_latent(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """The VAE sample the rollout drew: its generator's first draw is the input image's latent."""
        device = self.model.device
        return self.vae.encode(pixels[None].to(device), sample=True, generator=torch.Generator().manual_seed(seed))[0]

    def sequence(self, image, question, result, events, seed):
        items, discarded = rollout_items(image, question, result, events)
        seq, spans = self.builder.build(items, lambda pixels, k: self.input_latent(pixels, seed))
        sampled = torch.full((len(seq.label_ids),), float("nan"))
        retokenized = 0
        actions = [t for t, e in zip(result.generated, self._turn_fates(events)) if e]
        for (a, b), trace in zip(spans, actions):
            ids, m = seq.label_ids[a:b], 0
            while m < min(len(ids), len(trace["ids"])) and ids[m] == trace["ids"][m]:
                m += 1
            retokenized += m < len(ids) or m < len(trace["ids"])
            sampled[a:a + m] = torch.tensor(trace["logprobs"][:m])
        return seq, sampled, discarded, retokenized

    @staticmethod
    def _turn_fates(events: list[str]) -> list[bool]:
        """Per turn: whether it is an action in the rebuilt sequence (not discarded)."""
        fates = []
        for j, kind in enumerate(events):
            if kind == "turn":
                following = events[j + 1] if j + 1 < len(events) else None
                fates.append(following in ("tool", None))
        return fates

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return values
        t = acc.reduce(torch.tensor([values[k] for k in values], dtype=torch.float64, device=acc.device), "sum")
        return dict(zip(values, t.cpu().tolist()))

    def __call__(self, indices: list[int], step: int):
        x, G = self.x, self.x["num_generations"]
        start = time.time()
        was_training = self.model.training
        self.model.eval()
        sums = {k: 0.0 for k in ("reward", "answer", "format", "exploration", "group_std", "accuracy", "tool", "depth",
                                 "segmentation", "called", "answered", "turns", "discarded", "truncated",
                                 "retokenized", "tokens", "zero_groups", "groups", "rollouts")}
        failures_before = self.judge.failures
        samples = []  # (seq, sampled logprobs, advantage) per rollout
        log_lines = []
        for index in indices:
            row = self.rows[index]
            rng = example_rng(self.cfg.seed, step, index)
            seeds = [int(s) for s in rng.integers(2**62, size=G)]
            image = self.image(row)
            outs = [self.rollout(image, row["question"], s) for s in seeds]
            turns = [r.turns for r, _ in outs]
            acc_r = np.asarray(self.judge([row] * G, [R.final_answer(t) for t in turns]))
            fmt_r = np.asarray([R.format_reward(t) for t in turns])
            called = [R.called_tool(t) for t in turns]
            exp_r = np.asarray(R.exploration_rewards(called, row["flag"], x["exploration_threshold"],
                                                     x["exploration_bonus"]))
            w = self.weights
            total = w["answer"] * acc_r + w["format"] * fmt_r + w["exploration"] * exp_r
            adv = R.group_advantages(total)
            sums["zero_groups"] += float(np.all(adv == 0))
            sums["groups"] += 1
            sums["group_std"] += float(total.std(ddof=1))
            for g, ((result, events), seed) in enumerate(zip(outs, seeds)):
                seq, sampled, discarded, retok = self.sequence(image, row["question"], result, events, seed)
                samples.append((seq, sampled, float(adv[g])))
                n_turns = len(result.turns)
                sums["reward"] += total[g]
                sums["answer"] += w["answer"] * acc_r[g]
                sums["format"] += w["format"] * fmt_r[g]
                sums["exploration"] += w["exploration"] * exp_r[g]
                sums["accuracy"] += acc_r[g]
                sums["tool"] += float(bool(result.tools_used))
                sums["depth"] += result.tools_used.count("depth")
                sums["segmentation"] += result.tools_used.count("segmentation")
                sums["called"] += float(called[g])
                sums["answered"] += float(R.ANSWER_CONTENT.search(result.turns[-1]) is not None) if n_turns else 0.0
                sums["turns"] += n_turns
                sums["discarded"] += discarded
                sums["truncated"] += sum(not t["finished"] for t in result.generated) / max(n_turns, 1)
                sums["retokenized"] += retok / max(n_turns - discarded, 1)
                sums["tokens"] += len(seq.label_ids)
                sums["rollouts"] += 1
                log_lines.append({"step": step, "data_id": row["data_id"], "flag": row["flag"], "seed": seed,
                                  "turns": result.turns, "tools": result.tools_used,
                                  "rewards": {"answer": float(acc_r[g]), "format": float(fmt_r[g]),
                                              "exploration": float(exp_r[g]), "total": float(total[g])},
                                  "advantage": float(adv[g])})
        if was_training:
            self.model.train()
        sums["judge_failures"] = float(self.judge.failures - failures_before)
        sums["seconds"] = time.time() - start
        g = self._reduce(sums)
        world = self.accelerator.num_processes if self.accelerator else 1
        n, groups = max(g["rollouts"], 1), max(g["groups"], 1)
        stats = dict(zip(STATS, (
            g["reward"] / n, g["answer"] / n, g["format"] / n, g["exploration"] / n, g["group_std"] / groups,
            g["accuracy"] / n, g["tool"] / n, g["depth"] / n, g["segmentation"] / n, g["called"] / n, g["answered"] / n,
            g["turns"] / n, g["discarded"] / n, g["truncated"] / n, g["retokenized"] / n, g["tokens"] / n,
            g["zero_groups"] / groups, g["judge_failures"], g["seconds"] / world)))
        if x["log_rollouts"] and self.rollout_log is not None:
            with open(self.rollout_log, "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in log_lines)
        return self._packs(samples, stats)

    def _packs(self, samples, stats):
        count = sum(len(seq.label_ids) for seq, _, _ in samples)
        keep = samples if self.x["beta"] else [s for s in samples if s[2] != 0.0]
        keep = keep or samples[:1]  # every process runs one backward a step (DDP); a zero advantage adds 0
        matched = max(1, sum(int((~torch.isnan(s)).sum()) for _, s, _ in keep))
        packs, current = [], None
        for seq, sampled, advantage in keep:
            if current is not None and current["seq"].length + seq.length > self.cfg.max_tokens_per_pack:
                packs.append(current)
                current = None
            if current is None:
                current = {"seq": PackedSequence(seq.tokens), "advantages": [], "sampled_logp": []}
            current["seq"].extend(seq)
            current["advantages"].append(torch.full((len(seq.label_ids),), advantage))
            current["sampled_logp"].append(sampled)
        packs.append(current)
        tokens = max(1, sum(len(s.label_ids) for s, _, _ in keep))
        for p in packs:
            p["advantages"] = torch.cat(p["advantages"])
            p["sampled_logp"] = torch.cat(p["sampled_logp"])
            p["step_matched"], p["step_tokens"] = matched, tokens
            if self.x["beta"] and p["seq"].label_ids:
                with torch.no_grad():
                    out = forward_packed(self.ref_model, p["seq"])
                    p["ref_logp"] = token_logprobs(out["logits"], out["labels"], self.x["temperature"],
                                                   self.inferencer.text_vocab_size)
        packs[0]["stats"] = stats
        return packs, count


def build_judge(x: dict):
    if x["judge"] == "llm":
        return R.make_judge("llm", base_url=x["judge_base_url"], model=x["judge_model"],
                            api_key=os.environ.get(x["judge_api_key_env"], "-"), retries=x["judge_retries"],
                            timeout=x["judge_timeout"])
    return R.make_judge(x["judge"], data_dir=x["data_dir"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML of TrainConfig fields and GRPO options")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML values), after the file")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    x = options(cfg, DEFAULTS, "GRPO")
    if not x["data_dir"]:
        raise ValueError("data_dir is required")
    if x["num_generations"] < 2:
        raise ValueError("num_generations must be at least 2 (advantages are normalised within a group)")
    torch.manual_seed(cfg.seed)
    rows = read_rl_rows(x["data_dir"])
    judge = build_judge(x)
    model, vae, tokenizer = load_stage2(x)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if x["beta"] else None
    vocab_size = Inferencer(model, vae, tokenizer).text_vocab_size
    trainer = Trainer(cfg, GRPOObjective(model, x, vocab_size), len(rows))
    acc = trainer.accelerator
    if acc.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise ValueError(f"GRPO rollouts run on the unwrapped model: {acc.distributed_type} would need its "
                                  f"parameters gathered for generation; use one process or DDP")
    vae.to(acc.device)
    if ref_model is not None:
        ref_model.to(acc.device)
    acc.print(f"GRPO: {len(rows)} questions, {x['num_generations']} rollouts each, judge {judge.name}, "
              f"{trainer.num_parameters / 1e6:.2f} M trainable parameters, {acc.num_processes} process(es), "
              f"start at step {trainer.step}")
    batches = GRPOBatches(rows, trainer.unwrapped.model, ref_model, vae, tokenizer, judge, cfg)
    batches.accelerator = acc
    if acc.is_main_process:
        batches.rollout_log = Path(cfg.output_dir) / "rollouts.jsonl"
    trainer.fit(batches)
    trainer.finish(vae, tokenizer, x["export_dir"], stage="stage2b-grpo", weights=x["export_weights"])

if __name__ == "__main__":
    main()
