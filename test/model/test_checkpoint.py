"""Checkpoints: round trip, no pickle, and clear errors that name the file."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from clustvit_ros.model import (CheckpointError, ModelConfig, build_model, load_checkpoint,
                                read_metadata, save_checkpoint)


def test_round_trip_keeps_weights_config_and_outputs(tmp_path, untrained_model):
    path = save_checkpoint(untrained_model, tmp_path / "m.safetensors", extra={"note": "round trip"})
    loaded = load_checkpoint(path)
    assert loaded.config == untrained_model.config
    assert loaded.checkpoint_info == {"note": "round trip"}
    for (name, a), (_, b) in zip(untrained_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    image = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(untrained_model(image).logits, loaded(image).logits)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_model_has_the_permissions_the_umask_allows(tmp_path, untrained_model, umask):
    """safetensors writes 0600; a node running as another user must still read an exported model."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(untrained_model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_half_storage_loads_as_float32(tmp_path, untrained_model):
    path = save_checkpoint(untrained_model, tmp_path / "half.safetensors", half=True)
    assert path.stat().st_size < 0.6 * save_checkpoint(untrained_model, tmp_path / "full.safetensors").stat().st_size
    loaded = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    image = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(image).logits, untrained_model(image).logits, rtol=0.05, atol=0.05)


def test_metadata_is_readable_without_weights(untrained_checkpoint):
    config, extra = read_metadata(untrained_checkpoint)
    assert config.clusters == 3 and config.injection_point == 4 and config.head == "segmenter"
    assert config.class_names[0] == "Sky" and len(config.palette) == 11


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_not_safetensors_is_named(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x80\x04 this is a pickle, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable safetensors file"):
        load_checkpoint(bad)


def test_truncated_file_is_named(tmp_path, untrained_checkpoint):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(untrained_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(cut)


def test_timm_backbone_file_is_not_a_model(backbone_file):
    with pytest.raises(CheckpointError, match="looks like a timm ViT backbone"):
        load_checkpoint(backbone_file)


def test_shape_mismatch_is_named(tmp_path, untrained_model):
    path = save_checkpoint(untrained_model, tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["decode_head.class_embed"] = torch.zeros(1, 5, 192)  # 5 classes, metadata says 11
    bad = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"mismatch.safetensors: .*shape mismatch decode_head.class_embed"):
        load_checkpoint(bad)


def test_backbone_initialisation_loads_timm_weights(backbone_file):
    from safetensors.torch import load_file
    model = build_model(ModelConfig(), backbone_file)
    timm_state = load_file(str(backbone_file))
    assert torch.equal(model.backbone.blocks[3].mlp.fc1.weight, timm_state["blocks.3.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="not a vit_small_patch16_224 backbone"):
        build_model(ModelConfig(arch="vit_small_patch16_224"), backbone_file)
