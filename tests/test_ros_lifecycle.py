"""A fresh node (separate process): no frame yet, no work without subscribers, lifecycle
transitions, set_parameters refusals, diagnostics."""
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
    proc = NodeProcess(params=dict(FAST, **{"perception.rate_hz": 5}), remaps={"image": CAM},
                       log_path=log).start()
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


@pytest.fixture(scope="module")
def client(node):
    c = RosClient("cooper_lc_client")
    assert c.wait_for_service(SpatialQuery, SRV, timeout=120), node.log_text()[-3000:]
    yield c
    c.close()


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

    for i in range(10):
        pub.publish(make_image(pattern_frame(48, 64, t=i), stamp=now_stamp(client)))
        time.sleep(0.1)
    d1 = wait_for(lambda: (lambda d: d if int(d["frames_received"]) >= int(d0["frames_received"]) + 5 else None)(
        client.diagnostics()), timeout=30)
    assert d1, "frames not received"
    assert d1["frames_processed"] == d0["frames_processed"] == "0"
    assert int(d1["frames_idle"]) > 0
    assert d1["model_depth_count"] == d1["model_seg_count"] == "0"

    # only depth wanted: depth runs, segmentation does not
    depth = client.collect(Image, "/cooper/depth/image")

    def got():
        pub.publish(make_image(pattern_frame(48, 64), stamp=now_stamp(client), frame_id="only_depth"))
        return any(m.header.frame_id == "only_depth" for _t, m in depth)
    assert wait_for(got, timeout=60, period=0.3)
    d2 = client.diagnostics()
    assert int(d2["model_depth_count"]) >= 1 and d2["model_seg_count"] == "0"
    client.unsubscribe(depth)


def test_rate_limit(node, client):
    """perception.rate_hz=5: processing never exceeds 5 Hz even with frames at 30 Hz."""
    set_param(client, "generation.num_steps", 2)
    pub = client.publisher(Image, CAM)
    depth = client.collect(Image, "/cooper/depth/image")
    time.sleep(1.0)
    t_end = time.monotonic() + 4.0
    while time.monotonic() < t_end:
        pub.publish(make_image(pattern_frame(32, 32), stamp=now_stamp(client), frame_id="rate"))
        time.sleep(1 / 30)
    times = [t for t, m in depth if m.header.frame_id == "rate"]
    client.unsubscribe(depth)
    assert len(times) >= 2
    # 120 frames offered in 4 s; at most 5 Hz processed (+1 for the window edges)
    assert len(times) <= 4.0 * 5 + 1, len(times)
    mean_gap = (times[-1] - times[0]) / 1e9 / (len(times) - 1)
    assert mean_gap >= 0.18, mean_gap   # 1/5 Hz = 0.2 s between starts, delivery jitter allowed


def test_set_parameters_refused_with_reason(node, client):
    r = set_param(client, "query.max_turns", 99)
    assert not r.successful and "query.max_turns" in r.reason
    r = set_param(client, "model.dtype", "float8")
    assert not r.successful and "not one of" in r.reason
    r = set_param(client, "model.checkpoint", "/elsewhere")
    assert not r.successful and "applied at configure" in r.reason
    r = set_param(client, "depth.min_m", 50.0)
    assert r.successful  # max_m = 0 (model's) -> no conflict
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
    return client.call(ChangeState, "/cooper/change_state", req, timeout=60).success


def _state(client):
    return client.call(GetState, "/cooper/get_state", GetState.Request(), timeout=30).current_state.label


def test_lifecycle_deactivate_and_activate(node, client):
    assert _state(client) == "active"
    assert _transition(client, Transition.TRANSITION_DEACTIVATE)
    assert _state(client) == "inactive"
    r = client.call(SpatialQuery, SRV, request(image=small_image()), timeout=60)
    assert not r.success and "not active" in r.message
    assert _transition(client, Transition.TRANSITION_ACTIVATE)
    assert _state(client) == "active"
    assert client.call(SpatialQuery, SRV, request(image=small_image()), timeout=120).success


def test_diagnostics(node, client):
    d = client.diagnostics()
    assert d["lifecycle_state"] == "active"
    assert d["model_trained"] == "False"
    assert d["_message"] == "running on UNTRAINED weights"
    assert float(d["rss_mb"]) > 0
