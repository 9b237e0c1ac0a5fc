"""Training: a tiny overfit run on real frames, resuming, and refusing to overwrite."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clustvit_ros.tools.data import open_dataset
from clustvit_ros.model import load_checkpoint
from clustvit_ros.model.checkpoint import CheckpointError
from clustvit_ros.tools.train import (TrainSettings, distillation_loss, load_last_epoch, read_training_state,
                                   train)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, camvid):
    """Four real CamVid frames as both train and val split (generic layout)."""
    root = tmp_path_factory.mktemp("tiny")
    source = open_dataset(camvid, "train")
    for split in ("train", "val"):
        for index in (0, 90, 180, 270):
            for kind, path in (("images", source.images[index]), ("masks", source.masks[index])):
                target = root / kind / split / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    (root / "classes.txt").write_text("\n".join(source.class_names) + "\n")
    return root


def _settings(data, out, backbone, epochs):
    return TrainSettings(data=str(data), out=str(out), init_backbone=str(backbone), epochs=epochs,
                         batch_size=2, lr=5e-4, warmup_steps=4, void_label=11, input_size=(96, 128),
                         crop_size=(96, 128), scale_range=(1.0, 1.0), cluster_warmup_epochs=2,
                         workers=0, device="cpu")


def _drop_saved_settings(state_path, names):
    with safe_open(str(state_path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(state_path))
    meta = json.loads(metadata["meta"])
    for name in names:
        meta["settings"].pop(name)
    save_file(tensors, str(state_path), metadata={**metadata, "meta": json.dumps(meta)})


def test_overfit_loss_falls_and_resume_continues(tmp_path, tiny_dataset, backbone_file):
    out = tmp_path / "tiny.safetensors"
    settings = _settings(tiny_dataset, out, backbone_file, epochs=8)
    best = train(settings, log=lambda _: None)
    history = read_training_state(settings.state_path())["history"]
    losses = [r["loss"] for r in history]
    assert len(losses) == 8
    umask = os.umask(0)
    os.umask(umask)
    for written in (out, settings.state_path()):  # safetensors writes 0600; the run's files follow the umask
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written
    assert losses[-1] < 0.6 * losses[0], losses
    assert best["miou"] > history[0]["val_miou"]
    model = load_checkpoint(out)  # the best checkpoint is a complete, loadable model
    assert model.config.clusters == 3 and model.config.ignore_index == 11
    assert model.checkpoint_info["val_metrics"]["miou"] == pytest.approx(best["miou"])

    with pytest.raises(ValueError, match="pass --resume"):
        train(settings, log=lambda _: None)
    # A state file written before keep_cluster_module / distill_from existed still resumes.
    _drop_saved_settings(settings.state_path(), ("keep_cluster_module", "distill_from", "train_merge_threshold"))
    longer = _settings(tiny_dataset, out, backbone_file, epochs=10)
    lines = []
    train(longer, resume=True, log=lines.append)
    assert lines[0].startswith("resuming") and "epoch 9/10" in lines[0]
    resumed = read_training_state(settings.state_path())["history"]
    assert [r["epoch"] for r in resumed] == list(range(1, 11))
    assert resumed[:8] == history

    # The last epoch's weights (for export --last-epoch) come from the state file.
    last = load_checkpoint(out)
    assert load_last_epoch(last, out)["epoch"] == 9
    state = load_file(str(settings.state_path()))
    assert torch.equal(last.decode_head.class_embed, state["model.decode_head.class_embed"])
    with pytest.raises(CheckpointError, match="no training state beside"):
        load_last_epoch(last, tmp_path / "elsewhere.safetensors")


def test_plain_vit_trains_without_cluster_module(tmp_path, tiny_dataset, backbone_file):
    settings = _settings(tiny_dataset, tmp_path / "plain.safetensors", backbone_file, epochs=2)
    settings.clusters = 0
    train(settings, log=lambda _: None)
    model = load_checkpoint(settings.out)
    assert model.cluster_head is None and model.regenerator is None
    assert np.isfinite(read_training_state(settings.state_path())["history"][-1]["loss"])


def test_fine_tune_from_trained_checkpoint_with_other_k_and_ip(tmp_path, tiny_dataset, default_model_file,
                                                               backbone_file):
    """--init-from: backbone and head come from the packaged model, the cluster module is new."""
    source = load_checkpoint(default_model_file)
    settings = _settings(tiny_dataset, tmp_path / "ft.safetensors", default_model_file, epochs=1)
    settings.init_backbone, settings.init_from = None, str(default_model_file)
    other_k = source.config.clusters + 1  # not the packaged model's k, whatever it is
    settings.clusters, settings.injection_point, settings.lr = other_k, 3, 1e-5
    fine_tuned = train(settings, log=lambda _: None)
    model = load_checkpoint(settings.out)
    assert (model.config.clusters, model.config.injection_point) == (other_k, 3)
    assert model.cluster_head.fc2.weight.shape[0] != source.cluster_head.fc2.weight.shape[0]
    # At this learning rate one epoch barely moves the loaded trunk ...
    drift = (model.backbone.blocks[6].mlp.fc1.weight - source.backbone.blocks[6].mlp.fc1.weight).abs().max()
    assert 0 < drift < 0.05
    # ... and a trained trunk segments these frames far better than one epoch from ImageNet does.
    scratch = _settings(tiny_dataset, tmp_path / "scratch.safetensors", backbone_file, 1)
    scratch.clusters, scratch.injection_point = other_k, 3
    scratch_best = train(scratch, log=lambda _: None)
    assert fine_tuned["miou"] > scratch_best["miou"] + 20


def test_fine_tune_refuses_a_checkpoint_of_another_head(tmp_path, tiny_dataset, default_model_file):
    settings = _settings(tiny_dataset, tmp_path / "ft.safetensors", default_model_file, epochs=1)
    settings.init_backbone, settings.init_from, settings.head = None, str(default_model_file), "linear"
    with pytest.raises(CheckpointError, match="clustvit_tiny_camvid.safetensors.*linear"):
        train(settings, log=lambda _: None)


def test_continue_whole_model_with_distillation_and_a_merge_threshold(tmp_path, tiny_dataset,
                                                                       default_model_file):
    """--keep-cluster-module + --distill-from + --train-merge-threshold: stage two of the default recipe."""
    source = load_checkpoint(default_model_file)
    settings = _settings(tiny_dataset, tmp_path / "stage2.safetensors", default_model_file, epochs=1)
    settings.init_backbone, settings.init_from, settings.keep_cluster_module = None, str(default_model_file), True
    settings.clusters = source.config.clusters  # a kept module keeps its k
    settings.distill_from, settings.train_merge_threshold, settings.lr = str(default_model_file), 0.3, 1e-5
    train(settings, log=lambda _: None)
    model = load_checkpoint(settings.out)
    # The cluster module was loaded, not re-initialised: one small-LR epoch leaves it close.
    drift = (model.cluster_head.fc2.weight - source.cluster_head.fc2.weight).abs().max()
    assert 0 < drift < 0.05
    record = read_training_state(settings.state_path())["history"][0]
    # The teacher (the same weights, unmerged) and the merged student disagree a little, not a lot.
    assert 0 < record["distill_loss"] < 0.5
    assert record["train_merged_fraction"] > 0.2

    settings = _settings(tiny_dataset, tmp_path / "other.safetensors", default_model_file, epochs=1)
    settings.init_backbone, settings.init_from, settings.keep_cluster_module = None, str(default_model_file), True
    settings.clusters = source.config.clusters + 1
    with pytest.raises(CheckpointError,
                       match=f"clustvit_tiny_camvid.safetensors.*cluster module.*k={settings.clusters}"):
        train(settings, log=lambda _: None)


def test_distillation_loss_is_kl_over_labelled_pixels():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8, 8)
    masks = torch.randint(0, 5, (2, 8, 8))
    assert distillation_loss(teacher, teacher, masks, 255).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 8, 8)
    loss = distillation_loss(student, teacher, masks, 255)
    expected = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                        reduction="none").sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Void pixels do not count: a student wrong only there has no loss.
    masks[:, :4] = 255
    wrong_on_void = teacher.clone()
    wrong_on_void[:, :, :4] = torch.randn(2, 5, 4, 8)
    assert distillation_loss(wrong_on_void, teacher, masks, 255).item() == pytest.approx(0.0, abs=1e-6)


def test_bf16_autocast_trains_on_the_cpu(tmp_path, tiny_dataset, backbone_file):
    """--precision bf16 on the CPU (fast where the CPU has bf16 matrix units): it learns as fp32 does."""
    settings = _settings(tiny_dataset, tmp_path / "bf16.safetensors", backbone_file, epochs=8)
    settings.precision = "bf16"
    lines = []
    best = train(settings, log=lines.append)
    assert any(line.startswith("bf16 autocast on the CPU: bf16 matrix products") for line in lines), lines
    history = read_training_state(settings.state_path())["history"]
    losses = [r["loss"] for r in history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], losses
    assert best["miou"] > history[0]["val_miou"]
    model = load_checkpoint(settings.out)  # stored as fp32 weights, loadable like any checkpoint
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())

    settings = _settings(tiny_dataset, tmp_path / "fp16.safetensors", backbone_file, epochs=1)
    settings.precision = "fp16"
    with pytest.raises(ValueError, match="fp16 autocast training needs a CUDA device"):
        train(settings, log=lambda _: None)
    assert not settings.state_path().exists()


def test_matmul_attention_computes_what_the_fused_kernel_does(backbone_file, val_samples):
    """use_matmul_attention (bf16 training on the CPU) changes how attention runs, not what it gives."""
    from clustvit_ros.model import ClusterMerging, ModelConfig, build_model
    from clustvit_ros.model.config import CAMVID_CLASSES, CAMVID_PALETTE
    from clustvit_ros.tools.data import to_tensor
    from clustvit_ros.tools.train import use_matmul_attention

    config = ModelConfig.for_dataset(list(CAMVID_CLASSES), list(CAMVID_PALETTE), ignore_index=11)
    model = build_model(config, str(backbone_file)).eval()
    rgb = val_samples[0][0]
    image = to_tensor(rgb, config.mean, config.std)[None]
    with torch.no_grad():
        fused = model(image, ClusterMerging(0.3))
        changed = use_matmul_attention(model)
        assert changed == len(model.backbone.blocks) + len(model.decode_head.blocks)
        assert use_matmul_attention(model) == 0  # nothing left to change
        unfused = model(image, ClusterMerging(0.3))
    assert unfused.stats.tokens_after == fused.stats.tokens_after
    torch.testing.assert_close(unfused.logits, fused.logits, atol=2e-4, rtol=1e-4)


def test_loader_workers_live_across_epochs_and_draw_the_same_augmentations(tmp_path, tiny_dataset, backbone_file):
    """One worker kept for the whole run sees each epoch's draws: the weights equal an in-process run's."""
    weights = []
    for workers in (0, 1):
        settings = _settings(tiny_dataset, tmp_path / f"w{workers}.safetensors", backbone_file, epochs=3)
        settings.workers, settings.scale_range, settings.augment = workers, (0.75, 1.5), "domain-shift"
        train(settings, log=lambda _: None)
        weights.append(load_file(str(settings.state_path())))
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, msg=name)
