"""What every backend provides to `Inferencer.generate_latents` and `decode_latents`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

# step(x [L, C] float32, t, branches) -> velocities [branches, L, C] float32 on the model's device,
# branch 0 over the first context given to `prepare`, 1 over the second, ...
StepFn = Callable[[torch.Tensor, float, int], torch.Tensor]


class BackendUnavailable(RuntimeError):
    """This backend cannot run on this machine (the message says why)."""


class Backend(ABC):
    name = "base"

    def __init__(self, inferencer):
        self.inferencer = inferencer
        self.notes: list[str] = []  # why backends earlier in the fallback chain were skipped

    @abstractmethod
    def prepare(self, contexts, height: int, width: int) -> StepFn:
        """Called once per generated image with its read-only contexts (conditional first, then the
        text-free and image-free CFG contexts when guidance uses them)."""

    @abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [1, z, h, w] -> image [1, 3, H, W] in [-1, 1], float32."""

    def describe(self) -> dict:
        return {"backend": self.name}


def single_device(inferencer) -> torch.device:
    """The one device of the model; graph backends need the whole network in one place."""
    devices = {p.device for p in inferencer.model.parameters()} | {p.device for p in inferencer.vae.parameters()}
    if len(devices) != 1:
        raise BackendUnavailable(f"the model is split over {sorted(map(str, devices))} (device_map); only the "
                                 "eager backend runs a split model")
    return next(iter(devices))
