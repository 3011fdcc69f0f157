"""What the node counts and measures, and its /diagnostics status.

Counters (all since start, never reset; tests and benchmarks take differences):
  frames_received (taken by the model worker), frames_superseded (replaced by a newer frame before
  a take, or lost on the way: gaps in the publisher's sequence numbers), frames_processed,
  frames_skipped (bad / stale frames, model refused),
  frames_idle (no output wanted), frames_behind_max (newest seq - processed seq when work starts),
  perception_preempted (a map stopped early because a question came: perception.yield_to_questions),
  depth_published, metric_depth_published, relative_depth_published, segmentation_published,
  labels_published, points_published, points_skipped (no camera_info with the frame's stamp, or
  one the node cannot use), alignment_ok, alignment_failed, queries_ok, queries_failed,
  queries_cancelled, model_errors.
Gauges: queries_waiting (questions queued for the model), model_worker_threads (0 or 1).
Timings (seconds: *_last_s, *_mean_s, *_max_s, *_count): decode, model_depth, model_seg,
  publish, overhead (decode + publish), end_to_end (camera stamp -> depth published), query
  (request -> answer), query_wait (request -> the model worker starts it), query_run (the
  worker's time on it, answered questions).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

__all__ = ["Stats", "COUNTERS", "TIMINGS", "rss_mb", "diagnostic_array"]

COUNTERS = ("frames_received", "frames_superseded", "frames_processed", "frames_skipped", "frames_idle",
            "frames_behind_max", "perception_preempted", "depth_published", "metric_depth_published",
            "relative_depth_published", "segmentation_published", "labels_published",
            "points_published", "points_skipped", "alignment_ok", "alignment_failed",
            "queries_ok", "queries_failed", "queries_cancelled", "model_errors")
TIMINGS = ("decode", "model_depth", "model_seg", "publish", "overhead", "end_to_end", "query",
           "query_wait", "query_run")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return float("nan")


class _Timing:
    __slots__ = ("n", "last", "total", "max")

    def __init__(self):
        self.n, self.last, self.total, self.max = 0, 0.0, 0.0, 0.0

    def add(self, v: float):
        self.n += 1
        self.last = v
        self.total += v
        self.max = max(self.max, v)


class Stats:
    """Thread-safe counters, timings and the last reasons (skip, error, alignment)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._c = dict.fromkeys(COUNTERS, 0)
        self._t = {k: _Timing() for k in TIMINGS}
        self.info: dict[str, str] = {}      # free-form values shown as they are (alignment fit ...)
        self.last_skip = ""
        self.last_error = ""
        self.last_error_time = -1e9

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def raise_to(self, key: str, value: int) -> None:
        with self._lock:
            self._c[key] = max(self._c[key], value)

    def time(self, key: str, seconds: float) -> None:
        with self._lock:
            self._t[key].add(seconds)

    def set_info(self, **values: Any) -> None:
        with self._lock:
            self.info.update({k: str(v) for k, v in values.items()})

    def error(self, text: str) -> None:
        self.last_error = text
        self.last_error_time = time.monotonic()

    def values(self) -> dict[str, str]:
        with self._lock:
            v = {k: str(x) for k, x in self._c.items()}
            for k, st in self._t.items():
                v[f"{k}_last_s"] = f"{st.last:.6f}"
                v[f"{k}_mean_s"] = f"{st.total / st.n if st.n else 0.0:.6f}"
                v[f"{k}_max_s"] = f"{st.max:.6f}"
                v[f"{k}_count"] = str(st.n)
            v.update(self.info)
        v["last_skip_reason"] = self.last_skip
        v["last_error"] = self.last_error
        v["rss_mb"] = f"{rss_mb():.1f}"
        return v


def diagnostic_array(node_name: str, stamp, state: str, configured: bool, active: bool,
                     trained: bool, hardware_id: str, values: dict[str, str], last_error: str,
                     error_recent: bool):
    """One DiagnosticArray with the node's status: ERROR when configure failed, WARN when not
    active, after a recent error or on untrained weights, else OK."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    st = DiagnosticStatus()
    st.name = f"{node_name}: cooper perception"
    st.hardware_id = hardware_id
    if not configured:
        st.level, st.message = DiagnosticStatus.WARN, f"not configured ({state})"
        if last_error:
            st.level, st.message = DiagnosticStatus.ERROR, last_error
    elif not active:
        st.level, st.message = DiagnosticStatus.WARN, "inactive"
    elif last_error and error_recent:
        st.level, st.message = DiagnosticStatus.WARN, last_error
    elif not trained:
        st.level, st.message = DiagnosticStatus.WARN, "running on UNTRAINED weights"
    else:
        st.level, st.message = DiagnosticStatus.OK, "running"
    st.values = [KeyValue(key=k, value=x) for k, x in values.items()]
    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [st]
    return arr
