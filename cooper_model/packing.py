"""Packed training sequences (upstream `PackedDataset` layout) and one forward pass over them.

A sample is a list of splits. Text: <|im_start|> ids <|im_end|>, causal, positions advancing per
token. Clean images (ViT or VAE): full attention, one shared position, then +1. A noisy VAE image
(the generation target): full attention inside, invisible to every other split, one shared position
that does *not* advance, so the clean copy that may follow shares it. The KV-cache inference in
`inference.py` must give the same numbers as this path; the tests check that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .modeling import CooperModel, flattened_position_ids, packed_attention_mask, patchify
from .tokenizer import SpecialTokens


@dataclass
class PackedSequence:
    tokens: SpecialTokens
    text_ids: list[int] = field(default_factory=list)
    text_index: list[int] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)  # next-token targets
    label_index: list[int] = field(default_factory=list)  # positions whose logits predict them
    vit_patches: list[torch.Tensor] = field(default_factory=list)
    vit_pos: list[torch.Tensor] = field(default_factory=list)
    vit_index: list[int] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)  # [n, p*p*C] clean latent patches
    latent_t: list[torch.Tensor] = field(default_factory=list)  # flow time per latent token
    latent_pos: list[torch.Tensor] = field(default_factory=list)
    latent_index: list[int] = field(default_factory=list)
    noisy_latent_index: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    sample_lens: list[int] = field(default_factory=list)  # several samples packed; none see each other
    rope: int = 0

    @property
    def length(self) -> int:
        return len(self.positions)

    def extend(self, other: "PackedSequence") -> None:
        """Pack another sample after this one: it keeps its own positions (from 0), and no token
        of one sample attends to the other (upstream's `sample_lens`)."""
        offset = self.length
        if not self.sample_lens and offset:
            self.sample_lens.append(offset)
        shifted = lambda index: [i + offset for i in index]  # noqa: E731
        self.text_ids += other.text_ids
        self.text_index += shifted(other.text_index)
        self.label_ids += other.label_ids
        self.label_index += shifted(other.label_index)
        self.vit_patches += other.vit_patches
        self.vit_pos += other.vit_pos
        self.vit_index += shifted(other.vit_index)
        self.latents += other.latents
        self.latent_t += other.latent_t
        self.latent_pos += other.latent_pos
        self.latent_index += shifted(other.latent_index)
        self.noisy_latent_index += shifted(other.noisy_latent_index)
        self.positions += other.positions
        self.split_lens += other.split_lens
        self.attn_modes += other.attn_modes
        self.sample_lens += other.sample_lens or [other.length]

    def _split(self, n: int, mode: str, positions: list[int]) -> int:
        start = self.length
        self.positions.extend(positions)
        self.split_lens.append(n)
        self.attn_modes.append(mode)
        return start

    def add_text(self, ids: list[int], loss: bool = False) -> None:
        ids = [self.tokens.bos] + list(ids) + [self.tokens.eos]
        start = self._split(len(ids), "causal", list(range(self.rope, self.rope + len(ids))))
        self.text_ids.extend(ids)
        self.text_index.extend(range(start, start + len(ids)))
        if loss:  # predict every token after <|im_start|>, <|im_end|> included
            self.label_ids.extend(ids[1:])
            self.label_index.extend(range(start, start + len(ids) - 1))
        self.rope += len(ids)

    def _image(self, num: int, mode: str, advance: bool) -> int:
        start = self._split(num + 2, mode, [self.rope] * (num + 2))
        self.text_ids.extend([self.tokens.start_of_image, self.tokens.end_of_image])
        self.text_index.extend([start, start + num + 1])
        if advance:
            self.rope += 1
        return start + 1

    def add_vit_image(self, pixels: torch.Tensor, patch: int, max_per_side: int) -> None:
        patches = patchify(pixels, patch)
        first = self._image(patches.shape[0], "full", advance=True)
        self.vit_patches.append(patches)
        self.vit_pos.append(flattened_position_ids(pixels.shape[1], pixels.shape[2], patch, max_per_side))
        self.vit_index.extend(range(first, first + patches.shape[0]))

    def add_latent_image(self, latent: torch.Tensor, latent_patch: int, downsample: int, max_latent_size: int,
                         t: float = 0.0, noisy: bool = False) -> None:
        """`latent` [C, h, w] (scaled VAE latent). Noisy images hold x_t built by the caller."""
        tokens = patchify(latent, latent_patch)
        first = self._image(tokens.shape[0], "noise" if noisy else "full", advance=not noisy)
        self.latents.append(tokens)
        self.latent_t.append(torch.full((tokens.shape[0],), float(t)))
        self.latent_pos.append(flattened_position_ids(latent.shape[1] * downsample, latent.shape[2] * downsample,
                                                      downsample * latent_patch, max_latent_size))
        idx = list(range(first, first + tokens.shape[0]))
        self.latent_index.extend(idx)
        if noisy:
            self.noisy_latent_index.extend(idx)


def forward_packed(model: CooperModel, seq: PackedSequence) -> dict[str, torch.Tensor]:
    """One pass over a packed sample: hidden states, logits at the label positions, velocities at
    the noisy latent tokens (in packing order)."""
    device, dtype = model.device, model.dtype
    n = seq.length
    x = torch.zeros(n, model.config.hidden_size, device=device, dtype=dtype)
    x[torch.tensor(seq.text_index, device=device)] = model.embed_text(torch.tensor(seq.text_ids, device=device))
    if seq.vit_patches:
        lens = [p.shape[0] for p in seq.vit_patches]
        vit = model.embed_vit_patches(torch.cat(seq.vit_patches).to(device), torch.cat(seq.vit_pos).to(device), lens)
        x[torch.tensor(seq.vit_index, device=device)] = vit.to(dtype)
    gen_mask = torch.zeros(n, dtype=torch.bool, device=device)
    if seq.latents:
        lat = model.embed_latents(torch.cat(seq.latents).to(device), torch.cat(seq.latent_t).to(device),
                                  torch.cat(seq.latent_pos).to(device))
        index = torch.tensor(seq.latent_index, device=device)
        x[index] = lat.to(dtype)
        gen_mask[index] = True
    mask = packed_attention_mask(seq.split_lens, seq.attn_modes, seq.sample_lens or None, device=device)
    hidden, _ = model.run_llm(x, torch.tensor(seq.positions, device=device), gen_mask, None, mask)
    out = {"hidden": hidden}
    if seq.label_index:
        out["logits"] = model.logits(hidden[torch.tensor(seq.label_index, device=device)])
        out["labels"] = torch.tensor(seq.label_ids, device=device)
    if seq.noisy_latent_index:
        out["velocity"] = model.velocity(hidden[torch.tensor(seq.noisy_latent_index, device=device)])
    return out
