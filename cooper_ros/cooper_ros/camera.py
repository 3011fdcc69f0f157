"""Pixel rays and projection from a sensor_msgs/CameraInfo (numpy; image_geometry is not in the
pip wheels).

Two ways to read a CameraInfo, chosen by the node's `input.rectified`:

* raw image (image_raw): intrinsics K and distortion D. A pixel's ray is found by undoing the
  distortion (plumb_bob and rational_polynomial by the fixed-point iteration OpenCV's
  undistortPoints uses, equidistant by Newton on the angle), so lens distortion does not bend
  the point cloud.
* rectified image (image_rect): the projection matrix P; D is already applied by the
  rectifier. The rectification rotation R and a stereo baseline (P's Tx, Ty) are not applied:
  points are in the rectified camera frame, which is the optical frame of a monocular camera.

Intrinsics are scaled when the image the rays are for is not the CameraInfo's size. Binning and
ROI are not supported (a CameraInfo that uses them is refused).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CameraModel", "CameraModelError"]


class CameraModelError(ValueError):
    """A CameraInfo the node cannot use, with the reason."""


_RADIAL = ("plumb_bob", "rational_polynomial")
_FISHEYE = ("equidistant",)


@dataclass(frozen=True)
class CameraModel:
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = ""
    d: tuple = ()              # empty: no distortion to undo

    @classmethod
    def from_camera_info(cls, ci, shape, rectified: bool) -> "CameraModel":
        """The model of ``ci`` for an image of ``shape`` (H, W)."""
        if (ci.binning_x or 0) > 1 or (ci.binning_y or 0) > 1 or (ci.roi.width and ci.roi.height):
            raise CameraModelError("camera_info uses binning or a region of interest (not supported)")
        if rectified:
            p = np.asarray(ci.p, dtype=np.float64).reshape(-1)
            if p.size != 12:
                raise CameraModelError("camera_info has no projection matrix P")
            fx, cx, fy, cy = p[0], p[2], p[5], p[6]
            dm, d = "", ()
        else:
            k = np.asarray(ci.k, dtype=np.float64).reshape(-1)
            fx, cx, fy, cy = k[0], k[2], k[4], k[5]
            d = tuple(float(x) for x in ci.d)
            dm = ci.distortion_model or ""
            if not any(d):
                dm, d = "", ()
            elif dm not in _RADIAL + _FISHEYE:
                raise CameraModelError(
                    f"distortion model {dm!r} is not supported (plumb_bob, rational_polynomial, "
                    f"equidistant); rectify the image (image_proc) and set input.rectified")
        if not (fx > 0 and fy > 0):
            raise CameraModelError(f"camera_info has no valid focal length (fx={fx}, fy={fy})")
        h, w = int(shape[0]), int(shape[1])
        if ci.width and ci.height and (ci.width != w or ci.height != h):
            sx, sy = w / ci.width, h / ci.height
            fx, cx, fy, cy = fx * sx, cx * sx, fy * sy, cy * sy
        return cls(float(fx), float(fy), float(cx), float(cy), dm, d)

    # ------------------------------------------------------------------ distortion
    def _distort(self, x, y):
        """Normalised undistorted -> distorted coordinates."""
        d = self.d
        if self.distortion_model in _FISHEYE:
            k = (list(d) + [0.0] * 4)[:4]
            r = np.hypot(x, y)
            th = np.arctan(r)
            th2 = th * th
            thd = th * (1 + th2 * (k[0] + th2 * (k[1] + th2 * (k[2] + th2 * k[3]))))
            s = np.where(r > 1e-12, thd / np.maximum(r, 1e-12), 1.0)
            return x * s, y * s
        k1, k2, p1, p2, k3, k4, k5, k6 = (list(d) + [0.0] * 8)[:8]
        r2 = x * x + y * y
        radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
        return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
                y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)

    def _undistort(self, xd, yd, iterations: int = 20):
        """Normalised distorted -> undistorted coordinates."""
        d = self.d
        if self.distortion_model in _FISHEYE:
            k = (list(d) + [0.0] * 4)[:4]
            thd = np.hypot(xd, yd)
            th = np.minimum(thd, np.pi / 2 - 1e-6)
            for _ in range(iterations):  # Newton on th * (1 + k1 th^2 + ...) = thd
                th2 = th * th
                f = th * (1 + th2 * (k[0] + th2 * (k[1] + th2 * (k[2] + th2 * k[3])))) - thd
                df = 1 + th2 * (3 * k[0] + th2 * (5 * k[1] + th2 * (7 * k[2] + th2 * 9 * k[3])))
                th = th - f / df
            s = np.where(thd > 1e-12, np.tan(th) / np.maximum(thd, 1e-12), 1.0)
            return xd * s, yd * s
        k1, k2, p1, p2, k3, k4, k5, k6 = (list(d) + [0.0] * 8)[:8]
        x, y = xd.copy(), yd.copy()
        for _ in range(iterations):
            r2 = x * x + y * y
            radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
            dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
            dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
            x, y = (xd - dx) / radial, (yd - dy) / radial
        return x, y

    # ------------------------------------------------------------------ rays and projection
    def rays(self, shape, stride: int = 1):
        """(x/z, y/z) of every stride-th pixel centre of an image of ``shape``, float32 grids."""
        key = (self, int(shape[0]), int(shape[1]), int(stride))
        r = _RAY_CACHE.get(key)
        if r is None:
            s = max(1, int(stride))
            u = (np.arange(0, shape[1], s, dtype=np.float64) - self.cx) / self.fx
            v = (np.arange(0, shape[0], s, dtype=np.float64) - self.cy) / self.fy
            xd, yd = np.meshgrid(u, v)
            x, y = self._undistort(xd, yd) if self.d else (xd, yd)
            r = (x.astype(np.float32), y.astype(np.float32))
            if len(_RAY_CACHE) > 16:
                _RAY_CACHE.clear()
            _RAY_CACHE[key] = r
        return r

    def project(self, xyz: np.ndarray):
        """Camera-frame points N x 3 -> (u, v, z) pixel coordinates and depth; points behind the
        camera get NaN."""
        xyz = np.asarray(xyz, dtype=np.float64)
        z = xyz[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            front = z > 1e-6
            x = np.where(front, xyz[:, 0] / z, np.nan)
            y = np.where(front, xyz[:, 1] / z, np.nan)
        if self.d:
            x, y = self._distort(x, y)
        return self.fx * x + self.cx, self.fy * y + self.cy, np.where(front, z, np.nan)


_RAY_CACHE: dict = {}
