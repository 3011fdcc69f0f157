"""Camera geometry shared by the generator, the readers and the tests.

Conventions: camera frame is OpenCV (x right, y down, z forward); poses are 4x4 camera-to-world;
the world is z-up. Depth is planar (z in the camera frame), in metres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Intrinsics":
        return Intrinsics(float(d["fx"]), float(d["fy"]), float(d["cx"]), float(d["cy"]),
                          int(d["width"]), int(d["height"]))


def project(points_cam: np.ndarray, intr: Intrinsics) -> np.ndarray:
    """[N,3] camera-frame points -> [N,2] pixel coordinates (u right, v down)."""
    z = points_cam[:, 2]
    return np.stack([intr.fx * points_cam[:, 0] / z + intr.cx,
                     intr.fy * points_cam[:, 1] / z + intr.cy], axis=1)


def backproject(depth: np.ndarray, intr: Intrinsics, mask: np.ndarray | None = None) -> np.ndarray:
    """Planar depth [H,W] -> [N,3] camera-frame points of the pixels in `mask` (pixel centres)."""
    v, u = np.nonzero(np.ones_like(depth, bool) if mask is None else mask)
    z = depth[v, u]
    x = (u + 0.5 - intr.cx) * z / intr.fx
    y = (v + 0.5 - intr.cy) * z / intr.fy
    return np.stack([x, y, z], axis=1)


def linearize_depth_buffer(buf: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL depth buffer in [0,1] -> planar metric depth (metres)."""
    buf = buf.astype(np.float64)
    return (far * near / (far - (far - near) * buf)).astype(np.float32)


def distance_to_planar(distance: np.ndarray, intr: Intrinsics) -> np.ndarray:
    """Euclidean distance to the camera centre [H,W] -> planar depth (Hypersim stores the former)."""
    h, w = distance.shape
    u = (np.arange(w) + 0.5 - intr.cx) / intr.fx
    v = (np.arange(h) + 0.5 - intr.cy) / intr.fy
    ray_norm = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + 1.0)
    return (distance / ray_norm).astype(np.float32)


def opengl_projection(intr: Intrinsics, near: float, far: float) -> list[float]:
    """Column-major OpenGL projection matrix that reproduces the pinhole intrinsics exactly."""
    w, h = intr.width, intr.height
    P = np.array([
        [2 * intr.fx / w, 0, 1 - 2 * intr.cx / w, 0],
        [0, 2 * intr.fy / h, 2 * intr.cy / h - 1, 0],
        [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
        [0, 0, -1, 0],
    ])
    return P.flatten(order="F").tolist()


_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def opengl_view(cam_to_world: np.ndarray) -> list[float]:
    """Column-major OpenGL view matrix (world -> GL camera) for an OpenCV camera-to-world pose."""
    return (_CV_TO_GL @ np.linalg.inv(cam_to_world)).flatten(order="F").tolist()


def look_pose(position, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world pose of an OpenCV camera at `position` looking along (yaw, pitch), rolled."""
    f = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)])
    r = np.cross(f, [0.0, 0.0, 1.0])
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    # Roll rotates the image plane axes about the optical axis.
    c, s = np.cos(roll), np.sin(roll)
    r, d = c * r + s * d, -s * r + c * d
    T = np.eye(4)
    T[:3, :3] = np.stack([r, d, f], axis=1)
    T[:3, 3] = position
    return T


def box_corners(centre: np.ndarray, size: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """8 corners [8,3] of an oriented box (size = full extents along the box's own axes)."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    return centre + (signs * (np.asarray(size) / 2)) @ np.asarray(rotation).T


def points_in_box(points: np.ndarray, centre, size, rotation, margin: float = 0.0) -> np.ndarray:
    """Boolean [N]: which points lie inside the oriented box grown by `margin` metres."""
    local = (points - np.asarray(centre)) @ np.asarray(rotation)
    return np.all(np.abs(local) <= np.asarray(size) / 2 + margin, axis=1)


def quat_to_matrix(q) -> np.ndarray:
    """(x, y, z, w) quaternion (PyBullet order) -> 3x3 rotation matrix."""
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
