#!/usr/bin/env bash
# Set up .venv if needed, then run every test (ROS processes on loopback DDS, in a domain
# of their own). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/prepare.sh"
exec "$root/.venv/bin/python" -m pytest -ra "$@"
