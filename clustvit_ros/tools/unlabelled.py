"""Frames without labels, a folder of images or a video, for measuring speed and merging.

A robot's own footage has no masks, but how much ClustViT merges, and so how fast it
runs, depends on the scene: ``clustvit bench --unlabelled --data <folder or video>``
measures it there. Every pixel's label is the void label, so nothing can be scored or
trained on these frames; the bench reports no mIoU for them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from ..model.config import CAMVID_CLASSES, CAMVID_PALETTE
from .data import (CAMVID_VOID, IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, DatasetError, SegmentationData, _frame_filter,
                   _images_in, read_rgb)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
MAX_FRAMES = 200  # spread over the video: a bench needs dozens, not every frame
MAX_DECODED_BYTES = 1 << 30  # decoded frames held at once (1 GiB: ~170 frames of 1080p)


class UnlabelledFrames(SegmentationData):
    """Images (from files, or decoded from a video) whose masks are all void."""

    def __init__(self, root: Path, images: list[Path], decoded: Optional[list[np.ndarray]] = None):
        super().__init__(root, "unlabelled", "unlabelled", images, [], list(CAMVID_CLASSES), list(CAMVID_PALETTE),
                         CAMVID_VOID)
        self.decoded = decoded

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rgb = self.decoded[index] if self.decoded is not None else read_rgb(self.images[index])
        return rgb, np.full(rgb.shape[:2], self.ignore_index, np.int64)

    def select(self, indices) -> "UnlabelledFrames":
        indices = list(indices)
        return UnlabelledFrames(self.root, [self.images[i] for i in indices],
                                None if self.decoded is None else [self.decoded[i] for i in indices])


def open_unlabelled(source: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
                    frame_list: Optional[str | Path] = None, max_frames: Optional[int] = None) -> UnlabelledFrames:
    """The images directly in folder ``source``, or frames spread evenly over video ``source``.

    A video gives at most ``max_frames`` frames (MAX_FRAMES, and what fits in MAX_DECODED_BYTES),
    taken at a fixed stride over its whole length, not its first seconds.
    """
    source = Path(source)
    if source.is_dir():
        images = list(_images_in(source).values())
        if not images:
            raise DatasetError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) directly in this folder")
        frames = UnlabelledFrames(source, images)
    elif source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
        frames = _decode_video(source, min(max_frames or MAX_FRAMES, MAX_FRAMES))
    elif source.is_file():
        raise DatasetError(f"{source}: neither a folder of images nor a video ({', '.join(sorted(VIDEO_SUFFIXES))})")
    else:
        raise DatasetError(f"{source}: not found")
    wanted = _frame_filter(include, exclude, frame_list)
    if wanted is None:
        return frames
    keep = [i for i, image in enumerate(frames.images) if wanted(image)]
    if not keep:
        raise DatasetError(f"{source}: no frames match the frame selection (include {list(include)}, "
                           f"exclude {list(exclude)}, list {frame_list})")
    return frames.select(keep)


def _decode_video(path: Path, max_frames: int) -> UnlabelledFrames:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DatasetError(f"{path}: cannot be opened as a video")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{path}: {width}x{height} frames, over the {MAX_IMAGE_PIXELS} pixels this tool decodes")
        wanted = max(1, min(max_frames, MAX_DECODED_BYTES // max(1, 3 * width * height)))
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # containers may not know (0, or wrong)
        stride = max(1, math.ceil(count / wanted)) if count > 0 else 1
        indices, decoded = read_video(capture, wanted, stride)
    finally:
        capture.release()
    if not decoded:
        raise DatasetError(f"{path}: no frame could be decoded")
    names = [path.parent / f"{path.stem}_{index:06d}.png" for index in indices]  # for --include and reports
    return UnlabelledFrames(path, names, decoded)


def read_video(capture: cv2.VideoCapture, count: int, stride: int) -> tuple[list[int], list[np.ndarray]]:
    """Every ``stride``-th frame of an open capture as RGB, up to ``count``: (frame indices, frames)."""
    indices, frames, index = [], [], 0
    while len(frames) < count:
        ok, bgr = capture.read()
        if not ok or bgr is None:
            break
        if index % stride == 0:
            indices.append(index)
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        index += 1
    return indices, frames
