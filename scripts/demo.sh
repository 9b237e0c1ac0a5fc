#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the segmentation node on a real
# street video with the packaged model; prints tokens and latency per frame and
# saves overlay frames to demo_output/. Extra arguments go to the demo
# (python -m clustvit_ros.tools.demo --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"
exec "$root/.venv/bin/python" -m clustvit_ros.tools.demo "$@"
