"""Render the bundled demo camera sequence (cooper_ros/data/demo_sequence/) with the training
data engine's PyBullet scenes: one synthetic room, a camera sliding and panning through it.

    python scripts/make_demo_sequence.py [--frames 12] [--out cooper_ros/data/demo_sequence]

Writes frame_NNN.jpg (640x480 RGB), camera_info.json (intrinsics) and ground_truth.json (the
metric depth range and the objects in view, for reference). Run once; the output is committed
so the demo needs neither PyBullet nor the training package.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.geometry import Intrinsics, look_pose
from training.data.scene import SceneBuilder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="cooper_ros/data/demo_sequence")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    b = SceneBuilder()
    # The original layout and camera draws: the committed sequence was rendered with them.
    scene = b.build(rng, stacking=False)
    while len(scene["objects"]) < 3:
        scene = b.build(rng, stacking=False)
    pose0, _ = b.sample_view(scene, rng, 640, 480, min_visible=3, stacked_view_p=0.0)
    W, H = 640, 480
    fx = W / 2 / np.tan(np.radians(70) / 2)
    intr = Intrinsics(fx, fx, W / 2, H / 2, W, H)
    f = pose0[:3, 2]
    yaw0 = np.arctan2(f[1], f[0])
    pitch0 = np.arcsin(np.clip(f[2], -1, 1))
    right = pose0[:3, 0]
    frames = []
    for i in range(a.frames):
        s = i / max(1, a.frames - 1) - 0.5
        pos = pose0[:3, 3] + right * (0.6 * s)
        pose = look_pose(pos, yaw0 - 0.25 * s, pitch0, 0.0)
        smp = b.render(scene, pose, intr, rng, f"demo_{i:03d}")
        Image.fromarray(smp.rgb).save(out / f"frame_{i:03d}.jpg", quality=90)
        d = smp.depth[np.isfinite(smp.depth)]
        frames.append({"file": f"frame_{i:03d}.jpg", "depth_min_m": float(d.min()), "depth_max_m": float(d.max()),
                       "objects_in_scene": [o.class_name if hasattr(o, "class_name") else str(getattr(o, "name", ""))
                                   for o in smp.objects]})
    b.close()
    (out / "camera_info.json").write_text(json.dumps(
        {"width": W, "height": H, "frame_id": "demo_camera_optical", "distortion_model": "plumb_bob",
         "k": [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]}, indent=1))
    (out / "ground_truth.json").write_text(json.dumps({"source": "training.data.scene (PyBullet), seed %d" % a.seed,
                                                       "frames": frames}, indent=1))
    print(f"wrote {len(frames)} frames to {out}")


if __name__ == "__main__":
    main()
