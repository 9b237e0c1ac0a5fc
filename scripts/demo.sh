#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the segmentation node on a real
# street video with the packaged model; prints tokens and latency per frame and
# saves overlay frames to demo_output/. Extra arguments go to the demo
# (python -m clustvit_ros.tools.demo --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
# DDS traffic stays on loopback, in a domain of its own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 90) + 1 ))}"
cd "$root"
exec "$root/.venv/bin/python" -m clustvit_ros.tools.demo "$@"
