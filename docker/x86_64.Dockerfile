# cooper on x86_64 with an NVIDIA GPU: CUDA + TensorRT (NVIDIA's TensorRT image), ROS 2 Jazzy,
# the pinned Python stack in a venv that sees the system ROS packages, and the workspace built.
#   docker build -f docker/x86_64.Dockerfile -t cooper:x86_64 .
# The TensorRT image's tag fixes CUDA and TensorRT together (25.06: CUDA 12.9, TensorRT 10.11,
# Ubuntu 24.04); the torch wheel must be a CUDA build matching that CUDA major version.
ARG TRT_TAG=25.06-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}

ARG ROS_DISTRO=jazzy
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV ROS_DISTRO=${ROS_DISTRO} \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    COOPER_CACHE=/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ROS 2 from packages.ros.org (the signing key ships in ros2-apt-source)
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg lsb-release software-properties-common \
    && add-apt-repository -y universe \
    && curl -sSL https://raw.githubusercontent.com/ros/rosdistro/master/ros.key -o /usr/share/keyrings/ros-archive-keyring.gpg \
    && echo "deb [arch=amd64 signed-by=/usr/share/keyrings/ros-archive-keyring.gpg] http://packages.ros.org/ros2/ubuntu $(lsb_release -cs) main" \
       > /etc/apt/sources.list.d/ros2.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
       ros-${ROS_DISTRO}-ros-base ros-${ROS_DISTRO}-rosidl-default-generators ros-${ROS_DISTRO}-diagnostic-msgs \
       ros-${ROS_DISTRO}-sensor-msgs ros-${ROS_DISTRO}-std-srvs ros-${ROS_DISTRO}-geometry-msgs \
       ros-${ROS_DISTRO}-rmw-fastrtps-cpp python3-colcon-common-extensions python3-venv python3-pip \
       build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cooper
# Dependencies first, so editing the code does not reinstall them.
COPY requirements.txt ./
# The CUDA build of the pinned torch, then the rest of the pins (pip keeps the installed torch).
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX}" "torch==$(sed -n 's/^torch==//p' requirements.txt)" \
    && /opt/venv/bin/pip install -r requirements.txt
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv

COPY . .
# cooper_model and training into the venv; the ROS packages (interfaces + node) with colcon.
RUN pip install --no-deps -e .
WORKDIR /opt/cooper/ros2_ws
RUN . /opt/ros/${ROS_DISTRO}/setup.bash \
    && colcon build --cmake-args -DPython3_EXECUTABLE=/opt/venv/bin/python \
    && rm -rf build log
WORKDIR /opt/cooper

COPY docker/entrypoint.sh /usr/local/bin/cooper-entrypoint
RUN chmod +x /usr/local/bin/cooper-entrypoint
VOLUME ["/cache", "/models"]
ENTRYPOINT ["/usr/local/bin/cooper-entrypoint"]
CMD []
