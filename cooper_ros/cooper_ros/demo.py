"""Demo: the cooper node on the bundled checkpoint, fed a bundled camera sequence, asked a few
spatial questions. Everything goes over ROS 2 (DDS) between two processes, as on a robot.

    python -m cooper_ros.demo --out out/demo          (scripts/demo.sh does setup + this)

Writes under --out:
  frames/NNN_{camera,depth_colored,segmentation}.png, NNN_depth_relative.png (16-bit, 0..65535 =
  relative 0..1), NNN_depth_mm.png (16-bit millimetres, metric checkpoints), NNN_labels.png
  (16-bit class ids, checkpoints with a palette)   for each camera frame the node processed
  overview.png                         camera | depth | segmentation, one row per frame
  answers.json, answers/*.png          /spatial_query answers, reasoning turns, tools, maps
  latencies.json                       perception and query latencies
  SUMMARY.md                           all of it in words
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

def _sequence_dir() -> str:
    from .node import package_file

    p = package_file("data", "demo_sequence")
    return str(p) if p else "cooper_ros/data/demo_sequence"


SEQUENCE = _sequence_dir()

QUESTIONS = [
    # (question, mode, use the request image?)  mode "" = adaptive COOPER reasoning
    ("How far is the table from the camera, in metres?", "", False),
    ("Which is closer to the camera, the sofa or the table?", "perception", False),
    ("How many mugs can you see?", "text", False),
    ("Is the cabinet taller than the table? Answer yes or no.", "direct", True),
]

UNTRAINED = ("NOTE: the bundled checkpoint (cooper_model/checkpoints/cooper-small) has UNTRAINED, "
             "random weights. The depth maps, segmentations and answers below are meaningless; "
             "the demo shows that the pipeline and the ROS plumbing work end to end. Use a trained "
             "checkpoint (model.checkpoint / --checkpoint) for real results.")
STAGE1_ONLY = ("NOTE: the checkpoint went through stage 1 only: its depth maps and segmentations are "
               "trained, its answers are not (stage 2, the reasoning, is not trained yet), so they are "
               "meaningless.")


def weights_note(diag: dict) -> str | None:
    """What the demo must say about the weights, from the node's diagnostics."""
    if diag.get("model_trained") != "True":
        return UNTRAINED
    if diag.get("model_reasoning_trained") != "True":
        return STAGE1_ONLY
    return None


