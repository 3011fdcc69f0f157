"""Metric depth image <-> sensor_msgs/PointCloud2 (numpy)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .camera import CameraModel

__all__ = ["edge_mask", "depth_to_points", "make_pointcloud2", "cloud_xyz"]


def edge_mask(depth: np.ndarray, max_jump: float) -> np.ndarray:
    """True where a pixel's depth differs from one of its 4 neighbours by more than
    ``max_jump`` times its own depth.

    Model depth is soft across object edges (and upsampled to the camera's size), so pixels on an
    edge get depths between the object and the background: in a cloud they float in the air
    ("flying pixels"). They are the pixels with a large relative jump to a neighbour.
    """
    d = np.asarray(depth, dtype=np.float32)
    jump = np.zeros_like(d)
    with np.errstate(invalid="ignore"):
        dx = np.abs(d[:, 1:] - d[:, :-1])
        dy = np.abs(d[1:, :] - d[:-1, :])
        dx[~np.isfinite(dx)] = 0.0   # next to an invalid pixel: not an edge of the model's making
        dy[~np.isfinite(dy)] = 0.0
        np.maximum(jump[:, 1:], dx, out=jump[:, 1:])
        np.maximum(jump[:, :-1], dx, out=jump[:, :-1])
        np.maximum(jump[1:, :], dy, out=jump[1:, :])
        np.maximum(jump[:-1, :], dy, out=jump[:-1, :])
        return jump > max_jump * np.abs(d)


def depth_to_points(depth: np.ndarray, camera: CameraModel, stride: int = 1,
                    rgb: np.ndarray | None = None, max_edge_jump: float = 0.0):
    """Back-project a metric depth map (H x W, metres along the optical axis; NaN / inf invalid).

    Every ``stride``-th pixel in each direction; pixels on depth edges (see :func:`edge_mask`)
    are dropped when ``max_edge_jump`` > 0. Returns (xyz float32 N x 3 in the camera's optical
    frame, rgb uint8 N x 3 or None).
    """
    s = max(1, int(stride))
    d = depth[::s, ::s]
    rx, ry = camera.rays(depth.shape, s)
    valid = np.isfinite(d) & (d > 0)
    if max_edge_jump > 0:
        valid &= ~edge_mask(depth, max_edge_jump)[::s, ::s]
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


def cloud_xyz(msg: Any) -> np.ndarray:
    """The finite x, y, z (float32 or float64 fields) of any PointCloud2, as float64 N x 3."""
    from sensor_msgs.msg import PointField

    types = {PointField.FLOAT32: "f4", PointField.FLOAT64: "f8"}
    fields = {f.name: f for f in msg.fields}
    missing = [c for c in "xyz" if c not in fields or fields[c].datatype not in types]
    if missing:
        raise ValueError(f"point cloud has no float field(s) {', '.join(missing)}")
    n = int(msg.width) * int(msg.height)
    if n == 0:
        return np.zeros((0, 3))
    if len(msg.data) < n * msg.point_step:
        raise ValueError(f"point cloud data too short: {len(msg.data)} bytes for {n} points of "
                         f"{msg.point_step} bytes")
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype({"names": list("xyz"), "itemsize": int(msg.point_step),
                      "formats": [order + types[fields[c].datatype] for c in "xyz"],
                      "offsets": [fields[c].offset for c in "xyz"]})
    if msg.row_step and msg.height > 1 and msg.row_step != msg.width * msg.point_step:
        rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.row_step)
        raw = np.ascontiguousarray(rows[:, :msg.width * msg.point_step]).view(dtype).reshape(-1)
    else:
        raw = np.frombuffer(bytes(msg.data), dtype=dtype, count=n)
    xyz = np.stack([raw[c].astype(np.float64) for c in "xyz"], axis=-1)
    return xyz[np.isfinite(xyz).all(axis=1)]
