"""Depth image + CameraInfo -> sensor_msgs/PointCloud2 (pure numpy)."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["depth_to_points", "make_pointcloud2"]


def depth_to_points(depth: np.ndarray, k: Any, stride: int = 1, rgb: np.ndarray | None = None):
    """Back-project a metric depth map (H x W float, NaN invalid) with pinhole intrinsics.

    ``k`` is the row-major 3x3 K of a CameraInfo (fx, 0, cx, 0, fy, cy, 0, 0, 1) for the
    depth's resolution. Returns (xyz float32 N x 3 in the optical frame, rgb uint8 N x 3 or None).
    """
    k = np.asarray(k, dtype=np.float64).reshape(-1)
    fx, fy, cx, cy = k[0], k[4], k[2], k[5]
    if not (fx > 0 and fy > 0):
        raise ValueError(f"camera_info has no valid focal length (fx={fx}, fy={fy})")
    s = max(1, int(stride))
    d = depth[::s, ::s].astype(np.float32, copy=False)
    vs, us = np.mgrid[0:depth.shape[0]:s, 0:depth.shape[1]:s]
    valid = np.isfinite(d) & (d > 0)
    z = d[valid]
    x = (us[valid].astype(np.float32) - np.float32(cx)) * z / np.float32(fx)
    y = (vs[valid].astype(np.float32) - np.float32(cy)) * z / np.float32(fy)
    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
    col = None
    if rgb is not None:
        col = rgb[::s, ::s][valid]
    return xyz, col


def make_pointcloud2(xyz: np.ndarray, header: Any, rgb: np.ndarray | None = None, msg: Any = None):
    """N x 3 float32 (+ N x 3 uint8 colours) -> unorganised PointCloud2 (x, y, z[, rgb])."""
    from sensor_msgs.msg import PointCloud2, PointField

    n = int(xyz.shape[0])
    if rgb is not None:
        dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])
    else:
        dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    rec = np.empty(n, dtype=dt)
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    fields = [PointField(name=c, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, c in enumerate("xyz")]
    if rgb is not None:
        c = rgb.astype(np.uint32)
        rec["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
        # RViz reads packed colour as a FLOAT32 field named rgb
        fields.append(PointField(name="rgb", offset=12, datatype=PointField.FLOAT32, count=1))
    if msg is None:
        msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, n
    msg.fields = fields
    msg.is_bigendian = False
    msg.point_step = dt.itemsize
    msg.row_step = dt.itemsize * n
    msg.is_dense = True
    msg.data = rec.tobytes()
    return msg
