"""The inference engine: preprocessing, labels, overlay, settings validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clustvit_ros.inference.devices import resolve_device
from clustvit_ros.inference.engine import SegmentationEngine, inference_shape


def test_resolve_device_rejects_with_reasons():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, reason in (("gpu", "expected auto, cpu"), ("cuda:x", "GPU index")):
        with pytest.raises(ValueError, match=reason):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_inference_shape_keeps_aspect():
    assert inference_shape(360, 480, 480) == (360, 480)
    assert inference_shape(1080, 1920, 640) == (360, 640)
    assert inference_shape(480, 360, 240) == (240, 180)


def test_segment_real_frame(untrained_checkpoint, val_samples):
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu")
    rgb = val_samples[0][0]
    result = engine.segment(rgb)
    assert result.labels.shape == rgb.shape[:2] and result.labels.dtype == np.uint8
    assert result.labels.max() < 11
    assert result.network_size == (360, 480)
    assert result.stats["tokens_in"] == 690
    assert set(result.timings_ms) == {"preprocess", "inference", "postprocess"}
    # A bigger frame is scaled to the inference size; labels come back at either size.
    big = np.ascontiguousarray(np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1))
    at_input = engine.segment(big)
    at_network = engine.segment(big, labels_at_input_resolution=False)
    assert at_input.labels.shape == (720, 960) and at_network.labels.shape == (360, 480)
    assert at_input.stats["tokens_in"] == 690


def test_overlay_and_settings(untrained_checkpoint, val_samples):
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu", inference_size=320)
    rgb = val_samples[1][0]
    labels = engine.segment(rgb).labels
    overlay = engine.overlay(rgb[..., ::-1].copy(), labels, alpha=0.4)
    assert overlay.shape == rgb.shape and overlay.dtype == np.uint8
    assert engine.strategy.name == "clustvit" and engine.knob.name == "threshold" and engine.knob_value == 0.5
    engine.knob_value = 0.8
    assert engine.model.reduction.threshold == 0.8
    for bad in (-0.1, 1.5, float("nan"), "high"):
        with pytest.raises(ValueError, match=r"threshold must be (in \[0, 1\]|a number)"):
            engine.knob_value = bad
    assert engine.model.reduction.threshold == 0.8  # the old value stays in force
    with pytest.raises(ValueError, match="inference_size"):
        engine.inference_size = 8
    with pytest.raises(ValueError, match="RGB uint8"):
        engine.segment(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="half precision needs a CUDA device"):
        SegmentationEngine(engine.model, "cpu", precision="fp16")


def test_packaged_model_segments_street_scenes(default_model_file, val_samples):
    """The shipped fp16 checkpoint, loaded as a user would: accurate labels on real val frames."""
    from clustvit_ros.tools.metrics import ConfusionMatrix
    engine = SegmentationEngine.from_checkpoint(default_model_file, "cpu")
    # The default threshold is the one chosen on held-out drives, and the file says so.
    info = engine.model.checkpoint_info
    assert engine.inference_size == 640 and info["held_out_drive_sweep"]
    assert engine.knob_value == pytest.approx(info["chosen_threshold"])
    # Per-cluster floors, when the held-out choice picked some, are the model's from start-up.
    assert engine.model.config.cluster_floors == pytest.approx(info.get("cluster_floors") or [])
    assert info["training"]["val_images"] == 0 and len(info["training"]["train_prefixes"]) == 3  # all drives
    confusion = ConfusionMatrix(11, ignore_index=11)
    merged = []
    for rgb, mask in val_samples:
        result = engine.segment(rgb)
        assert result.network_size == (480, 640) and result.labels.shape == mask.shape
        confusion.update(torch.from_numpy(result.labels.astype(np.int64)), torch.from_numpy(mask))
        merged.append(result.stats["merged_fraction"])
    assert confusion.pixel_accuracy() > 0.85  # val (a drive it trained on): 95 %
    assert 0.4 < np.mean(merged) < 0.8  # all of val: 0.66
    # Merging off is the plain ViT on the same weights, and still a working model.
    engine.knob_value = 1.0
    assert engine.segment(val_samples[0][0]).stats["merged_fraction"] == 0.0


def test_packaged_model_is_found_without_a_sourced_workspace(default_model_file, monkeypatch):
    """pip installs and plain shells have no AMENT_PREFIX_PATH: the model is still found."""
    from clustvit_ros.inference.packaged import packaged_model_path
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert packaged_model_path().samefile(default_model_file)
    monkeypatch.setenv("AMENT_PREFIX_PATH", "/nonexistent")
    assert packaged_model_path().samefile(default_model_file)


def test_precision_choice(untrained_checkpoint, val_samples):
    from clustvit_ros.inference.devices import resolve_precision
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    assert auto.name in ("fp32", "bf16") and auto.reason.startswith("auto:")  # decided by a probe, said why
    assert resolve_precision("fp32", cpu).reason == "requested"
    for bad, reason in (("fp64", "expected auto, fp32"), ("fp16", "half precision needs a CUDA device")):
        with pytest.raises(ValueError, match=reason):
            resolve_precision(bad, cpu)
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu", precision="bf16")
    assert engine.dtype == torch.bfloat16 and engine.info().dtype == "bf16"
    result = engine.segment(val_samples[0][0])
    assert result.labels.shape == val_samples[0][0].shape[:2]


def test_batch_of_frames_and_confidence(untrained_checkpoint, val_samples):
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu")
    frames = [rgb for rgb, _ in val_samples[:2]]
    batch = engine.segment_batch(frames, confidence=True)
    alone = [engine.segment(frame, confidence=True) for frame in frames]
    for together, single in zip(batch, alone):
        assert together.batch_size == 2 and single.batch_size == 1
        assert (together.labels == single.labels).mean() > 0.999
        assert together.confidence.shape == together.labels.shape and together.confidence.dtype == np.uint8
        assert int(together.confidence.min()) >= 255 // 11 - 1  # the winner has at least 1/11
    with pytest.raises(ValueError, match="one network size"):
        engine.segment_batch([frames[0], frames[0][:200]])


def test_a_step_from_a_frame_begun_before_a_setting_is_dropped(untrained_checkpoint):
    """The operator's value survives the controller's step for a frame that was already running."""
    from clustvit_ros.inference.runtime import BudgetedKnob
    engine = SegmentationEngine.from_checkpoint(untrained_checkpoint, "cpu")
    knob = BudgetedKnob()
    knob.set(engine, 0.4)
    knob.budget_changed(engine, target_ms=50.0, setting=0.4)
    in_flight = knob.begin(engine)
    assert in_flight[1] == 0.4
    knob.set(engine, 0.9)  # arrives while that frame is being segmented
    assert knob.step(engine, in_flight, latency_ms=10.0, target_ms=50.0) is False
    assert engine.knob_value == 0.9
    # The next frame runs with the setting, and its step applies: 10 ms of 50 is headroom, reduce less.
    begun = knob.begin(engine)
    assert begun[1] == 0.9 and knob.step(engine, begun, latency_ms=10.0, target_ms=50.0) is True
    assert engine.knob_value == pytest.approx(0.95)
    begun = knob.begin(engine)
    knob.budget_changed(engine, target_ms=0.0, setting=0.9)  # budget off: back to the setting
    assert knob.step(engine, begun, latency_ms=100.0, target_ms=0.0) is False and engine.knob_value == 0.9
