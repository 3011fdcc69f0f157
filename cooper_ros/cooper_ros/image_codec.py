"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

Pure numpy (+ Pillow for JPEG/PNG). The PyPI `cv-bridge` is broken with numpy 2 and the
ROS one is not available from pip, so this module is the node's only image converter.

Two layers:

* :func:`image_to_array` / :func:`array_to_image` are lossless: the array keeps the
  encoding's dtype and channel count (H x W or H x W x C), honouring ``step`` padding and
  ``is_bigendian``.
* :func:`to_rgb8` turns any supported encoding into the ``uint8 H x W x 3`` RGB array the
  model takes; :func:`decode_compressed` does the same for JPEG/PNG ``CompressedImage`` data.

Everything raises :class:`ImageConversionError` (a ``ValueError``) with a message that says what
is wrong, never a bare numpy error. Size limits are checked from the header *before* the data
is touched, so a huge image costs nothing to refuse.

Functions take any object with the Image fields (``height, width, encoding, is_bigendian,
step, data``), so they are testable without rclpy.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ImageConversionError",
    "ENCODINGS",
    "encoding_info",
    "check_image_header",
    "image_to_array",
    "array_to_image",
    "to_rgb8",
    "image_to_rgb8",
    "decode_compressed",
    "encode_compressed",
    "DEFAULT_MAX_PIXELS",
]

# 4096 x 4096: larger than any camera a node like this is fed; refuses the 8000 x 8000 case.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageConversionError(ValueError):
    """An image message cannot be converted; the message says why."""


@dataclass(frozen=True)
class EncodingInfo:
    dtype: np.dtype        # element type (native byte order)
    channels: int
    # how to_rgb8 interprets it: "rgb", "bgr", "rgba", "bgra", "gray", "yuv422_uyvy",
    # "yuv422_yuyv", "bayer_rggb" ...
    kind: str

    @property
    def pixel_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * self.channels)


def _e(dtype, channels, kind):
    return EncodingInfo(np.dtype(dtype), channels, kind)


# sensor_msgs/image_encodings.hpp names (lower-case keys; lookup is case-insensitive)
ENCODINGS: dict[str, EncodingInfo] = {
    "rgb8": _e(np.uint8, 3, "rgb"),
    "bgr8": _e(np.uint8, 3, "bgr"),
    "rgba8": _e(np.uint8, 4, "rgba"),
    "bgra8": _e(np.uint8, 4, "bgra"),
    "rgb16": _e(np.uint16, 3, "rgb"),
    "bgr16": _e(np.uint16, 3, "bgr"),
    "rgba16": _e(np.uint16, 4, "rgba"),
    "bgra16": _e(np.uint16, 4, "bgra"),
    "mono8": _e(np.uint8, 1, "gray"),
    "mono16": _e(np.uint16, 1, "gray"),
    "8uc1": _e(np.uint8, 1, "gray"),
    "8uc3": _e(np.uint8, 3, "bgr"),      # OpenCV convention
    "8uc4": _e(np.uint8, 4, "bgra"),
    "16uc1": _e(np.uint16, 1, "depth"),  # usually depth in millimetres (REP 118)
    "16sc1": _e(np.int16, 1, "depth"),
    "32sc1": _e(np.int32, 1, "depth"),
    "32fc1": _e(np.float32, 1, "depth"),  # usually depth in metres (REP 118)
    "64fc1": _e(np.float64, 1, "depth"),
    "yuv422": _e(np.uint8, 2, "yuv422_uyvy"),       # UYVY
    "uyvy": _e(np.uint8, 2, "yuv422_uyvy"),
    "yuv422_yuy2": _e(np.uint8, 2, "yuv422_yuyv"),  # YUYV
    "yuyv": _e(np.uint8, 2, "yuv422_yuyv"),
    "bayer_rggb8": _e(np.uint8, 1, "bayer_rggb"),
    "bayer_bggr8": _e(np.uint8, 1, "bayer_bggr"),
    "bayer_gbrg8": _e(np.uint8, 1, "bayer_gbrg"),
    "bayer_grbg8": _e(np.uint8, 1, "bayer_grbg"),
}


def encoding_info(encoding: str) -> EncodingInfo:
    info = ENCODINGS.get((encoding or "").strip().lower())
    if info is None:
        known = ", ".join(sorted(ENCODINGS))
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r} (supported: {known})")
    return info


def _data_len(data: Any) -> int:
    try:
        return len(data)
    except TypeError:  # pragma: no cover - defensive
        return memoryview(data).nbytes


