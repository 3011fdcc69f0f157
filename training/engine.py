"""What every trainer shares: configuration as YAML, accelerate (one CPU, one GPU, DDP, FSDP,
DeepSpeed ZeRO-3), AdamW as upstream, EMA, a data order that is a pure function of (seed, step),
atomic checkpoints with resume, CSV logs and progress bars.

Data parallelism is exact: a step always takes the same `batch_size` examples of the global order,
each process takes its share (`rank::world`), and the loss is a sum over the process's tokens
divided by the token count of the *whole* step (all-reduced), so after DDP's gradient mean the
update equals that of one process holding the whole batch. Randomness inside an example (noise,
timestep, dropout, flips) is drawn from a generator seeded by (seed, step, example index), never
from the process's RNG, so it does not depend on how the batch was split, and a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    total_steps: int = 1000
    batch_size: int = 8  # examples per optimizer step, all processes together
    max_tokens_per_pack: int = 10240  # upstream's per-GPU token budget; larger shares split into packs
    lr: float = 5e-6
    lr_scheduler: str = "constant"  # constant | cosine (after warmup)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # cosine floor
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int = 0  # torch CPU threads per process (0 = torch's default)
    extra: dict = field(default_factory=dict)  # the trainer's own options

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        """A YAML file of fields; unknown keys go to `extra`. `overrides` are `key=value` strings
        (YAML-parsed values), applied after the file."""
        values = yaml.safe_load(Path(path).read_text()) if path else {}
        for item in overrides or []:
            key, _, value = item.partition("=")
            if not _:
                raise ValueError(f"override {item!r} is not key=value")
            values[key.strip()] = yaml.safe_load(value)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(values.pop("extra", {}) or {})
        extra.update({k: values.pop(k) for k in list(values) if k not in known})
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        # PyYAML (YAML 1.1) reads `3e-4` as a string: coerce the float fields
        for f in dataclasses.fields(cls):
            if f.type in ("float", float) and isinstance(values.get(f.name), str):
                values[f.name] = float(values[f.name])
        return cls(**values, extra=extra)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def example_rng(seed: int, step: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, index])


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


class DataOrder:
    """Epoch-wise permutations of `num_examples`, seeded per epoch: step k's global batch is
    examples [k*B, (k+1)*B) of the concatenated epochs."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]


