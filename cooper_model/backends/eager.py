"""The reference: `Inferencer.velocity` once per CFG branch, the autoencoder's own decoder."""

from __future__ import annotations

import torch

from .base import Backend


class EagerBackend(Backend):
    name = "eager"

    def prepare(self, contexts, height, width):
        inf = self.inferencer

        def step(x, t, branches):
            return torch.stack([inf.velocity(ctx, x, t, height, width) for ctx in contexts[:branches]])

        return step

    def decode(self, latent):
        return self.inferencer.vae.decode(latent.to(self.inferencer.device)).float()
