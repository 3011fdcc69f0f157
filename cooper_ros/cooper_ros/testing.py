"""Helpers to run the cooper node as a separate process and talk to it over DDS.

Used by the tests (tests/test_ros_*.py), the demo and the benchmark. Nothing here fakes the
node or the model: :class:`NodeProcess` starts ``python -m cooper_ros.node`` and
:class:`RosClient` is an ordinary rclpy node in the calling process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .node import apply_default_environment, default_fastdds_profile, package_file

__all__ = ["ros_test_environment", "NodeProcess", "RosClient", "make_image", "pattern_frame",
           "FAST", "wait_for", "stamp", "now_stamp", "request", "small_image", "set_param",
           "camera_info", "assert_good_request", "checkpoint_variant"]

# fast settings for CPU tests (the pipeline's code paths are the same at any step count)
FAST = {"generation.num_steps": 2, "query.max_new_tokens": 8, "query.max_turns": 2}
SRV = "/spatial_query"


def ros_test_environment(domain_id: int | None = None) -> dict[str, str]:
    """Set (in os.environ, before rclpy.init) and return the variables every process shares:
    localhost-only discovery, a per-run domain id, the big-SHM Fast DDS profile."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    elif "COOPER_TEST_DOMAIN_ID" in os.environ:
        os.environ["ROS_DOMAIN_ID"] = os.environ["COOPER_TEST_DOMAIN_ID"]
    elif "ROS_DOMAIN_ID" not in os.environ:
        # per test run: other runs on the same machine use other domains
        os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
    apply_default_environment()
    os.environ.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
    keys = ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", "FASTDDS_DEFAULT_PROFILES_FILE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def pattern_frame(h: int = 480, w: int = 640, t: float = 0.0) -> np.ndarray:
    """A deterministic colourful uint8 H x W x 3 frame (moves with t)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = (x / max(w - 1, 1) * 255 + t * 40) % 256
    g = (y / max(h - 1, 1) * 255) % 256
    b = 128 + 127 * np.sin((x + y) / 40.0 + t)
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_image(arr: np.ndarray, encoding: str = "rgb8", stamp=None, frame_id: str = "camera"):
    from . import image_codec as ic
    from std_msgs.msg import Header

    h = Header()
    h.frame_id = frame_id
    if stamp is not None:
        h.stamp = stamp
    return ic.array_to_image(arr, encoding, h)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the node gets SIGTERM when the process that started it dies (no orphans)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class NodeProcess:
    """``python -m cooper_ros.node`` in a child process, logging to a file."""

    def __init__(self, params: dict[str, Any] | None = None, params_file: str | None = None,
                 remaps: dict[str, str] | None = None, name: str = "cooper",
                 log_path: str | Path | None = None, extra_env: dict[str, str] | None = None):
        self.params = dict(params or {})
        self.params_file = params_file or str(package_file("config", "cooper.yaml") or "")
        self.remaps = dict(remaps or {})
        self.name = name
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="cooper_node_", suffix=".log")[1])
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @staticmethod
    def _fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace('"', '\\"') + '"' if v == "" or ":" in v else v
        return repr(v)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cooper_ros.node", "--ros-args", "-r", f"__node:={self.name}"]
        if self.params_file:
            cmd += ["--params-file", self.params_file]
        for k, v in self.params.items():
            cmd += ["-p", f"{k}:={self._fmt(v)}"]
        for a, b in self.remaps.items():
            cmd += ["-r", f"{a}:={b}"]
        return cmd

    def start(self) -> "NodeProcess":
        env = dict(os.environ)
        env.update(ros_test_environment())
        env.update(self.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("RCUTILS_LOGGING_BUFFERED_STREAM", "0")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.log_text():
                return True
            time.sleep(0.1)
        return False

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Buffer(deque):
    """deque of (receive_time_ns, msg) that keeps its subscription alive."""
    subscription: Any = None


class RosClient:
    """An rclpy node spinning in a background thread, with helpers for tests and tools."""

    def __init__(self, name: str = "cooper_client", node_ns: str = "/cooper"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        ros_test_environment()
        self._own_context = not rclpy.ok()
        if self._own_context:
            rclpy.init()
        self.rclpy = rclpy
        self.node = rclpy.create_node(name)
        self.ns = node_ns.rstrip("/")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._running = True
        self._spin.start()
        self._pubs: dict[str, Any] = {}
        self._clients: dict[str, Any] = {}

    def _spin_loop(self):
        while self._running:
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # shutting down
                if not self._running:
                    return

    def close(self):
        self._running = False
        self._spin.join(timeout=5)
        self.executor.remove_node(self.node)
        self.node.destroy_node()
        if self._own_context and self.rclpy.ok():
            self.rclpy.shutdown()

    # --- publishing
    def publisher(self, msg_type, topic: str, reliable: bool = False, depth: int = 1):
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        key = f"{topic}:{msg_type.__name__}:{reliable}"
        if key not in self._pubs:
            qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                             else ReliabilityPolicy.BEST_EFFORT)
            self._pubs[key] = self.node.create_publisher(msg_type, topic, qos)
        return self._pubs[key]

    def now(self):
        return self.node.get_clock().now()

    # --- subscribing
    def collect(self, msg_type, topic: str, maxlen: int = 10000, reliable: bool = True,
                latched: bool = False):
        """Subscribe and return a deque of (receive_time_ns, msg) that fills in the background.
        ``latched``: transient-local durability (receives what was published before)."""
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        buf = _Buffer(maxlen=maxlen)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        sub = self.node.create_subscription(
            msg_type, topic, lambda m: buf.append((self.node.get_clock().now().nanoseconds, m)), qos)
        buf.subscription = sub
        return buf

    def stamps(self, msg_type, topic: str, maxlen: int = 1_000_000, reliable: bool = True):
        """Like :meth:`collect`, but keeps only (receive_time_ns, header stamp ns, frame_id):
        for long runs where keeping every message would fill memory."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        buf = _Buffer(maxlen=maxlen)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)

        def keep(m):
            st = m.header.stamp
            buf.append((self.node.get_clock().now().nanoseconds,
                        st.sec * 1_000_000_000 + st.nanosec, m.header.frame_id))
        buf.subscription = self.node.create_subscription(msg_type, topic, keep, qos)
        return buf

    def unsubscribe(self, buf):
        self.node.destroy_subscription(buf.subscription)

    def wait_for_subscribers(self, pub, n: int = 1, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pub.get_subscription_count() >= n:
                return True
            time.sleep(0.05)
        return False

    # --- services
    def client(self, srv_type, name: str):
        if name not in self._clients:
            self._clients[name] = self.node.create_client(srv_type, name)
        return self._clients[name]

    def wait_for_service(self, srv_type, name: str, timeout: float = 60.0) -> bool:
        cli = self.client(srv_type, name)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cli.wait_for_service(timeout_sec=0.5):
                return True
        return False

    def call(self, srv_type, name: str, request, timeout: float = 120.0):
        cli = self.client(srv_type, name)
        ev = threading.Event()
        fut = cli.call_async(request)
        fut.add_done_callback(lambda _f: ev.set())
        if not ev.wait(timeout):
            cli.remove_pending_request(fut)
            raise TimeoutError(f"no answer from {name} within {timeout} s")
        return fut.result()

    def diagnostics(self, timeout: float = 10.0, node_name: str = "cooper") -> dict[str, str]:
        """The newest /diagnostics status of the cooper node, as a dict (waits for a new one)."""
        from diagnostic_msgs.msg import DiagnosticArray

        if not hasattr(self, "_diag"):
            self._diag = self.collect(DiagnosticArray, "/diagnostics", maxlen=20)
        start = len(self._diag)
        seen = self._diag[-1] if self._diag else None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._diag and (self._diag[-1] is not seen or len(self._diag) > start):
                for _t, arr in reversed(list(self._diag)):
                    for st in arr.status:
                        if st.name.startswith(f"{node_name}:"):
                            d = {kv.key: kv.value for kv in st.values}
                            d["_level"] = st.level
                            d["_message"] = st.message
                            return d
            time.sleep(0.05)
        raise TimeoutError("no /diagnostics from the cooper node")


def _srv():
    from cooper_interfaces.srv import SpatialQuery

    return SpatialQuery


def wait_for(pred, timeout=60.0, period=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(period)
    return None


def stamp(sec, nsec=0):
    from builtin_interfaces.msg import Time

    return Time(sec=int(sec), nanosec=int(nsec))


def now_stamp(client, offset_s=0.0):
    t = client.now().nanoseconds + int(offset_s * 1e9)
    return stamp(t // 10**9, t % 10**9)


def request(question="How far is the chair from the table?", image=None, mode="direct", max_turns=0):
    r = _srv().Request()
    r.question = question
    if image is not None:
        r.image = image
    r.mode = mode
    r.max_turns = max_turns
    return r


def small_image(h=96, w=128, frame_id="req_cam", st=None):
    return make_image(pattern_frame(h, w), "rgb8", stamp=st or stamp(1234, 5678), frame_id=frame_id)


def assert_good_request(client, node):
    """The node is alive and answers a good request."""
    assert node.alive(), node.log_text()[-3000:]
    r = client.call(_srv(), SRV, request(image=small_image()), timeout=120)
    assert r.success, r.message
    return r


def set_param(client, name, value):
    from rcl_interfaces.msg import Parameter as ParamMsg, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    cli = client.client(SetParameters, "/cooper/set_parameters")
    assert cli.wait_for_service(timeout_sec=30)
    v = ParameterValue()
    if isinstance(value, bool):
        v.type, v.bool_value = ParameterType.PARAMETER_BOOL, value
    elif isinstance(value, int):
        v.type, v.integer_value = ParameterType.PARAMETER_INTEGER, value
    elif isinstance(value, float):
        v.type, v.double_value = ParameterType.PARAMETER_DOUBLE, value
    else:
        v.type, v.string_value = ParameterType.PARAMETER_STRING, value
    req = SetParameters.Request(parameters=[ParamMsg(name=name, value=v)])
    return client.call(SetParameters, "/cooper/set_parameters", req, timeout=30).results[0]


def camera_info(w, h, frame_id):
    from sensor_msgs.msg import CameraInfo

    ci = CameraInfo()
    ci.header.frame_id = frame_id
    ci.width, ci.height = w, h
    f = 0.8 * w
    ci.k = [f, 0.0, w / 2, 0.0, f, h / 2, 0.0, 0.0, 1.0]
    ci.p = [f, 0.0, w / 2, 0.0, 0.0, f, h / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    ci.r = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    ci.distortion_model = "plumb_bob"
    ci.d = [0.0] * 5
    return ci


class SyntheticCamera:
    """A camera driver stand-in: cycles a few pattern frames, each published with a CameraInfo of
    the same stamp, as a real driver pairs them."""

    def __init__(self, client, image_topic: str, info_topic: str, width: int = 640, height: int = 480,
                 frame_id: str = "camera", info_reliable: bool = False):
        from sensor_msgs.msg import CameraInfo, Image

        self.client = client
        self.image_pub = client.publisher(Image, image_topic)
        self.info_pub = client.publisher(CameraInfo, info_topic, reliable=info_reliable)
        self.frames = [make_image(pattern_frame(height, width, t=i), "rgb8", frame_id=frame_id) for i in range(4)]
        self.info = camera_info(width, height, frame_id)

    def send(self, i: int) -> int:
        """Publish frame i now; returns its stamp in nanoseconds."""
        st = now_stamp(self.client)
        self.info.header.stamp = st
        self.info_pub.publish(self.info)
        msg = self.frames[i % len(self.frames)]
        msg.header.stamp = st
        self.image_pub.publish(msg)
        return st.sec * 1_000_000_000 + st.nanosec


def checkpoint_variant(dest: str | Path, depth_kind: str | None = None, palette: bool = True,
                       source: str | Path | None = None) -> Path:
    """A copy of a checkpoint (default: the bundled one) with another depth kind and/or without
    its palette, for testing what the node publishes for such checkpoints."""
    import json
    import shutil

    from cooper_model import BUNDLED_CHECKPOINT

    dest = Path(dest)
    shutil.copytree(source or BUNDLED_CHECKPOINT, dest, dirs_exist_ok=True)
    cfg_path = dest / "cooper_config.json"
    cfg = json.loads(cfg_path.read_text())
    if depth_kind is not None:
        cfg["depth_kind"] = depth_kind
    if not palette:
        cfg.pop("palette", None)
        cfg.pop("class_names", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def fastdds_profile_path() -> str | None:
    p = default_fastdds_profile()
    return str(p) if p else None
