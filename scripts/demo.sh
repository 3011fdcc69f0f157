#!/usr/bin/env bash
# Set up (idempotent) and run the demo: the node on the bundled checkpoint, a bundled sequence
# of camera frames played into it, a few /spatial_query calls; results under out/demo/.
# Extra arguments go to `python -m cooper_ros.demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( 1 + $$ % 100 ))}"
exec python -m cooper_ros.demo --out out/demo "$@"
