"""Contention benchmark: how much a camera slows the model on this machine, and why.

    python -m cooper_ros.bench --contention [--rate 60] [--width 640 --height 480] [--repeat 25]

The flood benchmark measures the node as a whole; this one takes the node apart. In one process
it times ``pipe.depth`` (the bundled checkpoint unless --checkpoint) at 1 and 2 torch threads:

1. quiet: nothing else running;
2. camera: the flood's camera (a separate process publishing WxH rgb8 + CameraInfo at --rate Hz);
3. camera + subscription: as 2, and this process subscribes to the images with a callback spun
   by a SingleThreadedExecutor in another thread, as the node does (GIL and wake-ups shared
   with the model);
4. quiet again (drift check).

Each figure is the median of --repeat calls; ratios are against the quiet run at the same thread
count, measured in the same run. The camera process's CPU use is reported too.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGE_TOPIC = "/contention/image_raw"
INFO_TOPIC = "/contention/camera_info"


def camera_main(rate: float, width: int, height: int) -> None:
    """The camera process: publish until killed."""
    import rclpy

    from .testing import RosClient, SyntheticCamera

    rclpy.init()
    cam = SyntheticCamera(RosClient("cooper_contention_camera"), IMAGE_TOPIC, INFO_TOPIC, width, height)
    i, t0 = 0, time.perf_counter()
    try:
        while True:
            cam.send(i)
            i += 1
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    except KeyboardInterrupt:
        pass


def run(args) -> int:
    import rclpy
    import torch
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from cooper_model import BUNDLED_CHECKPOINT, CooperPipeline

    from .flood import cpu_seconds

    pipe = CooperPipeline.from_pretrained(args.checkpoint or BUNDLED_CHECKPOINT)
    rgb = np.random.default_rng(0).integers(0, 255, (args.height, args.width, 3), np.uint8)

    def time_depth(threads: int) -> float:
        torch.set_num_threads(threads)
        for _ in range(3):
            pipe.depth(rgb)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pipe.depth(rgb)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows, received = [], [0]
    threads_list = (2, 1)

    def measure(label):
        for t in threads_list:
            rows.append({"condition": label, "threads": t, "depth_s": time_depth(t)})
            print(f"{label:24s} threads={t}: {rows[-1]['depth_s'] * 1e3:7.1f} ms", flush=True)

    measure("quiet")
    camera = subprocess.Popen([sys.executable, "-m", "cooper_ros.contention", "--camera", str(args.rate),
                               str(args.width), str(args.height)])
    try:
        time.sleep(3.0)  # discovery, first frames
        cpu0, wall0 = cpu_seconds(f"/proc/{camera.pid}/stat"), time.perf_counter()
        measure("camera")
        rclpy.init()
        node = Node("cooper_contention_subscriber")
        node.create_subscription(Image, IMAGE_TOPIC, lambda m: received.__setitem__(0, received[0] + 1),
                                 qos_profile_sensor_data)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        time.sleep(1.0)
        start = received[0]
        measure("camera + subscription")
        frames = received[0] - start
        camera_cores = (cpu_seconds(f"/proc/{camera.pid}/stat") - cpu0) / (time.perf_counter() - wall0)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown()
    finally:
        camera.terminate()
        camera.wait(10)
    time.sleep(1.0)
    measure("quiet again")
    quiet = {r["threads"]: r["depth_s"] for r in rows if r["condition"] == "quiet"}
    for r in rows:
        r["ratio_to_quiet"] = r["depth_s"] / quiet[r["threads"]]
    res = {"rate_hz": args.rate, "width": args.width, "height": args.height, "repeat": args.repeat,
           "camera_process_cores": camera_cores, "frames_received_by_subscription": frames,
           "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()), "rows": rows}
    print(f"\ncamera process: {camera_cores:.2f} cores at {args.rate:g} Hz {args.width}x{args.height}; "
          f"the subscription received {frames} frames while timed")
    print(f"{'condition':24s} {'threads':>7s} {'depth':>9s} {'x quiet':>8s}")
    for r in rows:
        print(f"{r['condition']:24s} {r['threads']:7d} {r['depth_s'] * 1e3:7.1f}ms {r['ratio_to_quiet']:8.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--camera":
        camera_main(float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
