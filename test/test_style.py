"""The project's one style: ruff (pycodestyle + pyflakes) at 120 characters, over code, tests and launch files."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is part of the test extras (pip install -e .[test]): it is not installed")
    result = subprocess.run([ruff, "check", "--config", str(REPO / "ruff.toml"), "clustvit_ros", "test", "launch",
                             "setup.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
