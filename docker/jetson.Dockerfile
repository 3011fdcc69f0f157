# cooper on NVIDIA Jetson (Orin, JetPack 6 / L4T r36): CUDA, cuDNN and TensorRT from the
# l4t-jetpack base, ROS 2 Humble (Ubuntu 22.04), the Python stack in a venv, the workspace built.
#   docker build -f docker/jetson.Dockerfile -t cooper:jetson .      (on the Jetson, or with arm64 emulation)
# Orin (SM 8.7) has no FP8: use the tensorrt backend with precision int8 (weight-only) or fp16.
ARG L4T_TAG=r36.4.0
FROM nvcr.io/nvidia/l4t-jetpack:${L4T_TAG}

ARG ROS_DISTRO=humble
# NVIDIA's index of Jetson builds of torch for JetPack 6 (CUDA 12.6); torch is pinned to the version
# that index has for this JetPack, since Jetson wheels lag PyPI's.
ARG TORCH_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG TORCH_VERSION=2.8.0
ENV ROS_DISTRO=${ROS_DISTRO} \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    COOPER_CACHE=/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg lsb-release software-properties-common \
    && add-apt-repository -y universe \
    && curl -sSL https://raw.githubusercontent.com/ros/rosdistro/master/ros.key -o /usr/share/keyrings/ros-archive-keyring.gpg \
    && echo "deb [arch=arm64 signed-by=/usr/share/keyrings/ros-archive-keyring.gpg] http://packages.ros.org/ros2/ubuntu $(lsb_release -cs) main" \
       > /etc/apt/sources.list.d/ros2.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
       ros-${ROS_DISTRO}-ros-base ros-${ROS_DISTRO}-rosidl-default-generators ros-${ROS_DISTRO}-diagnostic-msgs \
       ros-${ROS_DISTRO}-sensor-msgs ros-${ROS_DISTRO}-std-srvs ros-${ROS_DISTRO}-geometry-msgs \
       ros-${ROS_DISTRO}-rmw-fastrtps-cpp python3-colcon-common-extensions python3-venv python3-pip \
       python3-libnvinfer build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cooper
COPY requirements.txt ./
# Jetson's torch first; the other pins without torch (the file's torch pin is the x86 CPU/CUDA one).
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && grep -v '^torch==' requirements.txt > /tmp/requirements-jetson.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements-jetson.txt
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv

COPY . .
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
