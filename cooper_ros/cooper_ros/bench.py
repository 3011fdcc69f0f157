"""Benchmark of the cooper node: its own overhead per frame against the model's time, and the
end-to-end latency camera stamp -> depth published.

    python -m cooper_ros.bench [--frames 20] [--width 640 --height 480] [--json out/bench/ros_bench.json]
    python -m cooper_ros.bench --flood [--duration 600] [--rate 60] [--query-period 2]   (cooper_ros/flood.py)
    python -m cooper_ros.bench --contention [--rate 60] [--repeat 25]                    (cooper_ros/contention.py)

Starts the node (separate process, bundled checkpoint unless --checkpoint), subscribes to every
output, sends camera frames + camera_info over DDS and reports, in one run:

* node overhead per frame, measured inside the node: image decode (sensor_msgs/Image -> RGB
  array) + building and publishing all outputs the checkpoint gives (32FC1 relative depth,
  rgb8 colour map; 32FC1 metres, camera_info and PointCloud2 when metric; rgb8 segmentation;
  16UC1 labels with a palette), against the model's depth and segmentation time for the same
  frames;
* a breakdown of the conversions measured in this process (same code as the node);
* end-to-end latency, camera stamp -> depth published (node clock, inside the node) and
  -> relative depth received (this process), (a) one frame at a time (node idle when the frame
  arrives) and (b) a 30 Hz camera stream (frames wait for the model; newest frame only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _ms(x: float) -> str:
    return f"{x * 1e3:8.2f} ms"


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _pc(pts, hdr):
    xyz, col = pts
    return xyz, hdr, col


def codec_breakdown(w: int, h: int, reps: int = 30) -> dict[str, float]:
    """Median seconds of each conversion the node does per frame, at w x h."""
    from std_msgs.msg import Header

    from . import image_codec as ic
    from .camera import CameraModel
    from .pointcloud import depth_to_points, make_pointcloud2
    from .testing import camera_info, pattern_frame

    rgb = pattern_frame(h, w)
    depth = np.random.default_rng(0).uniform(0.5, 8, (h, w)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 20, (h, w)).astype(np.uint16)
    hdr = Header(frame_id="cam")
    rgb_msg = ic.array_to_image(rgb, "rgb8", hdr)
    bgr_msg = ic.array_to_image(rgb[:, :, ::-1], "bgr8", hdr)
    jpg_msg = ic.encode_compressed(rgb, "jpeg", header=hdr)
    ci = camera_info(w, h, "cam")
    ci.d = [-0.28, 0.07, 0.001, -0.0005, 0.0]   # a raw image: rays undistorted (cached per size)
    cam = CameraModel.from_camera_info(ci, (h, w), rectified=False)
    cases = {
        "decode rgb8 -> RGB": lambda: ic.image_to_rgb8(rgb_msg),
        "decode bgr8 -> RGB": lambda: ic.image_to_rgb8(bgr_msg),
        "decode JPEG -> RGB": lambda: ic.decode_compressed(jpg_msg),
        "encode depth 32FC1": lambda: ic.array_to_image(depth, "32FC1", hdr),
        "encode colour rgb8": lambda: ic.array_to_image(rgb, "rgb8", hdr),
        "encode labels 16UC1": lambda: ic.array_to_image(labels, "16UC1", hdr),
        "point cloud (stride 2, rgb, edge filter)": lambda: make_pointcloud2(
            *_pc(depth_to_points(depth, cam, 2, rgb, 0.05), hdr)),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20, help="frames sent one at a time")
    ap.add_argument("--stream-s", type=float, default=10.0, help="seconds of 30 Hz stream (0: skip)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--checkpoint", default="", help="checkpoint dir (default: bundled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-steps", type=int, default=None,
                    help="denoising steps (0: model default; default 0, with --flood 2)")
    ap.add_argument("--json", default=None,
                    help="where to write the results (default out/bench/ros_bench.json, with --flood "
                         "out/bench/flood.json)")
    fl = ap.add_argument_group("flood (python -m cooper_ros.bench --flood; see cooper_ros/flood.py)")
    fl.add_argument("--flood", action="store_true", help="run the flood benchmark instead")
    fl.add_argument("--duration", type=float, default=600.0, help="seconds of flood")
    fl.add_argument("--rate", type=float, default=60.0, help="camera rate (Hz)")
    fl.add_argument("--query-period", type=float, default=2.0, help="seconds between questions")
    fl.add_argument("--query-mode", default="perception", help="mode of the questions")
    fl.add_argument("--query-timeout", type=float, default=120.0)
    fl.add_argument("--max-new-tokens", type=int, default=8, help="token budget per reasoning turn")
    fl.add_argument("--idle-frames", type=int, default=5, help="frames of the idle baseline")
    fl.add_argument("--idle-queries", type=int, default=20, help="questions of the idle baseline")
    fl.add_argument("--cpu-threads", type=int, default=0, help="the node's model.cpu_threads (0: not set)")
    fl.add_argument("--warmup", type=float, default=30.0, help="seconds of flood before RSS counts")
    fl.add_argument("--settle", type=float, default=5.0, help="seconds waited after the camera stops")
    fl.add_argument("--lifecycle-s", type=float, default=40.0,
                    help="seconds of lifecycle transitions under load after the flood (0: skip)")
    fl.add_argument("--label", default="", help="name of this run in the report")
    fl.add_argument("--params-file", default="", help="node parameters YAML (default: the bundled one)")
    fl.add_argument("--node-pythonpath", default="",
                    help="prepended to the node's PYTHONPATH: benchmark another version of the node")
    ct = ap.add_argument_group("contention (python -m cooper_ros.bench --contention; see cooper_ros/contention.py)")
    ct.add_argument("--contention", action="store_true",
                    help="time the model quiet / beside a camera process / with a subscription (uses --rate, --width, --height)")
    ct.add_argument("--repeat", type=int, default=25, help="depth maps timed per condition")
    args = ap.parse_args(argv)
    if args.contention:
        from .contention import run

        args.json = args.json or "out/bench/contention.json"
        return run(args)
    if args.flood:
        from .flood import run

        args.num_steps = 2 if args.num_steps is None else args.num_steps
        args.json = args.json or "out/bench/flood.json"
        return run(args)
    args.num_steps = args.num_steps or 0
    args.json = args.json or "out/bench/ros_bench.json"

    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from cooper_interfaces.srv import SpatialQuery

    from .testing import NodeProcess, RosClient, SyntheticCamera

    W, H = args.width, args.height
    params = {"model.checkpoint": args.checkpoint, "model.device": args.device,
              "model.dtype": args.dtype, "generation.num_steps": args.num_steps,
              "input.max_image_age_s": 0.0}
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(params=params, remaps={"image": "/bench/image_raw", "camera_info": "/bench/camera_info"},
                       log_path=out_path.with_suffix(".node.log")).start()
    client = RosClient("cooper_bench")
    res: dict = {"width": W, "height": H}
    try:
        t0 = time.monotonic()
        if not client.wait_for_service(SpatialQuery, "/spatial_query", timeout=180):
            print(node.log_text()[-3000:], file=sys.stderr)
            return 1
        res["node_startup_s"] = time.monotonic() - t0
        d0 = client.diagnostics()
        metric, palette = d0["model_depth_is_metric"] == "True", d0["model_has_palette"] == "True"
        # the outputs every frame gets from this checkpoint (metres and the cloud only when metric,
        # labels only with a palette)
        last = ["relative", "seg"] + (["points"] if metric else []) + (["labels"] if palette else [])
        topics = {"depth": ("/cooper/depth/image", Image), "colored": ("/cooper/depth/colored", Image),
                  "relative": ("/cooper/depth/relative", Image),
                  "info": ("/cooper/depth/camera_info", CameraInfo), "seg": ("/cooper/segmentation/image", Image),
                  "labels": ("/cooper/segmentation/labels", Image), "points": ("/cooper/points", PointCloud2)}
        outs = {k: client.collect(t, name) for k, (name, t) in topics.items()}
        camera = SyntheticCamera(client, "/bench/image_raw", "/bench/camera_info", W, H, "bench_cam",
                                 info_reliable=True)
        client.wait_for_subscribers(camera.image_pub, 1, 60)
        time.sleep(1.5)
        send = camera.send

        def lat(q, key_ns):
            for t, m in q:
                if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == key_ns:
                    return (t - key_ns) / 1e9
            return None

        # warm-up frame (first call allocates)
        k = send(0)
        end = time.monotonic() + 120
        while time.monotonic() < end and any(lat(outs[o], k) is None for o in last):
            time.sleep(0.02)
        d_before = client.diagnostics()

        # (a) one frame at a time
        e2e_recv = []
        for i in range(args.frames):
            k = send(i + 1)
            end = time.monotonic() + 120
            while time.monotonic() < end and any(lat(outs[o], k) is None for o in last):
                time.sleep(0.005)
            v = lat(outs["relative"], k)
            if v is not None:
                e2e_recv.append(v)
            time.sleep(0.05)
        d = client.diagnostics()
        n = int(d["decode_count"]) - int(d_before["decode_count"])

        def mean_delta(key):
            c1, c0 = int(d[f"{key}_count"]), int(d_before[f"{key}_count"])
            m1, m0 = float(d[f"{key}_mean_s"]), float(d_before[f"{key}_mean_s"])
            return (m1 * c1 - m0 * c0) / max(1, c1 - c0)

        res["sequential"] = {
            "frames": n,
            "node_decode_s": mean_delta("decode"),
            "node_publish_s": mean_delta("publish"),
            "node_overhead_s": mean_delta("overhead"),
            "model_depth_s": mean_delta("model_depth"),
            "model_segmentation_s": mean_delta("model_seg"),
            "e2e_stamp_to_depth_published_s": mean_delta("end_to_end"),
            "e2e_stamp_to_depth_received_median_s": statistics.median(e2e_recv) if e2e_recv else None,
            "e2e_stamp_to_depth_received_p95_s": _pct(e2e_recv, 0.95) if e2e_recv else None,
        }
        s = res["sequential"]
        s["overhead_fraction_of_model"] = s["node_overhead_s"] / max(1e-9, s["model_depth_s"] + s["model_segmentation_s"])

        # (b) 30 Hz stream
        if args.stream_s > 0:
            d0 = client.diagnostics()
            sent = []
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < args.stream_s:
                target = t0 + i / 30.0
                now = time.monotonic()
                if now < target:
                    time.sleep(target - now)
                sent.append(send(i))
                i += 1
            time.sleep(3.0)
            d1 = client.diagnostics()
            sent_set = set(sent)
            rec = [(t - (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec)) / 1e9 for t, m in outs["relative"]
                   if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec in sent_set]
            res["stream_30hz"] = {
                "frames_sent": len(sent),
                "frames_received_by_node": int(d1["frames_received"]) - int(d0["frames_received"]),
                "frames_processed": int(d1["frames_processed"]) - int(d0["frames_processed"]),
                "e2e_stamp_to_depth_received_median_s": statistics.median(rec) if rec else None,
                "e2e_stamp_to_depth_received_max_s": max(rec) if rec else None,
                "frames_behind_max": int(d1["frames_behind_max"]),
            }
        res["codec_breakdown_s"] = codec_breakdown(W, H)
        res["model"] = {k[len("model_"):]: v for k, v in d.items() if k.startswith("model_") and not k.startswith("model_depth_") and not k.startswith("model_seg_")}
        res["node_rss_mb"] = float(d["rss_mb"])
    finally:
        client.close()
        node.stop()

    s = res["sequential"]
    print(f"\ncooper node benchmark, {W}x{H} rgb8 frames, {s['frames']} frames one at a time "
          f"(checkpoint {res['model'].get('checkpoint')}, {res['model'].get('device')}, "
          f"trained={res['model'].get('trained')})")
    print("  per frame, measured inside the node:")
    print(f"    node overhead (decode + build/publish outputs)   {_ms(s['node_overhead_s'])}"
          f"   [decode {_ms(s['node_decode_s']).strip()}, publish {_ms(s['node_publish_s']).strip()}]")
    print(f"    model depth                                      {_ms(s['model_depth_s'])}")
    print(f"    model segmentation                               {_ms(s['model_segmentation_s'])}")
    print(f"    overhead / model time                            {100 * s['overhead_fraction_of_model']:8.2f} %")
    print("  end-to-end, camera stamp -> depth:")
    print(f"    published (node clock), mean                     {_ms(s['e2e_stamp_to_depth_published_s'])}")
    if s["e2e_stamp_to_depth_received_median_s"] is not None:
        print(f"    received by a subscriber, median / p95          {_ms(s['e2e_stamp_to_depth_received_median_s'])}"
              f" / {_ms(s['e2e_stamp_to_depth_received_p95_s']).strip()}")
    if "stream_30hz" in res:
        st = res["stream_30hz"]
        print(f"  30 Hz stream for {args.stream_s:.0f} s: sent {st['frames_sent']}, node received "
              f"{st['frames_received_by_node']}, processed {st['frames_processed']} (newest frame only), "
              f"frames behind max {st['frames_behind_max']}")
        if st["e2e_stamp_to_depth_received_median_s"] is not None:
            print(f"    stamp -> depth received, median / max            {_ms(st['e2e_stamp_to_depth_received_median_s'])}"
                  f" / {_ms(st['e2e_stamp_to_depth_received_max_s']).strip()}")
    print("  conversions in this process (median):")
    for k2, v in res["codec_breakdown_s"].items():
        print(f"    {k2:48s} {_ms(v)}")
    out_path.write_text(json.dumps(res, indent=1))
    print(f"  results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
