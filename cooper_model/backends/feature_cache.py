"""Feature caching across denoising steps (TeaCache / TaylorSeer style) that keeps CFG active.

Consecutive denoising steps of a flow model see nearly the same input, so a step whose input moved
little since the last one can skip the network. The signal is the model's embedded input tokens
(latents + time + position, as TeaCache's modulated input): its relative L1 change is accumulated
over skipped steps, and a step is computed again once the sum reaches `threshold`.
- "reuse" (TeaCache): a skipped step returns the last computed velocities.
- "taylor" (TaylorSeer, first order): it extrapolates them in t from the last two computed steps.

Each CFG branch is cached on its own and the guidance is combined afresh at every step by the
caller, so a cached step is still guided. (A published TeaCache hook for BAGEL cached the guided
result of the conditional branch only and so silently dropped CFG.) A step that needs more branches
than the cache holds, e.g. the first step inside the CFG interval, is always computed, as are the
first and last steps.
"""

from __future__ import annotations

import torch

MODES = ("none", "reuse", "taylor")


class StepCache:
    def __init__(self, mode: str, threshold: float, num_steps: int):
        if mode not in MODES:
            raise ValueError(f"feature_cache must be one of {', '.join(MODES)}, got {mode!r}")
        if threshold < 0:
            raise ValueError(f"feature_cache_threshold must be >= 0, got {threshold}")
        self.mode, self.threshold, self.num_steps = mode, float(threshold), num_steps
        self.computed = self.skipped = 0
        self.accumulated = 0.0
        self.previous_signal: torch.Tensor | None = None
        self.history: list[tuple[float, torch.Tensor]] = []  # (t, velocities) of computed steps, newest last

    def __call__(self, i: int, t: float, branches: int, signal: torch.Tensor, compute) -> torch.Tensor:
        """Velocities [branches, L, C] for step i: computed by `compute()` or served from cache."""
        if self.previous_signal is not None:
            prev = self.previous_signal
            self.accumulated += float((signal - prev).abs().mean() / (prev.abs().mean() + 1e-8))
        self.previous_signal = signal
        held = self.history[-1][1].shape[0] if self.history else 0
        must = i == 0 or i == self.num_steps - 1 or held < branches
        if must or self.mode == "none" or self.accumulated >= self.threshold:
            v = compute()
            self.history = (self.history + [(t, v)])[-2:]
            self.accumulated = 0.0
            self.computed += 1
            return v
        self.skipped += 1
        t1, v1 = self.history[-1]
        if self.mode == "taylor" and len(self.history) == 2 and self.history[0][1].shape[0] >= branches:
            t0, v0 = self.history[0]
            if t1 != t0:
                return v1[:branches] + (t - t1) * (v1[:branches] - v0[:branches]) / (t1 - t0)
        return v1[:branches]
