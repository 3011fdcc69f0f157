"""Depth image + CameraInfo -> sensor_msgs/PointCloud2 (pure numpy)."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["depth_to_points", "make_pointcloud2"]


_RAYS: dict = {}


def _rays(shape, k, s):
    """Cached per-pixel ray slopes ((u - cx) / fx, (v - cy) / fy) on the strided grid."""
    key = (shape, s, tuple(np.round(k, 6)))
    r = _RAYS.get(key)
    if r is None:
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
        us = (np.arange(0, shape[1], s, dtype=np.float32) - np.float32(cx)) / np.float32(fx)
        vs = (np.arange(0, shape[0], s, dtype=np.float32) - np.float32(cy)) / np.float32(fy)
        r = (np.broadcast_to(us[None, :], (len(vs), len(us))), np.broadcast_to(vs[:, None], (len(vs), len(us))))
        if len(_RAYS) > 16:
            _RAYS.clear()
        _RAYS[key] = r
    return r


def depth_to_points(depth: np.ndarray, k: Any, stride: int = 1, rgb: np.ndarray | None = None):
    """Back-project a metric depth map (H x W float, NaN invalid) with pinhole intrinsics.

    ``k`` is the row-major 3x3 K of a CameraInfo (fx, 0, cx, 0, fy, cy, 0, 0, 1) for the
    depth's resolution. Returns (xyz float32 N x 3 in the optical frame, rgb uint8 N x 3 or None).
    """
    k = np.asarray(k, dtype=np.float64).reshape(-1)
    if not (k[0] > 0 and k[4] > 0):
        raise ValueError(f"camera_info has no valid focal length (fx={k[0]}, fy={k[4]})")
    s = max(1, int(stride))
    d = depth[::s, ::s]
    rx, ry = _rays(depth.shape, k, s)
    valid = np.isfinite(d) & (d > 0)
    z = d[valid].astype(np.float32, copy=False)
    xyz = np.empty((z.size, 3), np.float32)
    xyz[:, 0] = rx[valid] * z
    xyz[:, 1] = ry[valid] * z
    xyz[:, 2] = z
    col = rgb[::s, ::s][valid] if rgb is not None else None
    return xyz, col


def make_pointcloud2(xyz: np.ndarray, header: Any, rgb: np.ndarray | None = None, msg: Any = None):
    """N x 3 float32 (+ N x 3 uint8 colours) -> unorganised PointCloud2 (x, y, z[, rgb])."""
    from sensor_msgs.msg import PointCloud2, PointField

    n = int(xyz.shape[0])
    cols = 4 if rgb is not None else 3
    buf = np.empty((n, cols), dtype="<f4")
    buf[:, :3] = xyz
    fields = [PointField(name=c, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, c in enumerate("xyz")]
    if rgb is not None:
        c = rgb.astype(np.uint32)
        buf[:, 3] = ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).view("<f4")
        # RViz reads packed colour as a FLOAT32 field named rgb
        fields.append(PointField(name="rgb", offset=12, datatype=PointField.FLOAT32, count=1))
    if msg is None:
        msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, n
    msg.fields = fields
    msg.is_bigendian = False
    msg.point_step = 4 * cols
    msg.row_step = 4 * cols * n
    msg.is_dense = True
    msg.data = buf.tobytes()
    return msg
