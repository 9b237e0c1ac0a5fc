"""Frames in, labels and statistics out: the inference engine (no ROS imports).

The engine owns the model on its device and does what every caller (the ROS
node, ``clustvit eval``, scripts) needs around the forward pass: scale the frame
to the inference size (aspect kept), normalise on the device, run the model
under its token-reduction strategy, turn logits into a label image at the
requested resolution, and time each stage.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch

from .model import ClustViT, ClusterMerging, load_checkpoint
from .model.reduction import TokenReduction

MIN_INFERENCE_SIZE = 32
MAX_INFERENCE_SIZE = 4096
DEFAULT_MODEL_NAME = "clustvit_tiny_camvid.safetensors"


def packaged_model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The default model shipped in models/: installed share (colcon or pip) or the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.append(Path(get_package_share_directory("clustvit_ros")) / "models" / name)
        except (PackageNotFoundError, OSError):  # OSError: no sourced workspace (AMENT_PREFIX_PATH unset)
            pass
    except ImportError:  # no ROS installation: pip install or source checkout
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / name)  # source tree / -e install
    candidates.append(Path(sys.prefix) / "share" / "clustvit_ros" / "models" / name)  # pip install
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]  # where it should be: the installed share, else the source tree


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; ValueError with a reason."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"device {name!r}: expected cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


def inference_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side scaled to ``long_side`` and the aspect ratio kept."""
    scale = long_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def class_indices(logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) logits -> (H, W) index of the largest, first one on ties.

    ``max(0).indices`` rather than ``argmax(0)``: same result, but argmax over a
    leading dimension takes a slow path on the CPU (40 ms vs 4 ms at 11x368x480).
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
    timings_ms: dict  # preprocess, inference, postprocess
    network_size: tuple[int, int]  # (h, w) the network saw, before patch padding


@dataclass
class EngineInfo:
    model_path: str
    device: str
    dtype: str
    strategy: dict = field(default_factory=dict)


class SegmentationEngine:
    """Runs a ClustViT model on RGB frames of any size."""

    def __init__(self, model: ClustViT, device: Union[str, torch.device] = "auto",
                 half: bool = False, inference_size: Optional[int] = None,
                 model_path: str = "<in memory>"):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if half and self.device.type != "cuda":
            raise ValueError("half precision needs a CUDA device")
        self.dtype = torch.float16 if half else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.config = model.config
        self.model_path = model_path
        self.inference_size = inference_size or max(self.config.input_size)
        self.palette_lut = default_palette_lut(self.config.palette)
        self._mean = torch.tensor(self.config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.config.std, device=self.device).view(1, 3, 1, 1) * 255.0

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", half: bool = False,
                        inference_size: Optional[int] = None) -> "SegmentationEngine":
        torch_device = resolve_device(device)  # fail on a bad device before loading weights
        model = load_checkpoint(path, device="cpu")
        return cls(model, torch_device, half, inference_size, model_path=str(path))

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

    @property
    def merge_threshold(self) -> Optional[float]:
        strategy = self.model.reduction
        return strategy.threshold if isinstance(strategy, ClusterMerging) else None

    @merge_threshold.setter
    def merge_threshold(self, value: float) -> None:
        if not isinstance(self.model.reduction, ClusterMerging):
            raise ValueError("the active strategy has no merge threshold")
        value = float(value)
        if not 0.0 <= value <= 1.0 or value != value:
            raise ValueError(f"merge_threshold {value} outside 0..1")
        self.model.reduction.threshold = value

    def info(self) -> EngineInfo:
        return EngineInfo(self.model_path, str(self.device), str(self.dtype).replace("torch.", ""),
                          self.model.reduction.describe())

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

    def segment(self, image: np.ndarray, labels_at_input_resolution: bool = True,
                bgr: bool = False) -> FrameResult:
        """Segment one RGB (or, with ``bgr``, BGR) uint8 frame."""
        start = time.perf_counter()
        images = self.preprocess(image, bgr=bgr)
        self._sync()
        preprocessed = time.perf_counter()
        logits, stats = self.infer(images)
        self._sync()
        inferred = time.perf_counter()
        output_size = image.shape[:2] if labels_at_input_resolution else None
        labels = self.labels_from_logits(logits, output_size)
        done = time.perf_counter()
        timings = {"preprocess": 1e3 * (preprocessed - start), "inference": 1e3 * (inferred - preprocessed),
                   "postprocess": 1e3 * (done - inferred)}
        return FrameResult(labels, stats.as_dict(0), timings, tuple(images.shape[-2:]))

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
