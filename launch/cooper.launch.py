"""Launch the cooper node (and optionally RViz) on a machine with a ROS 2 install.

    ros2 launch cooper_ros cooper.launch.py camera:=/camera checkpoint:=/models/COOPER \
        device:=cuda backend:=eager rviz:=true

Arguments
  camera        camera namespace; subscribes <camera>/image_raw, <camera>/image_raw/compressed
                and <camera>/camera_info                                  (default /camera)
  image         full image topic, overrides <camera>/image_raw            (default: unset)
  camera_info   full camera_info topic, overrides <camera>/camera_info    (default: unset)
  params_file   the node's YAML (default: share/cooper_ros/config/cooper.yaml, the same file
                `python -m cooper_ros.node --ros-args --params-file` takes)
  checkpoint, device, dtype, backend, device_map
                override model.* from params_file when not empty (backend may be a fallback
                chain such as tensorrt,onnxruntime,eager; device_map: auto or a JSON object)
  alignment_source, alignment_topic
                a sparse metric source for relative depth: depth | points | scan, and its
                topic (remapped to alignment/<source>); empty: the params_file's setting
  node_name, namespace
  rviz          true: start rviz2 with share/cooper_ros/config/cooper.rviz
  fixed_frame   RViz fixed frame (the camera's optical frame id)
  fastdds_profile
                Fast DDS XML profile with a shared-memory segment big enough for camera images
                (default: the bundled one; empty: leave FASTDDS_DEFAULT_PROFILES_FILE alone).
                Set the same variable for the camera driver's process to get the benefit.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

SHARE = get_package_share_directory("cooper_ros")


def _node(context, *args, **kwargs):
    cfg = {k: LaunchConfiguration(k).perform(context) for k in (
        "camera", "image", "camera_info", "params_file", "checkpoint", "device", "dtype",
        "backend", "device_map", "alignment_source", "alignment_topic", "node_name", "namespace",
        "fastdds_profile")}
    camera = cfg["camera"].rstrip("/")
    image = cfg["image"] or f"{camera}/image_raw"
    info = cfg["camera_info"] or f"{camera}/camera_info"
    overrides = {}
    for arg, param in (("checkpoint", "model.checkpoint"), ("device", "model.device"),
                       ("dtype", "model.dtype"), ("backend", "model.backend"),
                       ("device_map", "model.device_map"), ("alignment_source", "alignment.source")):
        if cfg[arg]:
            overrides[param] = cfg[arg]
    actions = []
    if cfg["fastdds_profile"] and not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        actions.append(SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", cfg["fastdds_profile"]))
    remappings = [("image", image), ("camera_info", info)]
    if cfg["alignment_source"] and cfg["alignment_topic"]:
        remappings.append((f"alignment/{cfg['alignment_source']}", cfg["alignment_topic"]))
    params = [cfg["params_file"]]
    if overrides:
        params.append(overrides)
    actions.append(Node(
        package="cooper_ros",
        executable="cooper_node",
        name=cfg["node_name"],
        namespace=cfg["namespace"],
        output="screen",
        emulate_tty=True,
        parameters=params,
        remappings=remappings,
    ))
    return actions


def generate_launch_description():
    args = [
        DeclareLaunchArgument("camera", default_value="/camera", description="camera namespace"),
        DeclareLaunchArgument("image", default_value="", description="image topic (overrides camera)"),
        DeclareLaunchArgument("camera_info", default_value="", description="camera_info topic"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(SHARE, "config", "cooper.yaml"),
                              description="parameters YAML of the node"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="checkpoint directory (empty: params_file / bundled)"),
        DeclareLaunchArgument("device", default_value="", description="cpu, cuda, cuda:N, auto"),
        DeclareLaunchArgument("dtype", default_value="", description="float32, bfloat16, float16"),
        DeclareLaunchArgument("backend", default_value="",
                              description="backend or fallback chain, e.g. tensorrt,onnxruntime,eager "
                                          "(empty: the params file)"),
        DeclareLaunchArgument("device_map", default_value="",
                              description="auto or a JSON object {module: device} (empty: the params file)"),
        DeclareLaunchArgument("alignment_source", default_value="",
                              description="depth, points or scan: fit relative depth to this metric source"),
        DeclareLaunchArgument("alignment_topic", default_value="",
                              description="topic of the alignment source, e.g. /scan"),
        DeclareLaunchArgument("node_name", default_value="cooper"),
        DeclareLaunchArgument("namespace", default_value=""),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz"),
        DeclareLaunchArgument("rviz_config", default_value=os.path.join(SHARE, "config", "cooper.rviz")),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame"),
        DeclareLaunchArgument("fastdds_profile",
                              default_value=os.path.join(SHARE, "config", "fastdds_shm.xml")),
    ]
    rviz = Node(
        package="rviz2", executable="rviz2", name="cooper_rviz", output="screen",
        arguments=["-d", LaunchConfiguration("rviz_config"), "-f", LaunchConfiguration("fixed_frame")],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription(args + [OpaqueFunction(function=_node), rviz])
