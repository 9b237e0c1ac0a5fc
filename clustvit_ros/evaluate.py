"""Accuracy and token statistics of a model on a labelled split."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .data import SegmentationData
from .engine import SegmentationEngine
from .metrics import ConfusionMatrix


def evaluate(engine: SegmentationEngine, data: SegmentationData, progress: bool = False,
             description: str = "eval") -> dict:
    """Segment every image as the robot would (engine pipeline) and score it.

    Labels come back at the image's resolution and are compared with its mask.
    Returns ``miou``, ``per_class_iou``, ``pixel_accuracy`` (percent), ``images``,
    ``mean_tokens_in``, ``mean_tokens_after_merge``, ``merged_fraction``.
    """
    if len(data.class_names) != engine.config.num_classes:
        raise ValueError(f"data has {len(data.class_names)} classes, model {engine.config.num_classes}")
    confusion = ConfusionMatrix(engine.config.num_classes, data.ignore_index)
    tokens_in, tokens_after, merged = [], [], []
    for index in tqdm(range(len(data)), desc=description, disable=not progress, leave=False):
        rgb, mask = data.load(index)
        if rgb.shape[:2] != mask.shape:
            raise ValueError(f"{data.images[index]}: image {rgb.shape[:2]} and mask {mask.shape} differ in size")
        result = engine.segment(rgb)
        confusion.update(torch.from_numpy(result.labels.astype(np.int64)), torch.from_numpy(mask))
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
        "inference_size": engine.inference_size,
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
