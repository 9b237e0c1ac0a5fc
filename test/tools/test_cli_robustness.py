"""User mistakes in data folders: one clear line naming the file, exit 2, and JSON that is always JSON."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from test_cli import clustvit
from bad_inputs import png_bomb

pytestmark = pytest.mark.slow


def _dataset(root, camvid, images=3, masks=None, classes="Sky\nBuilding\nPole\nRoad\nPavement\nTree\n"
             "SignSymbol\nFence\nCar\nPedestrian\nBicyclist\n"):
    """A generic-layout copy of a few real CamVid val frames."""
    source = sorted((camvid / "val").iterdir())[:images]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index, path in enumerate(source):
        shutil.copy(path, root / "images" / path.name)
        if masks is None or index < masks:
            shutil.copy(camvid / "valannot" / path.name, root / "masks" / path.name)
    (root / "classes.txt").write_text(classes)
    return root


def _one_clear_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _eval(model, data, *extra):
    return clustvit("eval", "--model", model, "--data", data, "--split", "val", "--device", "cpu", "--json",
                    "--void-label", "11", *extra, check=False)


def test_header_bomb_in_a_data_folder(tmp_path, camvid, untrained_checkpoint):
    data = _dataset(tmp_path / "bomb", camvid, images=2)
    bomb = data / "images" / "zz_bomb.png"
    bomb.write_bytes(png_bomb(30000))
    shutil.copy(next((data / "masks").iterdir()), data / "masks" / "zz_bomb.png")
    _one_clear_line(_eval(untrained_checkpoint, data), "zz_bomb.png", "30000x30000")
    result = clustvit("bench", "--model", untrained_checkpoint, "--data", data, "--split", "val", "--limit", "3",
                      "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", "--void-label", "11", check=False)
    _one_clear_line(result, "zz_bomb.png")


def test_labels_outside_the_classes_name_the_mask(tmp_path, camvid, untrained_checkpoint):
    data = _dataset(tmp_path / "labels", camvid, images=2)
    mask_path = sorted((data / "masks").iterdir())[1]
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[:10, :10] = 17
    cv2.imwrite(str(mask_path), mask)
    _one_clear_line(_eval(untrained_checkpoint, data), mask_path.name, "17", "void label 11")


def test_images_without_masks_are_an_error_not_a_smaller_score(tmp_path, camvid, untrained_checkpoint):
    data = _dataset(tmp_path / "missing", camvid, images=4, masks=2)
    _one_clear_line(_eval(untrained_checkpoint, data), "no mask", "2 of 4 images")


def test_bad_colour_in_classes_file_names_file_and_line(tmp_path, camvid, untrained_checkpoint):
    data = _dataset(tmp_path / "colours", camvid, classes="Sky 128 128 128\nBuilding 128 zero 0\n")
    _one_clear_line(_eval(untrained_checkpoint, data), "classes.txt:2", "Building", "three integers 0..255")


def test_json_stays_valid_when_nothing_can_be_scored(tmp_path, camvid, untrained_checkpoint):
    data = _dataset(tmp_path / "void", camvid, images=1)
    mask_path = next((data / "masks").iterdir())
    cv2.imwrite(str(mask_path), np.full((360, 480), 11, np.uint8))  # every pixel void
    result = _eval(untrained_checkpoint, data)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # strict JSON: NaN would not parse in most readers
    assert report["miou"] is None and "NaN" not in result.stdout


@pytest.mark.parametrize("field, value", [("clusters", 10 ** 9), ("std", [0, 0, 0]), ("input_size", "ab")])
def test_crafted_model_file_is_one_line_naming_file_and_field_exit_1(tmp_path, camvid, untrained_checkpoint,
                                                                     field, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(untrained_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["config"])
    config[field] = value
    crafted = tmp_path / f"crafted_{field}.safetensors"
    save_file(load_file(str(untrained_checkpoint)), str(crafted), metadata={**metadata, "config": json.dumps(config)})
    for command in (["eval", "--split", "val", "--limit", "1"], ["bench", "--split", "val", "--limit", "1"]):
        result = clustvit(command[0], "--model", crafted, "--data", camvid, *command[1:], "--device", "cpu",
                          check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, result.stderr
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(crafted) in lines[0] and f"field '{field}'" in lines[0], lines[0]
