#!/usr/bin/env bash
# Set up everything cooper needs, idempotently, in a virtual environment (default .venv):
#   * pinned Python dependencies (requirements.txt; torch 2.13.0 is the CPU build where a
#     local wheel is provided, see README),
#   * ROS 2: the system install when one is sourced (ROS_DISTRO set), else the ROS 2 Kilted
#     pip wheels (requirements-ros.txt) with the CMake path fix they need,
#   * cooper_interfaces built with cmake and installed into the venv prefix,
#   * this repo's Python packages (cooper_model, training, cooper_ros) in editable mode.
# Re-running it only redoes steps whose inputs changed. Then: `source scripts/env.sh`.
# Variables: COOPER_VENV (venv path), COOPER_PYTHON (interpreter for a new venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${COOPER_VENV:-$ROOT/.venv}"
T0=$(date +%s)
log() { echo "[setup $(( $(date +%s) - T0 ))s] $*" >&2; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$VENV/.cooper-stamp-$1" ] && [ "$(cat "$VENV/.cooper-stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$VENV/.cooper-stamp-$1"; }

SYSTEM_ROS=0
if [ -n "${ROS_DISTRO:-}" ] && python3 -c 'import rclpy' >/dev/null 2>&1; then
  SYSTEM_ROS=1
  log "using the sourced system ROS 2 ($ROS_DISTRO)"
fi

# --- 1. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$SYSTEM_ROS" = 1 ]; then
    PY="${COOPER_PYTHON:-python3}"
    log "creating $VENV with $PY (--system-site-packages, to see the system rclpy)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    PY="${COOPER_PYTHON:-}"
    if [ -z "$PY" ]; then
      for c in python3.11 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
          PY="$c"; break
        fi
      done
    fi
    if [ -z "$PY" ]; then
      echo "cooper setup: Python 3.11 is needed (the ROS 2 pip wheels are cp311 only)." >&2
      echo "  Debian 12: apt-get install python3.11-venv; elsewhere pyenv install 3.11; or source a ROS 2 install." >&2
      exit 1
    fi
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
fi
PYV="$VENV/bin/python"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# --- 2. pinned dependencies, with a pip recent enough for PEP 660 editable installs of the
# ament_python package (an old pip falls back to `setup.py develop`, which its setup.cfg breaks)
PIP_PIN="pip==26.3"
if ! "$PYV" -m pip --version 2>/dev/null | grep -q "^pip ${PIP_PIN#pip==} "; then
  log "pip install $PIP_PIN"
  "$PYV" -m pip install -q "$PIP_PIN" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; } >&2
fi
REQS=(requirements.txt)
[ "$SYSTEM_ROS" = 0 ] && REQS+=(requirements-ros.txt)
H=$(hash_of "${REQS[@]}"; echo "$SYSTEM_ROS")
if ! stamp_ok reqs "$H"; then
  log "pip install -r ${REQS[*]}"
  args=()
  for r in "${REQS[@]}"; do args+=(-r "$r"); done
  # (the machine's extra local indexes make pip warn about every missing name: hide those lines)
  "$PYV" -m pip install -q "${args[@]}" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; } >&2
  stamp_set reqs "$H"
else
  log "dependencies up to date"
fi

# --- 3. the pip wheels' CMake files carry their build machine's paths: point them here
if [ "$SYSTEM_ROS" = 0 ]; then
  PYINC=$("$PYV" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  NPINC=$("$PYV" -c 'import numpy; print(numpy.get_include())')
  files=$(grep -rl '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' 2>/dev/null || true)
  if [ -n "$files" ]; then
    log "fixing build paths in $(echo "$files" | wc -l) CMake files of the ROS wheels"
    echo "$files" | xargs sed -i \
      -e "s|/opt/python/cp311-cp311/include/python3.11|$PYINC|g" \
      -e "s|/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include|$NPINC|g"
  fi
  export AMENT_PREFIX_PATH="$VENV"
  export CMAKE_PREFIX_PATH="$VENV"
else
  export AMENT_PREFIX_PATH="$VENV:${AMENT_PREFIX_PATH:-}"
  export CMAKE_PREFIX_PATH="$VENV:${CMAKE_PREFIX_PATH:-}"
fi

# --- 4. cooper_interfaces -> venv prefix
IFACE=ros2_ws/src/cooper_interfaces
H=$(hash_of $(find "$IFACE" -type f | sort); echo "$SYSTEM_ROS")
if ! stamp_ok interfaces "$H" || ! "$PYV" -c 'import cooper_interfaces.srv' >/dev/null 2>&1; then
  log "building cooper_interfaces (cmake)"
  BUILD="$ROOT/ros2_ws/build/cooper_interfaces"
  rm -rf "$BUILD"
  cmake -S "$IFACE" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PYV" > "$VENV/.cooper-cmake.log" 2>&1 \
    && cmake --build "$BUILD" -j"$(nproc)" >> "$VENV/.cooper-cmake.log" 2>&1 \
    && cmake --install "$BUILD" >> "$VENV/.cooper-cmake.log" 2>&1 \
    || { tail -40 "$VENV/.cooper-cmake.log" >&2; echo "cooper setup: building cooper_interfaces failed (log: $VENV/.cooper-cmake.log)" >&2; exit 1; }
  stamp_set interfaces "$H"
else
  log "cooper_interfaces up to date"
fi

# --- 5. this repo's packages, editable
H=$(hash_of pyproject.toml cooper_ros/setup.py)
if ! stamp_ok editable "$H"; then
  log "pip install -e . -e cooper_ros"
  args=()
  [ -f pyproject.toml ] && args+=(-e .)
  args+=(-e cooper_ros)
  "$PYV" -m pip install -q --no-deps --no-build-isolation "${args[@]}" > "$VENV/.cooper-editable.log" 2>&1 \
    || { cat "$VENV/.cooper-editable.log" >&2; exit 1; }
  stamp_set editable "$H"
fi

# --- 6. check
export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PYV" -c 'import rclpy, cooper_interfaces.srv, cooper_ros.node, cooper_model' \
  || { echo "cooper setup: the environment does not import (see above)" >&2; exit 1; }
log "done: $VENV (source scripts/env.sh to use it)"
