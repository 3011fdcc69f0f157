"""ament_python package cooper_ros (also installable with pip: `pip install -e cooper_ros`)."""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "cooper_ros"
HERE = os.path.dirname(os.path.realpath(__file__))


def rel(*parts):
    """Path relative to this file's directory (works through the ros2_ws/src symlink)."""
    return os.path.relpath(os.path.join(HERE, *parts), os.getcwd())


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "tests"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [rel("resource", PACKAGE)]),
        ("share/" + PACKAGE, [rel("package.xml")]),
        ("share/" + PACKAGE + "/launch", [rel("..", "launch", "cooper.launch.py")]),
        ("share/" + PACKAGE + "/config", sorted(rel("config", os.path.basename(p))
                                                for p in glob(os.path.join(HERE, "config", "*")))),
        ("share/" + PACKAGE + "/data/demo_sequence",
         sorted(rel("data", "demo_sequence", os.path.basename(p))
                for p in glob(os.path.join(HERE, "data", "demo_sequence", "*")))),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="cooper",
    maintainer_email="cooper@example.com",
    description="ROS 2 node for COOPER: depth, segmentation and spatial question answering.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "cooper_node = cooper_ros.node:main",
            "cooper_bench = cooper_ros.bench:main",
            "cooper_demo = cooper_ros.demo:main",
        ],
    },
)
