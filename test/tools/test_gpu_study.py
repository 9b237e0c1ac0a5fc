"""The GPU study script runs end to end; on a machine without CUDA, its CPU (eager fp32) arms."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ros]


def test_gpu_study_dry_run_on_this_machine(tmp_path, default_model_file):
    out = tmp_path / "study.json"
    result = subprocess.run([sys.executable, "-m", "clustvit_ros.tools.gpu_study", "--device", "auto",
                             "--model", str(default_model_file), "--frames", "4", "--repeats", "1",
                             "--warmup", "1", "--node-frames", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads(out.read_text())
    arms = {row["arm"] for row in study["rows"]}
    assert {"ClustViT-Ti eager b1", "ViT-Ti eager b1", "ClustViT-Ti eager b4", "ViT-Ti eager b4"} <= arms
    assert all(row["frames_per_second"] > 0 for row in study["rows"])
    assert study["node"]["frames"] >= 3 and study["node"]["latency_ms_median"] > 0
    assert "| ClustViT-Ti eager b1 | fp32 | 1 |" in result.stdout
