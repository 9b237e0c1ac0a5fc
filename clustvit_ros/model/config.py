"""Architecture and dataset description stored with every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

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
    class_names: list[str] = field(default_factory=lambda: list(CAMVID_CLASSES))
    palette: list[list[int]] = field(default_factory=lambda: [list(c) for c in CAMVID_PALETTE])
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # (height, width) the network sees at inference; images are resized to it
    # (aspect kept by the engine) and padded to a multiple of the patch size.
    input_size: tuple[int, int] = (360, 480)
    ignore_index: int = 11
    default_merge_threshold: float = 0.5
    # Free-form provenance: training data, recipe, metrics.
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; supported: {', '.join(HEADS)}")
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if self.clusters < 0:
            raise ValueError("clusters must be >= 0 (0 = plain ViT)")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.palette) != self.num_classes:
            raise ValueError(f"{len(self.palette)} palette colours for {self.num_classes} classes")
        if not 0.0 <= self.default_merge_threshold <= 1.0:
            raise ValueError("default_merge_threshold must be in [0, 1]")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        for key in ("mean", "std", "input_size"):
            if key in data:
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
