"""Architecture and dataset description stored with every checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .reduction.clustvit import SPEC as CLUSTVIT_STRATEGY

# CamVid (SegNet 11-class split): names and the conventional RGB palette.
CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)

# timm ViT variants we know how to build; the name is passed to timm.create_model.
SUPPORTED_ARCHS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
)

HEADS = ("segmenter", "linear")

# Bounds on what a checkpoint may describe (far above any real model, far below an
# allocation that could take the machine down).
MAX_CLASSES = 65536  # labels are published as mono16 at most
MAX_CLUSTERS = 64
MAX_DEPTH = 64
MAX_HEAD_LAYERS = 12
MAX_NAME_CHARS = 100
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 4096
MAX_INFO_DEPTH = 32
MAX_CONFIG_CHARS = 1_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"field {field!r} = {_short(value)}: expected {expected}")


def _depth(value: Any, limit: int = MAX_INFO_DEPTH + 1) -> int:
    """Nesting depth of JSON-like data, counted only up to ``limit``."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A deterministic, well-spread RGB palette for datasets without one."""
    palette = []
    for i in range(num_classes):
        # Bit-reversed colour map (as in PASCAL VOC): neighbours get distinct colours.
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and use it on new images.

    ``clusters == 0`` builds the plain ViT (no cluster module, no regenerator).
    """

    arch: str = "vit_tiny_patch16_224"
    num_classes: int = 11
    clusters: int = 3
    injection_point: int = 4
    head: str = "segmenter"
    head_layers: int = 2
    # The Segmenter decoder runs on ClustViT's merged sequence and the regenerator restores
    # its output (instead of the backbone's): merging then saves in the head too.
    head_on_merged: bool = False
    class_names: list[str] = field(default_factory=lambda: list(CAMVID_CLASSES))
    palette: list[list[int]] = field(default_factory=lambda: [list(c) for c in CAMVID_PALETTE])
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # (height, width) the network sees at inference; images are resized to it
    # (aspect kept by the engine) and padded to a multiple of the patch size.
    input_size: tuple[int, int] = (360, 480)
    ignore_index: int = 11
    default_merge_threshold: float = 0.5
    # Per cluster (in cluster order), the least probability a token needs to merge into it,
    # whatever the threshold knob says: the threshold used is max(knob, floor). Empty: none.
    # On a held-out drive road-like tokens (pavement, grass) are far less sure of the road
    # cluster than road is, and merging them there is what costs mIoU (models/README.md).
    cluster_floors: list[float] = field(default_factory=list)
    # Free-form provenance: training data, recipe, metrics.
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field against sane bounds before anything is built from it.

        A checkpoint's metadata comes from a file anyone may have written: a
        cluster count of 1e9 would allocate terabytes, a zero std would divide
        by zero on every frame. ValueError names the field and the bound.
        """
        _check(self.arch in SUPPORTED_ARCHS, "arch", self.arch, f"one of {', '.join(SUPPORTED_ARCHS)}")
        _check(self.head in HEADS, "head", self.head, f"one of {', '.join(HEADS)}")
        _check(_is_int(self.num_classes) and 1 <= self.num_classes <= MAX_CLASSES, "num_classes",
               self.num_classes, f"an integer in 1..{MAX_CLASSES}")
        _check(_is_int(self.clusters) and 0 <= self.clusters <= MAX_CLUSTERS, "clusters", self.clusters,
               f"an integer in 0..{MAX_CLUSTERS} (0 = plain ViT)")
        _check(_is_int(self.injection_point) and 0 <= self.injection_point <= MAX_DEPTH, "injection_point",
               self.injection_point, f"an integer in 0..{MAX_DEPTH}")
        _check(isinstance(self.head_on_merged, bool) and (not self.head_on_merged or (
            self.head == "segmenter" and self.clusters > 0)), "head_on_merged", self.head_on_merged,
            "false, or true for a segmenter head with clusters")
        _check(_is_int(self.head_layers) and 1 <= self.head_layers <= MAX_HEAD_LAYERS, "head_layers",
               self.head_layers, f"an integer in 1..{MAX_HEAD_LAYERS}")
        _check(isinstance(self.class_names, (list, tuple)) and len(self.class_names) == self.num_classes
               and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in self.class_names),
               "class_names", self.class_names,
               f"{self.num_classes} names (one per class) of 1..{MAX_NAME_CHARS} characters")
        _check(isinstance(self.palette, (list, tuple)) and len(self.palette) == self.num_classes
               and all(isinstance(c, (list, tuple)) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
                       for c in self.palette),
               "palette", self.palette, f"{self.num_classes} RGB colours of integers 0..255")
        for name in ("mean", "std"):
            value = getattr(self, name)
            _check(isinstance(value, (list, tuple)) and len(value) == 3
                   and all(_is_number(v) and math.isfinite(v) and abs(v) <= 1e3 for v in value),
                   name, value, "3 finite numbers (R, G, B)")
        _check(all(abs(v) >= 1e-6 for v in self.std), "std", self.std, "non-zero values")
        _check(isinstance(self.input_size, (list, tuple)) and len(self.input_size) == 2
               and all(_is_int(v) and MIN_INPUT_SIZE <= v <= MAX_INPUT_SIZE for v in self.input_size),
               "input_size", self.input_size,
               f"(height, width), integers in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}")
        _check(_is_int(self.ignore_index) and 0 <= self.ignore_index <= 65535, "ignore_index",
               self.ignore_index, "an integer in 0..65535")
        knob = CLUSTVIT_STRATEGY.knob  # the threshold's range has one source: ClustViT's knob
        _check(_is_number(self.default_merge_threshold) and knob.low <= self.default_merge_threshold <= knob.high,
               "default_merge_threshold", self.default_merge_threshold, f"a number in [{knob.low:g}, {knob.high:g}]")
        _check(isinstance(self.cluster_floors, (list, tuple)) and len(self.cluster_floors) in (0, self.clusters)
               and all(_is_number(v) and 0.0 <= v <= 1.0 for v in self.cluster_floors),
               "cluster_floors", self.cluster_floors,
               f"no values, or {self.clusters} numbers in [0, 1] (one per cluster)")
        _check(isinstance(self.info, dict) and _depth(self.info) <= MAX_INFO_DEPTH, "info", self.info,
               f"a JSON object nested at most {MAX_INFO_DEPTH} deep")

    def set_cluster_floors(self, floors: Any) -> None:
        """Replace the per-cluster floors (all zero: none); ValueError, unchanged, if they do not fit."""
        floors = [float(v) for v in floors] if isinstance(floors, (list, tuple)) else floors
        if isinstance(floors, list) and not any(floors):
            floors = []
        _check(isinstance(floors, list) and len(floors) in (0, self.clusters)
               and all(0.0 <= v <= 1.0 for v in floors), "cluster_floors", floors,
               f"{self.clusters} numbers in [0, 1] (one per cluster of this model)")
        self.cluster_floors = floors

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        if len(text) > MAX_CONFIG_CHARS:
            raise ValueError(f"config metadata of {len(text)} characters (at most {MAX_CONFIG_CHARS})")
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("config metadata nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"config metadata is a JSON {type(data).__name__}, expected an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        for key in ("mean", "std", "input_size"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        config = cls(**data)
        config.validate()
        return config

    @classmethod
    def for_dataset(cls, class_names: list[str], palette: Optional[list] = None,
                    **kwargs: Any) -> "ModelConfig":
        palette = palette or default_palette(len(class_names))
        return cls(num_classes=len(class_names), class_names=list(class_names),
                   palette=[list(c) for c in palette], **kwargs)
