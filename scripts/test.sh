#!/usr/bin/env bash
# Set up .venv if needed, then run every test. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
# DDS traffic of every ROS process stays on loopback, in a domain of its own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 90) + 1 ))}"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -ra "$@"
