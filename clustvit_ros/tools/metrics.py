"""Segmentation metrics from an accumulated confusion matrix."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class ConfusionMatrix:
    """Pixel confusion counts (rows = ground truth, columns = prediction).

    IoU per class = TP / (TP + FP + FN); classes that never occur in either
    ground truth or prediction have no IoU (NaN) and stay out of the mean.
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        prediction = prediction.reshape(-1).long()
        target = target.reshape(-1).long().to(prediction.device)
        valid = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        index = target[valid] * self.num_classes + prediction[valid].clamp(0, self.num_classes - 1)
        counts = torch.bincount(index, minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def iou(self) -> list[float]:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return [(t / u).item() if u > 0 else math.nan for t, u in zip(tp, union)]

    def miou(self) -> float:
        values = [v for v in self.iou() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum().item()
        return self.matrix.diag().sum().item() / total if total else math.nan

    def summary(self, class_names: Sequence[str]) -> dict:
        """miou, per_class_iou (name -> IoU, None if absent), pixel_accuracy; in percent."""
        return {
            "miou": 100.0 * self.miou(),
            "per_class_iou": {name: (None if math.isnan(v) else 100.0 * v)
                              for name, v in zip(class_names, self.iou())},
            "pixel_accuracy": 100.0 * self.pixel_accuracy(),
        }
