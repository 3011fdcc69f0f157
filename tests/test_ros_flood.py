"""Flood: 640x480 frames + CameraInfo at 60 Hz for 15 s while /spatial_query is called back to
back. What must hold on any machine, however loaded (the speed figures are measured by
`python -m cooper_ros.bench --flood`, never asserted here):

* the node keeps taking frames and producing outputs (its counters grow); the frames it had no
  time for are counted as superseded, never queued;
* every question is answered, successfully;
* no backlog: outputs only for frames that were sent, in stamp order, never twice; once the
  camera stops no question waits and the output counters stop;
* no errors (model errors, skipped frames), the node is alive, and SIGINT ends it cleanly
  (exit code 0, nothing in the log about a publisher on a dead context or a traceback).
"""
import threading
import time

import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed (run scripts/setup.sh)")
pytest.importorskip("cooper_interfaces.srv", reason="cooper_interfaces not built (run scripts/setup.sh)")

from sensor_msgs.msg import Image  # noqa: E402

from cooper_interfaces.srv import SpatialQuery  # noqa: E402
from cooper_ros.testing import (FAST, NodeProcess, RosClient, SyntheticCamera, request,  # noqa: E402
                                small_image, wait_for)

RATE_HZ = 60.0
DURATION_S = 15.0
SRV = "/spatial_query"
CAM = "/flood_camera/image_raw"
INFO = "/flood_camera/camera_info"


def _ints(d, *keys):
    return {k: int(d[k]) for k in keys}


def test_flood_60hz_with_questions(tmp_path):
    log = tmp_path / "cooper_node.log"
    # no age limit: on a loaded machine the newest frame may be seconds old when the model is free
    node = NodeProcess(params=dict(FAST, **{"input.max_image_age_s": 0.0}), remaps={"image": CAM, "camera_info": INFO}, log_path=log).start()
    client = RosClient("cooper_flood_client")
    try:
        assert client.wait_for_service(SpatialQuery, SRV, timeout=120), node.log_text()[-3000:]
        outs = {k: client.stamps(Image, f"/cooper/{k}") for k in
                ("depth/relative", "depth/colored", "segmentation/image")}
        camera = SyntheticCamera(client, CAM, INFO, 640, 480, "flood")
        assert client.wait_for_subscribers(camera.image_pub, 1, 60)
        time.sleep(1.0)  # let the node see our subscriptions
        query = request("How far is the chair from the table?", mode="perception", max_turns=1)
        answers = []
        stop = threading.Event()

        def querier():   # a planner asking about the newest frame, back to back
            while not stop.is_set():
                try:
                    answers.append(client.call(SpatialQuery, SRV, query, timeout=300))
                except TimeoutError as exc:
                    answers.append(exc)

        d0 = client.diagnostics()
        sent = set()
        qt = threading.Thread(target=querier, daemon=True)
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < DURATION_S:
            target = t0 + i / RATE_HZ
            if time.monotonic() < target:
                time.sleep(target - time.monotonic())
            sent.add(camera.send(i))
            if i == 30:
                qt.start()
            i += 1
        stop.set()
        qt.join(timeout=300)
        assert not qt.is_alive(), "a question never came back"
        # the camera stopped: the step in flight ends, then nothing is waiting and nothing moves
        keys = ("depth_published", "segmentation_published", "frames_processed")

        def settled():   # two diagnostics in a row (one period apart) with the same counts
            a, b = client.diagnostics(), client.diagnostics()
            return b if _ints(a, *keys) == _ints(b, *keys) and b["queries_waiting"] == "0" else None
        d1 = wait_for(settled, timeout=120, period=0.0)
        assert d1, "outputs kept coming after the camera stopped (a backlog)"
        assert node.alive(), node.log_text()[-3000:]

        grew = {k: int(d1[k]) - int(d0[k]) for k in
                ("frames_received", "frames_superseded", "depth_published", "segmentation_published", "relative_depth_published",
                 "queries_ok", "queries_failed", "model_errors", "frames_skipped", "perception_preempted",
                 "query_wait_count", "query_run_count")}
        print(f"\nflood: {len(sent)} frames sent; node counters: {grew}")
        assert grew["frames_received"] > 0 and grew["depth_published"] > 0 and grew["segmentation_published"] > 0
        # the worker takes a frame when it wants one; the others are superseded in the middleware,
        # counted from the camera's sequence numbers: together never more than was sent
        assert grew["frames_superseded"] > 0
        assert grew["frames_received"] + grew["frames_superseded"] <= len(sent)
        assert grew["model_errors"] == 0 and grew["frames_skipped"] == 0, node.log_text()[-3000:]
        assert answers and all(not isinstance(a, Exception) and a.success for a in answers), \
            [a if isinstance(a, Exception) else a.message for a in answers if isinstance(a, Exception) or not a.success]
        assert grew["queries_ok"] == len(answers) and grew["queries_failed"] == 0
        # every answered question was timed twice: its wait for the worker and its run
        assert grew["query_wait_count"] == grew["query_run_count"] == len(answers)
        # a map is stopped early only for a waiting question, at most once per question
        assert grew["perception_preempted"] <= len(answers)
        for name, q in outs.items():     # newest frame only: sent frames, in order, each once
            stamps = [s for _r, s, f in q if f == "flood"]
            assert stamps, name
            assert set(stamps) <= sent, f"{name}: an output for a frame that was never sent"
            assert stamps == sorted(set(stamps)), f"{name}: outputs out of order or repeated"
        # still answering (with an image: the newest frame is now too old, and refused as such)
        assert client.call(SpatialQuery, SRV, request(image=small_image(), mode="perception", max_turns=1),
                           timeout=120).success
    finally:
        client.close()
        rc = node.stop()
    text = node.log_text()
    assert rc == 0, text[-3000:]
    for bad in ("Traceback", "RCLError", "context is invalid"):
        assert bad not in text, text[-3000:]
