"""Frames without labels (a robot's own footage): speed and merging measured there, never scored."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from clustvit_ros.tools import unlabelled
from clustvit_ros.tools.data import DatasetError
from clustvit_ros.tools.unlabelled import open_unlabelled
from test_cli import clustvit

DEMO_VIDEO = Path(__file__).resolve().parents[2] / "demo" / "vtest_excerpt.mp4"


def test_video_frames_are_spread_over_the_whole_video(monkeypatch):
    monkeypatch.setattr(unlabelled, "MAX_FRAMES", 10)
    frames = open_unlabelled(DEMO_VIDEO)  # 100 frames, 640x480
    assert len(frames) == 10
    assert [p.stem for p in frames.images][:3] == ["vtest_excerpt_000000", "vtest_excerpt_000010",
                                                   "vtest_excerpt_000020"]
    rgb, mask = frames.load(9)
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    assert mask.shape == (480, 640) and (mask == frames.ignore_index).all()  # nothing to score
    first, last = frames.load(0)[0], rgb
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 1  # different moments, not one frame ten times
    assert len(open_unlabelled(DEMO_VIDEO, include=["*_00002*"])) == 1 and len(frames.subset(4)) == 4
    spread = open_unlabelled(DEMO_VIDEO, max_frames=4)  # e.g. bench --limit 4: the whole video, not its start
    assert [p.stem[-6:] for p in spread.images] == ["000000", "000025", "000050", "000075"]


def test_a_folder_of_images_and_what_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    frames = open_unlabelled(tmp_path)
    assert [p.name for p in frames.images] == ["a.png", "b.jpg"] and frames.load(1)[0].shape == (40, 60, 3)
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 1000)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {fake: "fake.mp4: (cannot be opened as a video|no frame could be decoded)",
             empty: "no images .* directly in this folder",
             tmp_path / "notes.txt": "neither a folder of images nor a video",
             tmp_path / "missing": "missing: not found"}
    for source, message in cases.items():
        with pytest.raises(DatasetError, match=message):
            open_unlabelled(source)
    with pytest.raises(DatasetError, match="no frames match"):
        open_unlabelled(tmp_path, include=["z*"])


def test_bench_on_unlabelled_video(default_model_file):
    result = clustvit("bench", "--unlabelled", "--data", DEMO_VIDEO, "--model", default_model_file, "--limit", "2",
                      "--repeats", "1", "--warmup", "1", "--device", "cpu", "--json")
    report = json.loads(result.stdout)
    assert report["unlabelled"] is True and report["images"] == 2 and report["input_size"] == [480, 640]
    assert 0 < report["merged_fraction"] < 1 and report["gflops_ratio"] > 1 and report["latency_ratio"] > 0
    refused = clustvit("bench", "--unlabelled", "--data", DEMO_VIDEO, "--model", default_model_file,
                       "--sweep-threshold", "--device", "cpu", check=False)
    assert refused.returncode == 2 and "sweeps, --strategy all and --oracle-clusters need labels" in refused.stderr
