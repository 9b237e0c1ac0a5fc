"""Pure-patch shares per drive: the ceiling on what fixed cluster classes can merge."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from clustvit_ros.tools import patch_classes
from clustvit_ros.tools.data import open_dataset


def _dataset(root):
    """Two 'drives'; a 32x48 mask is 2x3 patches of 16 pixels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("ground 10 20 30\nwall 40 50 60\nsky 70 80 90\n")
    first = np.zeros((32, 48), np.uint8)       # column 0: ground
    first[:, 16:32] = 1                          # column 1: wall
    first[:, 32:] = 2                            # column 2: sky, except
    first[0, 40] = 1                             # one wall pixel spoils the top sky patch,
    first[16:, 32:] = 255                        # and the bottom one is void
    second = np.full((32, 48), 2, np.uint8)      # all sky
    for stem, mask in (("driveA_0001", first), ("driveB_0001", second)):
        cv2.imwrite(str(root / "images" / f"{stem}.png"), np.full((32, 48, 3), 90, np.uint8))
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return root


def test_shares_count_only_pure_labelled_patches(tmp_path):
    data = open_dataset(_dataset(tmp_path), "train")
    shares = patch_classes.pure_patch_shares(data, (32, 48))
    assert shares["driveA"]["frames"] == 1 and shares["driveA"]["patches"] == 6
    assert shares["driveA"]["shares"] == pytest.approx({"ground": 2 / 6, "wall": 2 / 6, "sky": 0.0})
    assert shares["driveB"]["shares"] == pytest.approx({"ground": 0.0, "wall": 0.0, "sky": 1.0})
    assert patch_classes.mergeable_share(shares["driveA"]["shares"], ["wall", "ground"]) == pytest.approx(4 / 6)
    # At twice the size each 16-pixel patch is a quarter of a label patch: still pure.
    assert patch_classes.pure_patch_shares(data, (64, 96))["driveA"]["shares"]["wall"] == pytest.approx(1 / 3)


def test_cli_json_and_unknown_class_name(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    args = ["--data", str(root), "--input-size", "32", "48"]
    assert patch_classes.main(args + ["--cluster-classes", "sky", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["per_prefix"]["driveB"]["mergeable"] == pytest.approx(1.0)
    assert patch_classes.main(args + ["--cluster-classes", "road"]) == 2
    assert "unknown class names ['road']" in capsys.readouterr().err
    assert patch_classes.main(args + ["--input-size", "8", "8"]) == 2


def test_camvid_drives_cap_three_class_merging(camvid):
    """On CamVid at 480x640 Road, Sky and Building are about half of each drive's patches
    (models/README.md: the cap the fine-tuned 0006R0 fold reaches at threshold 0.2)."""
    data = open_dataset(camvid, "train,val", include=["0006R0_*"])
    row = patch_classes.pure_patch_shares(data, (480, 640), every=10)["0006R0"]
    mergeable = patch_classes.mergeable_share(row["shares"], ["Road", "Sky", "Building"])
    assert 0.45 < mergeable < 0.6 and row["frames"] == 11
    assert max(row["shares"], key=row["shares"].get) == "Road" and row["shares"]["Pole"] < 0.01
