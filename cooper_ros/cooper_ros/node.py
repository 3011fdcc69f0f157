"""The cooper ROS 2 node: camera in, depth / segmentation out, /spatial_query service and action.

A thin adapter over ``cooper_model.CooperPipeline``. This module holds the node's parameters and
lifecycle and wires the parts together, each in a file of its own:

* ``perception.py``: frames in, depth / segmentation / point cloud out;
* ``queries.py``: the service and the action;
* ``worker.py``: the one thread that makes every model call (why: see there);
* ``intake.py``: camera input, taken by that thread when it wants a frame;
* ``diagnostics.py``: counters, timings and the /diagnostics status.

Start it with either of::

    python -m cooper_ros.node --ros-args --params-file cooper_ros/config/cooper.yaml \
        -r image:=/camera/image_raw -r camera_info:=/camera/camera_info
    ros2 run cooper_ros cooper_node --ros-args ...

Threads: a SingleThreadedExecutor runs every callback (they check requests and queue work; none
waits for the model; camera input has no callback: the worker takes it, see ``intake.py``) and the
model worker runs the model. Lifecycle: configure
loads the model and starts the worker, activate/deactivate only open and close the gate (no
thread starts or stops, so deactivate returns at once and never leaves two workers), cleanup
stops the worker after its call in flight and frees the model.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

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
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange,  # noqa: E402
                                ParameterDescriptor, SetParametersResult)
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, LaserScan, PointCloud2  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from .diagnostics import Stats, diagnostic_array  # noqa: E402
from .intake import Intake  # noqa: E402
from .params import (PARAMS, RECONFIGURE_ONLY, SPEC_BY_NAME, Settings,  # noqa: E402
                     check_consistency, check_value)
from .perception import Perception, is_oom  # noqa: E402
from .queries import QueryServer  # noqa: E402
from .sync import stamp_ns  # noqa: E402
from .worker import THREAD_NAME, ModelWorker  # noqa: E402

# seconds cleanup waits for the model call in flight before it reports failure
STOP_TIMEOUT_S = 60.0

SPARSE_TOPICS = {"depth": ("alignment/depth", Image), "points": ("alignment/points", PointCloud2),
                 "scan": ("alignment/scan", LaserScan)}


class ParameterError(ValueError):
    """Invalid parameters at start; the message lists every reason."""


def parse_device_map(text: str):
    """The model.device_map parameter -> from_pretrained's device_map (None, "auto" or a dict)."""
    if not text:
        return None
    return text if text == "auto" else json.loads(text)


