"""cooper_ros: ROS 2 adapter of the COOPER pipeline (see cooper_ros.node)."""
__version__ = "0.1.0"