class EMA:
    """Exponential moving average of the trainable parameters, kept in float32. Elementwise, so it
    works the same on FSDP / ZeRO-3 shards as on whole tensors."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights in the live parameters (for evaluation or export)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(saved, self.params):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[str(i)])


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_scheduler == "constant":
            return 1.0
        if cfg.lr_scheduler == "cosine":
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}")
    return f


def export_checkpoint(model, vae, tokenizer, out: str | Path, stage: str, card: dict | None = None,
                      dtype="float32") -> None:
    """Write `model` in the released layout (ema.safetensors, ae.safetensors, configs, tokenizer),
    recording the training stage it went through."""
    from cooper_model.checkpoint import save_checkpoint

    config = model.config
    config.trained = True
    if config.trained_stages is not None:  # None = a released checkpoint, trained through every stage
        config.trained_stages = sorted({*config.trained_stages, stage})
    save_checkpoint(out, model, vae, tokenizer, dtype=dtype)
    if card:
        (Path(out) / "training_run.json").write_text(json.dumps(card, indent=2) + "\n")


class Trainer:
    """Runs `objective(pack) -> {"loss_sum": tensor, "count": int, **metrics}` over packs made by
    `make_packs(indices, step) -> (packs, count)`, where `count` is this process's loss normaliser
    (tokens) for the step. An objective may add `"loss_mean"`, a term it has normalised itself over
    an equal share per process (SFT's stage-1 replay). The objective is an nn.Module so accelerate
    can wrap it (DDP, FSDP, DeepSpeed)."""

    def __init__(self, cfg: TrainConfig, objective: torch.nn.Module, num_examples: int, accelerator=None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        acc = self.accelerator
        if cfg.batch_size % acc.num_processes:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {acc.num_processes} processes")
        self.out = Path(cfg.output_dir)
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.objective, self.optimizer, self.scheduler = acc.prepare(objective, optimizer, scheduler)
        self.ema = EMA([p for p in self.objective.parameters() if p.requires_grad], cfg.ema)
        self.order = DataOrder(num_examples, cfg.batch_size, cfg.seed)
        self.step = 0
        self.num_parameters = sum(p.numel() for p in params)
        self.started = time.time()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.resume()

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.objective)

    # Checkpoints -------------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        root = self.out / CHECKPOINTS
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())

    def save(self) -> Path:
        """Write everything a resume needs into a temporary directory, then rename it into place:
        a kill at any moment leaves either the previous checkpoint or the new one, never half of one."""
        acc = self.accelerator
        root = self.out / CHECKPOINTS
        final = root / f"step_{self.step:07d}"
        tmp = root / f".tmp_step_{self.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            torch.save(self.ema.state_dict(), tmp / "ema.pt")
            (tmp / STATE_FILE).write_text(json.dumps({"step": self.step, "time": time.time()}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoint_dirs()[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        dirs = self.checkpoint_dirs()
        if not dirs:
            return
        last = dirs[-1]
        self.accelerator.load_state(str(last))
        self.ema.load_state_dict(torch.load(last / "ema.pt", map_location="cpu", weights_only=True))
        self.step = json.loads((last / STATE_FILE).read_text())["step"]
        self.accelerator.print(f"resumed from {last} (step {self.step})")

    def finish(self, vae, tokenizer, export_dir: str | None, stage: str, weights: str = "ema") -> None:
        """End the run; with `export_dir`, the main process writes the EMA (or the live) weights there."""
        acc = self.accelerator
        if export_dir and acc.is_main_process:
            swap = self.ema.swapped_in() if weights == "ema" else contextlib.nullcontext()
            with swap:
                export_checkpoint(self.unwrapped.model, vae, tokenizer, export_dir, stage,
                                  card={"stage": stage, "steps": self.cfg.total_steps, "config": self.cfg.to_dict(),
                                        "seconds_this_process": round(time.time() - self.started, 1)})
            acc.print(f"exported {weights} weights to {export_dir}")
        acc.wait_for_everyone()
        acc.end_training()

    # The loop ------------------------------------------------------------------------------------
    def fit(self, make_packs, on_log=None) -> None:
        acc, cfg = self.accelerator, self.cfg
        rank, world = acc.process_index, acc.num_processes
        log_path = self.out / "log.csv"
        fields = None
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", disable=not acc.is_local_main_process)
        window_start, window_examples, window_tokens = time.time(), 0, 0
        while self.step < cfg.total_steps:
            mine = self.order.batch(self.step)[rank::world]
            packs, count = make_packs(mine, self.step)
            total = torch.tensor([float(count)], device=acc.device)
            total = acc.reduce(total, reduction="sum").item() if world > 1 else total.item()
            metrics: dict[str, float] = {}
            loss_value = 0.0
            for i, pack in enumerate(packs):
                sync = contextlib.nullcontext() if i == len(packs) - 1 else acc.no_sync(self.objective)
                with sync:
                    out = self.objective(pack)
                    # sum over this process's tokens / tokens of the whole step; DDP then averages
                    # over processes, hence the factor `world`
                    loss = out["loss_sum"] * (world / max(total, 1.0))
                    if "loss_mean" in out:
                        # a second term already averaged over this process's share of its own tokens
                        # (equal shares: DDP's mean makes it the step's mean)
                        loss = loss + out["loss_mean"]
                    acc.backward(loss)
                loss_value += float(out["loss_sum"].detach()) / max(total, 1.0)
                loss_value += float(out["loss_mean"].detach()) / world if "loss_mean" in out else 0.0
                for k, v in out.items():
                    if k not in ("loss_sum", "loss_mean", "count"):
                        metrics[k] = metrics.get(k, 0.0) + float(v)
            grad_norm = acc.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update()
            self.step += 1
            window_examples += cfg.batch_size
            window_tokens += int(metrics.get("tokens", total))  # sequence tokens when the objective counts them
            loss_all = acc.reduce(torch.tensor([loss_value], device=acc.device), "sum").item() if world > 1 else loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_all:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                seconds = time.time() - window_start
                row = {"step": self.step, "loss": loss_all, "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "examples_per_s": window_examples / seconds, "tokens_per_s": window_tokens / seconds,
                       **metrics}
                if acc.is_main_process:
                    if fields is None:
                        fields = list(row)
                        new = not log_path.exists()
                        with open(log_path, "a") as f:
                            if new:
                                f.write(",".join(fields) + "\n")
                    with open(log_path, "a") as f:
                        f.write(",".join(f"{row.get(k, float('nan')):.6g}" for k in fields) + "\n")
                if on_log:
                    on_log(row)
                window_start, window_examples, window_tokens = time.time(), 0, 0
            if self.step % cfg.save_every == 0 or self.step == cfg.total_steps:
                self.save()
        bar.close()
