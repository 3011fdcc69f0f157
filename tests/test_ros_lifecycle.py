"""A fresh node (separate process): no frame yet, no work without subscribers, rate limit,
set_parameters refusals, diagnostics, and lifecycle transitions while a camera streams and
questions are waiting. Everything is checked on behaviour and on the counters the node reports,
never on how long something took."""
import threading
import time

import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed (run scripts/setup.sh)")
pytest.importorskip("cooper_interfaces.srv", reason="cooper_interfaces not built (run scripts/setup.sh)")

from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from cooper_interfaces.srv import SpatialQuery  # noqa: E402
from cooper_ros.testing import (FAST, NodeProcess, RosClient, make_image, now_stamp,  # noqa: E402
                                pattern_frame, request, set_param, small_image, wait_for)

SRV = "/spatial_query"
CAM = "/lc_camera/image_raw"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    log = tmp_path_factory.mktemp("lc") / "cooper_node.log"
    # rate_hz given as an int on purpose: accepted for a float parameter
    proc = NodeProcess(params=dict(FAST, **{"perception.rate_hz": 5, "model.cpu_threads": 1}), remaps={"image": CAM},
                       log_path=log).start()
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


@pytest.fixture(scope="module")
def client(node):
    c = RosClient("cooper_lc_client")
    assert c.wait_for_service(SpatialQuery, SRV, timeout=120), node.log_text()[-3000:]
    yield c
    c.close()


def _counter(d, key):
    return int(d[key])


def _diag_when(client, pred, timeout=60):
    return wait_for(lambda: (lambda d: d if pred(d) else None)(client.diagnostics()), timeout=timeout)


def test_no_frame_received_yet(node, client):
    r = client.call(SpatialQuery, SRV, request(mode="direct"), timeout=60)
    assert not r.success
    assert "no camera frame received yet on " + CAM in r.message, r.message
    # with an image in the request it works
    assert client.call(SpatialQuery, SRV, request(image=small_image()), timeout=120).success


def test_int_parameter_for_float_is_accepted(node, client):
    req = GetParameters.Request(names=["perception.rate_hz"])
    r = client.call(GetParameters, "/cooper/get_parameters", req, timeout=30)
    assert r.values[0].double_value == 5.0


def test_no_work_for_outputs_nobody_subscribes(node, client):
    pub = client.publisher(Image, CAM)
    assert client.wait_for_subscribers(pub, 1, 60)
    d0 = client.diagnostics()

    def sent_more():
        pub.publish(make_image(pattern_frame(48, 64), stamp=now_stamp(client)))
        return _counter(client.diagnostics(), "frames_idle") > _counter(d0, "frames_idle")
    assert wait_for(sent_more, timeout=60, period=0.2), "frames not received"
    d1 = client.diagnostics()
    assert d1["frames_processed"] == d0["frames_processed"] == "0"
    assert d1["model_depth_count"] == d1["model_seg_count"] == "0"

    # only relative depth wanted: depth runs, segmentation does not
    depth = client.collect(Image, "/cooper/depth/relative")

    def got():
        pub.publish(make_image(pattern_frame(48, 64), stamp=now_stamp(client), frame_id="only_depth"))
        return any(m.header.frame_id == "only_depth" for _t, m in depth)
    assert wait_for(got, timeout=60, period=0.3)
    d2 = client.diagnostics()
    assert int(d2["model_depth_count"]) >= 1 and d2["model_seg_count"] == "0"
    client.unsubscribe(depth)


def test_rate_limit(node, client):
    """perception.rate_hz=5: with frames at 30 Hz, no two perception starts closer than 0.2 s
    (the node's own record of its shortest gap; load can only lengthen gaps)."""
    pub = client.publisher(Image, CAM)
    depth = client.collect(Image, "/cooper/depth/relative")
    time.sleep(0.5)
    d0 = client.diagnostics()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.0:
        pub.publish(make_image(pattern_frame(32, 32), stamp=now_stamp(client), frame_id="rate"))
        time.sleep(1 / 30)
    d1 = _diag_when(client, lambda d: int(d["depth_published"]) > int(d0["depth_published"]) + 1)
    client.unsubscribe(depth)
    assert d1, "no depth while frames streamed"
    assert _counter(d1, "depth_published") - _counter(d0, "depth_published") >= 2
    assert float(d1["perception_min_start_interval_s"]) >= 1 / 5 - 1e-3, d1["perception_min_start_interval_s"]


def test_set_parameters_refused_with_reason(node, client):
    r = set_param(client, "query.max_turns", 99)
    assert not r.successful and "query.max_turns" in r.reason
    r = set_param(client, "model.dtype", "float8")
    assert not r.successful and "not one of" in r.reason
    r = set_param(client, "model.checkpoint", "/elsewhere")
    assert not r.successful and "applied at configure" in r.reason
    r = set_param(client, "model.device_map", "[1, 2]")
    assert not r.successful and "JSON object" in r.reason
    r = set_param(client, "depth.min_m", 50.0)
    assert r.successful  # max_m = 0 (no limit) -> no conflict
    r = set_param(client, "depth.max_m", 20.0)
    assert not r.successful and "must be smaller" in r.reason
    assert set_param(client, "depth.min_m", 0.0).successful
    r = set_param(client, "query.max_question_chars", 10)
    assert r.successful
    q = client.call(SpatialQuery, SRV, request("x" * 11, image=small_image()), timeout=60)
    assert not q.success and "question too long: 11 characters, the limit is 10" in q.message
    assert set_param(client, "query.max_question_chars", 4000).successful


