"""Accuracy and token statistics of a model on a labelled split."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .data import SegmentationData, frame_prefix
from ..inference.engine import SegmentationEngine
from .metrics import ConfusionMatrix


def evaluate(engine: SegmentationEngine, data: SegmentationData, progress: bool = False,
             description: str = "eval") -> dict:
    """Segment every image as the robot would (engine pipeline) and score it.

    Labels come back at the image's resolution and are compared with its mask.
    Returns ``miou``, ``per_class_iou``, ``pixel_accuracy`` (percent), ``images``,
    ``mean_tokens_in``, ``mean_tokens_after_merge``, ``merged_fraction``, and
    ``per_prefix``: the same scores per file-name prefix (CamVid: per drive).
    """
    if len(data.class_names) != engine.config.num_classes:
        raise ValueError(f"data has {len(data.class_names)} classes, model {engine.config.num_classes}")
    confusion = ConfusionMatrix(engine.config.num_classes, data.ignore_index)
    # Per drive (file-name prefix): frames of one drive are alike, so a split that mixes
    # drives the model trained on with drives it did not must be read drive by drive.
    groups: dict[str, dict] = {}
    tokens_in, tokens_after, merged = [], [], []
    for index in tqdm(range(len(data)), desc=description, disable=not progress, leave=False):
        rgb, mask = data.load(index)  # checks sizes and labels, naming the file
        result = engine.segment(rgb)
        prediction, target = torch.from_numpy(result.labels.astype(np.int64)), torch.from_numpy(mask)
        confusion.update(prediction, target)
        group = groups.setdefault(frame_prefix(data.images[index]), {
            "confusion": ConfusionMatrix(engine.config.num_classes, data.ignore_index),
            "images": 0, "tokens_in": 0, "merged": 0})
        group["confusion"].update(prediction, target)
        group["images"] += 1
        group["tokens_in"] += result.stats["tokens_in"]
        group["merged"] += result.stats["merged_tokens"]
        tokens_in.append(result.stats["tokens_in"])
        tokens_after.append(result.stats["tokens_after_merge"])
        merged.append(result.stats["merged_tokens"])
    summary = confusion.summary(data.class_names)
    summary.update({
        "images": len(data),
        "mean_tokens_in": float(np.mean(tokens_in)) if tokens_in else 0.0,
        "mean_tokens_after_merge": float(np.mean(tokens_after)) if tokens_after else 0.0,
        "merged_fraction": float(np.sum(merged) / np.sum(tokens_in)) if tokens_in else 0.0,
        "strategy": engine.model.reduction.describe(),
        "cluster_floors": list(getattr(engine.model.config, "cluster_floors", [])),
        "inference_size": engine.inference_size,
        "per_prefix": {
            name: {**group["confusion"].summary(data.class_names), "images": group["images"],
                   "merged_fraction": group["merged"] / max(group["tokens_in"], 1)}
            for name, group in sorted(groups.items())},
    })
    return summary


def evaluate_model(model, data: SegmentationData, device: str = "auto",
                   inference_size: Optional[int] = None, progress: bool = False) -> dict:
    """Convenience wrapper: evaluate an in-memory model (keeps its mode and device)."""
    was_training = model.training
    engine = SegmentationEngine(model, device, inference_size=inference_size)
    try:
        return evaluate(engine, data, progress=progress)
    finally:
        model.train(was_training)
