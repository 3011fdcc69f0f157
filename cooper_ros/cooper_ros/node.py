"""The cooper ROS 2 node: camera in, depth / segmentation out, /spatial_query service.

A thin adapter over ``cooper_model.CooperPipeline``: everything model-related goes through the
pipeline; this module only converts messages, schedules work and reports.

Start it with either of::

    python -m cooper_ros.node --ros-args --params-file cooper_ros/config/cooper.yaml \
        -r image:=/camera/image_raw -r camera_info:=/camera/camera_info
    ros2 run cooper_ros cooper_node --ros-args ...

Threads: the executor (multi-threaded) runs the subscriptions (they only store the newest
frame), the service/action (own callback group) and the diagnostics timer; perception runs in
its own worker thread. One lock serialises model calls; a waiting query goes before the next
perception frame, so a query waits at most for one frame in flight.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import image_codec as ic
from .params import (MODE_ALIASES, MODES, PARAMS, RECONFIGURE_ONLY, SPEC_BY_NAME, Settings,
                     check_consistency, check_value)

PACKAGE_DIR = Path(__file__).resolve().parent


def package_file(*rel: str) -> Path | None:
    """A file shipped with cooper_ros (config/, data/): in the source tree (editable / pip
    install from the repo) or in share/cooper_ros (colcon install)."""
    cands = [PACKAGE_DIR.parent.joinpath(*rel), PACKAGE_DIR.joinpath(*rel)]
    try:
        from ament_index_python.packages import get_package_share_directory
        cands.append(Path(get_package_share_directory("cooper_ros")).joinpath(*rel))
    except Exception:
        pass
    for c in cands:
        if c.exists():
            return c
    return None


def default_fastdds_profile() -> Path | None:
    """The bundled Fast DDS profile (large shared-memory segment), wherever it is installed."""
    return package_file("config", "fastdds_shm.xml")


def apply_default_environment() -> None:
    """Use the bundled Fast DDS profile unless the user chose one (must run before rclpy.init).

    The default Fast DDS shared-memory segment (~512 kB) is smaller than one camera image, so
    best-effort images fall back to fragmented UDP and are mostly lost. COOPER_FASTDDS_PROFILE=0
    disables this.
    """
    if os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or os.environ.get("COOPER_FASTDDS_PROFILE") == "0":
        return
    prof = default_fastdds_profile()
    if prof is not None:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(prof)


import rclpy  # noqa: E402
from rclpy.action import ActionServer, CancelResponse, GoalResponse  # noqa: E402
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor  # noqa: E402
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile,  # noqa: E402
                       ReliabilityPolicy)
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange,  # noqa: E402
                                ParameterDescriptor, SetParametersResult)
from builtin_interfaces.msg import Time as TimeMsg  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402

from cooper_interfaces.srv import SpatialQuery  # noqa: E402
from cooper_interfaces.action import SpatialQuery as SpatialQueryAction  # noqa: E402

from .pointcloud import depth_to_points, make_pointcloud2  # noqa: E402


class ParameterError(ValueError):
    """Invalid parameters at start; the message lists every reason."""


@dataclass
class Frame:
    msg: Any                 # sensor_msgs/Image or CompressedImage
    compressed: bool
    seq: int                 # 1, 2, ... in order of arrival
    recv_ns: int             # time.monotonic_ns() at arrival


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except Exception:  # pragma: no cover
        return float("nan")


class _Stat:
    """Running count / last / mean / max of a quantity (seconds)."""
    __slots__ = ("n", "last", "total", "max")

    def __init__(self):
        self.n, self.last, self.total, self.max = 0, 0.0, 0.0, 0.0

    def add(self, v: float):
        self.n += 1
        self.last = v
        self.total += v
        self.max = max(self.max, v)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


def _clean(text: Any) -> str:
    """A string rclpy can send: valid UTF-8, no NUL (a NUL cuts a ROS string short)."""
    s = "" if text is None else str(text)
    return s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return "OutOfMemory" in name or "out of memory" in str(exc).lower()


class CooperNode(LifecycleNode):
    """Lifecycle node: configure loads the model, activate starts processing."""

    def __init__(self, node_name: str = "cooper", **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._pipe = None
        self._pipe_info: dict[str, Any] = {}
        self._configured = False
        self._active = False
        self._state_label = "unconfigured"

        self._model_lock = threading.Lock()
        self._queries_waiting = 0
        self._qw_lock = threading.Lock()

        self._frame_cv = threading.Condition()
        self._frame: Frame | None = None
        self._recv_seq = 0
        self._camera_info: CameraInfo | None = None

        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

        self._stats_lock = threading.Lock()
        self._s = {
            "frames_received": 0, "frames_processed": 0, "frames_skipped": 0,
            "frames_idle": 0, "frames_behind_max": 0, "queries_ok": 0, "queries_failed": 0,
            "model_errors": 0,
        }
        self._t = {k: _Stat() for k in ("decode", "model_depth", "model_seg", "publish",
                                        "overhead", "end_to_end", "query")}
        self._last_skip = ""
        self._last_error = ""
        self._last_error_time = -1e9
        self._log_times: dict[str, float] = {}

        self._cb_sensor = MutuallyExclusiveCallbackGroup()
        self._cb_query = MutuallyExclusiveCallbackGroup()
        self._cb_misc = ReentrantCallbackGroup()

        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._srv = None
        self._action = None

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            float(self.get_parameter("diagnostics.period_s").value), self._publish_diagnostics,
            callback_group=self._cb_misc)

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        errors = []
        overrides = getattr(self, "_parameter_overrides", {})
        for spec in PARAMS:
            ov = overrides.get(spec.name)
            if ov is None:
                continue
            val = ov.value
            if spec.type is float and isinstance(val, int) and not isinstance(val, bool):
                val = float(val)  # YAML `5` for a float parameter
                overrides[spec.name] = Parameter(spec.name, value=val)
            why = check_value(spec.name, val)
            if why:
                errors.append(why)
        if errors:
            raise ParameterError("; ".join(errors))
        for spec in PARAMS:
            d = ParameterDescriptor(description=spec.description,
                                    read_only=False, dynamic_typing=False)
            extra = []
            if spec.min is not None and spec.type is float:
                d.floating_point_range = [FloatingPointRange(
                    from_value=float(spec.min), to_value=float(spec.max), step=0.0)]
            elif spec.min is not None and spec.type is int:
                d.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=1)]
            if spec.choices:
                extra.append("one of: " + ", ".join(spec.choices))
            if spec.pattern:
                extra.append(f"matches: {spec.pattern}")
            if spec.name in RECONFIGURE_ONLY:
                extra.append("applied at configure; change it while unconfigured")
            d.additional_constraints = "; ".join(extra)
            self.declare_parameter(spec.name, spec.default, d)
        vals = self._param_values()
        why = check_consistency(vals)
        if why:
            raise ParameterError(why)
        known = set(SPEC_BY_NAME) | {"use_sim_time", "start_type_description_service"}
        for name in overrides:
            if name not in known and not name.startswith("qos_overrides."):
                self.get_logger().warning(f"unknown parameter {name!r} in the parameters "
                                          f"(ignored; typo?)")

    def _param_values(self) -> dict[str, Any]:
        return {p.name: self.get_parameter(p.name).value for p in PARAMS}

    def _settings(self) -> Settings:
        return Settings(self._param_values())

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        vals = self._param_values()
        for p in params:
            if p.name not in SPEC_BY_NAME:
                continue
            v = p.value
            why = check_value(p.name, v)
            if why:
                self.get_logger().warning(f"refused parameter change: {why}")
                return SetParametersResult(successful=False, reason=why)
            if p.name in RECONFIGURE_ONLY and self._configured and v != vals[p.name]:
                why = (f"{p.name} is applied at configure: deactivate and clean up the node, set "
                       f"it, then configure again")
                self.get_logger().warning(f"refused parameter change: {why}")
                return SetParametersResult(successful=False, reason=why)
            vals[p.name] = v
        why = check_consistency(vals)
        if why:
            self.get_logger().warning(f"refused parameter change: {why}")
            return SetParametersResult(successful=False, reason=why)
        for p in params:
            if p.name == "diagnostics.period_s" and getattr(self, "_diag_timer", None) is not None:
                self._diag_timer.timer_period_ns = int(float(p.value) * 1e9)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        s = self._settings()
        try:
            self._load_model(s)
        except Exception as exc:  # noqa: BLE001 - report any load failure as a failed transition
            self._last_error = f"model load failed: {type(exc).__name__}: {exc}"
            self.get_logger().error(self._last_error)
            self._pipe = None
            return TransitionCallbackReturn.FAILURE
        self._create_interfaces(s)
        self._configured = True
        self._state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop.clear()
        self._active = True
        self._worker = threading.Thread(target=self._perception_loop, name="cooper-perception",
                                        daemon=True)
        self._worker.start()
        self._state_label = "active"
        self.get_logger().info("active: processing camera frames and answering queries")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        self._active = False
        self._stop.set()
        with self._frame_cv:
            self._frame_cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=60.0)
        self._worker = None

    def _teardown(self) -> None:
        self._stop_worker()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        if self._srv is not None:
            self.destroy_service(self._srv)
            self._srv = None
        if self._action is not None:
            self._action.destroy()
            self._action = None
        with self._model_lock:
            self._pipe = None
        self._configured = False

    def _load_model(self, s: Settings) -> None:
        from cooper_model import BUNDLED_CHECKPOINT, CooperPipeline

        path = s["model.checkpoint"] or str(BUNDLED_CHECKPOINT)
        device = s["model.device"]
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.monotonic()
        self.get_logger().info(f"loading checkpoint {path} on {device} ({s['model.dtype']}, "
                               f"backend {s['model.backend']})")
        pipe = CooperPipeline.from_pretrained(path, device=device, dtype=s["model.dtype"],
                                              backend=s["model.backend"])
        self._pipe = pipe
        self._pipe_info = {
            "checkpoint": path, "device": device, "dtype": s["model.dtype"],
            "backend": s["model.backend"], "trained": bool(getattr(pipe, "is_trained", False)),
            "depth_range": tuple(getattr(pipe, "depth_range", (0.0, 0.0))),
            "load_s": time.monotonic() - t0,
        }
        msg = (f"model loaded in {self._pipe_info['load_s']:.1f} s; depth range "
               f"{self._pipe_info['depth_range']} m")
        self.get_logger().info(msg)
        if not self._pipe_info["trained"]:
            self.get_logger().warning(
                "the checkpoint's weights are UNTRAINED (random): depth, segmentation and "
                "answers are meaningless until a trained checkpoint is used")

    def _create_interfaces(self, s: Settings) -> None:
        rel = (ReliabilityPolicy.BEST_EFFORT if s["input.reliability"] == "best_effort"
               else ReliabilityPolicy.RELIABLE)
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=rel,
                                durability=DurabilityPolicy.VOLATILE)
        info_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                              reliability=ReliabilityPolicy.BEST_EFFORT,
                              durability=DurabilityPolicy.VOLATILE)
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        self._subs.append(self.create_subscription(
            Image, "image", self._on_image, sensor_qos, callback_group=self._cb_sensor))
        self._image_topic = self.resolve_topic_name("image")
        if s["input.compressed"]:
            self._subs.append(self.create_subscription(
                CompressedImage, self._image_topic.rstrip("/") + "/compressed",
                self._on_compressed, sensor_qos, callback_group=self._cb_sensor))
        self._subs.append(self.create_subscription(
            CameraInfo, "camera_info", self._on_camera_info, info_qos,
            callback_group=self._cb_sensor))
        self._pubs = {
            "depth": self.create_publisher(Image, "~/depth/image", out_qos),
            "depth_colored": self.create_publisher(Image, "~/depth/colored", out_qos),
            "depth_info": self.create_publisher(CameraInfo, "~/depth/camera_info", out_qos),
            "seg": self.create_publisher(Image, "~/segmentation/image", out_qos),
            "labels": self.create_publisher(Image, "~/segmentation/labels", out_qos),
            "points": self.create_publisher(PointCloud2, "~/points", out_qos),
        }
        srv_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._srv = self.create_service(SpatialQuery, s["query.service_name"], self._on_query,
                                        qos_profile=srv_qos, callback_group=self._cb_query)
        if s["query.action_name"]:
            self._action = ActionServer(
                self, SpatialQueryAction, s["query.action_name"], self._on_action,
                goal_callback=lambda _g: GoalResponse.ACCEPT,
                cancel_callback=lambda _g: CancelResponse.REJECT,
                callback_group=self._cb_query)

    # ------------------------------------------------------------------ input
    def _on_image(self, msg: Image) -> None:
        self._store_frame(msg, compressed=False)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._store_frame(msg, compressed=True)

    def _store_frame(self, msg, compressed: bool) -> None:
        with self._frame_cv:
            self._recv_seq += 1
            self._frame = Frame(msg, compressed, self._recv_seq, time.monotonic_ns())
            self._frame_cv.notify()
        with self._stats_lock:
            self._s["frames_received"] += 1

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _decode(self, msg, compressed: bool, max_pixels: int) -> np.ndarray:
        if compressed:
            return ic.decode_compressed(msg, max_pixels)
        return ic.image_to_rgb8(msg, max_pixels)

    def _age_s(self, stamp) -> float:
        return (self.get_clock().now().nanoseconds - _stamp_ns(stamp)) / 1e9

    def _log(self, level: str, text: str) -> None:
        """Log at a severity chosen at run time (rclpy refuses to change the severity of one
        call site between calls, so each severity has its own line here)."""
        lg = self.get_logger()
        if level == "error":
            lg.error(text)
        elif level == "warning":
            lg.warning(text)
        else:
            lg.info(text)

    def _log_throttled(self, level: str, key: str, text: str, period: float = 2.0) -> None:
        now = time.monotonic()
        if now - self._log_times.get(key, -1e9) >= period:
            self._log_times[key] = now
            self._log(level, text)

    # ------------------------------------------------------------------ perception
    def _wanted_outputs(self, s: Settings) -> dict[str, bool]:
        p = self._pubs
        if not p or not s["perception.enabled"]:
            return {}

        def on(key, pub):
            return bool(s[key]) and p[pub].get_subscription_count() > 0

        w = {
            "depth": on("outputs.depth", "depth") or on("outputs.depth", "depth_info"),
            "depth_colored": on("outputs.depth_colored", "depth_colored"),
            "points": on("outputs.points", "points"),
            "seg": on("outputs.segmentation", "seg"),
            "labels": on("outputs.labels", "labels"),
        }
        return {k: v for k, v in w.items() if v}

    def _perception_loop(self) -> None:
        last_seq = 0
        last_start = 0.0
        while not self._stop.is_set():
            with self._frame_cv:
                while not self._stop.is_set() and (self._frame is None or self._frame.seq == last_seq):
                    self._frame_cv.wait(timeout=0.5)
                if self._stop.is_set():
                    return
            s = self._settings()
            rate = s["perception.rate_hz"]
            if rate > 0:
                wait = last_start + 1.0 / rate - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            want = self._wanted_outputs(s)
            if not want:
                with self._frame_cv:
                    last_seq = self._frame.seq if self._frame else last_seq
                with self._stats_lock:
                    self._s["frames_idle"] += 1
                continue
            last_start = time.monotonic()
            try:
                last_seq = self._process_newest(s, want)
            except Exception as exc:  # noqa: BLE001 - never let the worker die
                self._last_error = f"perception failed: {type(exc).__name__}: {exc}"
                self.get_logger().error(self._last_error + "\n" + traceback.format_exc())
                with self._stats_lock:
                    self._s["model_errors"] += 1
                with self._frame_cv:
                    last_seq = self._frame.seq if self._frame else last_seq

    def _yield_to_queries(self) -> None:
        """A query waiting for the model goes before the next perception step."""
        while self._queries_waiting > 0 and not self._stop.is_set():
            time.sleep(0.002)

    def _skip(self, frame: Frame, reason: str) -> None:
        with self._stats_lock:
            self._s["frames_skipped"] += 1
        self._last_skip = reason
        self._log_throttled("warning", "skip:" + reason[:60],
                            f"skipped camera frame #{frame.seq}: {reason}")

    def _model_failed(self, frame: Frame, exc: Exception) -> None:
        with self._stats_lock:
            self._s["model_errors"] += 1
        kind = "out of memory" if _is_oom(exc) else "error"
        self._last_error = f"model {kind} on frame #{frame.seq}: {type(exc).__name__}: {exc}"
        self._last_error_time = time.monotonic()
        self._log_throttled("error", "model:" + type(exc).__name__,
                            self._last_error + " (frame skipped)")
        self._release_memory()

    def _process_newest(self, s: Settings, want: dict) -> int:
        """Depth then segmentation of the newest frame; returns the frame's seq.

        The frame is taken when the model is free (so it is the newest one when work starts);
        depth outputs are published before segmentation runs, and a waiting query may use the
        model between the two.
        """
        need_depth = bool(want.get("depth") or want.get("depth_colored") or want.get("points"))
        need_seg = bool(want.get("seg") or want.get("labels"))
        ov = s.generation_overrides()
        self._yield_to_queries()
        with self._model_lock:
            if self._pipe is None:
                return 0
            with self._frame_cv:
                frame = self._frame
                newest_seq = self._recv_seq
            header = frame.msg.header
            t0 = time.perf_counter()
            max_age = s["input.max_image_age_s"]
            if max_age > 0 and _stamp_ns(header.stamp) > 0:
                age = self._age_s(header.stamp)
                if age > max_age:
                    self._skip(frame, f"frame is {age:.2f} s old (input.max_image_age_s={max_age})")
                    return frame.seq
            try:
                rgb = self._decode(frame.msg, frame.compressed, s["input.max_pixels"])
            except ic.ImageConversionError as exc:
                self._skip(frame, str(exc))
                return frame.seq
            t_dec = time.perf_counter() - t0
            with self._stats_lock:
                self._s["frames_behind_max"] = max(self._s["frames_behind_max"], newest_seq - frame.seq)
            depth_out = None
            if need_depth:
                depth_out, t_depth = self._infer(frame, self._pipe.depth, rgb, ov)
                if depth_out is None:
                    return frame.seq
        t_pub = 0.0
        if depth_out is not None:
            t1 = time.perf_counter()
            self._publish_depth(header, rgb, depth_out, s, want)
            t_pub += time.perf_counter() - t1
            e2e = self._age_s(header.stamp) if _stamp_ns(header.stamp) > 0 else float("nan")
            with self._stats_lock:
                self._t["model_depth"].add(t_depth)
                if e2e == e2e:
                    self._t["end_to_end"].add(e2e)
        if need_seg:
            self._yield_to_queries()
            with self._model_lock:
                if self._pipe is None:
                    return frame.seq
                seg_out, t_seg = self._infer(frame, self._pipe.segment, rgb, ov)
                if seg_out is None:
                    return frame.seq
            t1 = time.perf_counter()
            self._publish_seg(header, seg_out, want)
            t_pub += time.perf_counter() - t1
            with self._stats_lock:
                self._t["model_seg"].add(t_seg)
        with self._stats_lock:
            self._s["frames_processed"] += 1
            self._t["decode"].add(t_dec)
            self._t["publish"].add(t_pub)
            self._t["overhead"].add(t_dec + t_pub)
        return frame.seq

    def _infer(self, frame, task, rgb, overrides):
        """One model call on a camera frame: (output, seconds), or (None, 0) when the model refused
        or failed; then the frame is skipped with the reason logged and counted."""
        from cooper_model.pipeline import CooperInputError

        t1 = time.perf_counter()
        try:
            out = task(rgb, **overrides)
        except CooperInputError as exc:
            self._skip(frame, f"model refused the frame: {exc}")
            return None, 0.0
        except Exception as exc:  # noqa: BLE001 - any model failure skips the frame, the node stays up
            self._model_failed(frame, exc)
            return None, 0.0
        return out, time.perf_counter() - t1

    def _publish_depth(self, header, rgb, depth_out, s: Settings, want: dict) -> None:
        p = self._pubs
        depth = np.asarray(depth_out.depth, dtype=np.float32)
        lo, hi = s["depth.min_m"], s["depth.max_m"]
        if lo > 0 or hi > 0:  # REP 118: -inf too close, +inf too far, NaN invalid
            depth = depth.copy()
            with np.errstate(invalid="ignore"):
                if lo > 0:
                    depth[depth < lo] = -np.inf
                if hi > 0:
                    depth[depth > hi] = np.inf
        if want.get("depth"):
            p["depth"].publish(ic.array_to_image(depth, "32FC1", header))
            ci = self._camera_info
            if ci is not None:
                out = CameraInfo()
                out.header = header
                out.height, out.width = ci.height, ci.width
                out.distortion_model, out.d = ci.distortion_model, ci.d
                out.k, out.r, out.p = ci.k, ci.r, ci.p
                out.binning_x, out.binning_y, out.roi = ci.binning_x, ci.binning_y, ci.roi
                p["depth_info"].publish(out)
        if want.get("depth_colored"):
            p["depth_colored"].publish(ic.array_to_image(depth_out.colored, "rgb8", header))
        if want.get("points"):
            ci = self._camera_info
            if ci is None:
                self._log_throttled("warning", "points-noinfo",
                                    "~/points needs camera_info; none received yet", 10.0)
            else:
                try:
                    k = self._scaled_k(ci, depth.shape)
                    xyz, col = depth_to_points(depth, k, s["outputs.points_stride"],
                                               rgb if s["outputs.points_colored"] else None)
                    p["points"].publish(make_pointcloud2(xyz, header, col))
                except ValueError as exc:
                    self._log_throttled("warning", "points", f"~/points not published: {exc}", 10.0)

    def _publish_seg(self, header, seg_out, want: dict) -> None:
        p = self._pubs
        if want.get("seg"):
            p["seg"].publish(ic.array_to_image(seg_out.color, "rgb8", header))
        if want.get("labels"):
            p["labels"].publish(ic.array_to_image(
                np.asarray(seg_out.labels, dtype=np.uint16), "16UC1", header))

    @staticmethod
    def _scaled_k(ci: CameraInfo, shape) -> np.ndarray:
        k = np.asarray(ci.k, dtype=np.float64).reshape(3, 3).copy()
        if ci.width and ci.height and (ci.width != shape[1] or ci.height != shape[0]):
            k[0] *= shape[1] / ci.width
            k[1] *= shape[0] / ci.height
        return k.reshape(-1)

    def _release_memory(self) -> None:
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    # ------------------------------------------------------------------ queries
    def _on_query(self, req, resp):
        try:
            self._answer(req, resp)
        except Exception as exc:  # noqa: BLE001 - last resort: a service callback must not raise
            resp.success = False
            resp.message = _clean(f"internal error: {type(exc).__name__}: {exc}")
        return resp

    def _on_action(self, goal_handle):
        req = goal_handle.request
        fb = SpatialQueryAction.Feedback()
        t0 = time.monotonic()
        fb.stage = "running"
        goal_handle.publish_feedback(fb)
        result = SpatialQueryAction.Result()
        turns = []

        def on_event(kind, value):  # called by the model as each turn / map is produced
            fb = SpatialQueryAction.Feedback()
            fb.stage, fb.elapsed_s = kind, float(time.monotonic() - t0)
            if kind == "turn":
                fb.turn_index, fb.turn_text = len(turns), _clean(value)
                turns.append(value)
            else:
                fb.turn_index, fb.tool = max(len(turns) - 1, 0), _clean(value)
            goal_handle.publish_feedback(fb)

        self._answer(req, result, on_event)
        if result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _fail(self, resp, t0: float, text: str, level: str = "warning"):
        resp.success = False
        resp.message = _clean(text)
        resp.latency_s = float(time.monotonic() - t0)
        with self._stats_lock:
            self._s["queries_failed"] += 1
        self._log(level, f"spatial_query refused: {text}")
        return resp

    def _answer(self, req, resp, on_event=None):
        t0 = time.monotonic()
        try:
            return self._answer_inner(req, resp, t0, on_event)
        except Exception as exc:  # noqa: BLE001 - the service must always answer
            self.get_logger().error(traceback.format_exc())
            return self._fail(resp, t0, f"internal error: {type(exc).__name__}: {exc}", "error")

    def _answer_inner(self, req, resp, t0: float, on_event=None):
        s = self._settings()
        if not self._active or self._pipe is None:
            return self._fail(resp, t0, f"node is not active (lifecycle state: {self._state_label})")
        question = req.question or ""
        if not question.strip():
            return self._fail(resp, t0, "question is empty")
        limit = s["query.max_question_chars"]
        if len(question) > limit:
            return self._fail(resp, t0, f"question too long: {len(question)} characters, the limit "
                                        f"is {limit} (parameter query.max_question_chars)")
        mode_in = (req.mode or "").strip().lower()
        if mode_in not in MODE_ALIASES:
            return self._fail(resp, t0, f"unknown mode {req.mode!r}: use one of "
                                        f"{', '.join(repr(m) for m in MODES)} or empty (adaptive)")
        mode = MODE_ALIASES[mode_in] or MODE_ALIASES[s["query.default_mode"]]
        max_turns = int(req.max_turns) or int(s["query.max_turns"])

        img = req.image
        max_px = s["input.max_pixels"]
        if img.width == 0 and img.height == 0 and len(img.data) == 0 and not img.encoding:
            with self._frame_cv:
                frame = self._frame
            if frame is None:
                return self._fail(resp, t0, f"no camera frame received yet on "
                                            f"{getattr(self, '_image_topic', 'image')} and the "
                                            f"request has no image")
            header = frame.msg.header
            max_age = s["input.max_image_age_s"]
            if max_age > 0 and _stamp_ns(header.stamp) > 0:
                age = self._age_s(header.stamp)
                if age > max_age:
                    return self._fail(resp, t0, f"newest camera frame is {age:.2f} s old, the limit "
                                                f"is {max_age} s (parameter input.max_image_age_s)")
            try:
                rgb = self._decode(frame.msg, frame.compressed, max_px)
            except ic.ImageConversionError as exc:
                return self._fail(resp, t0, f"newest camera frame is unusable: {exc}")
        else:
            header = img.header
            try:
                rgb = ic.image_to_rgb8(img, max_px)
            except ic.ImageConversionError as exc:
                return self._fail(resp, t0, f"invalid image in request: {exc}")

        from cooper_model.pipeline import CooperInputError

        ov = s.generation_overrides(for_query=True)
        with self._qw_lock:
            self._queries_waiting += 1
        try:
            self._model_lock.acquire()
        finally:
            with self._qw_lock:
                self._queries_waiting -= 1
        try:
            if self._pipe is None:
                return self._fail(resp, t0, "model was unloaded")
            try:
                out = self._pipe.ask(rgb, question, mode=mode, max_turns=max_turns, on_event=on_event, **ov)
            except CooperInputError as exc:
                return self._fail(resp, t0, f"the model refused the input: {exc}")
            except Exception as exc:  # noqa: BLE001
                with self._stats_lock:
                    self._s["model_errors"] += 1
                self._release_memory()
                what = "model ran out of memory" if _is_oom(exc) else "model error"
                self._last_error = f"{what} during query: {type(exc).__name__}: {exc}"
                self._last_error_time = time.monotonic()
                return self._fail(resp, t0, f"{what} during inference: {type(exc).__name__}: "
                                            f"{exc}", "error")
        finally:
            self._model_lock.release()

        resp.success = True
        resp.message = "" if self._pipe_info.get("trained") else \
            "warning: the model's weights are untrained; the answer is meaningless"
        resp.answer = _clean(out.answer)
        resp.boxed_answer = _clean(out.boxed_answer)
        resp.reasoning_turns = [_clean(t) for t in out.turns]
        resp.tools_used = [_clean(t) for t in out.tools_used]
        if s["query.return_images"]:
            resp.auxiliary_images = [ic.array_to_image(np.asarray(im, dtype=np.uint8), "rgb8", header)
                                     for _name, im in out.images]
            resp.auxiliary_image_names = [_clean(n) for n, _im in out.images]
        resp.image_stamp = TimeMsg(sec=header.stamp.sec, nanosec=header.stamp.nanosec)
        resp.image_frame_id = header.frame_id
        resp.latency_s = float(time.monotonic() - t0)
        with self._stats_lock:
            self._s["queries_ok"] += 1
            self._t["query"].add(resp.latency_s)
        return resp

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict[str, str]:
        with self._stats_lock:
            v = {k: str(x) for k, x in self._s.items()}
            for k, st in self._t.items():
                v[f"{k}_last_s"] = f"{st.last:.6f}"
                v[f"{k}_mean_s"] = f"{st.mean:.6f}"
                v[f"{k}_max_s"] = f"{st.max:.6f}"
                v[f"{k}_count"] = str(st.n)
        v["lifecycle_state"] = self._state_label
        v["rss_mb"] = f"{_rss_mb():.1f}"
        v["last_skip_reason"] = self._last_skip
        v["last_error"] = self._last_error
        for k, x in self._pipe_info.items():
            v[f"model_{k}"] = str(x)
        return v

    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        st = DiagnosticStatus()
        st.name = f"{self.get_name()}: cooper perception"
        st.hardware_id = str(self._pipe_info.get("device", ""))
        vals = self.diagnostics_values()
        if not self._configured:
            st.level, st.message = DiagnosticStatus.WARN, f"not configured ({self._state_label})"
            if self._last_error:
                st.level, st.message = DiagnosticStatus.ERROR, self._last_error
        elif not self._active:
            st.level, st.message = DiagnosticStatus.WARN, "inactive"
        elif self._last_error and time.monotonic() - self._last_error_time < 10.0:
            st.level, st.message = DiagnosticStatus.WARN, self._last_error
        elif not self._pipe_info.get("trained"):
            st.level, st.message = DiagnosticStatus.WARN, "running on UNTRAINED weights"
        else:
            st.level, st.message = DiagnosticStatus.OK, "running"
        st.values = [KeyValue(key=k, value=x) for k, x in vals.items()]
        arr.status = [st]
        self._diag_pub.publish(arr)


def main(argv: list[str] | None = None) -> int:
    apply_default_environment()
    args = sys.argv if argv is None else argv
    rclpy.init(args=args)
    node = None
    rc = 0
    try:
        try:
            node = CooperNode()
        except ParameterError as exc:
            print(f"[cooper] invalid parameters, not starting: {exc}", file=sys.stderr, flush=True)
            return 2
        except Exception as exc:  # rclpy's own parameter exceptions (type mismatch, range)
            print(f"[cooper] invalid parameters, not starting: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            return 2
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        if node.get_parameter("lifecycle.autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                print(f"[cooper] configure failed: {node._last_error}", file=sys.stderr, flush=True)
                return 3
            node.trigger_activate()
        while rclpy.ok():
            try:
                executor.spin_once(timeout_sec=0.5)
            except (KeyboardInterrupt, ExternalShutdownException):
                break
            except Exception:  # noqa: BLE001 - a failing callback must not take the node down
                if not rclpy.ok():
                    break
                try:
                    node.get_logger().error("callback failed (node keeps running):\n"
                                            + traceback.format_exc())
                except Exception:  # pragma: no cover
                    pass
    finally:
        if node is not None:
            try:
                node._stop_worker()
                node.destroy_node()
            except Exception:  # pragma: no cover
                pass
        if rclpy.ok():
            rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
