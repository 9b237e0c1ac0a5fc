"""The ``clustvit`` command: train, eval, bench, export. A thin layer over the library.

JSON output keys are a contract other tools rely on (see README).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..inference.devices import PRECISIONS
from ..model.checkpoint import CheckpointError
from .arguments import add_cluster_floors, add_frame_selection, at_least_one
from .bench import BenchSettings as BENCH
from .data import DatasetError
from .train import TrainSettings as TRAIN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clustvit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    _add_train(commands)
    _add_eval(commands)
    _add_bench(commands)
    _add_export(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a model (resumable; keeps the best checkpoint)")
    train.add_argument("--data", required=True, help="dataset root (CamVid or images/ + masks/ layout)")
    train.add_argument("--out", required=True, help="best checkpoint (.safetensors)")
    train.add_argument("--init-backbone", help="timm ViT safetensors to initialise the backbone from")
    train.add_argument("--init-from", help="our trained checkpoint to fine-tune: backbone and decode head "
                       "are loaded, the cluster head and regenerator start fresh (k and ip may differ)")
    train.add_argument("--keep-cluster-module", action="store_true",
                       help="with --init-from: load its cluster head and regenerator too (same k and ip)")
    train.add_argument("--train-merge-threshold", type=float,
                       help="merge rule while training: merge when the best cluster's probability reaches "
                            "this (default: the paper's argmax rule)")
    train.add_argument("--distill-from", help="trained checkpoint (same classes) whose unmerged predictions "
                       "the model is distilled towards, e.g. the plain ViT")
    train.add_argument("--distill-weight", type=float, default=TRAIN.distill_weight,
                       help="weight of the distillation KL term")
    train.add_argument("--arch", default=TRAIN.arch)
    train.add_argument("--clusters", type=int, default=TRAIN.clusters,
                       help="k; 0 trains the plain ViT (no merging)")
    train.add_argument("--injection-point", type=int, default=TRAIN.injection_point,
                       help="block before which tokens merge")
    train.add_argument("--head", choices=("segmenter", "linear"), default=TRAIN.head)
    # --no-head-on-merged exists so that a script's later option can undo a recipe's earlier one.
    train.add_argument("--head-on-merged", action=argparse.BooleanOptionalAction, default=TRAIN.head_on_merged,
                       help="run the Segmenter decoder on the merged sequence and regenerate its output "
                            "(merging then saves in the head too)")
    train.add_argument("--epochs", type=at_least_one, default=TRAIN.epochs)
    train.add_argument("--batch-size", type=at_least_one, default=TRAIN.batch_size)
    train.add_argument("--lr", type=float, default=TRAIN.lr)
    train.add_argument("--warmup-steps", type=int, default=TRAIN.warmup_steps,
                       help="linear LR warm-up before the cosine decay")
    train.add_argument("--layer-decay", type=float, default=TRAIN.layer_decay)
    train.add_argument("--cluster-loss-weight", type=float, default=TRAIN.cluster_loss_weight)
    train.add_argument("--cluster-warmup-epochs", type=int, default=TRAIN.cluster_warmup_epochs)
    train.add_argument("--cluster-classes", nargs="+", default=list(TRAIN.cluster_classes), metavar="CLASS",
                       help="k class names: cluster i always gathers the i-th class's tokens (default: each "
                            "image's k most frequent classes, by rank)")
    train.add_argument("--class-weighting", choices=("none", "sqrt-inverse"), default=TRAIN.class_weighting)
    train.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=TRAIN.input_size)
    train.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), default=TRAIN.crop_size)
    train.add_argument("--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=TRAIN.scale_range)
    train.add_argument("--void-label", type=int, help="ignored label (default: 11 for CamVid, else 255)")
    add_frame_selection(train, "train", "train", "training frames")
    add_frame_selection(train, "val", "val", "validation frames ('none': no validation, keep the last epoch)")
    train.add_argument("--val-limit", type=at_least_one,
                       help="validate on N images spread evenly over the validation frames")
    train.add_argument("--val-every", type=at_least_one, default=TRAIN.val_every,
                       help="validate every N epochs (and the last)")
    _add_train_recipe(train)


def _add_train_recipe(train) -> None:
    """The domain-shift recipe's options: augmentation, sampling, weight averaging, regularisation."""
    train.add_argument("--augment", choices=("basic", "domain-shift"), default=TRAIN.augment,
                       help="photometric augmentation: basic = colour jitter; domain-shift = also hue, gamma, "
                            "blur, noise and JPEG artefacts")
    train.add_argument("--rare-class-temperature", type=float, default=TRAIN.rare_class_temperature,
                       help="rare-class sampling: draw images by class with p ~ exp((1 - pixel share) / T) "
                            "and crop around that class (0 = off; 0.1 favours thin classes)")
    train.add_argument("--ema-decay", type=float, default=TRAIN.ema_decay,
                       help="keep an exponential moving average of the weights (e.g. 0.999); it is what is "
                            "validated and saved (0 = off)")
    train.add_argument("--keep", choices=("best", "last"), default=TRAIN.keep,
                       help="checkpoint to keep in --out: the best validation epoch, or the last")
    train.add_argument("--weight-decay", type=float, default=TRAIN.weight_decay)
    train.add_argument("--drop-path", type=float, default=TRAIN.drop_path, help="stochastic depth rate")
    train.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=TRAIN.precision,
                       help="bf16: autocast on CUDA, or on a CPU with bf16 matrix units (AVX512-BF16/AMX), "
                            "where it is about 1.5x faster; fp16: autocast on CUDA only")
    train.add_argument("--workers", type=int, default=TRAIN.workers)
    train.add_argument("--seed", type=int, default=TRAIN.seed)
    train.add_argument("--device", default=TRAIN.device)
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="accuracy and token statistics on a split")
    _add_model_args(evaluate)
    evaluate.add_argument("--data", required=True)
    add_frame_selection(evaluate, "val")
    evaluate.add_argument("--merge-threshold", type=float, help="ClustViT's knob (the same as --knob for clustvit)")
    add_cluster_floors(evaluate, "measure with these floors")
    evaluate.add_argument("--merge-rule", choices=("threshold", "argmax"), default="threshold",
                          help="argmax: the paper's decision (most probable of keep + k clusters), no threshold")
    evaluate.add_argument("--strategy", help="token reduction (default: the model's: clustvit, or none)")
    evaluate.add_argument("--knob", type=float, help="the strategy's knob (clustvit: the merge threshold)")
    evaluate.add_argument("--inference-size", type=int, help="long side the image is scaled to")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="fp32, bf16, fp16 (CUDA), or auto (the node's choice for this device)")
    evaluate.add_argument("--limit", type=at_least_one,
                          help="N images spread evenly over the selection, the first included (default: all)")
    evaluate.add_argument("--void-label", type=int)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="latency and GFLOPs, merging on vs off, batch 1")
    bench.add_argument("--model", help="checkpoint; omitted: untrained ViT-Ti ClustViT from "
                                       "../shared/weights (use with --oracle-clusters)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--data", required=True)
    add_frame_selection(bench, "val")
    bench.add_argument("--limit", type=at_least_one, default=BENCH.limit,
                       help="images timed, spread evenly over the selection (a video: over its length)")
    bench.add_argument("--repeats", type=at_least_one, default=BENCH.repeats, help="timed runs per image and arm")
    bench.add_argument("--warmup", type=int, default=BENCH.warmup)
    bench.add_argument("--height", type=int)
    bench.add_argument("--width", type=int)
    bench.add_argument("--merge-threshold", type=float, help="ClustViT's knob (the same as --knob for clustvit)")
    add_cluster_floors(bench, "measure with these floors")
    bench.add_argument("--strategy", default="clustvit",
                       help="token reduction to measure against the plain ViT, or 'all' for the comparison table")
    bench.add_argument("--knob", type=float, help="the strategy's knob (clustvit: the merge threshold)")
    bench.add_argument("--sweep", action="store_true", help="sweep the strategy's knob (speed and accuracy)")
    bench.add_argument("--eval-limit", type=at_least_one, help="images for the mIoU of sweeps (default: the split)")
    bench.add_argument("--oracle-clusters", action="store_true",
                       help="merge decisions from the ground-truth pseudo clusters")
    bench.add_argument("--clusters", type=int, default=BENCH.clusters, help="k of the untrained model (no --model)")
    bench.add_argument("--injection-point", type=int, default=BENCH.injection_point, help="ip of the untrained model")
    bench.add_argument("--head", choices=("segmenter", "linear"), default=BENCH.head)
    bench.add_argument("--init-backbone", help="backbone of the untrained model (default ../shared/weights/...)")
    bench.add_argument("--sweep-threshold", action="store_true",
                       help="speed and accuracy against the threshold, printed and plotted (PNG)")
    bench.add_argument("--sweep-points", type=float, nargs="+", metavar="V",
                       help="the knob values a sweep measures (default: the strategy's own points)")
    bench.add_argument("--plot", help="PNG for sweeps and --strategy all (default <strategy>_sweep.png, "
                                      "strategies.png)")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="dtype of the measured arms: fp32, bf16, fp16 (CUDA), or auto")
    bench.add_argument("--void-label", type=int)
    bench.add_argument("--unlabelled", action="store_true",
                       help="DATA is a folder of images or a video without labels (e.g. the robot's own "
                            "footage): speed and merging there, no mIoU")
    bench.add_argument("--json", action="store_true")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="rewrite a checkpoint (fp16, metadata) for deployment")
    export.add_argument("--model", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--half", action="store_true", help="store weights in fp16 (loaded as fp32 on CPU)")
    export.add_argument("--merge-threshold", type=float, help="new default merge threshold")
    add_cluster_floors(export, "new floors (all 0 removes them)")
    export.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="new inference size")
    export.add_argument("--info", help="JSON file merged into the checkpoint's metadata")
    export.add_argument("--last-epoch", action="store_true",
                        help="the run's last epoch (from its .train-state file) instead of its best")

