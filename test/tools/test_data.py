"""Dataset discovery, layouts, and augmentation."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from clustvit_ros.tools.data import Augment, DatasetError, evenly_spaced, open_dataset


def _write_pair(image_dir, mask_dir, stem, value):
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image_dir / f"{stem}.jpg"), np.full((40, 60, 3), 90, np.uint8))
    cv2.imwrite(str(mask_dir / f"{stem}.png"), np.full((40, 60), value, np.uint8))


def test_camvid_layout(camvid):
    data = open_dataset(camvid, "val")
    assert data.layout == "camvid" and len(data) == 101 and data.ignore_index == 11
    assert data.class_names[3] == "Road" and tuple(data.palette[3]) == (128, 64, 128)
    rgb, mask = data.load(0)
    assert rgb.shape == (360, 480, 3) and rgb.dtype == np.uint8
    assert mask.shape == (360, 480) and mask.max() <= 11


def test_a_sample_of_a_drive_spreads_over_the_drive(camvid):
    """bench's --limit: 16 of drive 0001TP's 62 frames come from all of it, not its first seconds."""
    drive = open_dataset(camvid, "train,val", include=["0001TP_*"])
    assert len(drive) == 62
    sample = drive.spread(16)
    positions = [drive.images.index(image) for image in sample.images]
    assert len(sample) == 16 and positions[0] == 0 and positions[-1] == 58  # 15 * 62 // 16
    assert positions == sorted(set(positions))
    assert all(drive.masks[i] == mask for i, mask in zip(positions, sample.masks))  # images keep their masks
    rgb, mask = sample.load(15)
    assert rgb.shape[:2] == mask.shape
    assert drive.subset(16).images == drive.images[:16]  # subset is still the first N
    assert drive.spread(None) is drive and drive.spread(62) is drive and drive.spread(1000) is drive
    for count in range(1, 40):
        for limit in range(1, count + 3):
            picked = evenly_spaced(count, limit)
            assert len(picked) == min(count, limit) and picked == sorted(set(picked))
            assert picked[0] == 0 and count - picked[-1] <= -(-count // limit)  # the last stride reaches the end


@pytest.mark.parametrize("layout", ["images/{split}", "{split}/images", "images"])
def test_generic_layouts(tmp_path, layout):
    image_dir = tmp_path / layout.format(split="val")
    mask_dir = tmp_path / layout.replace("images", "masks").format(split="val")
    _write_pair(image_dir, mask_dir, "a", 1)
    _write_pair(image_dir, mask_dir, "b", 2)
    (tmp_path / "classes.txt").write_text("# name r g b\nground 10 20 30\nwall 40 50 60\nsky 70 80 90\n")
    data = open_dataset(tmp_path, "val")
    assert data.layout == "generic" and len(data) == 2 and data.ignore_index == 255
    assert data.class_names == ["ground", "wall", "sky"] and data.palette[1] == (40, 50, 60)
    assert data.load(1)[1].max() == 2


def test_missing_split_and_classes_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="data folder not found"):
        open_dataset(tmp_path / "nothing", "val")
    with pytest.raises(DatasetError, match="no 'val' split found"):
        open_dataset(tmp_path, "val")
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", 1)
    with pytest.raises(DatasetError, match="no classes.txt"):
        open_dataset(tmp_path, "val")


def test_augment_shapes_and_void_padding(val_samples):
    rgb, mask = val_samples[0]
    augment = Augment(base_size=(360, 480), crop_size=(352, 480), scale_range=(0.5, 0.5), flip=False,
                      ignore_index=11)
    out_rgb, out_mask = augment(rgb, mask.astype(np.uint8), np.random.default_rng(0))
    assert out_rgb.shape == (352, 480, 3) and out_mask.shape == (352, 480)
    # Scaled to 180x240, the rest of the crop is void padding.
    assert (out_mask[200:, :] == 11).all() and (out_mask[:, 260:] == 11).all()
    assert set(np.unique(out_mask)) <= set(np.unique(mask)) | {11}
