# Source this (bash) to use the project's environment: `source scripts/env.sh`.
# Activates the venv made by scripts/setup.sh and sets what ROS 2 needs at run time.
_cooper_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COOPER_VENV="${COOPER_VENV:-$_cooper_root/.venv}"
if [ ! -x "$COOPER_VENV/bin/python" ]; then
  echo "cooper: no venv at $COOPER_VENV; run scripts/setup.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
# a sourced system ROS (ROS_DISTRO) stays in charge of rclpy; the venv adds our packages
# shellcheck disable=SC1091
source "$COOPER_VENV/bin/activate"
# cooper_interfaces is installed into the venv prefix; with the pip wheels the
# ros-wheels-bootstrapper adds $VIRTUAL_ENV/lib itself, with a system ROS we must.
export AMENT_PREFIX_PATH="$COOPER_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export LD_LIBRARY_PATH="$COOPER_VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# images travel over shared memory (the default Fast DDS segment is too small for them)
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_cooper_root/cooper_ros/config/fastdds_shm.xml}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export HF_HUB_OFFLINE=1
unset _cooper_root
