#!/usr/bin/env bash
# Entry point of the cooper images: the ROS 2 environment, then the node's launch file.
#   docker run ... cooper:x86_64                                   -> ros2 launch cooper_ros cooper.launch.py
#   docker run ... cooper:x86_64 checkpoint:=/models/COOPER device:=cuda backend:=tensorrt,onnxruntime,eager
#   docker run ... cooper:x86_64 bash                               -> any other command
set -eo pipefail
ROS_SETUP="${ROS_SETUP:-/opt/ros/${ROS_DISTRO}/setup.bash}"
WORKSPACE_SETUP="${WORKSPACE_SETUP:-/opt/cooper/ros2_ws/install/setup.bash}"
# shellcheck disable=SC1090
source "$ROS_SETUP"
# shellcheck disable=SC1090
source "$WORKSPACE_SETUP"
if [ "$#" -eq 0 ] || [[ "$1" == *":="* ]]; then
  exec ros2 launch cooper_ros cooper.launch.py "$@"
fi
exec "$@"
