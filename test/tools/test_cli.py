"""The clustvit command line: its JSON keys are a contract other tools rely on."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clustvit_ros.model import read_metadata

EVAL_KEYS = {"miou", "per_class_iou", "pixel_accuracy", "images", "mean_tokens_in",
             "mean_tokens_after_merge", "merged_fraction"}
BENCH_KEYS = {"latency_ms_merged", "latency_ms_unmerged", "latency_ratio", "gflops_merged",
              "gflops_unmerged", "gflops_ratio", "mean_tokens_after_merge", "merged_fraction", "device"}


def clustvit(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "clustvit_ros.tools.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"clustvit {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_eval_json_contract(untrained_checkpoint, camvid):
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--split", "val",
                      "--merge-threshold", "0.3", "--limit", "2", "--device", "cpu", "--json")
    report = json.loads(result.stdout)
    assert EVAL_KEYS <= set(report)
    assert report["images"] == 2 and report["mean_tokens_in"] == 690
    assert set(report["per_class_iou"]) == set(read_metadata(untrained_checkpoint)[0].class_names)
    assert 0 <= report["miou"] <= 100 and 0 <= report["merged_fraction"] <= 1


def test_bench_oracle_json_contract(camvid, backbone_file):
    result = clustvit("bench", "--data", camvid, "--split", "val", "--oracle-clusters", "--limit", "2",
                      "--init-backbone", backbone_file,
                      "--repeats", "1", "--warmup", "1", "--device", "cpu", "--json")
    report = json.loads(result.stdout)
    assert BENCH_KEYS <= set(report)
    assert report["device"].startswith("cpu")
    assert report["gflops_merged"] < report["gflops_unmerged"]
    assert report["gflops_ratio"] == pytest.approx(report["gflops_unmerged"] / report["gflops_merged"])
    assert report["latency_ratio"] == pytest.approx(report["latency_ms_unmerged"] / report["latency_ms_merged"])
    assert 0.3 < report["merged_fraction"] < 0.9  # real street scenes: about half merge
    assert report["mean_tokens_after_merge"] < 690
    # The result says which frames it measured, as the command named them, and which it timed:
    # --limit of them spread over the selection (val: 101 frames).
    val = sorted(path.name for path in (camvid / "val").iterdir())
    assert report["frames"] == {"data": str(camvid), "split": "val", "include": [], "exclude": [], "list": None,
                                "limit": 2, "eval_limit": None, "timed": [val[0], val[50]]}


def test_bench_sweep_writes_plot(untrained_checkpoint, camvid, tmp_path):
    plot = tmp_path / "sweep.png"
    result = clustvit("bench", "--model", untrained_checkpoint, "--data", camvid, "--limit", "1",
                      "--eval-limit", "1", "--repeats", "1", "--warmup", "0", "--sweep-threshold", "--plot", plot,
                      "--device", "cpu", "--json")
    rows = json.loads(result.stdout)["sweep"]
    assert [r["merge_threshold"] for r in rows][0] == 0.0 and rows[-1]["merge_threshold"] == 1.0
    assert rows[0]["merged_fraction"] == 1.0 and rows[-1]["merged_fraction"] == 0.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Chosen points (a floor sweep needs only those below its floors), each measured once, in order.
    common = ("bench", "--model", untrained_checkpoint, "--data", camvid, "--limit", "1", "--eval-limit", "1",
              "--repeats", "1", "--warmup", "0", "--sweep-threshold", "--plot", plot, "--device", "cpu", "--json")
    result = clustvit(*common, "--sweep-points", "1", "0.3", "0", "0.3")
    report = json.loads(result.stdout)
    rows = report["sweep"]
    assert [r["merge_threshold"] for r in rows] == [0.0, 0.3, 1.0]
    # what folds.py reports as the held-out frames of a sweep
    assert report["frames"]["split"] == "val" and report["frames"]["eval_limit"] == 1
    assert rows[0]["merged_fraction"] == 1.0 and rows[-1]["merged_fraction"] == 0.0
    result = clustvit(*common, "--sweep-points", "0.3", "1.5", check=False)
    assert result.returncode == 2 and "threshold must be in [0, 1], got 1.5" in result.stderr


def test_bad_model_file_is_a_clear_error(tmp_path, camvid):
    bad = tmp_path / "broken.safetensors"
    bad.write_text("not a model")
    result = clustvit("eval", "--model", bad, "--data", camvid, "--limit", "1", check=False)
    # A bad model file exits 1, in the CLI as in the node; other user mistakes exit 2.
    assert result.returncode == 1
    assert "broken.safetensors" in result.stderr and "Traceback" not in result.stderr
    result = clustvit("eval", "--model", tmp_path / "absent.safetensors", "--data", camvid, check=False)
    assert result.returncode == 1 and "absent.safetensors: no such file" in result.stderr


def test_bad_arguments_are_rejected(untrained_checkpoint, camvid):
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--merge-threshold", "1.5",
                      check=False)
    assert result.returncode == 2 and "threshold must be in [0, 1], got 1.5" in result.stderr
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--device", "tpu", check=False)
    assert result.returncode == 2 and "expected auto, cpu, cuda" in result.stderr


def test_a_later_train_option_undoes_an_earlier_one():
    """The training scripts add options after the shared recipe's: ablate_recipe.sh's arm
    decoder_on_all_tokens appends --no-head-on-merged to a recipe that carries --head-on-merged,
    and the later one must win."""
    from clustvit_ros.tools.cli import build_parser
    parser = build_parser()
    base = ["train", "--data", "d", "--out", "o.safetensors"]
    assert parser.parse_args(base).head_on_merged is False
    assert parser.parse_args(base + ["--head-on-merged"]).head_on_merged is True
    assert parser.parse_args(base + ["--head-on-merged", "--no-head-on-merged"]).head_on_merged is False
    assert parser.parse_args(base + ["--no-head-on-merged", "--head-on-merged"]).head_on_merged is True


def test_export_half_with_new_defaults(untrained_checkpoint, camvid, tmp_path):
    out = tmp_path / "exported.safetensors"
    clustvit("export", "--model", untrained_checkpoint, "--out", out, "--half", "--merge-threshold", "0.7",
             "--input-size", "480", "640")
    config, _ = read_metadata(out)
    assert config.default_merge_threshold == 0.7 and config.input_size == (480, 640)
    assert out.stat().st_size < 0.6 * untrained_checkpoint.stat().st_size
    # The stored inference size is what bench measures (360x480 CamVid frames run at 480x640)...
    result = clustvit("bench", "--model", out, "--data", camvid, "--limit", "1", "--repeats", "1",
                      "--warmup", "0", "--device", "cpu", "--json")
    assert json.loads(result.stdout)["input_size"] == [480, 640]
    # An explicit --height/--width is the network's size, whatever the checkpoint stores.
    result = clustvit("bench", "--model", out, "--data", camvid, "--limit", "1", "--repeats", "1",
                      "--warmup", "0", "--device", "cpu", "--height", "240", "--width", "320", "--json")
    assert json.loads(result.stdout)["input_size"] == [240, 320]
    # ...and eval scores at the labels' own resolution all the same.
    result = clustvit("eval", "--model", out, "--data", camvid, "--limit", "1", "--device", "cpu", "--json")
    assert json.loads(result.stdout)["inference_size"] == 640


def test_cluster_floors_are_measured_exported_and_refused_when_wrong(untrained_checkpoint, camvid, tmp_path):
    common = ("--data", camvid, "--limit", "2", "--device", "cpu", "--merge-threshold", "0.0", "--json")
    plain = json.loads(clustvit("eval", "--model", untrained_checkpoint, *common).stdout)
    floored = json.loads(clustvit("eval", "--model", untrained_checkpoint, *common,
                                  "--cluster-floors", "0.9", "0", "0.9").stdout)
    assert plain["cluster_floors"] == [] and floored["cluster_floors"] == [0.9, 0.0, 0.9]
    assert floored["merged_fraction"] < plain["merged_fraction"] == 1.0
    # Exported floors are the model's from then on: eval, bench and the engine use them.
    out = tmp_path / "floored.safetensors"
    clustvit("export", "--model", untrained_checkpoint, "--out", out, "--cluster-floors", "0.9", "0", "0.9")
    assert read_metadata(out)[0].cluster_floors == [0.9, 0.0, 0.9]
    again = json.loads(clustvit("eval", "--model", out, *common).stdout)
    assert again["merged_fraction"] == floored["merged_fraction"]
    bench = json.loads(clustvit("bench", "--model", out, "--data", camvid, "--limit", "1", "--repeats", "1",
                                "--warmup", "0", "--device", "cpu", "--merge-threshold", "0", "--json").stdout)
    assert bench["cluster_floors"] == [0.9, 0.0, 0.9] and bench["merged_fraction"] < 1.0
    # All zero removes them.
    clustvit("export", "--model", out, "--out", out, "--cluster-floors", "0", "0", "0")
    assert read_metadata(out)[0].cluster_floors == []
    # One floor per cluster, each a probability: refused with the reason, nothing written.
    for bad, reason in ((("0.9",), "3 numbers in [0, 1] (one per cluster of this model)"),
                        (("0.9", "0", "1.5"), "1.5: must be in [0, 1]"),
                        (("nan", "0", "0"), "nan: must be in [0, 1]")):
        result = clustvit("export", "--model", untrained_checkpoint, "--out", tmp_path / "bad.safetensors",
                          "--cluster-floors", *bad, check=False)
        assert result.returncode == 2 and reason in result.stderr, result.stderr
        assert not (tmp_path / "bad.safetensors").exists()


def test_eval_with_another_strategy_and_the_paper_rule(untrained_checkpoint, camvid):
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--limit", "1",
                      "--strategy", "tome", "--knob", "0.2", "--device", "cpu", "--json")
    report = json.loads(result.stdout)
    assert report["strategy"] == {"strategy": "tome", "ratio": 0.2}
    assert report["mean_tokens_after_merge"] < report["mean_tokens_in"]
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--limit", "1",
                      "--merge-rule", "argmax", "--device", "cpu", "--json")
    assert json.loads(result.stdout)["strategy"] == {"strategy": "clustvit", "threshold": None, "oracle": False}
    result = clustvit("eval", "--model", untrained_checkpoint, "--data", camvid, "--strategy", "tome",
                      "--knob", "0.9", check=False)
    assert result.returncode == 2 and "ratio must be in [0, 0.5]" in result.stderr


def test_bench_all_strategies_table(untrained_checkpoint, camvid, tmp_path):
    plot = tmp_path / "strategies.png"
    result = clustvit("bench", "--model", untrained_checkpoint, "--data", camvid, "--strategy", "all",
                      "--limit", "1", "--eval-limit", "1", "--repeats", "1", "--warmup", "0",
                      "--device", "cpu", "--plot", plot, "--json")
    report = json.loads(result.stdout)
    rows = report["rows"]
    from clustvit_ros.model.reduction import strategy_names, strategy_spec
    for name in strategy_names():  # every strategy, every point of its knob sweep
        knob = strategy_spec(name).knob
        assert [r["knob_value"] for r in rows if r["strategy"] == name] == (list(knob.sweep) if knob else [None])
    for row in rows:
        assert row["latency_ms"] > 0 and row["gflops"] > 0 and 0 <= row["miou"] <= 100
        dominated = any(o["latency_ms"] <= row["latency_ms"] and o["miou"] >= row["miou"] and o is not row
                        and (o["latency_ms"], o["miou"]) != (row["latency_ms"], row["miou"]) for o in rows)
        assert row["pareto"] == (not dominated)
    assert {v["strategy"] for v in report["clustvit_vs_others"]} == set(strategy_names()) - {"clustvit", "none"}
    # The no-op ends cost the plain ViT's FLOPs; merging costs fewer.
    plain = next(r for r in rows if r["strategy"] == "none")["gflops"]
    assert next(r for r in rows if r["strategy"] == "clustvit" and r["knob_value"] == 1.0)["gflops"] == \
        pytest.approx(plain, rel=1e-6)
    assert min(r["gflops"] for r in rows if r["strategy"] == "clustvit") < plain
    assert "| strategy | knob | mIoU |" in report["table"]
    assert plot.stat().st_size > 10_000