def load_sequence(path: Path):
    from PIL import Image as PILImage

    files = sorted(path.glob("frame_*.jpg")) + sorted(path.glob("frame_*.png"))
    if not files:
        raise SystemExit(f"no frames in {path}")
    frames = [np.asarray(PILImage.open(f).convert("RGB")) for f in files]
    info = json.loads((path / "camera_info.json").read_text())
    return files, frames, info


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--sequence", default=SEQUENCE, help="folder of frame_*.jpg + camera_info.json")
    ap.add_argument("--checkpoint", default="", help="checkpoint dir (default: the bundled small one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rate", type=float, default=2.0, help="camera frame rate (Hz) of the playback")
    ap.add_argument("--loops", type=int, default=1, help="times the sequence is played before the questions")
    ap.add_argument("--compressed", action="store_true", help="send JPEG CompressedImage instead of raw rgb8")
    args = ap.parse_args(argv)

    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import Header

    from cooper_interfaces.srv import SpatialQuery

    from . import image_codec as ic
    from .testing import NodeProcess, RosClient, now_stamp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, frames, cinfo = load_sequence(Path(args.sequence))
    fid = cinfo.get("frame_id", "demo_camera_optical")
    print(f"[demo] {len(frames)} camera frames from {args.sequence}", flush=True)

    node = NodeProcess(params={"model.checkpoint": args.checkpoint, "model.device": args.device},
                       remaps={"image": "/demo_camera/image_raw", "camera_info": "/demo_camera/camera_info"},
                       log_path=out / "node.log").start()
    client = RosClient("cooper_demo")
    rc = 0
    cam_stop = threading.Event()
    try:
        t0 = time.monotonic()
        print("[demo] starting the node (python -m cooper_ros.node) ...", flush=True)
        if not client.wait_for_service(SpatialQuery, "/spatial_query", timeout=300):
            print(node.log_text()[-4000:], file=sys.stderr)
            print("[demo] the node did not come up; log above", file=sys.stderr)
            return 1
        startup = time.monotonic() - t0
        diag = client.diagnostics()
        note = weights_note(diag)
        print(f"[demo] node up in {startup:.1f} s; checkpoint {diag.get('model_checkpoint')}", flush=True)
        if note:
            print("\n" + "!" * 100 + f"\n{note}\n" + "!" * 100 + "\n", flush=True)

        metric = diag.get("model_depth_is_metric") == "True"
        palette = diag.get("model_has_palette") == "True"
        if not metric:
            print("[demo] the checkpoint's depth is relative: no metric depth and no point cloud "
                  "(~/depth/relative instead)", flush=True)
        outs = {
            "depth": client.collect(Image, "/cooper/depth/image"),
            "relative": client.collect(Image, "/cooper/depth/relative"),
            "colored": client.collect(Image, "/cooper/depth/colored"),
            "seg": client.collect(Image, "/cooper/segmentation/image"),
            "labels": client.collect(Image, "/cooper/segmentation/labels"),
            "points": client.collect(PointCloud2, "/cooper/points"),
            "info": client.collect(CameraInfo, "/cooper/depth/camera_info"),
        }
        if args.compressed:
            img_pub = client.publisher(__import__("sensor_msgs.msg", fromlist=["CompressedImage"]).CompressedImage,
                                       "/demo_camera/image_raw/compressed")
        else:
            img_pub = client.publisher(Image, "/demo_camera/image_raw")
        info_pub = client.publisher(CameraInfo, "/demo_camera/camera_info", reliable=True)
        client.wait_for_subscribers(img_pub, 1, 60)
        time.sleep(1.5)  # the node discovers our output subscriptions

        info = CameraInfo()
        info.width, info.height = int(cinfo["width"]), int(cinfo["height"])
        info.k = [float(x) for x in cinfo["k"]]
        fx, cx, fy, cy = info.k[0], info.k[2], info.k[4], info.k[5]
        info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.distortion_model = cinfo.get("distortion_model", "plumb_bob")
        info.d = [0.0] * 5
        msgs = []
        for arr in frames:
            h = Header(frame_id=fid)
            msgs.append(ic.encode_compressed(arr, "jpeg", header=h) if args.compressed
                        else ic.array_to_image(arr, "rgb8", h))
        sent: dict[int, int] = {}   # stamp ns -> frame index
        sent_lock = threading.Lock()

        def publish(i):
            st = now_stamp(client)
            m = msgs[i % len(msgs)]
            m.header.stamp = st
            info.header.stamp = st
            info.header.frame_id = fid
            with sent_lock:
                sent[st.sec * 10**9 + st.nanosec] = i % len(msgs)
            info_pub.publish(info)
            img_pub.publish(m)

        # --- 1. play the sequence
        n_play = len(msgs) * max(1, args.loops)
        print(f"[demo] playing {n_play} frames at {args.rate:g} Hz ...", flush=True)
        for i in range(n_play):
            publish(i)
            time.sleep(1.0 / args.rate)

        # --- 2. the camera keeps running (looping the sequence) while we ask questions
        def camera():
            i = n_play
            while not cam_stop.is_set():
                publish(i)
                i += 1
                cam_stop.wait(1.0 / args.rate)
        cam = threading.Thread(target=camera, daemon=True)
        cam.start()

        answers = []
        (out / "answers").mkdir(exist_ok=True)
        for qi, (question, mode, with_image) in enumerate(QUESTIONS):
            req = SpatialQuery.Request(question=question, mode=mode)
            if with_image:
                req.image = ic.array_to_image(frames[-1], "rgb8", Header(frame_id=fid, stamp=now_stamp(client)))
            t1 = time.monotonic()
            r = client.call(SpatialQuery, "/spatial_query", req, timeout=600)
            wall = time.monotonic() - t1
            item = {"question": question, "mode": mode or "(adaptive COOPER)",
                    "image": "in the request" if with_image else "newest camera frame",
                    "success": r.success, "message": r.message, "answer": r.answer,
                    "boxed_answer": r.boxed_answer, "reasoning_turns": list(r.reasoning_turns),
                    "tools_used": list(r.tools_used), "latency_s": r.latency_s, "round_trip_s": wall,
                    "image_stamp": f"{r.image_stamp.sec}.{r.image_stamp.nanosec:09d}",
                    "auxiliary_images": []}
            for name, im in zip(r.auxiliary_image_names, r.auxiliary_images):
                p = out / "answers" / f"q{qi}_{len(item['auxiliary_images'])}_{name}.png"
                save_png(p, ic.image_to_rgb8(im))
                item["auxiliary_images"].append(str(p.relative_to(out)))
            answers.append(item)
            status = "ok" if r.success else f"FAILED: {r.message}"
            print(f"[demo] Q{qi}: {question!r} mode={item['mode']} -> {status}; answer {r.answer[:60]!r}"
                  f" tools={list(r.tools_used)} latency {r.latency_s:.2f} s", flush=True)
            if not r.success:
                rc = 1
        cam_stop.set()
        cam.join(timeout=10)
        time.sleep(1.0)

        # --- 3. save what the node published
        with sent_lock:
            sent_map = dict(sent)

        def key(m):
            return m.header.stamp.sec * 10**9 + m.header.stamp.nanosec

        by = {k: {key(m): (t, m) for t, m in q} for k, q in outs.items()}
        needed = ["relative", "colored", "seg"] + (["depth"] if metric else []) + (["labels"] if palette else [])
        done = sorted(set.intersection(*(set(by[k]) for k in needed)))
        rows = []
        e2e = []
        for n, k in enumerate(done):
            idx = sent_map.get(k)
            if idx is None:
                continue
            base = out / "frames" / f"{n:03d}"
            cam_rgb = frames[idx]
            col = ic.image_to_rgb8(by["colored"][k][1])
            seg = ic.image_to_rgb8(by["seg"][k][1])
            save_png(base.with_name(f"{n:03d}_camera.png"), cam_rgb)
            save_png(base.with_name(f"{n:03d}_depth_colored.png"), col)
            rel = ic.image_to_array(by["relative"][k][1])
            save_png(base.with_name(f"{n:03d}_depth_relative.png"), (np.clip(rel, 0, 1) * 65535).astype(np.uint16))
            if metric:
                depth = ic.image_to_array(by["depth"][k][1])
                mm = np.where(np.isfinite(depth), np.clip(depth * 1000.0, 0, 65535), 0).astype(np.uint16)
                save_png(base.with_name(f"{n:03d}_depth_mm.png"), mm)
            save_png(base.with_name(f"{n:03d}_segmentation.png"), seg)
            if palette:
                save_png(base.with_name(f"{n:03d}_labels.png"), ic.image_to_array(by["labels"][k][1]))
            rows.append(np.concatenate([cam_rgb, col, seg], axis=1))
            e2e.append((by["relative"][k][0] - k) / 1e9)
        if rows:
            from PIL import Image as PILImage
            sheet = np.concatenate(rows[:8], axis=0)
            PILImage.fromarray(sheet).resize((sheet.shape[1] // 2, sheet.shape[0] // 2)).save(out / "overview.png")
        diag = client.diagnostics()
        lat = {
            "node_startup_s": startup,
            "frames_sent": len(sent_map),
            "frames_processed": int(diag["frames_processed"]),
            "frames_with_all_outputs_saved": len(rows),
            "point_clouds_received": len(outs["points"]),
            "model_depth_mean_s": float(diag["model_depth_mean_s"]),
            "model_segmentation_mean_s": float(diag["model_seg_mean_s"]),
            "node_overhead_mean_s": float(diag["overhead_mean_s"]),
            "stamp_to_depth_published_mean_s": float(diag["end_to_end_mean_s"]),
            "stamp_to_depth_received_median_s": statistics.median(e2e) if e2e else None,
            "query_latency_s": [a["latency_s"] for a in answers],
        }
        (out / "answers.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
        (out / "latencies.json").write_text(json.dumps(lat, indent=1))
        md = ["# cooper demo", ""]
        if note:
            md += [f"**{note}**", ""]
        md += [f"Checkpoint: `{diag.get('model_checkpoint')}` on {diag.get('model_device')}; "
               f"sequence: `{args.sequence}` ({len(frames)} frames, {args.rate:g} Hz).", "",
               "## Perception", "",
               f"- frames sent {lat['frames_sent']}, processed {lat['frames_processed']} (newest frame only), "
               f"saved with all outputs {lat['frames_with_all_outputs_saved']} (`frames/`, `overview.png`)",
               f"- model time per frame: depth {lat['model_depth_mean_s']:.3f} s, segmentation "
               f"{lat['model_segmentation_mean_s']:.3f} s; node overhead {1e3 * lat['node_overhead_mean_s']:.2f} ms",
               f"- camera stamp -> depth published {lat['stamp_to_depth_published_mean_s']:.3f} s (mean)", "",
               "## /spatial_query", ""]
        for a in answers:
            md += [f"- **{a['question']}** (mode {a['mode']}, image: {a['image']}) -> "
                   + (f"answer `{a['answer'][:120]!r}`, boxed `{a['boxed_answer']!r}`, tools {a['tools_used']}, "
                      f"{len(a['reasoning_turns'])} turn(s), latency {a['latency_s']:.2f} s"
                      if a["success"] else f"failed: {a['message']}")]
        (out / "SUMMARY.md").write_text("\n".join(md) + "\n")
        print(f"[demo] perception: {lat['frames_processed']} frames processed; depth {lat['model_depth_mean_s']:.2f} s, "
              f"segmentation {lat['model_segmentation_mean_s']:.2f} s per frame, node overhead "
              f"{1e3 * lat['node_overhead_mean_s']:.2f} ms", flush=True)
        print(f"[demo] wrote {out}/ (SUMMARY.md, overview.png, frames/, answers.json, latencies.json)", flush=True)
        if not rows:
            print("[demo] no frame got all outputs", file=sys.stderr)
            rc = 1
        if note:
            print(f"[demo] {note}", flush=True)
    finally:
        cam_stop.set()
        client.close()
        code = node.stop()
        if code not in (0, None):
            print(f"[demo] node exited with {code}; see {out / 'node.log'}", file=sys.stderr)
            rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
