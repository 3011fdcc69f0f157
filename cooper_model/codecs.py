"""Modality codecs: how depth and segmentation become RGB images the model can generate, and back.

Depth follows COOPER's training target (`DepthImageTransform`): metres clamped to a fixed range,
(d - min) / (max - min), replicated to three channels; near is dark. A generated map decodes as
the mean of its channels. Depth fed back into reasoning is coloured with matplotlib's Spectral.
Segmentation is a colour image; a checkpoint that declares a palette (one colour per class) can have
its maps decoded to labels by the nearest colour.
"""

from __future__ import annotations

import colorsys

import numpy as np


class DepthCodec:
    def __init__(self, min_depth: float, max_depth: float):
        if not (np.isfinite(min_depth) and np.isfinite(max_depth) and 0 <= min_depth < max_depth):
            raise ValueError(f"depth range must satisfy 0 <= min < max, got [{min_depth}, {max_depth}]")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)

    def normalize(self, depth_m: np.ndarray) -> np.ndarray:
        """Metres -> [0, 1]; invalid (NaN, inf, <= 0) pixels become 0 like the clamp of a 0 reading."""
        depth = np.asarray(depth_m, dtype=np.float32)
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, self.min_depth)
        depth = np.clip(depth, self.min_depth, self.max_depth)
        return (depth - self.min_depth) / (self.max_depth - self.min_depth)

    def encode(self, depth_m: np.ndarray) -> np.ndarray:
        """Metres [H, W] -> uint8 [H, W, 3] grayscale pseudo-image."""
        gray = np.round(self.normalize(depth_m) * 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)

    def decode(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (or float in [0, 1]) -> metres [H, W] float32."""
        image = np.asarray(image)
        unit = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        return self.from_unit(unit.mean(axis=-1) if unit.ndim == 3 else unit)

    def from_unit(self, depth01: np.ndarray) -> np.ndarray:
        """[0, 1] map -> metres. Saturated pixels carry no metric information: REP 118 marks them
        -inf (nearer than the range) and +inf (farther); NaN stays NaN."""
        d = np.asarray(depth01, dtype=np.float32)
        metres = (self.min_depth + d * (self.max_depth - self.min_depth)).astype(np.float32)
        metres[d <= 0.0] = -np.inf
        metres[d >= 1.0] = np.inf
        return metres


def colorize_depth(depth01: np.ndarray, cmap: str = "Spectral") -> np.ndarray:
    """[0, 1] map -> uint8 RGB with matplotlib's colormap, as upstream `colorize_depth_maps(x, 0, 1)`
    followed by `(x * 255).astype(uint8)`. Non-finite values are shown black."""
    import matplotlib

    d = np.asarray(depth01, dtype=np.float32)
    finite = np.isfinite(d)
    rgb = matplotlib.colormaps[cmap](np.clip(np.where(finite, d, 0), 0, 1), bytes=False)[..., :3]
    # Upstream's colours pass through a float32 tensor before the * 255; in float64 a few of them
    # truncate one level lower (the blue channel of two Spectral bins).
    out = (rgb.astype(np.float32) * 255).astype(np.uint8)
    out[~finite] = 0
    return out


def default_palette(num_classes: int) -> np.ndarray:
    """Well-separated colours: class 0 (background) is black, then hues on a golden-ratio walk at
    alternating saturation and value so neighbouring ids look different."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(1, num_classes):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.9 if i % 2 else 0.6
        val = 1.0 if (i // 2) % 2 else 0.8
        palette[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return palette


class SegmentationCodec:
    def __init__(self, palette: np.ndarray, class_names: list[str] | None = None):
        palette = np.asarray(palette, dtype=np.uint8)
        if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < 2:
            raise ValueError(f"palette must be [K, 3] with K >= 2, got {palette.shape}")
        if len(np.unique(palette, axis=0)) != len(palette):
            raise ValueError("palette colours must be distinct")
        if class_names is not None and len(class_names) != len(palette):
            raise ValueError(f"{len(class_names)} class names for {len(palette)} palette colours")
        self.palette = palette
        # A declared palette without names: its colours still mean classes, numbered.
        self.class_names = class_names or [f"class_{i}" for i in range(len(palette))]

    def encode(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(self.palette):
            raise ValueError(f"labels must lie in [0, {len(self.palette) - 1}]")
        return self.palette[labels]

    def decode(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint16 [H, W] class ids (nearest palette colour in RGB)."""
        flat = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        # one int per colour: a 1-D unique is ~10x faster than unique rows (axis=0) on a frame
        packed, inverse = np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2], return_inverse=True)
        colours = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
        dist = ((colours[:, None, :] - self.palette[None, :, :].astype(np.int32)) ** 2).sum(-1)
        labels = dist.argmin(axis=1)[inverse.reshape(-1)]
        return labels.reshape(np.asarray(image).shape[:2]).astype(np.uint16)
