"""The end-to-end engine benchmark runs on real frames and reports both arms and the agreement."""
import json

import pytest

from clustvit_ros.tools import engine_bench


def test_engine_bench_reports_both_arms_and_agreement(camvid, untrained_checkpoint, capsys):
    code = engine_bench.main(["--model", str(untrained_checkpoint), "--data", str(camvid), "--split", "val",
                              "--frames", "2", "--rounds", "1", "--knob", "0.3", "--compare-precision", "fp32",
                              "--agreement-frames", "1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["knob"] == 0.3 and report["knob_off"] == 1.0 and report["frames"] == 2
    assert report["median_ms"]["merged"] > 0 and report["median_ms"]["off"] > 0
    # fp32 against fp32: the same labels, pixel for pixel
    assert report["precision_check"]["label_agreement"] == 1.0


def test_engine_bench_names_bad_data(tmp_path, capsys):
    assert engine_bench.main(["--data", str(tmp_path / "absent"), "--frames", "1"]) == 2
    assert "absent" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--frames", "--rounds", "--agreement-frames"])
def test_engine_bench_rejects_counts_below_one(option, capsys):
    with pytest.raises(SystemExit) as stop:
        engine_bench.main(["--data", "unused", option, "0"])
    assert stop.value.code == 2 and option in capsys.readouterr().err
