"""Validation by drive: choosing frames, per-drive scores, the domain-shift recipe and DDP training."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_cli import clustvit

from clustvit_ros.tools.data import (AUGMENT_PRESETS, Augment, DatasetError, TrainingSet, frame_prefix, open_dataset,
                               rare_class_probabilities)
from clustvit_ros.tools.train import TrainSettings, describe_frames, open_training_frames, read_training_state, train

DRIVES = {"0001TP": 62, "0006R0": 101, "0016E5": 305}


def test_frames_by_split_pattern_and_list(camvid, tmp_path):
    both = open_dataset(camvid, "train,val")
    assert len(both) == 468 and both.split == "train,val"
    counts = {}
    for path in both.images:
        counts[frame_prefix(path)] = counts.get(frame_prefix(path), 0) + 1
    assert counts == DRIVES
    held_out = open_dataset(camvid, "train,val", include=["0006R0_*"])
    rest = open_dataset(camvid, "train,val", exclude=["0006R0_*"])
    assert len(held_out) == 101 and len(rest) == 367
    assert not {p.name for p in held_out.images} & {p.name for p in rest.images}
    listing = tmp_path / "frames.txt"
    listing.write_text("# two frames\ntrain/0001TP_006690.png trainannot/0001TP_006690.png\n0016E5_08159\n")
    listed = open_dataset(camvid, "train,val", frame_list=listing)
    assert sorted(p.stem for p in listed.images) == ["0001TP_006690", "0016E5_08159"]
    with pytest.raises(DatasetError, match="no frames of split 'train' match"):
        open_dataset(camvid, "train", include=["Seq05VD_*"])


def test_frame_description_warns_about_a_shared_drive(camvid):
    settings = TrainSettings(data=str(camvid), out="unused", train_split="train", val_split="val")
    lines = describe_frames(*open_training_frames(settings))
    assert "0016E5 204" in lines[0] and "0016E5 101" in lines[1]
    assert "validation drive(s) 0016E5 also in training" in lines[2]
    settings = TrainSettings(data=str(camvid), out="unused", train_split="train,val", train_exclude=("0006R0_*",),
                             val_split="train,val", val_include=("0006R0_*",))
    lines = describe_frames(*open_training_frames(settings))
    assert len(lines) == 2 and "0006R0 101" in lines[1]


def test_a_limited_validation_or_eval_spreads_over_every_drive(camvid, untrained_checkpoint):
    """--val-limit and eval --limit take frames from the whole selection, not its first seconds."""
    settings = TrainSettings(data=str(camvid), out="unused", train_split="train,val", val_split="train,val",
                             val_limit=3)
    _, val = open_training_frames(settings)
    assert sorted(frame_prefix(p) for p in val.images) == sorted(DRIVES)  # the first 3 are all 0001TP
    command = ("eval", "--model", untrained_checkpoint, "--data", camvid, "--split", "train,val",
               "--inference-size", "160", "--device", "cpu")
    report = json.loads(clustvit(*command, "--limit", "3", "--json").stdout)
    assert report["images"] == 3 and set(report["per_prefix"]) == set(DRIVES)
    for bad in ("0", "-2"):
        refused = clustvit(*command, "--limit", bad, check=False)
        assert refused.returncode == 2 and "--limit" in refused.stderr
    refused = clustvit("train", "--data", camvid, "--out", "unused.safetensors", "--val-limit", "0", check=False)
    assert refused.returncode == 2 and "--val-limit" in refused.stderr


def test_eval_reports_each_drive(camvid, untrained_checkpoint):
    from clustvit_ros.inference.engine import SegmentationEngine
    from clustvit_ros.tools.evaluate import evaluate
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu", inference_size=160)
    data = open_dataset(camvid, "train", include=["0001TP_00669*", "0006R0_f0093*"])
    report = evaluate(engine, data)
    assert set(report["per_prefix"]) == {"0001TP", "0006R0"}
    assert sum(d["images"] for d in report["per_prefix"].values()) == report["images"] == len(data)
    for drive in report["per_prefix"].values():
        assert 0 <= drive["miou"] <= 100 and 0 <= drive["merged_fraction"] <= 1


def test_domain_shift_augmentation_keeps_labels_aligned(val_samples):
    rgb, mask = val_samples[0]
    augment = Augment(base_size=(360, 480), crop_size=(352, 480), scale_range=(1.0, 1.0), flip=False,
                      ignore_index=11, **AUGMENT_PRESETS["domain-shift"])
    rng = np.random.default_rng(3)
    views = [augment(rgb, mask.astype(np.uint8), rng) for _ in range(6)]
    for image, labels in views:
        assert image.shape == (352, 480, 3) and image.dtype == np.uint8 and labels.shape == (352, 480)
        assert set(np.unique(labels)) <= set(np.unique(mask))
    # Photometric changes alter the pixels, geometry stays: the same crop of the labels.
    assert np.mean([np.abs(v[0].astype(int) - rgb[:352].astype(int)).mean() for v in views]) > 5


def test_focus_crop_contains_the_rare_class(val_samples):
    rgb, mask = val_samples[1]
    pedestrian = 9
    assert (mask == pedestrian).sum() > 0
    augment = Augment(base_size=(360, 480), crop_size=(128, 128), scale_range=(1.0, 1.5), ignore_index=11)
    rng = np.random.default_rng(0)
    assert all((augment(rgb, mask.astype(np.uint8), rng, focus_class=pedestrian)[1] == pedestrian).any()
               for _ in range(20))


def test_rare_class_sampling_favours_thin_classes():
    pixels = np.array([[9000, 100, 0], [8000, 0, 50], [9500, 0, 0]])
    flat = rare_class_probabilities(pixels, temperature=10.0)
    sharp = rare_class_probabilities(pixels, temperature=0.05)
    assert flat.sum() == pytest.approx(1) and sharp.sum() == pytest.approx(1)
    assert sharp[0] < flat[0] and sharp[2] > flat[2] > 0
    assert rare_class_probabilities(np.array([[10, 0]]), 0.1)[1] == 0  # an absent class is never drawn


def test_epoch_plan_draws_images_showing_the_drawn_class(camvid):
    data = open_dataset(camvid, "train", include=["0001TP_*"])
    dataset = TrainingSet(data, Augment(ignore_index=11), (0.5,) * 3, (0.5,) * 3, rare_class_temperature=0.1)
    plan = dataset.epoch_plan(0)
    assert len(plan) == len(data) and plan == dataset.epoch_plan(0) and plan != dataset.epoch_plan(1)
    assert {epoch for epoch, *_ in plan} == {0} and [position for _, position, _, _ in plan] == list(range(len(plan)))
    for _, _, index, focus in plan:
        assert focus >= 0 and dataset.class_pixels[index, focus] >= 64
    thin = {2, 6, 7, 9, 10}  # pole, sign, fence, pedestrian, bicyclist
    assert sum(focus in thin for *_, focus in plan) > 0.4 * len(plan)
    plain = TrainingSet(data, Augment(ignore_index=11), (0.5,) * 3, (0.5,) * 3)
    assert sorted(i for _, _, i, _ in plain.epoch_plan(0)) == list(range(len(data)))


@pytest.fixture(scope="module")
def two_drives(tmp_path_factory, camvid):
    """Ten real frames of two drives, generic layout with one folder pair for every split."""
    import shutil
    root = tmp_path_factory.mktemp("drives")
    source = open_dataset(camvid, "train")
    picks = [p for p in source.images if p.stem.startswith("0001TP")][:8] + \
        [p for p in source.images if p.stem.startswith("0006R0")][:2]
    for path in picks:
        for kind, folder in (("images", "train"), ("masks", "trainannot")):
            (root / kind).mkdir(exist_ok=True)
            shutil.copy(camvid / folder / path.name, root / kind / path.name)
    (root / "classes.txt").write_text("\n".join(source.class_names) + "\n")
    return root


def _settings(data, out, backbone, **changes):
    values = dict(data=str(data), out=str(out), init_backbone=str(backbone), epochs=3, batch_size=2, lr=5e-4,
                  warmup_steps=2, void_label=11, input_size=(96, 128), crop_size=(96, 128), scale_range=(1.0, 1.0),
                  cluster_warmup_epochs=1, workers=0, device="cpu", train_split="train",
                  train_include=("0001TP_*",), val_split="val", val_include=("0006R0_*",))
    values.update(changes)
    return TrainSettings(**values)


@pytest.mark.slow
def test_keep_last_with_ema_and_no_validation_resumes(tmp_path, two_drives, backbone_file):
    from clustvit_ros.model import load_checkpoint
    settings = _settings(two_drives, tmp_path / "last.safetensors", backbone_file, ema_decay=0.9, keep="last",
                         augment="domain-shift", rare_class_temperature=0.1, val_split=None, epochs=2)
    result = train(settings, log=lambda _: None)
    assert result["epoch"] == 2
    model = load_checkpoint(settings.out)
    assert model.checkpoint_info["training"]["train_prefixes"] == ["0001TP"]
    assert model.checkpoint_info["training"]["val_images"] == 0
    state = read_training_state(settings.state_path())
    assert state["ema_updates"] == 8
    longer = _settings(two_drives, settings.out, backbone_file, ema_decay=0.9, keep="last", augment="domain-shift",
                       rare_class_temperature=0.1, val_split=None, epochs=3)
    lines = []
    train(longer, resume=True, log=lines.append)
    assert lines[0].startswith("resuming") and read_training_state(settings.state_path())["ema_updates"] == 12
    with pytest.raises(ValueError, match="keeping the best epoch needs validation"):
        train(_settings(two_drives, tmp_path / "x.safetensors", backbone_file, val_split=None), log=print)


@pytest.mark.slow
def test_validation_history_holds_each_held_out_drive(tmp_path, two_drives, backbone_file):
    settings = _settings(two_drives, tmp_path / "fold.safetensors", backbone_file, val_every=2, keep="last")
    train(settings, log=lambda _: None)
    history = read_training_state(settings.state_path())["history"]
    assert ["val_miou" in record for record in history] == [False, True, True]  # every 2nd and the last
    assert set(history[-1]["val_per_prefix_miou"]) == {"0006R0"}


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_weights(tmp_path, two_drives, backbone_file):
    """torchrun --nproc_per_node 2 on the CPU (gloo): the loss falls, both ranks end identical."""
    out = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 500), "-m", "clustvit_ros.tools.cli", "train", "--data", str(two_drives),
               "--out", str(out), "--init-backbone", str(backbone_file), "--train-split", "train",
               "--train-include", "0001TP_*", "--val-split", "none", "--keep", "last", "--epochs", "6",
               "--batch-size", "4", "--lr", "5e-4", "--warmup-steps", "2", "--input-size", "96", "128",
               "--crop-size", "96", "128", "--scale-range", "1", "1", "--cluster-warmup-epochs", "1",
               "--workers", "0", "--device", "cpu", "--void-label", "11"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "weights identical on all 2 processes" in result.stdout
    assert result.stdout.count('"best_epoch"') == 1  # rank 0 alone reports
    history = read_training_state(out.with_name("ddp.train-state.safetensors"))["history"]
    losses = [record["loss"] for record in history]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert json.loads(result.stdout.strip().splitlines()[-1])["best_epoch"] == 6


@pytest.mark.slow
def test_fixed_cluster_classes_train_record_and_refuse_changes(tmp_path, two_drives, backbone_file):
    from clustvit_ros.model import load_checkpoint
    fixed = ("Road", "Sky", "Building")
    settings = _settings(two_drives, tmp_path / "fixed.safetensors", backbone_file, cluster_classes=fixed,
                         keep="last", val_split=None, epochs=4, lr=1e-3)
    train(settings, log=lambda _: None)
    history = read_training_state(settings.state_path())["history"]
    assert history[-1]["cluster_loss"] < 0.8 * history[0]["cluster_loss"]
    model = load_checkpoint(settings.out)
    assert tuple(model.checkpoint_info["training"]["settings"]["cluster_classes"]) == fixed
    # Resuming under other cluster classes would train one head against two different targets.
    other = _settings(two_drives, settings.out, backbone_file, cluster_classes=("Road", "Sky", "Tree"),
                      keep="last", val_split=None, epochs=5)
    with pytest.raises(ValueError, match="cluster_classes"):
        train(other, resume=True, log=lambda _: None)
    for wrong, reason in ((("Road", "Sky"), "give exactly 3"), (("Road", "Sky", "Lawn"), "Lawn unknown"),
                          (("Road", "Road", "Sky"), "distinct names")):
        with pytest.raises(ValueError, match=reason):
            train(_settings(two_drives, tmp_path / "x.safetensors", backbone_file, cluster_classes=wrong,
                            keep="last", val_split=None), log=lambda _: None)
    assert not (tmp_path / "x.safetensors").exists()
