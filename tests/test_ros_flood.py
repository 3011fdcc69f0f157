"""Flood: 640x480 frames at 60 Hz for 20 s while /spatial_query is called back to back.

Checks (the node runs as a separate process, everything goes over DDS):
* memory stays flat: node RSS at the end is within FLAT_MB of its RSS after the warm-up;
* no backlog: every perception output belongs to a frame at most one frame old when work
  started (the node's own `frames_behind_max` <= 1), output stamps only increase, and once the
  camera stops at most two more depth outputs arrive (the frame in flight and the newest);
* the service keeps answering: its median latency during the flood stays within
  LATENCY_FACTOR (5x) of its idle median, for a query that generates its maps ("perception"
  mode, the kind a planner sends). A waiting query goes before the next perception step, so it
  waits at most for the step in flight (depth or segmentation, separate steps): flood latency
  <= idle latency + one perception step. Back-to-back queries nearly always find a step just
  started, so on the 2-core CPU (idle query ~0.5 s, steps ~0.7 s / ~1.0 s, the 60 Hz stream
  sharing the cores) the measured ratio is ~3-3.5x; 5x is the stated bound.
  (A trivially cheap query, e.g. mode "direct" at ~0.06 s, still waits for that step, so its
  ratio is large; the absolute added wait is what the bound describes.)
"""
import json
import statistics
import threading
import time

import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed (run scripts/setup.sh)")
pytest.importorskip("cooper_interfaces.srv", reason="cooper_interfaces not built (run scripts/setup.sh)")

from sensor_msgs.msg import Image  # noqa: E402

from cooper_interfaces.srv import SpatialQuery  # noqa: E402
from cooper_ros.testing import (FAST, NodeProcess, RosClient, make_image, now_stamp,  # noqa: E402
                                pattern_frame, request, small_image)

RATE_HZ = 60.0
DURATION_S = 20.0
WARMUP_S = 5.0
FLAT_MB = 64.0
LATENCY_FACTOR = 5.0
SRV = "/spatial_query"
CAM = "/flood_camera/image_raw"


def test_flood_60hz_for_20s_with_queries(tmp_path):
    log = tmp_path / "cooper_node.log"
    node = NodeProcess(params=FAST, remaps={"image": CAM}, log_path=log).start()
    client = RosClient("cooper_flood_client")
    try:
        assert client.wait_for_service(SpatialQuery, SRV, timeout=120), node.log_text()[-3000:]
        # a COOPER query that generates its maps (the kind a planner sends), with its own image
        query = request("How far is the chair from the table?", image=small_image(), mode="perception",
                        max_turns=1)

        def ask():
            t0 = time.monotonic()
            r = client.call(SpatialQuery, SRV, query, timeout=120)
            assert r.success, r.message
            return time.monotonic() - t0

        ask()  # warm-up
        idle = [ask() for _ in range(5)]

        depth = client.collect(Image, "/cooper/depth/image", maxlen=100000)
        labels = client.collect(Image, "/cooper/segmentation/labels", maxlen=100000)
        pub = client.publisher(Image, CAM)
        assert client.wait_for_subscribers(pub, 1, 60)
        time.sleep(1.0)  # let the node see our subscriptions
        frames = [make_image(pattern_frame(480, 640, t=i), "rgb8", frame_id="flood") for i in range(4)]

        flood_lat: list[float] = []
        stop = threading.Event()

        def querier():
            while not stop.is_set():
                flood_lat.append(ask())

        rss: list[tuple[float, float]] = []
        sent: dict[tuple[int, int], int] = {}
        qt = threading.Thread(target=querier, daemon=True)
        t0 = time.monotonic()
        qt.start()
        i = 0
        next_rss = t0
        while True:
            now = time.monotonic()
            if now - t0 >= DURATION_S:
                break
            target = t0 + i / RATE_HZ
            if now < target:
                time.sleep(target - now)
            msg = frames[i % len(frames)]
            msg.header.stamp = now_stamp(client)
            sent[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = i
            pub.publish(msg)
            i += 1
            if time.monotonic() >= next_rss:
                rss.append((time.monotonic() - t0, node.rss_mb()))
                next_rss += 0.5
        stop_ns = client.now().nanoseconds
        n_sent = i
        stop.set()
        qt.join(timeout=180)
        time.sleep(4.0)  # let the frame in flight finish
        diag = client.diagnostics()
        assert node.alive(), node.log_text()[-3000:]

        # ---- no backlog, newest frame only
        d_stamps = [sent.get((m.header.stamp.sec, m.header.stamp.nanosec)) for _t, m in depth
                    if m.header.frame_id == "flood"]
        l_stamps = [sent.get((m.header.stamp.sec, m.header.stamp.nanosec)) for _t, m in labels
                    if m.header.frame_id == "flood"]
        assert d_stamps and l_stamps, node.log_text()[-3000:]
        assert None not in d_stamps and None not in l_stamps, "output with a header never sent"
        assert d_stamps == sorted(set(d_stamps)), "depth outputs out of order or repeated"
        assert l_stamps == sorted(set(l_stamps)), "label outputs out of order or repeated"
        late = [t for t, m in depth if m.header.frame_id == "flood" and t > stop_ns]
        assert len(late) <= 2, f"{len(late)} depth outputs after the camera stopped: a backlog"
        behind = int(diag["frames_behind_max"])
        assert behind <= 1, f"a frame {behind} frames old was processed"

        # ---- memory flat
        warm = [m for t, m in rss if t >= WARMUP_S]
        growth = warm[-1] - warm[0]
        assert growth < FLAT_MB, f"node RSS grew {growth:.1f} MB during the flood: {rss}"

        # ---- latency
        idle_med = statistics.median(idle)
        flood_med = statistics.median(flood_lat)
        ratio = flood_med / idle_med
        report = {
            "frames_sent": n_sent, "send_rate_hz": n_sent / DURATION_S,
            "node_frames_received": int(diag["frames_received"]),
            "depth_outputs": len(d_stamps), "label_outputs": len(l_stamps),
            "frames_behind_max": behind, "depth_outputs_after_stop": len(late),
            "rss_mb_after_warmup": warm[0], "rss_mb_end": warm[-1], "rss_mb_max": max(warm),
            "rss_growth_mb": growth,
            "query_idle_median_s": idle_med, "query_flood_median_s": flood_med,
            "query_flood_max_s": max(flood_lat), "queries_during_flood": len(flood_lat),
            "latency_ratio_median": ratio, "stated_factor": LATENCY_FACTOR,
            "model_depth_mean_s": float(diag["model_depth_mean_s"]),
            "model_seg_mean_s": float(diag["model_seg_mean_s"]),
            "node_overhead_mean_s": float(diag["overhead_mean_s"]),
        }
        print("\nflood report: " + json.dumps(report, indent=1))
        (tmp_path / "flood_report.json").write_text(json.dumps(report, indent=1))
        # frames really arrived (best effort, keep-last 1: a busy node may miss some, by design)
        assert int(diag["frames_received"]) >= 0.25 * n_sent, report
        assert ratio <= LATENCY_FACTOR, report
    finally:
        client.close()
        rc = node.stop()
    assert rc == 0, node.log_text()[-3000:]
