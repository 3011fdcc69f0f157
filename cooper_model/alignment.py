"""Scale-and-shift alignment of a relative depth map to metric depth.

Released COOPER checkpoints give depth normalised per dataset, so upstream evaluates after a
least-squares fit `s * pred + b ~ target` (Marigold's protocol). The same fit, made robust to
outliers, turns relative depth into metres against a sparse metric source a robot already has
(a depth camera, a laser scan projected into the image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ScaleShiftFit:
    scale: float
    shift: float
    rmse: float  # over the inliers, in the target's unit
    inlier_fraction: float  # of the valid points; 1.0 for a plain least-squares fit
    num_points: int  # valid points the fit saw

    def apply(self, pred: np.ndarray) -> np.ndarray:
        return (self.scale * np.asarray(pred, dtype=np.float64) + self.shift).astype(np.float32)


def _least_squares(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    # Closed form of the weighted 2x2 normal equations; a flat prediction gives scale 0.
    w = np.ones_like(x) if w is None else w
    sw = w.sum()
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    var = (w * (x - mx) ** 2).sum()
    scale = float((w * (x - mx) * (y - my)).sum() / var) if var > 0 else 0.0
    return scale, float(my - scale * mx)


def fit_scale_shift(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None, robust: bool = False,
                    iterations: int = 10, min_points: int = 10) -> ScaleShiftFit:
    """Fit `scale * pred + shift` to `target` over `valid` pixels (default: where both are finite
    and the target is positive).

    `robust=True` iterates a trimmed fit: points whose residual exceeds 3 robust standard deviations
    (1.4826 * MAD) of the current fit are dropped, so a few wrong sparse readings (glass, edges,
    a scan hitting something the camera does not see) cannot drag the scale. Raises ValueError when
    fewer than `min_points` valid points remain."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    ok = np.isfinite(pred) & np.isfinite(target) & (target > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    x, y = pred[ok], target[ok]
    if x.size < min_points:
        raise ValueError(f"{x.size} valid points for a scale/shift fit; at least {min_points} are needed")
    inliers = np.ones(x.size, dtype=bool)
    scale, shift = _least_squares(x, y)
    if robust:
        for _ in range(iterations):
            residual = np.abs(scale * x + shift - y)
            mad = np.median(residual[inliers])
            keep = residual <= max(3.0 * 1.4826 * mad, 1e-9)
            if keep.sum() < min_points or np.array_equal(keep, inliers):
                break
            inliers = keep
            scale, shift = _least_squares(x[inliers], y[inliers])
    residual = scale * x[inliers] + shift - y[inliers]
    return ScaleShiftFit(scale, shift, float(np.sqrt(np.mean(residual**2))), float(inliers.mean()), int(x.size))


def depth_metrics(pred: np.ndarray, gt: np.ndarray, depth_range: tuple[float, float], align: bool) -> dict | None:
    """Upstream's (Marigold's) protocol: optional least-squares scale/shift of `pred` to `gt` over
    valid pixels, clamp to the range, then AbsRel, delta1 (max ratio < 1.25) and RMSE. None when
    fewer than 10 pixels are valid."""
    lo, hi = depth_range
    valid = np.isfinite(gt) & (gt > lo) & (gt < hi) & np.isfinite(pred)
    if valid.sum() < 10:
        return None
    p = pred.astype(np.float64)
    if align:
        p = fit_scale_shift(p, gt, valid).apply(p)
    p = np.clip(p, lo, hi)[valid]
    g = gt[valid].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    return {"absrel": float(np.mean(np.abs(p - g) / g)), "delta1": float(np.mean(ratio < 1.25)),
            "rmse": float(np.sqrt(np.mean((p - g) ** 2)))}
