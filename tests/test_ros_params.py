"""Parameters (one table, one YAML), refusing invalid values at start, and the launch/RViz files."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cooper_ros.params import (PARAMS, SPEC_BY_NAME, check_consistency, check_value,
                               load_params_file, render_yaml)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cooper_ros" / "config"
YAML = CONFIG / "cooper.yaml"


def test_every_parameter_has_description_and_a_valid_default():
    for p in PARAMS:
        assert p.description, p.name
        assert check_value(p.name, p.default) is None, p.name
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
            assert p.min is not None and p.max is not None, f"{p.name} has no range"
    assert check_consistency({p.name: p.default for p in PARAMS}) is None


def test_yaml_is_the_generated_one_and_loads_to_the_defaults():
    assert YAML.read_text() == render_yaml(), "regenerate: python -m cooper_ros.params > cooper_ros/config/cooper.yaml"
    vals = load_params_file(str(YAML))
    assert vals == {p.name: p.default for p in PARAMS}


def test_issue_parameters_are_all_there():
    for name in ("model.checkpoint", "model.device", "model.dtype", "model.backend", "perception.rate_hz",
                 "outputs.depth", "outputs.segmentation", "outputs.points", "generation.num_steps",
                 "generation.cfg_text_scale", "generation.cfg_img_scale", "depth.min_m", "depth.max_m",
                 "generation.vae_resolution", "input.max_image_age_s", "query.max_question_chars"):
        assert name in SPEC_BY_NAME


@pytest.mark.parametrize("name, value, expect", [
    ("model.dtype", "float8", "not one of"),
    ("model.device", "tpu", "does not match"),
    ("perception.rate_hz", -1.0, "below the minimum"),
    ("perception.rate_hz", "fast", "must be of type float"),
    ("query.max_turns", 100, "above the maximum"),
    ("query.max_question_chars", 0, "below the minimum"),
    ("outputs.depth", 1, "must be of type bool"),
    ("input.max_image_age_s", 1e9, "above the maximum"),
])
def test_check_value_refuses_with_a_reason(name, value, expect):
    why = check_value(name, value)
    assert why and expect in why and name in why


def test_int_accepted_for_float():
    assert check_value("perception.rate_hz", 5) is None


@pytest.mark.parametrize("change, expect", [
    ({"depth.min_m": 5.0, "depth.max_m": 2.0}, "must be smaller"),
    ({"generation.cfg_interval_start": 0.5}, "both be set"),
    ({"generation.cfg_interval_start": 0.8, "generation.cfg_interval_end": 0.2}, "must not exceed"),
    ({"generation.num_steps": 1}, "at least 2"),
    ({"generation.timestep_shift": 0.0}, "> 0"),
    ({"generation.cfg_img_scale": -0.5}, "-1 for the model default"),
])
def test_consistency_rules(change, expect):
    vals = {p.name: p.default for p in PARAMS}
    vals.update(change)
    why = check_consistency(vals)
    assert why and expect in why


def _run_node(tmp_path, params_yaml: dict | None, extra=(), timeout=60):
    from cooper_ros.testing import ros_test_environment
    import os

    env = dict(os.environ)
    env.update(ros_test_environment())
    cmd = [sys.executable, "-m", "cooper_ros.node", "--ros-args"]
    if params_yaml is not None:
        f = tmp_path / "params.yaml"
        f.write_text(yaml.safe_dump({"/**": {"ros__parameters": params_yaml}}))
        cmd += ["--params-file", str(f)]
    cmd += list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def test_node_refuses_invalid_yaml_at_start(tmp_path):
    pytest.importorskip("rclpy")
    r = _run_node(tmp_path, {"model": {"dtype": "float8"}, "perception": {"rate_hz": -3.0},
                             "query": {"max_turns": 100}})
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "invalid parameters, not starting" in out
    for reason in ("model.dtype='float8' is not one of", "perception.rate_hz=-3.0 is below the minimum",
                   "query.max_turns=100 is above the maximum"):
        assert reason in out, out


def test_node_refuses_inconsistent_parameters_at_start(tmp_path):
    pytest.importorskip("rclpy")
    r = _run_node(tmp_path, {"depth": {"min_m": 5.0, "max_m": 2.0}})
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "depth.min_m (5.0) must be smaller than depth.max_m (2.0)" in out, out


def test_node_reports_a_missing_checkpoint(tmp_path):
    pytest.importorskip("rclpy")
    r = _run_node(tmp_path, {"model": {"checkpoint": str(tmp_path / "nope")}}, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "configure failed" in out and "checkpoint directory not found" in out, out


# ------------------------------------------------------------------ launch / RViz / DDS profile
LAUNCH = ROOT / "launch" / "cooper.launch.py"


def test_launch_file_is_valid_and_uses_the_same_yaml():
    src = LAUNCH.read_text()
    tree = ast.parse(src)
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    for arg in ("camera", "checkpoint", "device", "backend", "params_file", "rviz"):
        assert f'DeclareLaunchArgument("{arg}"' in src, arg
    for f in ("cooper.yaml", "cooper.rviz", "fastdds_shm.xml"):
        assert f in src and (CONFIG / f).is_file(), f
    assert 'executable="cooper_node"' in src
    try:  # on a machine with ROS 2 installed, build the description for real
        import launch_ros  # noqa: F401
    except ImportError:
        return
    import importlib.util
    spec = importlib.util.spec_from_file_location("cooper_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.generate_launch_description() is not None


def test_setup_py_installs_launch_and_config():
    src = (ROOT / "cooper_ros" / "setup.py").read_text()
    assert '"share/" + PACKAGE + "/launch"' in src and '"..", "launch", "cooper.launch.py"' in src
    assert "cooper_node = cooper_ros.node:main" in src
    assert (ROOT / "ros2_ws" / "src" / "cooper_ros").resolve() == (ROOT / "cooper_ros").resolve()


def test_rviz_config_shows_camera_depth_segmentation_points():
    cfg = yaml.safe_load((CONFIG / "cooper.rviz").read_text())
    topics = {d["Topic"]["Value"] for d in cfg["Visualization Manager"]["Displays"] if "Topic" in d}
    assert {"/camera/image_raw", "/cooper/depth/colored", "/cooper/segmentation/image",
            "/cooper/points"} <= topics


def test_fastdds_profile_enlarges_shared_memory():
    import xml.etree.ElementTree as ET

    root = ET.parse(CONFIG / "fastdds_shm.xml").getroot()
    ns = {"d": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
    seg = root.find(".//d:transport_descriptor[d:type='SHM']/d:segment_size", ns)
    assert seg is not None and int(seg.text) >= 32 * 2**20
    part = root.find(".//d:participant", ns)
    assert part.get("is_default_profile") == "true"
