"""IoU on hand-made cases with known answers."""
import math

import torch

from clustvit_ros.tools.metrics import ConfusionMatrix


def test_iou_known_answer():
    # 3 classes, void = 9. Target / prediction over 8 pixels (one void, ignored).
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 9])
    prediction = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    cm = ConfusionMatrix(3, ignore_index=9)
    cm.update(prediction, target)
    # class 0: TP 2, FP 1 (pixel 6), FN 1 (pixel 2) -> 2/4
    # class 1: TP 2, FP 1 (pixel 2), FN 0 -> 2/3
    # class 2: TP 1, FP 0, FN 1 (pixel 6) -> 1/2 (the void pixel predicted 2 does not count)
    iou = cm.iou()
    assert math.isclose(iou[0], 0.5) and math.isclose(iou[1], 2 / 3) and math.isclose(iou[2], 0.5)
    assert math.isclose(cm.miou(), (0.5 + 2 / 3 + 0.5) / 3)
    assert math.isclose(cm.pixel_accuracy(), 5 / 7)
    summary = cm.summary(["a", "b", "c"])
    assert math.isclose(summary["miou"], 100 * cm.miou())
    assert math.isclose(summary["per_class_iou"]["b"], 100 * 2 / 3)


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    assert math.isnan(cm.iou()[2])
    assert math.isclose(cm.miou(), (0.5 + 0.5) / 2)
    assert cm.summary(["a", "b", "c"])["per_class_iou"]["c"] is None


def test_accumulates_over_images():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    cm.update(torch.tensor([[1, 1]]), torch.tensor([[0, 1]]))
    # rows = ground truth: (0,0) once, (0->1) once, (1,1) twice
    assert cm.matrix.tolist() == [[1, 1], [0, 2]]