def _transition(client, tid):
    req = ChangeState.Request()
    req.transition = Transition(id=tid)
    return client.call(ChangeState, "/cooper/change_state", req, timeout=120).success


def _state(client):
    return client.call(GetState, "/cooper/get_state", GetState.Request(), timeout=30).current_state.label


class Camera:
    """640x480 frames at 30 Hz in a background thread (the load the transitions happen under)."""

    def __init__(self, client):
        self.pub = client.publisher(Image, CAM)
        self.client = client
        self.frame = make_image(pattern_frame(480, 640), "rgb8", frame_id="lc_load")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.frame.header.stamp = now_stamp(self.client)
            self.pub.publish(self.frame)
            self.stop.wait(1 / 30)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def _ask_async(client, n):
    """n questions sent at once (they wait for the model one after the other)."""
    cli = client.client(SpatialQuery, SRV)
    return [cli.call_async(request(image=small_image(), mode="perception", max_turns=1)) for _ in range(n)]


def test_lifecycle_transitions_under_load(node, client):
    assert set_param(client, "perception.rate_hz", 0.0).successful
    outs = client.collect(Image, "/cooper/depth/relative")
    with Camera(client):
        d = _diag_when(client, lambda d: int(d["depth_published"]) > 0 and d["model_worker_threads"] == "1")
        assert d, node.log_text()[-3000:]
        assert _state(client) == "active"

        # deactivate with questions waiting: it succeeds, every question gets an answer
        futures = _ask_async(client, 4)
        assert _transition(client, Transition.TRANSITION_DEACTIVATE)
        assert _state(client) == "inactive"
        assert wait_for(lambda: all(f.done() for f in futures), timeout=120), "a question was left hanging"
        answers = [f.result() for f in futures]
        # the one running (if any) finished, the queued ones were refused
        assert all(a.success or "not active" in a.message for a in answers), [a.message for a in answers]
        # nothing is published while inactive; one worker, still there
        d1 = client.diagnostics()
        time.sleep(1.0)
        d2 = client.diagnostics()
        for key in ("depth_published", "segmentation_published", "relative_depth_published"):
            assert d1[key] == d2[key], key
        assert d2["model_worker_threads"] == "1" and d2["queries_waiting"] == "0"
        # inactive, the node takes no frames: the middleware keeps the newest for the next take
        assert d2["frames_received"] == d1["frames_received"]
        r = client.call(SpatialQuery, SRV, request(image=small_image()), timeout=60)
        assert not r.success and "not active" in r.message

        # activate: outputs and answers again, with the same single worker
        assert _transition(client, Transition.TRANSITION_ACTIVATE)
        assert _state(client) == "active"
        d_on = _diag_when(client, lambda d: int(d["relative_depth_published"]) > int(d2["relative_depth_published"]))
        # taking again; the 30 Hz frames the model had no time for were superseded, not queued
        assert d_on and int(d_on["frames_received"]) > int(d2["frames_received"])
        assert int(d_on["frames_superseded"]) > 0 and int(d_on["frames_behind_max"]) == 0
        assert client.call(SpatialQuery, SRV, request(image=small_image()), timeout=120).success
        assert client.diagnostics()["model_worker_threads"] == "1"

        # deactivate, cleanup (the model and its worker go), configure, activate
        assert _transition(client, Transition.TRANSITION_DEACTIVATE)
        assert _transition(client, Transition.TRANSITION_CLEANUP)
        assert _state(client) == "unconfigured"
        d3 = _diag_when(client, lambda d: d["lifecycle_state"] == "unconfigured")
        assert d3["model_worker_threads"] == "0"
        r = client.call(SpatialQuery, SRV, request(image=small_image()), timeout=60)
        assert not r.success and "not active" in r.message
        assert _transition(client, Transition.TRANSITION_CONFIGURE)
        assert _transition(client, Transition.TRANSITION_ACTIVATE)
        assert _state(client) == "active"
        d4 = _diag_when(client, lambda d: int(d["relative_depth_published"]) > int(d3["relative_depth_published"]))
        assert d4 and d4["model_worker_threads"] == "1"
        assert client.call(SpatialQuery, SRV, request(image=small_image()), timeout=120).success
    client.unsubscribe(outs)
    assert node.alive()
    assert _counter(client.diagnostics(), "model_errors") == 0


def test_diagnostics(node, client):
    d = client.diagnostics()
    assert d["lifecycle_state"] == "active"
    assert d["model_trained"] in ("True", "False") and d["model_reasoning_trained"] in ("True", "False")
    if d["model_trained"] == "False":
        assert d["_message"] == "running on UNTRAINED weights"
    assert float(d["rss_mb"]) > 0
    assert d["model_cpu_threads"] == "1"   # model.cpu_threads, as the model's own thread sees it
    assert d["model_depth_is_metric"] in ("True", "False") and d["model_has_palette"] in ("True", "False")