def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.safetensors)")
    parser.add_argument("--device", default="auto")


def json_safe(value):
    """NaN and infinities (an IoU with no pixels, say) as null: the output stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(json_safe(result), indent=2, sort_keys=True, allow_nan=False))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, item in value.items():
                print(f"  {name}: {_fmt(item)}")
        else:
            print(f"{key}: {_fmt(value)}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TRAIN) if hasattr(args, f.name)}
    for name in ("input_size", "crop_size", "scale_range", "train_include", "train_exclude", "val_include",
                 "val_exclude", "cluster_classes"):
        values[name] = tuple(values[name])
    if values["val_split"].lower() == "none":
        values["val_split"] = None
    settings = TRAIN(**values)
    best = train(settings, resume=args.resume, log=lambda line: print(line, flush=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    print(json.dumps(json_safe({"best_epoch": best.get("epoch"), "kept": args.keep, "miou": best.get("miou"),
                                "merged_fraction": best.get("merged_fraction"), "out": args.out})))
    return 0


def knob_argument(args: argparse.Namespace, strategy: str) -> Optional[float]:
    """The knob value asked for: ``--knob``, or ``--merge-threshold`` (ClustViT's knob by its own name)."""
    if args.merge_threshold is None:
        return args.knob
    if strategy != "clustvit":
        raise ValueError(f"--merge-threshold is ClustViT's knob; strategy {strategy!r} takes --knob")
    if args.knob is not None and args.knob != args.merge_threshold:
        raise ValueError("--knob and --merge-threshold name the same knob: give one")
    return args.merge_threshold


def cmd_eval(args: argparse.Namespace) -> int:
    from ..inference.engine import SegmentationEngine
    from ..model import ClusterMerging
    from .data import open_dataset
    from .evaluate import evaluate
    engine = SegmentationEngine.from_checkpoint(args.model, args.device, precision=args.precision,
                                                inference_size=args.inference_size)
    if args.strategy:
        engine.use_strategy(args.strategy)
    knob = knob_argument(args, engine.strategy.name)
    if knob is not None:
        engine.knob_value = knob
    if args.cluster_floors is not None:
        engine.model.config.set_cluster_floors(args.cluster_floors)
    if args.merge_rule == "argmax":
        if engine.strategy.name != "clustvit":
            raise ValueError("--merge-rule argmax is ClustViT's rule; the strategy is " + engine.strategy.name)
        engine.reduction = ClusterMerging(None)
    data = open_dataset(args.data, args.split, args.void_label, args.include, args.exclude,
                        args.frame_list).spread(args.limit)
    result = evaluate(engine, data, progress=not args.json)
    result["precision"] = engine.precision.name
    _print(result, args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run_bench
    settings = BenchSettings(**{k: v for k, v in vars(args).items()
                                if k in BenchSettings.__dataclass_fields__})
    result = run_bench(settings, log=(lambda line: print(line, file=sys.stderr, flush=True)))
    if not args.json and "table" in result:
        print(result.pop("table"))
    _print(result, args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..model import load_checkpoint, save_checkpoint
    model = load_checkpoint(args.model)
    extra = dict(model.checkpoint_info)
    if args.last_epoch:
        from .train import load_last_epoch
        run = load_last_epoch(model, args.model)
        extra.pop("val_metrics", None)  # they were the best epoch's
        extra["exported_epoch"] = run["epoch"] + 1
    if args.merge_threshold is not None:
        from ..model.reduction import strategy_spec
        model.config.default_merge_threshold = strategy_spec("clustvit").knob.validate(args.merge_threshold)
    if args.cluster_floors is not None:
        model.config.set_cluster_floors(args.cluster_floors)
    if args.input_size:
        model.config.input_size = tuple(args.input_size)
    if args.info:
        extra.update(json.loads(Path(args.info).read_text()))
    model.config.validate()
    save_checkpoint(model, args.out, half=args.half, extra=extra)
    print(args.out)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "export": cmd_export}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CheckpointError as exc:  # a bad model file: exit 1, as the node does
        print(f"clustvit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (DatasetError, ValueError, FileNotFoundError) as exc:  # other user mistakes (data, options)
        print(f"clustvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clustvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