def _check_size(w: int, h: int, max_pixels: int, what: str) -> None:
    """Refuse empty images and images over the pixel budget before any pixel is touched."""
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"empty {what} ({w}x{h}): width and height must be > 0")
    if max_pixels and h * w > max_pixels:
        raise ImageConversionError(
            f"{what} too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            f"pixels (parameter input.max_pixels)")


def check_image_header(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodingInfo:
    """Validate the header fields of an Image against its data, without reading pixels."""
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(w, h, max_pixels, "image")
    info = encoding_info(msg.encoding)
    row = w * info.pixel_bytes
    if step < row:
        raise ImageConversionError(
            f"step {step} is smaller than width x bytes per pixel = {w} x {info.pixel_bytes} "
            f"= {row} for encoding {msg.encoding!r}")
    if info.kind.startswith("yuv422") and w % 2:
        raise ImageConversionError(f"{msg.encoding} needs an even width, got {w}")
    n = _data_len(msg.data)
    need = (h - 1) * step + row   # the last row's padding may be missing
    if n < need:
        raise ImageConversionError(
            f"image data too short: {n} bytes, but height x step = {h} x {step} = {h * step} "
            f"bytes expected")
    return info


def image_to_array(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image message -> numpy array in the message's own dtype (native byte order).

    Returns H x W for one channel, else H x W x C. Without row padding and in native byte
    order the result is a zero-copy view of ``msg.data`` (treat it as read-only).
    """
    info = check_image_header(msg, max_pixels)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    row = w * info.pixel_bytes
    if step == row and buf.size >= h * row:
        rows = buf[: h * row].reshape(h, row)
    else:  # padded rows: view with stride `step`, then drop the padding
        rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1))
    dt = info.dtype.newbyteorder(">" if msg.is_bigendian else "<")
    arr = np.ascontiguousarray(rows).view(dt)
    if dt.byteorder not in ("=", "|") and dt != info.dtype:
        arr = arr.astype(info.dtype)  # to native order
    if info.channels == 1:
        return arr.reshape(h, w)
    return arr.reshape(h, w, info.channels)


def array_to_image(arr: np.ndarray, encoding: str, header: Any = None, msg: Any = None):
    """numpy array -> sensor_msgs/Image (rclpy message; created when ``msg`` is None).

    The array must match the encoding's dtype kind and channel count (H x W or H x W x 1 for one
    channel). Data is written little-endian (is_bigendian = 0), no row padding.
    """
    info = encoding_info(encoding)
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1 and info.channels == 1:
        a = a[:, :, 0]
    if info.channels == 1:
        if a.ndim != 2:
            raise ImageConversionError(f"{encoding} needs an H x W array, got shape {a.shape}")
    elif a.ndim != 3 or a.shape[2] != info.channels:
        raise ImageConversionError(
            f"{encoding} needs an H x W x {info.channels} array, got shape {a.shape}")
    if a.dtype != info.dtype:
        if a.dtype.kind != info.dtype.kind and not (a.dtype.kind in "ui" and info.dtype.kind in "ui"):
            raise ImageConversionError(
                f"{encoding} needs dtype {info.dtype}, got {a.dtype}")
        a = a.astype(info.dtype)
    a = np.ascontiguousarray(a, dtype=info.dtype.newbyteorder("<"))
    if msg is None:
        from sensor_msgs.msg import Image  # local import: the codec itself needs no ROS
        msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(a.shape[0]), int(a.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(a.shape[1] * info.pixel_bytes)
    msg.data = a.tobytes()
    return msg


def _normalize_to_u8(x: np.ndarray, what: str) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ImageConversionError(
            f"{what} image contains {bad} NaN/inf value(s); only finite float images can be "
            f"used as a camera image")
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip((x - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    y = y.astype(np.float32)
    u = u.astype(np.float32) - 128.0
    v = v.astype(np.float32) - 128.0
    r = y + 1.402 * v
    g = y - 0.344136 * u - 0.714136 * v
    b = y + 1.772 * u
    return np.clip(np.stack([r, g, b], axis=-1) + 0.5, 0, 255).astype(np.uint8)


def _bayer_to_rgb(raw: np.ndarray, pattern: str) -> np.ndarray:
    """Simple demosaic: each 2x2 cell gives one RGB value, upsampled back (nearest)."""
    h, w = raw.shape
    h2, w2 = h - h % 2, w - w % 2
    if h2 == 0 or w2 == 0:
        raise ImageConversionError(f"bayer image too small: {w}x{h}")
    r_ = raw[:h2, :w2].astype(np.float32)
    cells = {"00": r_[0::2, 0::2], "01": r_[0::2, 1::2], "10": r_[1::2, 0::2], "11": r_[1::2, 1::2]}
    order = pattern[-4:]  # e.g. "rggb"
    pos = ["00", "01", "10", "11"]
    r = cells[pos[order.index("r")]]
    b = cells[pos[order.index("b")]]
    gi = [p for p, c in zip(pos, order) if c == "g"]
    g = (cells[gi[0]] + cells[gi[1]]) * 0.5
    small = np.clip(np.stack([r, g, b], -1) + 0.5, 0, 255).astype(np.uint8)
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    out = np.empty((h, w, 3), np.uint8)
    out[:h2, :w2] = big
    if h2 < h:
        out[h2:, :w2] = big[-1:]
    if w2 < w:
        out[:, w2:] = out[:, w2 - 1:w2]
    return out


def to_rgb8(arr: np.ndarray, encoding: str) -> np.ndarray:
    """Array as returned by :func:`image_to_array` -> contiguous uint8 H x W x 3 RGB.

    16-bit colour/mono are scaled by 1/257; single-channel "depth-like" encodings (16UC1,
    32FC1, ...) are min-max normalised to a grey image (they must be finite).
    """
    info = encoding_info(encoding)
    k = info.kind
    if k in ("rgb", "bgr", "rgba", "bgra"):
        a = arr
        if a.dtype == np.uint16:
            a = (a.astype(np.uint32) * 255 + 32767) // 65535
            a = a.astype(np.uint8)
        if k == "rgb":
            return np.ascontiguousarray(a, dtype=np.uint8)
        if k == "bgr":
            return np.ascontiguousarray(a[:, :, ::-1], dtype=np.uint8)
        if k == "rgba":
            return np.ascontiguousarray(a[:, :, :3], dtype=np.uint8)
        return np.ascontiguousarray(a[:, :, 2::-1], dtype=np.uint8)
    if k == "gray":
        a = arr
        if a.dtype == np.uint16:
            a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if k == "depth":
        g = _normalize_to_u8(arr, encoding)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if k == "yuv422_uyvy" or k == "yuv422_yuyv":
        a = arr.reshape(arr.shape[0], -1, 4)  # pairs of pixels: 4 bytes
        if k == "yuv422_uyvy":
            u, y0, v, y1 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
        else:
            y0, u, y1, v = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
        y = np.stack([y0, y1], axis=-1).reshape(arr.shape[0], -1)
        uu = np.repeat(u, 2, axis=1)
        vv = np.repeat(v, 2, axis=1)
        return _yuv_to_rgb(y, uu, vv)
    if k.startswith("bayer_"):
        return _bayer_to_rgb(arr, k)
    raise ImageConversionError(f"cannot convert encoding {encoding!r} to rgb8")  # pragma: no cover


def image_to_rgb8(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> uint8 H x W x 3 RGB (the model's input)."""
    arr = image_to_array(msg, max_pixels)
    return to_rgb8(arr, msg.encoding)


def decode_compressed(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG, any format string) -> uint8 H x W x 3 RGB.

    The size is checked from the file header before the pixels are decoded.
    """
    from PIL import Image as PILImage

    data = bytes(msg.data)
    if not data:
        raise ImageConversionError("compressed image has no data")
    fmt = (getattr(msg, "format", "") or "").lower()
    try:
        im = PILImage.open(io.BytesIO(data))
    except Exception as exc:  # PIL.UnidentifiedImageError and friends
        raise ImageConversionError(
            f"cannot decode compressed image (format {fmt!r}, {len(data)} bytes): {exc}") from None
    if im.format not in ("JPEG", "PNG"):
        raise ImageConversionError(
            f"unsupported compressed image format {im.format!r}: only JPEG and PNG")
    _check_size(*im.size, max_pixels, "compressed image")
    try:
        im.load()
    except Exception as exc:
        raise ImageConversionError(f"corrupt compressed {im.format} image: {exc}") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im)
        g = _normalize_to_u8(a, f"{im.format} {im.mode}")
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, header: Any = None,
                      msg: Any = None):
    """uint8 H x W x 3 RGB (or H x W mono) -> sensor_msgs/CompressedImage (JPEG or PNG)."""
    from PIL import Image as PILImage

    a = np.ascontiguousarray(rgb)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise ImageConversionError(f"need uint8 H x W (x 3) to compress, got {a.dtype} {a.shape}")
    fmt = fmt.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise ImageConversionError(f"unsupported compressed format {fmt!r}: jpeg or png")
    bio = io.BytesIO()
    im = PILImage.fromarray(a)
    if fmt == "png":
        im.save(bio, format="PNG")
        fmt_str = "rgb8; png compressed rgb8" if a.ndim == 3 else "mono8; png compressed mono8"
        fmt = "png"
    else:
        im.save(bio, format="JPEG", quality=int(quality))
        fmt_str = "rgb8; jpeg compressed rgb8" if a.ndim == 3 else "mono8; jpeg compressed mono8"
        fmt = "jpeg"
    if msg is None:
        from sensor_msgs.msg import CompressedImage
        msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt_str
    msg.data = bio.getvalue()
    return msg
