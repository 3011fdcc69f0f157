"""Stage-1 samples: an RGB image and its target map, as the model sees them.

Rows are COOPER's Stage-1 jsonl (`stage1.jsonl`, written by `training.data.synth` or converted from
a real dataset). Depth targets are computed in float from the 16-bit depth file, as upstream does
(`DepthImageTransform`): metres clamped to the range, (d - min) / (max - min), three channels,
[-1, 1]. Segmentation targets are the class map painted in the checkpoint's palette (nearest-neighbour
resize, so no colour ever lies between two classes). RGB and target are resized to the VAE
transform and flipped together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cooper_model import image_processor as ip
from cooper_model.codecs import DepthCodec
from cooper_model.config import ImageTransformConfig


def depth_target(metres: np.ndarray, size: tuple[int, int], codec: DepthCodec) -> torch.Tensor:
    """Metres (NaN invalid) -> the float target image [3, H, W] in [-1, 1] at `size` (W, H)."""
    unit = codec.normalize(metres)
    unit = np.asarray(Image.fromarray(unit.astype(np.float32)).resize(size, Image.BILINEAR))
    return torch.from_numpy(np.clip(unit, 0, 1)).float()[None].repeat(3, 1, 1).mul(2).sub(1)


def segmentation_target(labels: np.ndarray, size: tuple[int, int], palette: np.ndarray) -> torch.Tensor:
    """Class ids -> the palette image [3, H, W] in [-1, 1] at `size`; nearest resize, so no colour
    ever lies between two classes."""
    labels = np.asarray(Image.fromarray(np.asarray(labels).astype(np.int32)).resize(size, Image.NEAREST))
    return ip.to_tensor(Image.fromarray(palette[labels]))


@dataclass
class Stage1Example:
    index: int
    task: str  # "depth" | "segmentation"
    prompt: str
    rgb: Image.Image  # resized to the VAE transform
    target: torch.Tensor  # [3, H, W] in [-1, 1], same size as rgb
    depth_m: np.ndarray | None = None  # float32 [H, W] metres (NaN invalid), for evaluation
    labels: np.ndarray | None = None  # int [H, W] class ids, for evaluation


def read_rows(data_dir: str | Path, tasks=("depth", "segmentation")) -> list[dict]:
    data_dir = Path(data_dir)
    rows = []
    with open(data_dir / "stage1.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["task"] in tasks:
                rows.append(row)
    if not rows:
        raise ValueError(f"{data_dir / 'stage1.jsonl'}: no rows for tasks {tasks}")
    return rows


class Stage1Dataset:
    def __init__(self, data_dir: str | Path, vae_transform: ImageTransformConfig, depth_range: tuple[float, float],
                 palette: np.ndarray, tasks=("depth", "segmentation"), flip: bool = False):
        self.root = Path(data_dir)
        self.rows = read_rows(self.root, tasks)
        self.transform = vae_transform
        self.depth_codec = DepthCodec(*depth_range)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.flip = flip

    @classmethod
    def for_model(cls, data_dir: str | Path, config, tasks=("depth", "segmentation"), flip: bool = False) -> "Stage1Dataset":
        """The split as `config`'s model sees it (its VAE transform, depth range and palette)."""
        if "segmentation" in tasks and not config.palette:
            raise ValueError("the checkpoint declares no palette, so its segmentation colours are unknown; "
                             "use depth only (tasks [depth])")
        palette = np.asarray(config.palette if config.palette else [[0, 0, 0]])  # depth never reads it
        return cls(data_dir, config.vae_transform, config.depth_range, palette, tasks=tasks, flip=flip)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, flip: bool = False) -> Stage1Example:
        row = self.rows[index]
        rgb = Image.open(self.root / row["rgb_image"]).convert("RGB")
        size = ip.target_size(rgb.width, rgb.height, self.transform)
        rgb = rgb.resize(size, Image.BICUBIC) if size != rgb.size else rgb
        depth_m = labels = None
        if row["task"] == "depth":
            raw = np.asarray(Image.open(self.root / row["depth_image"])).astype(np.float32)
            metres = np.where(raw > 0, raw / float(row.get("depth_scale", 1000.0)), np.nan).astype(np.float32)
            depth_m = np.asarray(Image.fromarray(metres).resize(size, Image.NEAREST))
            target = depth_target(metres, size, self.depth_codec)
        elif row["task"] == "segmentation":
            labels = np.asarray(Image.open(self.root / row["label_image"]).resize(size, Image.NEAREST)).astype(np.int64)
            if labels.max() >= len(self.palette):
                raise ValueError(f"{row['label_image']}: class {labels.max()} beyond the {len(self.palette)}-colour palette")
            target = segmentation_target(labels, size, self.palette)
        else:
            raise ValueError(f"unknown stage-1 task {row['task']!r}")
        if flip:
            rgb = rgb.transpose(Image.FLIP_LEFT_RIGHT)
            target = target.flip(-1)
            depth_m = None if depth_m is None else depth_m[:, ::-1].copy()
            labels = None if labels is None else labels[:, ::-1].copy()
        return Stage1Example(index, row["task"], row["prompt"], rgb, target, depth_m, labels)
