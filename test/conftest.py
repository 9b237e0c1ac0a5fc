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

# Tests share two cores with whatever else runs; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
    from clustvit_ros.data import open_dataset
    data = open_dataset(camvid, "val")
    return [data.load(i) for i in (0, 37, 80)]


def normalise(rgb: np.ndarray) -> torch.Tensor:
    from clustvit_ros.data import to_tensor
    return to_tensor(rgb, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unsqueeze(0)
