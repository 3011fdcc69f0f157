"""The README's demo command runs end to end (node + camera sequence + queries) and writes out/demo."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed (run scripts/setup.sh)")
pytest.importorskip("cooper_interfaces.srv", reason="cooper_interfaces not built (run scripts/setup.sh)")


def test_demo_writes_outputs_and_says_whether_weights_are_trained(tmp_path):
    from cooper_model.checkpoint import read_config
    from cooper_model import BUNDLED_CHECKPOINT
    from cooper_ros.testing import ros_test_environment

    env = dict(os.environ)
    env.update(ros_test_environment())
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "cooper_ros.demo", "--out", str(out), "--rate", "4"],
                       capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    config = read_config(BUNDLED_CHECKPOINT)
    untrained = not config.trained
    stage1_only = config.trained and config.trained_stages is not None and \
        not any(s.startswith("stage2") for s in config.trained_stages)
    summary = (out / "SUMMARY.md").read_text()
    assert ("UNTRAINED" in log) == untrained and ("UNTRAINED" in summary) == untrained
    assert ("stage 1 only" in log) == stage1_only and ("stage 1 only" in summary) == stage1_only
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) >= 3 and all(a["success"] for a in answers)
    assert any(a["tools_used"] for a in answers)           # the perception-mode question made maps
    lat = json.loads((out / "latencies.json").read_text())
    assert lat["frames_with_all_outputs_saved"] >= 1 and lat["point_clouds_received"] >= 1
    for suffix in ("camera", "depth_colored", "depth_mm", "segmentation", "labels"):
        assert (out / "frames" / f"000_{suffix}.png").is_file()
    assert (out / "overview.png").is_file()
