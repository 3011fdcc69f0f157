"""Metric depth from a relative depth map and a sparse metric source the robot already has.

Per frame, the sparse source (a registered depth image, a point cloud or a laser scan, paired
with the frame by stamp) becomes a sparse target depth map on the frame's pixel grid, and
``cooper_model.alignment.fit_scale_shift(relative, target, robust=True)`` fits
``scale * relative + shift`` to it. The fit's quality goes to /diagnostics; a fit with too few
points or too few inliers gives no metric depth for that frame (and no point cloud).

Frames: the node does not read TF (it is not in the pip wheels). A depth image must be
registered to the camera image (e.g. a RealSense's aligned_depth_to_color); points and scans
are moved into the camera optical frame with the static pose ``alignment.source_to_camera``.
"""
from __future__ import annotations

import numpy as np

from . import image_codec as ic
from .camera import CameraModel
from .pointcloud import cloud_xyz

__all__ = ["AlignmentError", "SOURCES", "pose_matrix", "scan_xyz", "sparse_target", "align"]

SOURCES = ("depth", "points", "scan")


class AlignmentError(ValueError):
    """Why a frame got no metric depth from the sparse source."""


def pose_matrix(pose) -> np.ndarray:
    """x, y, z, qx, qy, qz, qw -> 4 x 4 transform (source frame -> camera optical frame)."""
    x, y, z, qx, qy, qz, qw = (float(v) for v in pose)
    n = np.sqrt(qx * qx + qy * qy + qz * qz + qw * qw)
    qx, qy, qz, qw = qx / n, qy / n, qz / n, qw / n
    t = np.eye(4)
    t[:3, :3] = [[1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
                 [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
                 [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)]]
    t[:3, 3] = (x, y, z)
    return t


def scan_xyz(msg) -> np.ndarray:
    """The valid returns of a sensor_msgs/LaserScan as N x 3 points in the scan's frame."""
    r = np.asarray(msg.ranges, dtype=np.float64)
    a = msg.angle_min + msg.angle_increment * np.arange(r.size)
    ok = np.isfinite(r) & (r >= msg.range_min) & (r <= msg.range_max)
    return np.stack([r[ok] * np.cos(a[ok]), r[ok] * np.sin(a[ok]), np.zeros(ok.sum())], axis=-1)


def _registered_depth(msg, shape) -> np.ndarray:
    """A depth image registered to the camera -> metres on the frame's grid (nearest), NaN
    where the sensor has nothing (0 or non-finite)."""
    if msg.encoding not in ("32FC1", "16UC1", "mono16"):
        raise AlignmentError(f"alignment depth image has encoding {msg.encoding!r}; "
                             f"32FC1 (metres) or 16UC1 (millimetres) expected")
    try:
        d = ic.image_to_array(msg).astype(np.float32)
    except ic.ImageConversionError as exc:
        raise AlignmentError(f"alignment depth image unusable: {exc}") from exc
    if msg.encoding != "32FC1":
        d = d / 1000.0
    h, w = int(shape[0]), int(shape[1])
    if d.shape != (h, w):  # nearest: never invent depths between two sensor readings
        rows = np.minimum((np.arange(h) + 0.5) * d.shape[0] / h, d.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * d.shape[1] / w, d.shape[1] - 1).astype(int)
        d = d[rows][:, cols]
    d = np.where(np.isfinite(d) & (d > 0), d, np.nan)
    return d


def _projected(xyz: np.ndarray, camera: CameraModel, shape) -> np.ndarray:
    """Camera-frame points -> sparse depth map (nearest point per pixel), NaN elsewhere."""
    h, w = int(shape[0]), int(shape[1])
    target = np.full((h, w), np.inf)
    if len(xyz):
        u, v, z = camera.project(xyz)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(u) & np.isfinite(v) & np.isfinite(z)
            ui, vi = np.floor(u[ok]).astype(int), np.floor(v[ok]).astype(int)
            inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
        np.minimum.at(target, (vi[inside], ui[inside]), z[ok][inside])
    target[~np.isfinite(target)] = np.nan
    return target.astype(np.float32)


def sparse_target(kind: str, msg, shape, camera: CameraModel | None, pose) -> np.ndarray:
    """The sparse source message as a metric target map of ``shape`` (NaN = no reading)."""
    if kind == "depth":
        return _registered_depth(msg, shape)
    if camera is None:
        raise AlignmentError("projecting points needs the frame's camera_info")
    try:
        pts = cloud_xyz(msg) if kind == "points" else scan_xyz(msg)
    except ValueError as exc:
        raise AlignmentError(f"alignment {kind} unusable: {exc}") from exc
    t = pose_matrix(pose)
    return _projected(pts @ t[:3, :3].T + t[:3, 3], camera, shape)


def align(relative: np.ndarray, target: np.ndarray, min_points: int, min_inlier_fraction: float):
    """Fit ``relative`` to ``target`` (robust scale and shift) -> (metric depth, fit).

    Raises AlignmentError when the fit is refused: too few points, too few inliers, or a scale
    that is not positive (the prediction does not grow with the measured depth)."""
    from cooper_model.alignment import fit_scale_shift

    try:
        fit = fit_scale_shift(relative, target, robust=True, min_points=min_points)
    except ValueError as exc:
        raise AlignmentError(str(exc)) from exc
    if fit.inlier_fraction < min_inlier_fraction:
        raise AlignmentError(f"fit kept {100 * fit.inlier_fraction:.0f} % of {fit.num_points} points "
                             f"as inliers (alignment.min_inlier_fraction={min_inlier_fraction})")
    if not fit.scale > 0:
        raise AlignmentError(f"fitted scale {fit.scale:.4g} is not positive")
    return fit.apply(relative), fit
