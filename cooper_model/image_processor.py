"""Pre- and post-processing of images: upstream's resize rule and [-1, 1] tensors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import ImageTransformConfig


class CooperInputError(ValueError):
    """Raised for inputs the pipeline refuses (wrong image type/shape, bad question, bad mode)."""


def _divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def target_size(width: int, height: int, t: ImageTransformConfig) -> tuple[int, int]:
    """(width, height) after upstream's `MaxLongEdgeMinShortEdgeResize`: long edge <= max_size,
    short edge >= min_size (the long-edge limit wins), pixel budget, both sides multiples of stride."""

    def scaled(w, h, s):
        return _divisible(round(w * s), t.stride), _divisible(round(h * s), t.stride)

    scale = min(t.max_size / max(width, height), 1.0)
    scale = max(scale, t.min_size / min(width, height))
    w, h = scaled(width, height, scale)
    if w * h > t.max_pixels:
        w, h = scaled(w, h, t.max_pixels / (w * h))
    if max(w, h) > t.max_size:
        w, h = scaled(w, h, t.max_size / max(w, h))
    return w, h


def _onto_white(image: Image.Image) -> Image.Image:
    """Upstream `pil_img2rgb`: an image with transparency is composited onto white, so transparent
    regions read as white, not as whatever colour the hidden pixels hold (often black)."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def as_pil_rgb(image) -> Image.Image:
    """Accept a PIL image (any mode) or a uint8 HxWx3 (RGB) or HxWx4 (RGBA) array; transparency is
    composited onto white. Anything else is a clear error."""
    if isinstance(image, Image.Image):
        return _onto_white(image)
    if not isinstance(image, np.ndarray):
        raise CooperInputError(f"image must be a uint8 HxWx3 numpy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise CooperInputError(f"image must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise CooperInputError(f"image must be HxWx3 (RGB) or HxWx4 (RGBA), got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise CooperInputError(f"image is too small: {image.shape[1]}x{image.shape[0]}")
    return _onto_white(Image.fromarray(np.ascontiguousarray(image), "RGB" if image.shape[2] == 3 else "RGBA"))


def resize(image: Image.Image, t: ImageTransformConfig) -> Image.Image:
    size = target_size(image.width, image.height, t)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).sub(0.5).div(0.5)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float [3, H, W] in [-1, 1] -> uint8 HxWx3, as upstream's `decode_image` (truncation)."""
    x = (image.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return x.to(torch.uint8).cpu().numpy()
