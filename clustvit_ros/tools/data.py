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

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch

from ..inference.image_headers import ImageHeaderError, compressed_header
from ..model.config import CAMVID_CLASSES, CAMVID_PALETTE, default_palette

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
        """(RGB uint8 HxWx3, mask int64 HxW) of one sample; DatasetError names a bad file."""
        rgb, mask = read_rgb(self.images[index]), read_mask(self.masks[index])
        if rgb.shape[:2] != mask.shape:
            raise DatasetError(f"{self.masks[index]}: mask {mask.shape[1]}x{mask.shape[0]} does not match "
                               f"its image {self.images[index].name} ({rgb.shape[1]}x{rgb.shape[0]})")
        num_classes = len(self.class_names)
        invalid = ((mask < 0) | (mask >= num_classes)) & (mask != self.ignore_index)
        if invalid.any():
            values = np.unique(mask[invalid])
            raise DatasetError(f"{self.masks[index]}: labels {_list(values)} are neither classes 0.."
                               f"{num_classes - 1} nor the void label {self.ignore_index} "
                               "(set --void-label, or fix classes.txt)")
        return rgb, mask

    def subset(self, limit: Optional[int]) -> "SegmentationData":
        """The first ``limit`` samples (all when None)."""
        if limit is None or limit >= len(self):
            return self
        return self.select(range(limit))

    def spread(self, limit: Optional[int]) -> "SegmentationData":
        """``limit`` samples spread evenly over the selection, the first included (all when None).

        A benchmark's few frames must stand for the whole drive: how much ClustViT merges, and so
        how fast it runs, follows the scene, and a drive's opening seconds can differ from the rest
        (CamVid 0001TP's first 16 frames merge less than its other 46).
        """
        if limit is None or limit >= len(self):
            return self
        return self.select(evenly_spaced(len(self), limit))

    def select(self, indices) -> "SegmentationData":
        indices = list(indices)
        return SegmentationData(self.root, self.split, self.layout, [self.images[i] for i in indices],
                                [self.masks[i] for i in indices], self.class_names, self.palette,
                                self.ignore_index)


