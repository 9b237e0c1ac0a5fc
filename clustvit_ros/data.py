"""Segmentation datasets on disk, augmentation and normalisation (numpy + OpenCV).

Layouts found under a data root, for a split such as ``train`` or ``val``:

- CamVid style: ``<split>/`` images and ``<split>annot/`` masks (same file names);
- generic: ``images/<split>/`` + ``masks/<split>/``, ``<split>/images/`` +
  ``<split>/masks/``, or ``images/`` + ``masks/`` (one folder pair for every split).

Masks are single-channel integer images; image and mask pair up by file stem.
Class names (and optionally RGB colours) come from ``classes.txt`` in the root
(one ``name [r g b]`` per line); a CamVid-style root without one is CamVid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from .model.config import CAMVID_CLASSES, CAMVID_PALETTE, default_palette

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm"}
CAMVID_VOID = 11


class DatasetError(ValueError):
    """A data folder that cannot be read as a segmentation dataset."""


@dataclass
class SegmentationData:
    root: Path
    split: str
    layout: str  # "camvid" or "generic"
    images: list[Path]
    masks: list[Path]
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 HxWx3, mask int64 HxW) of one sample."""
        return read_rgb(self.images[index]), read_mask(self.masks[index])

    def subset(self, limit: Optional[int]) -> "SegmentationData":
        if limit is None or limit >= len(self):
            return self
        return SegmentationData(self.root, self.split, self.layout, self.images[:limit],
                                self.masks[:limit], self.class_names, self.palette, self.ignore_index)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot be read as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError(f"{path}: cannot be read as a mask")
    if mask.ndim != 2:
        raise DatasetError(f"{path}: a mask must be single-channel, got shape {mask.shape}")
    return mask.astype(np.int64)


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _read_classes_file(path: Path) -> tuple[list[str], Optional[list[tuple[int, int, int]]]]:
    names, colours = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        names.append(parts[0])
        if len(parts) >= 4:
            colours.append(tuple(int(v) for v in parts[1:4]))
    if not names:
        raise DatasetError(f"{path}: no class names")
    palette = colours if len(colours) == len(names) else None
    return names, palette


def open_dataset(root: str | Path, split: str, ignore_index: Optional[int] = None) -> SegmentationData:
    """Find the images and masks of ``split`` under ``root`` (see module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    candidates = [
        ("camvid", root / split, root / f"{split}annot"),
        ("generic", root / "images" / split, root / "masks" / split),
        ("generic", root / split / "images", root / split / "masks"),
        ("generic", root / "images", root / "masks"),
    ]
    for layout, image_dir, mask_dir in candidates:
        if image_dir.is_dir() and mask_dir.is_dir():
            break
    else:
        raise DatasetError(
            f"{root}: no '{split}' split found (expected {split}/ + {split}annot/, "
            f"images/{split}/ + masks/{split}/, {split}/images/ + {split}/masks/, or images/ + masks/)")
    images, masks = _images_in(image_dir), _images_in(mask_dir)
    stems = sorted(set(images) & set(masks))
    if not stems:
        raise DatasetError(f"{image_dir} and {mask_dir}: no image/mask pairs with matching names")
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names, palette = _read_classes_file(classes_file)
    elif layout == "camvid":
        names, palette = list(CAMVID_CLASSES), list(CAMVID_PALETTE)
    else:
        raise DatasetError(f"{root}: no classes.txt (one class name per line, optional r g b)")
    if ignore_index is None:
        ignore_index = CAMVID_VOID if layout == "camvid" and len(names) == len(CAMVID_CLASSES) else 255
    return SegmentationData(root, split, layout, [images[s] for s in stems], [masks[s] for s in stems],
                            names, list(palette or default_palette(len(names))), ignore_index)


def compact_mask(mask: np.ndarray) -> np.ndarray:
    """uint8 (or uint16) copy of an integer mask: 8x less memory, and OpenCV resizes it."""
    if mask.min() < 0 or mask.max() > 65535:
        raise DatasetError(f"mask values must lie in 0..65535, got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8 if mask.max() < 256 else np.uint16)


# -- normalisation -----------------------------------------------------------------
def to_tensor(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 HxWx3 -> normalised float tensor 3xHxW."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


# -- augmentation -------------------------------------------------------------------
@dataclass
class Augment:
    """Driving-scene augmentation: random scale, crop, horizontal flip, colour jitter.

    ``base_size`` is the (H, W) the image is first resized to (the model's input
    size); the random scale applies on top of it; the crop is ``crop_size``.
    """

    base_size: tuple[int, int] = (360, 480)
    crop_size: tuple[int, int] = (352, 480)
    scale_range: tuple[float, float] = (0.75, 1.75)
    flip: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    ignore_index: int = 255

    def __call__(self, rgb: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        scale = rng.uniform(*self.scale_range)
        height = max(1, int(round(self.base_size[0] * scale)))
        width = max(1, int(round(self.base_size[1] * scale)))
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
        if pad_h or pad_w:
            rgb = cv2.copyMakeBorder(rgb, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(128, 128, 128))
            mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self.ignore_index)
        top = int(rng.integers(0, rgb.shape[0] - crop_h + 1))
        left = int(rng.integers(0, rgb.shape[1] - crop_w + 1))
        rgb = rgb[top:top + crop_h, left:left + crop_w]
        mask = mask[top:top + crop_h, left:left + crop_w]
        if self.flip and rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        rgb = self._jitter(rgb, rng)
        return np.ascontiguousarray(rgb), np.ascontiguousarray(mask).astype(np.int64)

    def _jitter(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = rgb.astype(np.float32)
        if self.brightness:
            image *= rng.uniform(1 - self.brightness, 1 + self.brightness)
        if self.contrast:
            mean = image.mean()
            image = (image - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.saturation:
            grey = image.mean(axis=2, keepdims=True)
            image = (image - grey) * rng.uniform(1 - self.saturation, 1 + self.saturation) + grey
        return np.clip(image, 0, 255).astype(np.uint8)


class TrainingSet(torch.utils.data.Dataset):
    """Decoded samples held in memory (CamVid train is ~190 MB), augmented per access.

    Each (epoch, index) draws from its own seeded generator, so a resumed run
    sees the same augmentations as an uninterrupted one.
    """

    def __init__(self, data: SegmentationData, augment: Augment, mean, std, seed: int = 0):
        self.samples = [(rgb, compact_mask(mask)) for rgb, mask in map(data.load, range(len(data)))]
        self.augment, self.mean, self.std, self.seed = augment, mean, std, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        rgb, mask = self.augment(*self.samples[index], rng)
        return to_tensor(rgb, self.mean, self.std), torch.from_numpy(mask)