class CooperNode(LifecycleNode):
    """Lifecycle node: configure loads the model, activate starts processing."""

    def __init__(self, node_name: str = "cooper", **kwargs):
        self._queries: QueryServer | None = None   # first: rclpy destroys a node that failed to start
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        self.settings = Settings(self._param_values())   # replaced whole after every change
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self.stats = Stats()
        self.perception = Perception(self)
        self.worker: ModelWorker | None = None
        self.model_info: dict[str, Any] = {"trained": False, "reasoning_trained": False, "depth_is_metric": False, "has_palette": False}
        self.active = False
        self.state_label = "unconfigured"
        self.image_topic = self.resolve_topic_name("image")
        self._configured = False

        self._pub_lock = threading.Lock()   # publishing vs deactivate / teardown
        self._pubs: dict[str, Any] = {}
        self._log_times: dict[str, float] = {}

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(float(self.settings["diagnostics.period_s"]),
                                             self._publish_diagnostics)

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
            elif spec.type is list and isinstance(val, (list, tuple)) and \
                    all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in val):
                val = [float(x) for x in val]  # YAML [0, 0, 1] for a double array
                overrides[spec.name] = Parameter(spec.name, value=val)
            why = check_value(spec.name, val)
            if why:
                errors.append(why)
        if errors:
            raise ParameterError("; ".join(errors))
        for spec in PARAMS:
            d = ParameterDescriptor(description=spec.description, read_only=False, dynamic_typing=False)
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
        why = check_consistency(self._param_values())
        if why:
            raise ParameterError(why)
        known = set(SPEC_BY_NAME) | {"use_sim_time", "start_type_description_service"}
        for name in overrides:
            if name not in known and not name.startswith("qos_overrides."):
                self.get_logger().warning(f"unknown parameter {name!r} in the parameters (ignored; typo?)")

    def _param_values(self) -> dict[str, Any]:
        vals = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        for p in PARAMS:
            if p.type is list:
                vals[p.name] = [float(x) for x in vals[p.name]]
        return vals

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        vals = self._param_values()
        for p in params:
            if p.name not in SPEC_BY_NAME:
                continue
            why = check_value(p.name, p.value)
            if not why and p.name in RECONFIGURE_ONLY and self._configured and p.value != vals[p.name]:
                why = (f"{p.name} is applied at configure: deactivate and clean up the node, set "
                       f"it, then configure again")
            if why:
                self.get_logger().warning(f"refused parameter change: {why}")
                return SetParametersResult(successful=False, reason=why)
            vals[p.name] = p.value
        why = check_consistency(vals)
        if why:
            self.get_logger().warning(f"refused parameter change: {why}")
            return SetParametersResult(successful=False, reason=why)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        self.settings = Settings(self._param_values())
        if any(p.name == "diagnostics.period_s" for p in params):
            self._diag_timer.timer_period_ns = int(self.settings["diagnostics.period_s"] * 1e9)
        if self.worker is not None:
            self.worker.notify()   # e.g. perception re-enabled

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        s = self.settings
        try:
            pipe = self._load_model(s)
        except Exception as exc:  # noqa: BLE001 - report any load failure as a failed transition
            self.stats.error(f"model load failed: {type(exc).__name__}: {exc}")
            self.get_logger().error(self.stats.last_error)
            return TransitionCallbackReturn.FAILURE
        self._create_interfaces(s, pipe)
        self.worker = ModelWorker(pipe, self.perception.ready, self.perception.step,
                                  self._worker_crashed, cpu_threads=s["model.cpu_threads"]).start()
        self._configured = True
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.perception.reset()
        with self._pub_lock:
            self.active = True
        self.state_label = "active"
        self.worker.notify()
        self.get_logger().info("active: processing camera frames and answering queries")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_gate()
        self.state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._teardown("unconfigured")

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._teardown("finalized")

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._teardown("unconfigured")

    def _close_gate(self) -> None:
        """Stop publishing and drop the queued questions. The model call in flight finishes in
        the worker; its outputs are not published."""
        with self._pub_lock:
            self.active = False
        self.perception.reset()
        if self.worker is not None:
            self.worker.drop_queued("the node was deactivated")

    def _teardown(self, label: str) -> TransitionCallbackReturn:
        self._close_gate()
        if self.worker is not None:
            if not self.worker.stop(STOP_TIMEOUT_S):
                self.stats.error(f"the model call in flight did not end within {STOP_TIMEOUT_S} s; "
                                 f"the model is still loaded")
                self.get_logger().error(self.stats.last_error)
                return TransitionCallbackReturn.FAILURE
            self.worker = None
        with self._pub_lock:
            for pub in self._pubs.values():
                self.destroy_publisher(pub)
            self._pubs = {}
        if self.perception.intake is not None:
            self.perception.intake.destroy()
            self.perception.intake = None
        self.perception.camera_infos.clear()
        self.perception.sparse.clear()
        self._release_memory()
        self._configured = False
        self.state_label = label
        return TransitionCallbackReturn.SUCCESS

    def _load_model(self, s: Settings):
        from cooper_model import BUNDLED_CHECKPOINT, CooperPipeline

        path = s["model.checkpoint"] or str(BUNDLED_CHECKPOINT)
        device = s["model.device"]
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.monotonic()
        self.get_logger().info(f"loading checkpoint {path} on {device} ({s['model.dtype']}, backend "
                               f"{s['model.backend']}, device map {s['model.device_map'] or 'none'})")
        pipe = CooperPipeline.from_pretrained(path, device=device, dtype=s["model.dtype"],
                                              backend=s["model.backend"],
                                              device_map=parse_device_map(s["model.device_map"]))
        self.model_info = {
            "checkpoint": path, "device": device, "dtype": s["model.dtype"], "backend": pipe.backend,
            "backend_requested": s["model.backend"],
            "trained": bool(pipe.is_trained), "reasoning_trained": bool(pipe.reasoning_trained),
            "depth_range": tuple(pipe.depth_range),
            "depth_is_metric": bool(pipe.depth_is_metric), "has_palette": bool(pipe.has_palette),
            "load_s": round(time.monotonic() - t0, 3),
        }
        for note in pipe.backend_notes:   # why the backends before the chosen one were skipped
            self.get_logger().info(f"backend: {note}")
        kind = "metric" if pipe.depth_is_metric else "relative"
        self.get_logger().info(f"model loaded in {self.model_info['load_s']:.1f} s on backend {pipe.backend}; "
                               f"depth is {kind}; "
                               f"{'a palette of ' + str(len(pipe.class_names)) + ' classes' if pipe.has_palette else 'no palette (no labels)'}")
        if not pipe.depth_is_metric:
            how = (f"aligned to alignment/{s['alignment.source']}" if s["alignment.source"] != "none"
                   else "not published: set alignment.source to align it to a metric sensor")
            self.get_logger().info(f"relative depth goes to ~/depth/relative; metric ~/depth/image and "
                                   f"~/points are {how}")
        if not pipe.is_trained:
            self.get_logger().warning(
                "the checkpoint's weights are UNTRAINED (random): depth, segmentation and "
                "answers are meaningless until a trained checkpoint is used")
        elif not pipe.reasoning_trained:
            self.get_logger().warning(
                "the checkpoint went through stage 1 only: its depth and segmentation are trained, "
                "its answers to /spatial_query are not (stage 2 is missing)")
        return pipe

    def _create_interfaces(self, s: Settings, pipe) -> None:
        rel = (ReliabilityPolicy.BEST_EFFORT if s["input.reliability"] == "best_effort"
               else ReliabilityPolicy.RELIABLE)
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=rel,
                                durability=DurabilityPolicy.VOLATILE)
        # several messages: the one with the frame's stamp must still be there when work starts
        buffered_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                  reliability=ReliabilityPolicy.BEST_EFFORT,
                                  durability=DurabilityPolicy.VOLATILE)
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        latched_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        p = self.perception
        self.image_topic = self.resolve_topic_name("image")
        # taken by the model worker when it wants them, never delivered by callbacks (intake.py)
        intake = Intake(self, lambda n: self.stats.inc("frames_superseded", n))
        intake.add(Image, self.image_topic, sensor_qos, lambda m: p.on_frame(m, False), newest_only=True)
        if s["input.compressed"]:
            intake.add(CompressedImage, self.image_topic.rstrip("/") + "/compressed", sensor_qos,
                       lambda m: p.on_frame(m, True), newest_only=True)
        intake.add(CameraInfo, self.resolve_topic_name("camera_info"), buffered_qos, p.camera_infos.add,
                   newest_only=False)
        if s["alignment.source"] != "none":
            topic, typ = SPARSE_TOPICS[s["alignment.source"]]
            intake.add(typ, self.resolve_topic_name(topic), buffered_qos, p.sparse.add, newest_only=False)
        p.intake = intake
        pubs = {
            "depth": (Image, "~/depth/image"), "depth_relative": (Image, "~/depth/relative"),
            "depth_colored": (Image, "~/depth/colored"), "depth_info": (CameraInfo, "~/depth/camera_info"),
            "seg": (Image, "~/segmentation/image"), "points": (PointCloud2, "~/points"),
        }
        if pipe.has_palette:
            pubs["labels"] = (Image, "~/segmentation/labels")
        with self._pub_lock:
            self._pubs = {k: self.create_publisher(t, name, out_qos) for k, (t, name) in pubs.items()}
            if pipe.has_palette:   # once, latched: what label i means, for RViz and downstream nodes
                self._pubs["classes"] = self.create_publisher(String, "~/segmentation/classes", latched_qos)
                self._pubs["classes"].publish(String(data=json.dumps({"classes": [
                    {"id": i, "name": n, "color": [int(c) for c in col]}
                    for i, (n, col) in enumerate(zip(pipe.class_names, pipe.palette))]})))
        names = (s["query.service_name"], s["query.action_name"])
        if self._queries is not None and self._queries.names != names:
            self._queries.destroy()
            self._queries = None
        if self._queries is None:   # kept over cleanup: a question in flight can still be answered
            self._queries = QueryServer(self, *names)

    # ------------------------------------------------------------------ used by the parts
    def publish(self, key: str, msg) -> bool:
        """Publish on output ``key`` if the node is active; False when it was not published."""
        with self._pub_lock:
            pub = self._pubs.get(key) if self.active else None
            if pub is None:
                return False
            pub.publish(msg)
            return True

    def subscribed(self, *keys: str) -> bool:
        with self._pub_lock:
            return any(k in self._pubs and self._pubs[k].get_subscription_count() > 0 for k in keys)

    def age_s(self, stamp) -> float:
        return (self.get_clock().now().nanoseconds - stamp_ns(stamp)) / 1e9

    def log(self, level: str, text: str) -> None:
        """Log at a severity chosen at run time (rclpy refuses to change the severity of one
        call site between calls, so each severity has its own line here)."""
        lg = self.get_logger()
        if level == "error":
            lg.error(text)
        elif level == "warning":
            lg.warning(text)
        else:
            lg.info(text)

    def log_throttled(self, level: str, key: str, text: str, period: float = 2.0) -> None:
        now = time.monotonic()
        if now - self._log_times.get(key, -1e9) >= period:
            self._log_times[key] = now
            self.log(level, text)

    def model_failed(self, what: str, exc: Exception) -> str:
        """Count and log a model error (the node keeps running); returns its short name."""
        self.stats.inc("model_errors")
        kind = "model ran out of memory" if is_oom(exc) else "model error"
        self.stats.error(f"{kind} on {what}: {type(exc).__name__}: {exc}")
        self.log_throttled("error", "model:" + type(exc).__name__,
                           self.stats.last_error + (" (frame skipped)" if what.startswith("frame") else ""))
        self._release_memory()
        return kind

    def _worker_crashed(self, tb: str) -> None:
        self.stats.inc("model_errors")
        self.stats.error("perception failed: " + tb.strip().splitlines()[-1])
        self.get_logger().error("perception step failed (the worker goes on):\n" + tb)

    @staticmethod
    def _release_memory() -> None:
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict[str, str]:
        v = self.stats.values()
        v["queries_waiting"] = str(self.worker.waiting if self.worker is not None else 0)
        v["model_worker_threads"] = str(sum(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate()))
        if self.worker is not None and self.worker.cpu_threads is not None:
            v["model_cpu_threads"] = str(self.worker.cpu_threads)
        v["lifecycle_state"] = self.state_label
        for k, x in self.model_info.items():
            v[f"model_{k}"] = str(x)
        return v

    def _publish_diagnostics(self) -> None:
        st = self.stats
        self._diag_pub.publish(diagnostic_array(
            self.get_name(), self.get_clock().now().to_msg(), self.state_label, self._configured,
            self.active, bool(self.model_info.get("trained")), str(self.model_info.get("device", "")),
            self.diagnostics_values(), st.last_error, time.monotonic() - st.last_error_time < 10.0))

    def destroy_node(self) -> None:
        if self._queries is not None:
            self._queries.destroy()
            self._queries = None
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM, then shut down in order: stop publishing, let the
    model call in flight end, destroy the node, and only then the ROS context (so nothing is
    published on a dead context)."""
    apply_default_environment()
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    executor = SingleThreadedExecutor()

    def on_signal(_signum, _frame):
        stop.set()
        executor.wake()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node = None
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
        executor.add_node(node)
        if node.settings["lifecycle.autostart"]:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                print(f"[cooper] configure failed: {node.stats.last_error}", file=sys.stderr, flush=True)
                return 3
            node.trigger_activate()
        while not stop.is_set() and rclpy.ok():
            try:
                executor.spin_once(timeout_sec=0.5)
            except Exception:  # noqa: BLE001 - a failing callback must not take the node down
                node.get_logger().error("callback failed (node keeps running):\n" + traceback.format_exc())
        if node.state_label not in ("finalized", "unconfigured"):
            node.trigger_shutdown()
        elif node.state_label == "unconfigured":
            node._teardown("finalized")
    finally:
        if node is not None:
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