def evenly_spaced(count: int, limit: int) -> list[int]:
    """``limit`` indices of ``range(count)`` at an even stride from 0, in order, none repeated."""
    if limit >= count:
        return list(range(count))
    return [index * count // limit for index in range(limit)]


# Larger images are refused before decoding (an 8K x 8K frame is far above any dataset's).
MAX_IMAGE_PIXELS = 1 << 26


def _list(values, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in list(values)[:limit])
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def _imread(path: Path, flags: int, what: str) -> np.ndarray:
    """cv2.imread that checks a PNG or JPEG header's size first and never raises cv2.error."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})") from None
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:2] == b"\xff\xd8":
        try:
            _, width, height = compressed_header(head)
        except ImageHeaderError as exc:
            raise DatasetError(f"{path}: cannot be read as {what} ({exc})") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{path}: its header declares {width}x{height} pixels, over the "
                               f"{MAX_IMAGE_PIXELS} this tool decodes")
    try:
        image = cv2.imread(str(path), flags)
    except cv2.error as exc:
        raise DatasetError(f"{path}: cannot be read as {what} ({str(exc).strip().splitlines()[-1][:120]})") from None
    if image is None:
        raise DatasetError(f"{path}: cannot be read as {what}")
    return image


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(_imread(path, cv2.IMREAD_COLOR, "an image"), cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    mask = _imread(path, cv2.IMREAD_UNCHANGED, "a mask")
    if mask.ndim != 2:
        raise DatasetError(f"{path}: a mask must be single-channel, got shape {mask.shape}")
    return mask.astype(np.int64)


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _read_classes_file(path: Path) -> tuple[list[str], Optional[list[tuple[int, int, int]]]]:
    names, colours = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) not in (1, 4):
            raise DatasetError(f"{path}:{number}: expected 'name' or 'name r g b', got {line.strip()[:80]!r}")
        names.append(parts[0])
        if len(parts) == 4:
            try:
                colour = tuple(int(v) for v in parts[1:4])
            except ValueError:
                colour = ()
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise DatasetError(f"{path}:{number}: colour {' '.join(parts[1:4])!r} of class {parts[0]!r} "
                                   "must be three integers 0..255")
            colours.append(colour)
    if not names:
        raise DatasetError(f"{path}: no class names")
    palette = colours if len(colours) == len(names) else None
    return names, palette


def open_dataset(root: str | Path, split: str, ignore_index: Optional[int] = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 frame_list: Optional[str | Path] = None) -> SegmentationData:
    """Find the images and masks of ``split`` under ``root`` (see module doc).

    ``split`` may name several splits joined by commas (``train,val``). The frames
    can then be narrowed down by file-name patterns (``include``/``exclude``,
    shell-style on the file stem, e.g. ``0006R0_*``) and by a ``frame_list`` file
    (one image per line: a path relative to ``root``, a file name or a stem; a
    second column, such as the mask in CamVid's ``train.txt``, is ignored).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    splits = [s.strip() for s in split.split(",") if s.strip()]
    if not splits:
        raise DatasetError(f"{root}: no split named (got {split!r})")
    parts = [_open_split(root, name) for name in splits]
    layout = parts[0][0]
    images, masks = [], []
    for _, split_images, split_masks in parts:
        images += split_images
        masks += split_masks
    wanted = _frame_filter(include, exclude, frame_list)
    if wanted is not None:
        pairs = [(i, m) for i, m in zip(images, masks) if wanted(i)]
        if not pairs:
            raise DatasetError(f"{root}: no frames of split {split!r} match the frame selection "
                               f"(include {list(include)}, exclude {list(exclude)}, list {frame_list})")
        images, masks = [i for i, _ in pairs], [m for _, m in pairs]
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names, palette = _read_classes_file(classes_file)
    elif layout == "camvid":
        names, palette = list(CAMVID_CLASSES), list(CAMVID_PALETTE)
    else:
        raise DatasetError(f"{root}: no classes.txt (one class name per line, optional r g b)")
    if ignore_index is None:
        ignore_index = CAMVID_VOID if layout == "camvid" and len(names) == len(CAMVID_CLASSES) else 255
    return SegmentationData(root, ",".join(splits), layout, images, masks,
                            names, list(palette or default_palette(len(names))), ignore_index)


def _open_split(root: Path, split: str) -> tuple[str, list[Path], list[Path]]:
    """(layout, images, masks) of one split, paired by file stem and sorted."""
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
    unpaired = sorted(set(images) - set(masks))
    if unpaired:
        raise DatasetError(f"{images[unpaired[0]]}: no mask of that name in {mask_dir} "
                           f"({len(unpaired)} of {len(images)} images have none)")
    return layout, [images[s] for s in stems], [masks[s] for s in stems]


def _frame_filter(include: Sequence[str], exclude: Sequence[str],
                  frame_list: Optional[str | Path]) -> Optional[Callable[[Path], bool]]:
    """A predicate on image paths from patterns and a list file; None selects everything."""
    include, exclude = list(include or ()), list(exclude or ())
    listed: Optional[set[str]] = None
    if frame_list is not None:
        path = Path(frame_list)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read the frame list ({exc})") from None
        listed = {Path(line.split()[0]).stem for line in lines if line.strip() and not line.startswith("#")}
        if not listed:
            raise DatasetError(f"{path}: the frame list names no frames")
    if not include and not exclude and listed is None:
        return None

    def wanted(image: Path) -> bool:
        stem = image.stem
        if listed is not None and stem not in listed:
            return False
        if include and not any(fnmatch.fnmatchcase(stem, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(stem, p) for p in exclude)
    return wanted


def frame_prefix(path: Path | str, separator: str = "_") -> str:
    """The part of a file stem before the first ``separator``: CamVid's drive (``0006R0``)."""
    stem = Path(path).stem
    return stem.split(separator, 1)[0] if separator in stem else ""


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
    """Driving-scene augmentation: random scale, crop, flip and photometric changes.

    ``base_size`` is the (H, W) the image is first resized to (the model's input
    size); the random scale applies on top of it; the crop is ``crop_size``.
    The photometric part imitates what changes between drives and cameras:
    exposure and contrast (brightness, contrast, gamma), white balance and colour
    (saturation, hue), focus and motion (blur), sensor noise and compression
    (JPEG). A magnitude of 0 turns a change off.
    """

    base_size: tuple[int, int] = (360, 480)
    crop_size: tuple[int, int] = (352, 480)
    scale_range: tuple[float, float] = (0.75, 1.75)
    flip: bool = True
    brightness: float = 0.3  # gain in [1 - b, 1 + b]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.0  # shift of up to this fraction of the colour circle
    gamma: float = 0.0  # gamma log-uniform in [1 / (1 + g), 1 + g]
    blur_probability: float = 0.0  # Gaussian blur, sigma 0.3..1.5 px
    noise_std: float = 0.0  # additive Gaussian noise, std up to this (0..255 scale)
    jpeg_probability: float = 0.0  # re-encoded as JPEG at quality 30..90
    ignore_index: int = 255

    def __call__(self, rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 focus_class: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """A random view of (rgb, mask); with ``focus_class`` the crop contains that class."""
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
        top, left = self._crop_origin(mask, rng, focus_class)
        rgb = rgb[top:top + crop_h, left:left + crop_w]
        mask = mask[top:top + crop_h, left:left + crop_w]
        if self.flip and rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        rgb = self._photometric(np.ascontiguousarray(rgb), rng)
        return np.ascontiguousarray(rgb), np.ascontiguousarray(mask).astype(np.int64)

    def _crop_origin(self, mask: np.ndarray, rng: np.random.Generator,
                     focus_class: Optional[int]) -> tuple[int, int]:
        crop_h, crop_w = self.crop_size
        max_top, max_left = mask.shape[0] - crop_h, mask.shape[1] - crop_w
        if focus_class is not None:
            rows, columns = np.nonzero(mask == focus_class)
            if rows.size:  # a window around one random pixel of the class
                pick = int(rng.integers(rows.size))
                row, column = int(rows[pick]), int(columns[pick])
                top = int(rng.integers(max(0, row - crop_h + 1), min(row, max_top) + 1))
                left = int(rng.integers(max(0, column - crop_w + 1), min(column, max_left) + 1))
                return top, left
        return int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1))

    def _photometric(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = rgb.astype(np.float32)
        if self.brightness:
            image *= rng.uniform(1 - self.brightness, 1 + self.brightness)
        if self.contrast:
            mean = image.mean()
            image = (image - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.saturation:
            grey = image.mean(axis=2, keepdims=True)
            image = (image - grey) * rng.uniform(1 - self.saturation, 1 + self.saturation) + grey
        image = np.clip(image, 0, 255)
        if self.gamma:
            gamma = float(np.exp(rng.uniform(-np.log1p(self.gamma), np.log1p(self.gamma))))
            image = 255.0 * (image / 255.0) ** gamma
        if self.hue:
            hsv = cv2.cvtColor(image.astype(np.uint8), cv2.COLOR_RGB2HSV)  # OpenCV hue: 0..179
            shift = int(round(rng.uniform(-self.hue, self.hue) * 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        if self.blur_probability and rng.random() < self.blur_probability:
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(0.3, 1.5)))
        if self.noise_std:
            std = rng.uniform(0, self.noise_std)
            image = image + rng.standard_normal(image.shape, dtype=np.float32) * std
        image = np.clip(image, 0, 255).astype(np.uint8)
        if self.jpeg_probability and rng.random() < self.jpeg_probability:
            quality = int(rng.integers(30, 91))
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:  # channel order does not matter for a round trip
                image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        return image


# Named sets of photometric magnitudes (``clustvit train --augment``).
AUGMENT_PRESETS: dict[str, dict[str, float]] = {
    # Colour jitter only (the recipe of the first packaged models).
    "basic": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3},
    # For drives and cameras the model has not seen: exposure, white balance,
    # focus, sensor noise and compression as well.
    "domain-shift": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.5, "hue": 0.05, "gamma": 0.5,
                     "blur_probability": 0.3, "noise_std": 8.0, "jpeg_probability": 0.3},
}


def rare_class_probabilities(class_pixels: np.ndarray, temperature: float) -> np.ndarray:
    """Rare-class sampling (as in DAFormer): p(c) proportional to exp((1 - f_c) / T).

    ``class_pixels`` is (images, classes) pixel counts; f_c is class c's share of
    all labelled pixels. Small T favours rare classes strongly; classes absent
    from every image get probability 0.
    """
    totals = class_pixels.sum(0).astype(np.float64)
    frequency = totals / max(totals.sum(), 1.0)
    logits = (1.0 - frequency) / temperature
    weights = np.exp(logits - logits.max()) * (totals > 0)
    return weights / weights.sum()


class TrainingSet(torch.utils.data.Dataset):
    """Decoded samples held in memory (CamVid train is ~190 MB), augmented per access.

    Items are addressed by ``(epoch, position, index, focus_class)`` from
    ``epoch_plan``: each (epoch, position) draws its augmentation from its own
    seeded generator, so a resumed run, or one split over several processes,
    sees the same augmentations as one uninterrupted process. The item carries
    everything a draw depends on, so loader workers can live across epochs.
    """

    def __init__(self, data: SegmentationData, augment: Augment, mean, std, seed: int = 0,
                 rare_class_temperature: float = 0.0, min_class_pixels: int = 64):
        self.samples = [(rgb, compact_mask(mask)) for rgb, mask in map(data.load, range(len(data)))]
        self.augment, self.mean, self.std, self.seed = augment, mean, std, seed
        num_classes = len(data.class_names)
        self.class_pixels = np.stack([
            np.bincount(mask[mask < num_classes].ravel(), minlength=num_classes)[:num_classes]
            for _, mask in self.samples]) if self.samples else np.zeros((0, num_classes), np.int64)
        self.rare_class_temperature = rare_class_temperature
        self.class_probabilities = (rare_class_probabilities(self.class_pixels, rare_class_temperature)
                                    if rare_class_temperature > 0 else None)
        self._images_with = [np.nonzero(self.class_pixels[:, c] >= min_class_pixels)[0]
                             for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def epoch_plan(self, epoch: int) -> list[tuple[int, int, int, int]]:
        """The epoch's draws ``(epoch, position, image index, focus class or -1)``, seeded by epoch.

        Without rare-class sampling: every image once, shuffled. With it: a class
        is drawn by ``class_probabilities``, then an image showing that class.
        """
        rng = np.random.default_rng([self.seed, epoch, 7])
        if self.class_probabilities is None:
            return [(epoch, position, int(index), -1) for position, index in enumerate(rng.permutation(len(self)))]
        plan = []
        for position in range(len(self)):
            focus = int(rng.choice(len(self.class_probabilities), p=self.class_probabilities))
            candidates = self._images_with[focus]
            if candidates.size == 0:
                plan.append((epoch, position, int(rng.integers(len(self))), -1))
            else:
                plan.append((epoch, position, int(candidates[rng.integers(candidates.size)]), focus))
        return plan

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, index, focus = item if isinstance(item, tuple) else (0, item, item, -1)
        rng = np.random.default_rng([self.seed, epoch, position])
        rgb, mask = self.augment(*self.samples[index], rng, focus_class=None if focus < 0 else focus)
        return to_tensor(rgb, self.mean, self.std), torch.from_numpy(mask)
