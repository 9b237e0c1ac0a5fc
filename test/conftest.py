"""Shared fixtures: real data and weights from ../shared (skip cleanly without it)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CLUSTVIT_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "datasets" / "camvid"
BACKBONE = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
DEFAULT_MODEL = REPO / "models" / "clustvit_tiny_camvid.safetensors"

DEMO_VIDEO = REPO / "demo" / "vtest_excerpt.mp4"

# Tests share two cores with whatever else runs; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Before anything imports rclpy: DDS stays on loopback, in this run's own domain.
from ros_helpers import configure_ros_environment  # noqa: E402

configure_ros_environment()


@pytest.fixture(scope="session")
def demo_video() -> Path:
    assert DEMO_VIDEO.is_file(), "the packaged demo video is part of the repository"
    return DEMO_VIDEO


@pytest.fixture(scope="session")
def camvid() -> Path:
    if not (CAMVID / "val").is_dir():
        pytest.skip("../shared/datasets/camvid not available")
    return CAMVID


@pytest.fixture(scope="session")
def backbone_file() -> Path:
    if not BACKBONE.is_file():
        pytest.skip("../shared/weights ViT-Ti not available")
    return BACKBONE


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.skip("packaged default model not present")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def untrained_model(backbone_file):
    """ClustViT-Ti (k=3, ip=4, Segmenter) on the real pre-trained backbone, untrained head."""
    from clustvit_ros.model import ModelConfig, build_model
    torch.manual_seed(0)
    return build_model(ModelConfig(), backbone_file).eval()


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory, untrained_model) -> Path:
    from clustvit_ros.model import save_checkpoint
    return save_checkpoint(untrained_model, tmp_path_factory.mktemp("ckpt") / "untrained.safetensors")


@pytest.fixture(scope="session")
def val_samples(camvid):
    """A few real CamVid val frames: list of (RGB uint8, mask int64)."""
    from clustvit_ros.tools.data import open_dataset
    data = open_dataset(camvid, "val")
    return [data.load(i) for i in (0, 37, 80)]


def normalise(rgb: np.ndarray) -> torch.Tensor:
    from clustvit_ros.tools.data import to_tensor
    return to_tensor(rgb, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unsqueeze(0)


@pytest.fixture(scope="session")
def node_model(tmp_path_factory) -> Path:
    """The packaged default model; without it, an untrained ClustViT on the shared backbone."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    if not BACKBONE.is_file():
        pytest.skip("neither the packaged model nor ../shared weights are available")
    from clustvit_ros.model import ModelConfig, build_model, save_checkpoint
    torch.manual_seed(0)
    model = build_model(ModelConfig(default_merge_threshold=0.3), BACKBONE)
    return save_checkpoint(model, tmp_path_factory.mktemp("node") / "untrained.safetensors")


@pytest.fixture(scope="session")
def street_frames() -> list:
    """Real 480x360 BGR street frames: CamVid val when ../shared is there, else the demo video."""
    import cv2
    frames = []
    if (CAMVID / "val").is_dir():
        for path in sorted((CAMVID / "val").iterdir())[:12]:
            frames.append(cv2.imread(str(path), cv2.IMREAD_COLOR))
    else:
        capture = cv2.VideoCapture(str(DEMO_VIDEO))
        while len(frames) < 12:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.resize(frame, (480, 360), interpolation=cv2.INTER_AREA))
    assert frames, "no real frames available"
    return frames
