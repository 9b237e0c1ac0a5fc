"""Leave-one-drive-out summary: mean over folds and the threshold choice, from bench sweep files."""
import json

import pytest

from clustvit_ros.tools import folds


def _sweep(tmp_path, name, points):
    rows = [{"merge_threshold": t, "miou": m, "merged_fraction": f, "gflops": g, "latency_ratio": r}
            for t, m, f, g, r in points]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"sweep": rows, "latency_ratio": 1.0}))
    return path


def test_threshold_is_the_most_merging_within_the_cost(tmp_path, capsys):
    a = _sweep(tmp_path, "a", [(0.0, 30.0, 1.0, 14.0, 2.0), (0.3, 44.0, 0.6, 18.0, 1.6),
                               (0.5, 45.0, 0.4, 22.0, 1.3), (1.0, 45.2, 0.0, 31.0, 1.0)])
    b = _sweep(tmp_path, "b", [(0.0, 40.0, 1.0, 14.0, 2.0), (0.3, 60.2, 0.7, 17.0, 1.7),
                               (0.5, 60.5, 0.5, 20.0, 1.4), (1.0, 60.4, 0.0, 31.0, 1.0), (0.7, 60.0, 0.2, 28.0, 1.1)])
    rows = folds.mean_over_folds([folds.read_sweep(a), folds.read_sweep(b)])
    assert [row["merge_threshold"] for row in rows] == [0.0, 0.3, 0.5, 1.0]  # only points both folds measured
    assert rows[1]["miou"] == pytest.approx(52.1) and rows[1]["miou_per_fold"] == [44.0, 60.2]
    assert rows[1]["gflops_ratio"] == pytest.approx((31 / 18 + 31 / 17) / 2)
    # off: 52.8; 0.3 (52.1) is within 0.75 but not within 0.5; 0.5 (52.75) is within both
    assert folds.choose_threshold(rows, 0.5) == 0.5
    assert folds.choose_threshold(rows, 0.75) == 0.3
    assert folds.choose_threshold(rows, 0.0) is None  # nothing merges for free here
    assert folds.main([str(a), str(b), "--max-cost", "0.75"]) == 0
    assert "chosen default threshold (<= 0.75 mIoU below merging off): 0.3" in capsys.readouterr().out


def test_bad_sweep_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"latency_ratio": 1.0}')
    assert folds.main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    no_off = _sweep(tmp_path, "no_off", [(0.3, 44.0, 0.6, 18.0, 1.6)])
    assert folds.main([str(no_off)]) == 2
    assert "threshold 1" in capsys.readouterr().err


def test_floor_settings_compete_on_merging_within_the_cost(tmp_path, capsys):
    """Sweeps with per-cluster floors: each setting picks its threshold, the one that merges most wins."""
    def fold(name, points, floors=None):
        path = _sweep(tmp_path, name, points)
        result = json.loads(path.read_text())
        if floors is not None:
            result["cluster_floors"] = floors
        path.write_text(json.dumps(result))
        return path

    off = (1.0, 50.0, 0.0, 31.0, 1.0)
    plain = [fold("a", [(0.3, 48.0, 0.6, 18.0, 1.6), (0.5, 49.8, 0.4, 22.0, 1.3), off], []),
             fold("b", [(0.3, 48.4, 0.7, 17.0, 1.7), (0.5, 49.6, 0.5, 20.0, 1.4), off])]
    # A road floor gives up some merging at each threshold but costs less, so a lower threshold passes.
    floored = [fold("fa", [(0.3, 49.7, 0.55, 19.0, 1.5), (0.5, 49.9, 0.38, 22.5, 1.3), off], [0.9, 0, 0]),
               fold("fb", [(0.3, 49.6, 0.62, 18.0, 1.6), (0.5, 49.7, 0.45, 21.0, 1.4), off], [0.9, 0, 0])]
    setting = folds.choose_setting([*plain, *floored], 0.5)
    assert setting["cluster_floors"] == [0.9, 0.0, 0.0] and setting["chosen_threshold"] == 0.3
    assert setting["merged_fraction"] == pytest.approx(0.585)
    assert [(c["cluster_floors"], c["chosen_threshold"]) for c in setting["candidates"]] == [
        ([], 0.5), ([0.9, 0.0, 0.0], 0.3)]
    # With room for the plain setting's 0.3, it merges more and wins.
    assert folds.choose_setting([*plain, *floored], 2.0)["cluster_floors"] == []
    selection = {"data": "camvid", "split": "train,val", "include": ["0006R0_*"], "exclude": [], "list": None}
    plain[0].write_text(json.dumps({**json.loads(plain[0].read_text()), "frames": selection}))
    assert folds.main([*map(str, plain), *map(str, floored), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cluster_floors"] == [0.9, 0.0, 0.0] and report["chosen_threshold"] == 0.3
    # Which frames each sweep measured; None for a file written before bench recorded it.
    assert report["held_out_frames"] == [selection, None, None, None]
    # A setting missing a fold is refused rather than compared on fewer drives.
    assert folds.main([*map(str, plain), str(floored[0])]) == 2
    assert "one sweep per fold" in capsys.readouterr().err
