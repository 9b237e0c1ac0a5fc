#!/usr/bin/env bash
# Create (first run) or reuse (later runs) .venv at the repository root with
# everything: torch, torchvision, timm from PyPI, the ROS 2 pip wheels, pytest.
# Re-installs only when setup.py changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.clustvit-installed-$(sha256sum "$root/setup.py" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing clustvit_ros and its dependencies into $venv (first run downloads torch)" >&2
  log="$venv/setup.log"
  # torch's default Linux build brings its CUDA libraries: about 6 GB in the venv plus the
  # downloaded wheels. A disk that fills half-way leaves a broken venv and an OSError deep in
  # pip's log, so say it up front, in one line.
  need_gb="${CLUSTVIT_SETUP_MIN_FREE_GB:-7}"
  for dir in "$venv" "${TMPDIR:-/tmp}"; do
    free_gb=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free_gb" -lt "$need_gb" ]; then
      echo "setup: only $free_gb GB free on the disk of $dir; installing needs about $need_gb GB" \
        "(torch with its CUDA libraries): free some space (or set CLUSTVIT_SETUP_MIN_FREE_GB)" >&2
      exit 1
    fi
  done
  if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$root[ros,test]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: pip install failed; full log in $log" >&2
    exit 1
  fi
  rm -f "$venv"/.clustvit-installed-*
  touch "$stamp"
fi
