"""Frames in, labels and statistics out: the inference engine (no ROS imports).

The engine owns the model on its device and does what every caller (the ROS
node, ``clustvit eval``, scripts) needs around the forward pass: scale the frame
to the inference size (aspect kept), normalise on the device, run the model
under its token-reduction strategy, turn logits into a label image at the
requested resolution, and time each stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch

from ..model import ClustViT, load_checkpoint
from ..model.reduction import KnobSpec, StrategySpec, TokenReduction, make_strategy, spec_of, strategy_spec
from .devices import Precision, resolve_device, resolve_precision
from .packaged import packaged_model_path  # noqa: F401  (the engine's default model)

MIN_INFERENCE_SIZE = 32
MAX_INFERENCE_SIZE = 4096


def inference_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side scaled to ``long_side`` and the aspect ratio kept."""
    scale = long_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def class_indices(logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) logits -> (H, W) index of the largest, first one on ties.

    ``max(0).indices`` rather than ``argmax(0)``: same result, but argmax over a
    leading dimension takes a much slower path on the CPU.
    """
    return logits.max(0).indices


def default_palette_lut(palette) -> np.ndarray:
    """(C, 3) uint8 BGR lookup table from an RGB palette, padded to 256 entries."""
    lut = np.zeros((max(256, len(palette)), 3), dtype=np.uint8)
    for index, (r, g, b) in enumerate(palette):
        lut[index] = (b, g, r)
    return lut


@dataclass
class FrameResult:
    labels: np.ndarray  # (H, W) uint8, or uint16 for more than 255 classes
    stats: dict  # tokens_in, tokens_after_merge, merged_tokens, merged_fraction, cluster_sizes
    timings_ms: dict  # preprocess, inference, postprocess (a batch's shared stages: its share per frame)
    network_size: tuple[int, int]  # (h, w) the network saw, before patch padding
    confidence: Optional[np.ndarray] = None  # (H, W) uint8: the winning class's probability x 255
    batch_size: int = 1


@dataclass
class EngineInfo:
    model_path: str
    device: str
    dtype: str
    strategy: dict = field(default_factory=dict)
    precision_reason: str = ""


class SegmentationEngine:
    """Runs a ClustViT model on RGB frames of any size, one at a time or several as a batch."""

    def __init__(self, model: ClustViT, device: Union[str, torch.device] = "auto",
                 precision: Union[str, Precision] = "fp32", inference_size: Optional[int] = None,
                 model_path: str = "<in memory>"):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = precision if isinstance(precision, Precision) else resolve_precision(precision, self.device)
        self.dtype = self.precision.dtype
        self.model = model.to(self.device, self.dtype).eval()
        self.config = model.config
        self.model_path = model_path
        self.inference_size = inference_size or max(self.config.input_size)
        self.palette_lut = default_palette_lut(self.config.palette)
        self._mean = torch.tensor(self.config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.config.std, device=self.device).view(1, 3, 1, 1) * 255.0

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", precision: str = "fp32",
                        inference_size: Optional[int] = None) -> "SegmentationEngine":
        torch_device = resolve_device(device)  # fail on a bad device or precision before loading weights
        chosen = resolve_precision(precision, torch_device)
        model = load_checkpoint(path, device="cpu")
        return cls(model, torch_device, chosen, inference_size, model_path=str(path))

    def release(self) -> None:
        """Give the model's memory back (the lifecycle node's cleanup); the engine is unusable after."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- settings ------------------------------------------------------------------
    @property
    def inference_size(self) -> int:
        return self._inference_size

    @inference_size.setter
    def inference_size(self, value: int) -> None:
        value = int(value)
        if not MIN_INFERENCE_SIZE <= value <= MAX_INFERENCE_SIZE:
            raise ValueError(f"inference_size {value} outside {MIN_INFERENCE_SIZE}..{MAX_INFERENCE_SIZE}")
        self._inference_size = value

    @property
    def reduction(self) -> TokenReduction:
        return self.model.reduction

    @reduction.setter
    def reduction(self, strategy: TokenReduction) -> None:
        self.model.reduction = strategy

    # -- the active strategy and its knob, whatever the strategy ----------------------
    @property
    def strategy(self) -> StrategySpec:
        """The registry's description of the active strategy (name, knob, range, default)."""
        return spec_of(self.model.reduction)

    @property
    def knob(self) -> Optional[KnobSpec]:
        return self.strategy.knob

    def use_strategy(self, name: str, knob: Optional[float] = None) -> None:
        """Switch to a registered strategy; its knob at ``knob`` or its default (the model's own for ClustViT)."""
        spec = strategy_spec(name)
        if spec.needs_cluster_module and not self.config.clusters:
            raise ValueError(f"strategy {name!r} needs a model trained with a cluster module; "
                             f"{self.model_path} has none")
        self.model.reduction = make_strategy(name, knob, self.model)

    @property
    def knob_default(self) -> Optional[float]:
        """The active knob's default for this model (ClustViT: the checkpoint's threshold)."""
        return self.strategy.default_knob(self.model)

    @property
    def knob_value(self) -> Optional[float]:
        """The active strategy's knob (None when it has none); set it between frames."""
        knob = self.knob
        return None if knob is None else getattr(self.model.reduction, knob.name)

    @knob_value.setter
    def knob_value(self, value: float) -> None:
        knob = self.knob
        if knob is None:
            raise ValueError(f"strategy {self.strategy.name!r} has no knob")
        setattr(self.model.reduction, knob.name, knob.validate(value))

    def info(self) -> EngineInfo:
        return EngineInfo(self.model_path, str(self.device), self.precision.name,
                          self.model.reduction.describe(), self.precision.reason)

    def describe_strategy(self) -> str:
        """'clustvit (threshold 0.27)': the active strategy for logs."""
        knob = self.knob
        if knob is None:
            return self.strategy.name
        floors = getattr(self.model.config, "cluster_floors", None) if self.strategy.name == "clustvit" else None
        raised = f"; per-cluster floors {' '.join(f'{v:g}' for v in floors)}" if floors else ""
        return f"{self.strategy.name} ({knob.name} {self.knob_value:g}{raised})"

    # -- pipeline ------------------------------------------------------------------
    def network_shape(self, height: int, width: int) -> tuple[int, int]:
        return inference_shape(height, width, self.inference_size)

    def preprocess(self, image: np.ndarray, bgr: bool = False) -> torch.Tensor:
        """RGB (or BGR) uint8 (H, W, 3) -> normalised RGB (1, 3, h, w) on the device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        h, w = self.network_shape(*image.shape[:2])
        if (h, w) != image.shape[:2]:
            # Area averaging only pays off (against aliasing) when shrinking 2x or more.
            strong_shrink = 2 * h <= image.shape[0] or 2 * w <= image.shape[1]
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if strong_shrink else cv2.INTER_LINEAR)
        if bgr:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # on the small image: cheapest place
        # Upload uint8 (4x fewer bytes than float) and normalise on the device, in place.
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).float()
        return tensor.sub_(self._mean).div_(self._std).to(self.dtype)

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, reduction: Optional[TokenReduction] = None):
        """Normalised images -> (logits (B, C, h, w), ReductionStats)."""
        output = self.model(images, reduction)
        return output.logits, output.stats

    def labels_from_logits(self, logits: torch.Tensor,
                           output_size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """(1, C, h, w) logits -> (H, W) class indices; nearest resize to ``output_size``."""
        dtype = torch.uint8 if self.config.num_classes <= 256 else torch.int32
        labels = class_indices(logits[0]).to(dtype).cpu().numpy()
        if labels.dtype == np.int32:
            labels = labels.astype(np.uint16)
        if output_size is not None and tuple(output_size) != labels.shape:
            labels = cv2.resize(labels, (output_size[1], output_size[0]), interpolation=cv2.INTER_NEAREST)
        return labels

    def confidence_from_logits(self, logits: torch.Tensor,
                               output_size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """(1, C, h, w) logits -> (H, W) uint8: max class probability x 255 (a costmap's confidence mask)."""
        with torch.inference_mode():
            best = logits[0].float().softmax(0).max(0).values
            confidence = best.mul_(255.0).round_().to(torch.uint8).cpu().numpy()
        if output_size is not None and tuple(output_size) != confidence.shape:
            confidence = cv2.resize(confidence, (output_size[1], output_size[0]), interpolation=cv2.INTER_LINEAR)
        return confidence

    def segment(self, image: np.ndarray, labels_at_input_resolution: bool = True,
                bgr: bool = False, confidence: bool = False) -> FrameResult:
        """Segment one RGB (or, with ``bgr``, BGR) uint8 frame."""
        return self.segment_batch([image], labels_at_input_resolution, bgr, confidence)[0]

    def segment_batch(self, images: list[np.ndarray], labels_at_input_resolution: bool = True,
                      bgr: bool = False, confidence: bool = False) -> list[FrameResult]:
        """Segment frames that share one network size as one batch (the batched, masked path).

        One frame takes the batch-1 path. Labels (and confidence) come back per frame.
        """
        start = time.perf_counter()
        tensors = [self.preprocess(image, bgr=bgr) for image in images]
        shapes = {tuple(t.shape[-2:]) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs one network size, got {sorted(shapes)}")
        batch = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        self._sync()
        preprocessed = time.perf_counter()
        logits, stats = self.infer(batch)
        self._sync()
        inferred = time.perf_counter()
        results = []
        count = len(images)
        for index, image in enumerate(images):
            post_start = time.perf_counter()
            output_size = image.shape[:2] if labels_at_input_resolution else None
            frame_logits = logits[index:index + 1]
            labels = self.labels_from_logits(frame_logits, output_size)
            certainty = self.confidence_from_logits(frame_logits, output_size) if confidence else None
            timings = {"preprocess": 1e3 * (preprocessed - start) / count,
                       "inference": 1e3 * (inferred - preprocessed) / count,
                       "postprocess": 1e3 * (time.perf_counter() - post_start)}
            results.append(FrameResult(labels, stats.as_dict(index), timings, tuple(batch.shape[-2:]),
                                       certainty, count))
        return results

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Class indices -> BGR palette image."""
        return self.palette_lut[np.minimum(labels, len(self.palette_lut) - 1)]

    def overlay(self, bgr: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Palette blended over a BGR frame; labels are resized to the frame if needed."""
        if labels.shape != bgr.shape[:2]:
            labels = cv2.resize(labels, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_NEAREST)
        return cv2.addWeighted(bgr, 1.0 - alpha, self.colorize(labels), alpha, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
