"""Camera frames in, depth and segmentation out.

The model worker asks :meth:`ready`, which takes the newest frame (and the camera_info and
sparse messages that came with it) from the node's inputs (``intake.py``: no callbacks), and runs
:meth:`step`. A step works on the newest frame at the moment it starts, so no backlog can build
up; depth and segmentation of one frame are two steps (a question may run between them). With
``perception.yield_to_questions`` a step also ends early when a question comes while its map is
being generated (the model checks between its stages): the frame's depth is dropped and the
frame taken again unless a newer one came, a segmentation is redone after the question;
``perception_preempted`` counts them.

What is published for a frame (each only when someone subscribes):
* ``~/depth/relative`` (32FC1, unitless [0, 1], larger = farther) and ``~/depth/colored``, always;
* ``~/depth/image`` (32FC1 metres) + ``~/depth/camera_info`` and ``~/points``, only when the
  checkpoint's depth is metric or this frame's depth was aligned to the sparse metric source;
  ``~/points`` and ``~/depth/camera_info`` also need the camera_info with the frame's stamp;
* ``~/segmentation/image`` (the colours as generated) and ``~/segmentation/labels`` (16UC1, only
  when the checkpoint declares a palette).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import image_codec as ic
from .camera import CameraModel, CameraModelError
from .metric import AlignmentError, align, sparse_target
from .pointcloud import depth_to_points, make_pointcloud2
from .sync import StampBuffer, stamp_ns

__all__ = ["Frame", "Perception", "is_oom"]

POLL_S = 0.005   # how often an idle worker looks for a new frame (a take that finds none costs microseconds)


@dataclass
class Frame:
    msg: Any                 # sensor_msgs/Image or CompressedImage
    compressed: bool
    seq: int                 # 1, 2, ... in order of arrival


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def decode(frame: Frame, max_pixels: int) -> np.ndarray:
    if frame.compressed:
        return ic.decode_compressed(frame.msg, max_pixels)
    return ic.image_to_rgb8(frame.msg, max_pixels)


class Perception:
    def __init__(self, node):
        self.node = node               # CooperNode: settings, model_info, stats, publish, logging
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._seq = 0
        self._taken = 0                # seq of the last frame a step took
        self._pending_seg: tuple | None = None   # (frame, rgb, want, overhead s) for its 2nd step
        self._last_start = -1e9
        self._min_start_gap = float("inf")   # shortest time between two perception starts (rate limit)
        self.camera_infos = StampBuffer(60)
        self.sparse = StampBuffer(30)
        self.intake = None             # the node's inputs while configured (cooper_ros.intake.Intake)
        self._should_stop = None       # the step in flight's should_stop (model calls check it)

    # ------------------------------------------------------------------ inputs (worker thread)
    def on_frame(self, msg, compressed: bool) -> None:
        with self._lock:
            self._seq += 1
            self._frame = Frame(msg, compressed, self._seq)
        self.node.stats.inc("frames_received")

    def poll(self) -> None:
        """Take what the inputs received since the last poll (the newest frame only)."""
        intake = self.intake
        if intake is not None:
            intake.poll()

    def newest(self) -> Frame | None:
        """The newest frame taken so far (call :meth:`poll` first for the newest received)."""
        with self._lock:
            return self._frame

    def reset(self) -> None:
        """Forget the frame half done (deactivate / activate)."""
        self._pending_seg = None

    # ------------------------------------------------------------------ worker thread
    def ready(self) -> float | None:
        if not self.node.active:
            return None
        if self._pending_seg is not None:
            return 0.0
        s = self.node.settings
        if not s["perception.enabled"]:
            return None
        rate = s["perception.rate_hz"]
        if rate > 0:
            wait = self._last_start + 1.0 / rate - time.monotonic()
            if wait > 0:
                return wait
        self.poll()
        with self._lock:
            if self._frame is None or self._frame.seq == self._taken:
                return POLL_S   # no new frame yet: look again soon (a question wakes the worker at once)
        return 0.0

    def step(self, pipe, should_stop=None) -> None:
        from cooper_model.inference import GenerationInterrupted

        self._should_stop = should_stop if self.node.settings["perception.yield_to_questions"] else None
        if self._pending_seg is not None:
            pending, self._pending_seg = self._pending_seg, None
            try:
                self._segment(pipe, *pending)
            except GenerationInterrupted:
                self._pending_seg = pending      # the same frame's segmentation, after the question
                self.node.stats.inc("perception_preempted")
            return
        with self._lock:
            frame, newest = self._frame, self._seq
            taken_before, self._taken = self._taken, frame.seq
        last_start_before = self._last_start
        try:
            self._frame_step(pipe, frame, newest)
        except GenerationInterrupted:
            # nothing of this frame was published: take it again unless a newer one came, and do
            # not charge the rate limit for the step that did not happen
            with self._lock:
                self._taken = taken_before
            self._last_start = last_start_before
            self.node.stats.inc("perception_preempted")

    def _frame_step(self, pipe, frame: Frame, newest: int) -> None:
        s = self.node.settings
        want = self._wanted(s)
        if not want:
            self.node.stats.inc("frames_idle")
            return
        now, stats = time.monotonic(), self.node.stats
        if now - self._last_start < self._min_start_gap:
            self._min_start_gap = now - self._last_start
            stats.set_info(perception_min_start_interval_s=f"{self._min_start_gap:.4f}")
        self._last_start = now
        stats.raise_to("frames_behind_max", newest - frame.seq)
        header = frame.msg.header
        max_age = s["input.max_image_age_s"]
        if max_age > 0 and stamp_ns(header.stamp) > 0:
            age = self.node.age_s(header.stamp)
            if age > max_age:
                return self._skip(frame, f"frame is {age:.2f} s old (input.max_image_age_s={max_age})")
        # pair now: by the end of the model call the buffer may have moved past this stamp
        ci = self.camera_infos.nearest(header.stamp, s["input.camera_info_tolerance_s"])
        sparse = (self.sparse.nearest(header.stamp, s["alignment.tolerance_s"])
                  if s["alignment.source"] != "none" else None)
        t0 = time.perf_counter()
        try:
            rgb = decode(frame, s["input.max_pixels"])
        except ic.ImageConversionError as exc:
            return self._skip(frame, str(exc))
        overhead = time.perf_counter() - t0
        stats.time("decode", overhead)
        if want & {"relative", "colored", "depth", "points"}:
            t_pub = self._depth(pipe, frame, rgb, want, s, ci, sparse)
            if t_pub is None:
                return
            overhead += t_pub
        if want & {"seg", "labels"}:
            self._pending_seg = (frame, rgb, want, overhead)
        else:
            stats.time("overhead", overhead)
            stats.inc("frames_processed")

    # ------------------------------------------------------------------ steps
    def _wanted(self, s) -> set[str]:
        info = self.node.model_info
        metric = info["depth_is_metric"] or s["alignment.source"] != "none"
        rules = {
            "relative": ("outputs.depth_relative", ("depth_relative",), True),
            "colored": ("outputs.depth_colored", ("depth_colored",), True),
            "depth": ("outputs.depth", ("depth", "depth_info"), metric),
            "points": ("outputs.points", ("points",), metric),
            "seg": ("outputs.segmentation", ("seg",), True),
            "labels": ("outputs.labels", ("labels",), info["has_palette"]),
        }
        return {name for name, (param, pubs, possible) in rules.items()
                if possible and s[param] and self.node.subscribed(*pubs)}

    def _infer(self, frame: Frame, task: str, fn, rgb, s):
        """One model call on a frame: its output, or None (frame skipped, reason counted)."""
        from cooper_model.inference import GenerationInterrupted
        from cooper_model.pipeline import CooperInputError

        t0 = time.perf_counter()
        try:
            out = fn(rgb, should_stop=self._should_stop, **s.generation_overrides())
        except GenerationInterrupted:
            raise                    # not a failure: the step yields to a question (see step)
        except CooperInputError as exc:
            self._skip(frame, f"model refused the frame: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - any model failure skips the frame, the node stays up
            self.node.model_failed(f"frame #{frame.seq}", exc)
            return None
        self.node.stats.time(task, time.perf_counter() - t0)
        return out

    def _depth(self, pipe, frame: Frame, rgb, want: set[str], s, ci, sparse) -> float | None:
        """The depth step; returns the seconds spent publishing, None when the model failed."""
        out = self._infer(frame, "model_depth", pipe.depth, rgb, s)
        if out is None:
            return None
        node, stats, header = self.node, self.node.stats, frame.msg.header
        t0 = time.perf_counter()
        if ci is None or (sparse is None and s["alignment.source"] != "none"):
            self.poll()   # they may have come after the image
        if ci is None:
            ci = self.camera_infos.nearest(header.stamp, s["input.camera_info_tolerance_s"])
        if sparse is None and s["alignment.source"] != "none":
            sparse = self.sparse.nearest(header.stamp, s["alignment.tolerance_s"])
        metric = None
        if want & {"depth", "points"}:
            metric = self._metric(out, header, rgb.shape, ci, sparse, s)
        published = False   # stays False when the node was deactivated meanwhile
        if "relative" in want and node.publish("depth_relative", ic.array_to_image(
                np.asarray(out.relative, dtype=np.float32), "32FC1", header)):
            stats.inc("relative_depth_published")
            published = True
        if "colored" in want:
            published |= node.publish("depth_colored", ic.array_to_image(out.colored, "rgb8", header))
        if metric is not None and "depth" in want:
            if node.publish("depth", ic.array_to_image(metric, "32FC1", header)):
                stats.inc("metric_depth_published")
                published = True
            if ci is not None:
                node.publish("depth_info", _camera_info_for(ci, header))
        if metric is not None and "points" in want:
            published |= self._points(metric, rgb, header, ci, s)
        if published:
            stats.inc("depth_published")
        t_pub = time.perf_counter() - t0
        stats.time("publish", t_pub)
        if stamp_ns(header.stamp) > 0:
            stats.time("end_to_end", node.age_s(header.stamp))
        return t_pub

    def _metric(self, out, header, shape, ci, sparse, s) -> np.ndarray | None:
        """Metric depth of this frame (the model's, or aligned), REP 118 limits applied; None
        when the checkpoint is relative and the alignment failed."""
        if self.node.model_info["depth_is_metric"]:
            depth = np.asarray(out.depth, dtype=np.float32)
        else:
            depth = self._aligned(np.asarray(out.relative, dtype=np.float32), shape, ci, sparse, s)
            if depth is None:
                return None
        lo, hi = s["depth.min_m"], s["depth.max_m"]
        if lo > 0 or hi > 0:  # REP 118: -inf too close, +inf too far, NaN invalid
            depth = depth.copy()
            with np.errstate(invalid="ignore"):
                if lo > 0:
                    depth[depth < lo] = -np.inf
                if hi > 0:
                    depth[depth > hi] = np.inf
        return depth

    def _aligned(self, relative, shape, ci, msg, s) -> np.ndarray | None:
        kind, stats = s["alignment.source"], self.node.stats
        try:
            if msg is None:
                raise AlignmentError(f"no alignment {kind} message within "
                                     f"{s['alignment.tolerance_s']} s of the frame")
            camera = CameraModel.from_camera_info(ci, shape, s["input.rectified"]) if ci else None
            target = sparse_target(kind, msg, shape[:2], camera, s["alignment.source_to_camera"])
            depth, fit = align(relative, target, s["alignment.min_points"],
                               s["alignment.min_inlier_fraction"])
        except (AlignmentError, CameraModelError) as exc:
            stats.inc("alignment_failed")
            stats.set_info(alignment_last_failure=str(exc))
            self.node.log_throttled("warning", "alignment", f"no metric depth for this frame: {exc}", 10.0)
            return None
        stats.inc("alignment_ok")
        stats.set_info(alignment_scale=f"{fit.scale:.6g}", alignment_shift=f"{fit.shift:.6g}",
                       alignment_rmse_m=f"{fit.rmse:.4f}", alignment_inlier_fraction=f"{fit.inlier_fraction:.3f}",
                       alignment_points=fit.num_points)
        depth[~(depth > 0)] = np.nan    # a shifted prediction at or behind the camera is invalid
        return depth

    def _points(self, metric, rgb, header, ci, s) -> bool:
        stats = self.node.stats
        if ci is None:
            stats.inc("points_skipped")
            self.node.log_throttled("warning", "points-noinfo",
                                    "~/points skipped: no camera_info with the frame's stamp (within "
                                    "input.camera_info_tolerance_s)", 10.0)
            return False
        try:
            camera = CameraModel.from_camera_info(ci, metric.shape, s["input.rectified"])
        except CameraModelError as exc:
            stats.inc("points_skipped")
            self.node.log_throttled("warning", "points", f"~/points skipped: {exc}", 10.0)
            return False
        xyz, col = depth_to_points(metric, camera, s["outputs.points_stride"],
                                   rgb if s["outputs.points_colored"] else None,
                                   s["outputs.points_max_edge_jump"])
        if self.node.publish("points", make_pointcloud2(xyz, header, col)):
            stats.inc("points_published")
            return True
        return False

    def _segment(self, pipe, frame: Frame, rgb, want: set[str], overhead: float) -> None:
        s = self.node.settings
        out = self._infer(frame, "model_seg", pipe.segment, rgb, s)
        if out is None:
            return
        header, stats = frame.msg.header, self.node.stats
        t0 = time.perf_counter()
        if "seg" in want and self.node.publish("seg", ic.array_to_image(out.raw, "rgb8", header)):
            stats.inc("segmentation_published")
        if "labels" in want and out.labels is not None and self.node.publish(
                "labels", ic.array_to_image(np.asarray(out.labels, dtype=np.uint16), "16UC1", header)):
            stats.inc("labels_published")
        t_pub = time.perf_counter() - t0
        stats.time("publish", t_pub)
        stats.time("overhead", overhead + t_pub)
        stats.inc("frames_processed")

    def _skip(self, frame: Frame, reason: str) -> None:
        stats = self.node.stats
        stats.inc("frames_skipped")
        stats.last_skip = reason
        self.node.log_throttled("warning", "skip:" + reason[:60], f"skipped camera frame #{frame.seq}: {reason}")


def _camera_info_for(ci, header):
    """The frame's camera_info with the frame's header (depth_image_proc pairs them exactly)."""
    from sensor_msgs.msg import CameraInfo

    out = CameraInfo()
    out.header = header
    out.height, out.width = ci.height, ci.width
    out.distortion_model, out.d = ci.distortion_model, ci.d
    out.k, out.r, out.p = ci.k, ci.r, ci.p
    out.binning_x, out.binning_y, out.roi = ci.binning_x, ci.binning_y, ci.roi
    return out
