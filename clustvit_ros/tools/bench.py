"""``clustvit bench``: merged vs unmerged on the same weights, batch 1, real images.

Method: every image is prepared once (normalised, padded); after a warm-up the
arms run interleaved (A B C, then C B A, ...) so the machine's drift cancels in
their ratio; latencies are medians over images x repeats. GFLOPs count matrix
multiplies, convolutions and attention at 2 FLOPs per multiply-add
(torch.utils.flop_counter), over the whole model: embedding, blocks,
clustering, regeneration, head and upsampling.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from .data import open_dataset, to_tensor
from .unlabelled import open_unlabelled
from ..inference.devices import resolve_device, resolve_precision
from ..inference.engine import class_indices, inference_shape
from .metrics import ConfusionMatrix
from ..model import (ClusterMerging, ClustViT, ModelConfig, NoReduction, build_model, load_checkpoint,
                    pseudo_cluster_targets)
from ..model.heads import upsample_bilinear
from ..model.reduction import TokenReduction, make_strategy, strategy_names, strategy_spec

DEFAULT_BACKBONE = "weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
FLOP_CONVENTION = "2 FLOPs per multiply-add; matmul, convolution and attention (torch.utils.flop_counter)"


@dataclass
class BenchSettings:
    data: str
    model: Optional[str] = None
    device: str = "auto"
    split: str = "val"
    limit: int = 20
    repeats: int = 3
    warmup: int = 5
    height: Optional[int] = None
    width: Optional[int] = None
    merge_threshold: Optional[float] = None
    cluster_floors: Optional[tuple[float, ...]] = None  # None: the model's (ModelConfig.cluster_floors)
    oracle_clusters: bool = False
    # The untrained model (no --model) is built with the model's defaults.
    clusters: int = ModelConfig.clusters
    injection_point: int = ModelConfig.injection_point
    head: str = ModelConfig.head
    init_backbone: Optional[str] = None
    strategy: str = "clustvit"
    knob: Optional[float] = None
    sweep: bool = False
    sweep_threshold: bool = False
    # The knob values a sweep measures (None: the strategy's own sweep points).
    sweep_points: Optional[tuple[float, ...]] = None
    eval_limit: Optional[int] = None
    plot: Optional[str] = None
    threads: Optional[int] = None
    void_label: Optional[int] = None
    precision: str = "fp32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    frame_list: Optional[str] = None
    unlabelled: bool = False  # data is a folder of images or a video: speed and merging only


@dataclass
class Sample:
    image: torch.Tensor  # (1, 3, H, W) normalised, padded to the patch size, on the device
    mask: torch.Tensor  # (h, w) int64 at the label's resolution, on the CPU
    oracle: Optional[torch.Tensor]  # (1, N) pseudo-cluster targets
    network_shape: tuple[int, int] = (0, 0)  # the image before padding
    name: str = ""  # the image file (a video's frame: <video stem>_<frame index>.png), for the record

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices at the label's resolution (as the engine returns them)."""
        height, width = self.network_shape
        logits = logits[:, :, :height, :width]
        if (height, width) != tuple(self.mask.shape):
            logits = F.interpolate(logits.float(), size=tuple(self.mask.shape), mode="bilinear",
                                   align_corners=False)
        return class_indices(logits[0]).cpu()


def _frames(settings: BenchSettings):
    if settings.unlabelled:
        return open_unlabelled(settings.data, settings.include, settings.exclude, settings.frame_list,
                               max_frames=settings.limit)  # a video's frames spread over all of it
    return open_dataset(settings.data, settings.split, settings.void_label, settings.include, settings.exclude,
                        settings.frame_list)


def find_shared_backbone(data_dir: Optional[str] = None) -> Path:
    """The offline ViT-Ti weights in shared/: $CLUSTVIT_SHARED, beside the dataset, the cwd or the repo."""
    here = Path(__file__).resolve().parents[2]
    bases = [Path(os.environ["CLUSTVIT_SHARED"])] if os.environ.get("CLUSTVIT_SHARED") else []
    if data_dir:  # shared/datasets/camvid -> shared
        bases.append(Path(data_dir).resolve().parent.parent)
    bases += [Path.cwd() / ".." / "shared", here / ".." / "shared", Path.cwd() / "shared"]
    for base in bases:
        candidate = base / DEFAULT_BACKBONE
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no --model given and ../shared/{DEFAULT_BACKBONE} not found: "
                            "pass --model or --init-backbone")


def _load_model(settings: BenchSettings, num_classes: int, class_names, palette, ignore: int) -> ClustViT:
    if settings.model:
        return load_checkpoint(settings.model)
    backbone = settings.init_backbone or find_shared_backbone(settings.data)
    config = ModelConfig.for_dataset(class_names, palette, clusters=settings.clusters,
                                     injection_point=settings.injection_point, head=settings.head,
                                     ignore_index=ignore)
    torch.manual_seed(0)  # untrained head and cluster module: reproducible
    return build_model(config, backbone).eval()


def _resize(rgb: np.ndarray, mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear) and labels (nearest) to (height, width)."""
    size = (shape[1], shape[0])
    return (cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST).astype(np.int64))


def _prepare(settings: BenchSettings, model: ClustViT, device: torch.device, dtype,
             data=None) -> list[Sample]:
    """The frames as network inputs; ``data`` is the already opened selection (a video decodes once)."""
    data = (data if data is not None else _frames(settings)).spread(settings.limit)
    samples = []
    for index in range(len(data)):
        rgb, mask = data.load(index)
        if settings.height or settings.width:
            # An explicit size replaces the image (labels too) and is what the network sees.
            rgb, mask = _resize(rgb, mask, (settings.height or rgb.shape[0], settings.width or rgb.shape[1]))
            network_shape = rgb.shape[:2]
        else:
            # The checkpoint's inference size, as the engine and node use it; accuracy is
            # still scored against the labels at their own resolution.
            network_shape = inference_shape(*rgb.shape[:2], max(model.config.input_size))
        network_mask = mask
        if network_shape != rgb.shape[:2]:
            rgb, network_mask = _resize(rgb, mask, network_shape)
        image = to_tensor(rgb, model.config.mean, model.config.std).unsqueeze(0)
        height, width = model.padded_size(*image.shape[-2:])
        image = F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
        oracle = None
        if settings.oracle_clusters:
            if model.config.clusters == 0:
                raise ValueError("--oracle-clusters needs a model with a cluster module (clusters > 0)")
            oracle = pseudo_cluster_targets(torch.from_numpy(network_mask)[None], model.config.clusters,
                                            model.patch_size, data.ignore_index, _trained_cluster_classes(model)
                                            ).to(device)
        samples.append(Sample(image.to(device, dtype), torch.from_numpy(mask), oracle, network_shape,
                              data.images[index].name))
    if not samples:
        raise ValueError(f"{settings.data}: no images in split {settings.split!r}")
    return samples


def _trained_cluster_classes(model: ClustViT) -> tuple[int, ...]:
    """The fixed cluster classes the model trained with (the oracle's targets then), or () for per-image ranks."""
    from .train import cluster_class_ids  # training's own name check, not a second copy of it
    settings = (getattr(model, "checkpoint_info", None) or {}).get("training", {}).get("settings", {})
    return cluster_class_ids(model.config, tuple(settings.get("cluster_classes") or ()))


def timm_reference_forward(model: ClustViT, images: torch.Tensor) -> torch.Tensor:
    """The plain timm path (timm's own forward_features) + the same head: overhead reference."""
    features = model.backbone.forward_features(images)[:, model.backbone.num_prefix_tokens:]
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    logits = model.forward_head(features, grid)
    return upsample_bilinear(logits, tuple(images.shape[-2:]))


def _fused_cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, made to count fused CPU attention where it does not (torch < 2.15).

    Without this the plain ViT's attention (fused kernel) would count 0 FLOPs on those
    versions while a strategy's explicit attention matmuls count in full.
    """
    extra = {}
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is not None and fused not in flop_registry:
        extra[fused] = _fused_cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def count_gflops(fn: Callable[[], object]) -> float:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops() / 1e9


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1e3 * (time.perf_counter() - start)


def _interleaved(arms: dict[str, Callable[[Sample], object]], samples: list[Sample], repeats: int,
                 timer: Timer) -> dict[str, list[float]]:
    """Time each arm on each sample, alternating the arm order every round."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for round_index in range(repeats):
        for sample in samples:
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(timer(lambda: arms[name](sample)))
            names = names[1:] + names[:1]  # rotate which arm goes first
    return times


def _strategy(model: ClustViT, name: str, knob: Optional[float], sample: Sample) -> TokenReduction:
    """The strategy under test for one sample (ClustViT may take its decisions from the oracle)."""
    if strategy_spec(name).needs_cluster_module and model.config.clusters == 0:
        raise ValueError(f"this model has no cluster module: nothing to merge with {name!r}")
    strategy = make_strategy(name, knob, model)  # the knob's default: the model's own for ClustViT
    if isinstance(strategy, ClusterMerging):
        strategy.assignment = sample.oracle
    return strategy


def _load_accuracy_samples(settings: BenchSettings, model: ClustViT, device, dtype) -> list[Sample]:
    """Images for the mIoU of sweeps: --eval-limit of the split (all by default)."""
    accuracy = BenchSettings(**{**settings.__dict__, "limit": settings.eval_limit or 10 ** 9,
                                "oracle_clusters": False})
    return _prepare(accuracy, model, device, dtype)


def measure_setting(model: ClustViT, make: Callable[[Sample], TokenReduction], latency_samples: list[Sample],
                    accuracy_samples: list[Sample], repeats: int, timer: Timer, ignore_index: int) -> dict:
    """One strategy setting: latency interleaved with the plain ViT, GFLOPs, tokens, mIoU."""
    unmerged = NoReduction()
    arms = {"strategy": lambda s: model(s.image, make(s)), "none": lambda s: model(s.image, unmerged)}
    confusion = ConfusionMatrix(model.config.num_classes, ignore_index)
    merged_tokens = tokens_in = tokens_after = 0
    with torch.inference_mode():
        times = _interleaved(arms, latency_samples, repeats, timer)
        for sample in accuracy_samples:
            output = model(sample.image, make(sample))
            confusion.update(sample.labels(output.logits), sample.mask)
            merged_tokens += output.stats.merged_tokens[0]
            tokens_in += output.stats.tokens_in
            tokens_after += output.stats.tokens_after[0]
    with torch.no_grad():
        gflops = float(np.mean([count_gflops(lambda: arms["strategy"](s)) for s in latency_samples]))
    latency, plain = float(np.median(times["strategy"])), float(np.median(times["none"]))
    return {"miou": 100.0 * confusion.miou(), "latency_ms": latency, "latency_ratio": plain / latency,
            "gflops": gflops, "mean_tokens_after_merge": tokens_after / len(accuracy_samples),
            "merged_fraction": merged_tokens / tokens_in}


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.unlabelled and (settings.sweep or settings.sweep_threshold or settings.strategy == "all"
                                or settings.oracle_clusters):
        raise ValueError("--unlabelled measures speed and merging at one setting: sweeps, --strategy all "
                         "and --oracle-clusters need labels")
    device = resolve_device(settings.device)
    data_info = _frames(settings)
    model = _load_model(settings, len(data_info.class_names), data_info.class_names, data_info.palette,
                        data_info.ignore_index)
    if settings.cluster_floors is not None:
        model.config.set_cluster_floors(settings.cluster_floors)
    precision = resolve_precision(settings.precision, device)
    dtype = precision.dtype
    model = model.to(device, dtype)
    samples = _prepare(settings, model, device, dtype, data_info)
    timer = Timer(device)
    if settings.strategy == "all":
        return compare_strategies(model, samples, settings, timer, data_info, device, log)
    name = settings.strategy
    strategy_spec(name)  # unknown names fail here, with the list of known ones
    if settings.oracle_clusters and name != "clustvit":
        raise ValueError("--oracle-clusters applies to the clustvit strategy only")
    if settings.merge_threshold is not None and name != "clustvit":
        raise ValueError(f"--merge-threshold is ClustViT's knob; strategy {name!r} takes --knob")
    knob = settings.knob if settings.knob is not None else settings.merge_threshold
    result = merged_vs_unmerged(model, name, knob, samples, settings, timer, device, log)
    result["precision"] = precision.name
    result["frames"] = {**frame_selection(settings), "timed": [sample.name for sample in samples]}
    if settings.sweep or settings.sweep_threshold:
        if settings.oracle_clusters:
            raise ValueError("a sweep measures the learned decisions; drop --oracle-clusters")
        result["sweep"] = knob_sweep(model, name, samples, settings, timer, data_info, device, log)
    return result


def frame_selection(settings: BenchSettings) -> dict:
    """Which frames were measured, as the command named them: a result file says what it is of
    (a held-out drive's sweep names its drive; tools/folds.py reports them)."""
    return {"data": str(settings.data), "split": None if settings.unlabelled else settings.split,
            "include": list(settings.include), "exclude": list(settings.exclude),
            "list": settings.frame_list, "limit": settings.limit, "eval_limit": settings.eval_limit}


def merged_vs_unmerged(model: ClustViT, name: str, knob: Optional[float], samples: list[Sample],
                       settings: BenchSettings, timer: Timer, device: torch.device, log) -> dict:
    """The strategy, the plain ViT on the same weights, and timm's own forward: interleaved, with GFLOPs."""
    unmerged = NoReduction()
    merged_arm = lambda s: model(s.image, _strategy(model, name, knob, s))  # noqa: E731
    unmerged_arm = lambda s: model(s.image, unmerged)  # noqa: E731
    reference_arm = lambda s: timm_reference_forward(model, s.image)  # noqa: E731
    arms = {"merged": merged_arm, "unmerged": unmerged_arm, "timm_reference": reference_arm}

    with torch.inference_mode():
        log(f"bench: {name} on {len(samples)} images {tuple(samples[0].image.shape[-2:])} on {device}, "
            f"{settings.repeats} repeats, warm-up {settings.warmup}")
        for _ in range(settings.warmup):
            for arm in arms.values():
                arm(samples[0])
        times = _interleaved(arms, samples, settings.repeats, timer)
        stats = [model(s.image, _strategy(model, name, knob, s)).stats for s in samples]
    # FLOP counting cannot run under inference_mode (it dispatches through a mode stack).
    with torch.no_grad():
        gflops_merged = float(np.mean([count_gflops(lambda: merged_arm(s)) for s in samples]))
        gflops_unmerged = float(np.mean([count_gflops(lambda: unmerged_arm(s)) for s in samples]))

    median = {arm: float(np.median(values)) for arm, values in times.items()}
    tokens_in = sum(s.tokens_in for s in stats)
    described = _strategy(model, name, knob, samples[0]).describe()
    result = {
        "latency_ms_merged": median["merged"],
        "latency_ms_unmerged": median["unmerged"],
        "latency_ratio": median["unmerged"] / median["merged"],
        "latency_ms_timm_reference": median["timm_reference"],
        "overhead_ratio_unmerged_vs_timm": median["unmerged"] / median["timm_reference"],
        "gflops_merged": gflops_merged,
        "gflops_unmerged": gflops_unmerged,
        "gflops_ratio": gflops_unmerged / gflops_merged,
        "mean_tokens_in": tokens_in / len(stats),
        "mean_tokens_after_merge": float(np.mean([s.tokens_after[0] for s in stats])),
        "merged_fraction": sum(s.merged_tokens[0] for s in stats) / tokens_in,
        "device": _device_name(device),
        "images": len(samples),
        "timed_runs_per_arm": len(times["merged"]),
        "input_size": list(samples[0].image.shape[-2:]),
        "strategy": described,
        "oracle_clusters": settings.oracle_clusters,
        "unlabelled": settings.unlabelled,
        "merge_threshold": described.get("threshold"),
        "cluster_floors": list(model.config.cluster_floors),
        "model": settings.model or "untrained ClustViT (backbone from shared weights)",
        "torch_threads": torch.get_num_threads(),
        "flop_convention": FLOP_CONVENTION,
    }
    return result


def knob_sweep(model: ClustViT, name: str, samples: list[Sample], settings: BenchSettings, timer: Timer,
               data_info, device, log: Callable[[str], None]) -> list[dict]:
    """Speed and accuracy of one strategy at each point of its knob's sweep."""
    spec = strategy_spec(name)
    if spec.knob is None:
        raise ValueError(f"strategy {name!r} has no knob to sweep")
    points = spec.knob.sweep if settings.sweep_points is None else sorted(
        {spec.knob.validate(value) for value in settings.sweep_points})
    accuracy_samples = _load_accuracy_samples(settings, model, device, samples[0].image.dtype)
    rows = []
    for value in points:
        row = {"strategy": name, "knob": spec.knob.name, spec.knob.name: value, **measure_setting(
            model, lambda s, v=value: _strategy(model, name, v, s), samples, accuracy_samples,
            settings.repeats, timer, data_info.ignore_index)}
        if name == "clustvit":
            row["merge_threshold"] = value
        rows.append(row)
        log(f"sweep: {name} {spec.knob.name}={value:g} mIoU {row['miou']:.2f} merged {row['merged_fraction']:.3f} "
            f"GFLOPs {row['gflops']:.2f} latency ratio {row['latency_ratio']:.3f}")
    plot_sweep(rows, spec.knob.name, Path(settings.plot or f"{name}_sweep.png"), settings.model or "untrained")
    return rows


def compare_strategies(model: ClustViT, samples: list[Sample], settings: BenchSettings, timer: Timer,
                       data_info, device, log: Callable[[str], None]) -> dict:
    """Every strategy at every point of its knob sweep, on the same weights, images and machine."""
    if settings.oracle_clusters:
        raise ValueError("--strategy all compares learned decisions; drop --oracle-clusters")
    accuracy_samples = _load_accuracy_samples(settings, model, device, samples[0].image.dtype)
    with torch.inference_mode():
        for _ in range(settings.warmup):
            model(samples[0].image, NoReduction())
    rows = []
    for name in strategy_names():
        spec = strategy_spec(name)
        if spec.needs_cluster_module and model.config.clusters == 0:
            log(f"compare: skipping {name} (the model has no cluster module)")
            continue
        for value in (spec.knob.sweep if spec.knob else (None,)):
            measured = measure_setting(model, lambda s, n=name, v=value: _strategy(model, n, v, s), samples,
                                       accuracy_samples, settings.repeats, timer, data_info.ignore_index)
            row = {"strategy": name, "knob": spec.knob.name if spec.knob else None, "knob_value": value,
                   **measured}
            rows.append(row)
            log(f"compare: {name:9s} {row['knob'] or '':9s} {'' if value is None else f'{value:g}':>6}  "
                f"mIoU {row['miou']:6.2f}  {row['latency_ms']:7.1f} ms  x{row['latency_ratio']:.2f}  "
                f"{row['gflops']:6.2f} GFLOPs  tokens {row['mean_tokens_after_merge']:6.1f}")
    # Each setting was timed interleaved with the plain ViT, so its ratio is drift-free while its
    # milliseconds are not: compare settings on one plain-ViT reference divided by each ratio.
    plain_ms = float(np.median([r["latency_ms"] * r["latency_ratio"] for r in rows]))
    for row in rows:
        row["latency_ms_measured"] = row["latency_ms"]
        row["latency_ms"] = plain_ms / row["latency_ratio"]
    for row in rows:
        row["pareto"] = not any(o["latency_ms"] <= row["latency_ms"] and o["miou"] >= row["miou"]
                                and (o["latency_ms"] < row["latency_ms"] or o["miou"] > row["miou"])
                                for o in rows)
    plot_comparison(rows, Path(settings.plot or "strategies.png"), settings.model or "untrained")
    return {"rows": rows, "clustvit_vs_others": clustvit_vs_others(rows), "device": _device_name(device),
            "images_latency": len(samples), "images_accuracy": len(accuracy_samples),
            "repeats": settings.repeats, "input_size": list(samples[0].image.shape[-2:]),
            "model": settings.model or "untrained", "flop_convention": FLOP_CONVENTION,
            "latency_convention": "latency_ms = median plain-ViT latency of the run / the setting's "
                                  "interleaved ratio (raw medians in latency_ms_measured)",
            "table": comparison_table(rows)}


def clustvit_vs_others(rows: list[dict], tolerance: float = 0.5) -> list[dict]:
    """For every other strategy's point: is there a ClustViT point at least as accurate (-0.5 mIoU) and faster?"""
    ours = [r for r in rows if r["strategy"] == "clustvit"]
    verdicts = []
    for row in rows:
        if row["strategy"] in ("clustvit", "none") or not ours:
            continue
        matching = [r for r in ours if r["miou"] >= row["miou"] - tolerance]
        best = min(matching, key=lambda r: r["latency_ms"]) if matching else None
        verdicts.append({
            "strategy": row["strategy"], "knob_value": row["knob_value"], "miou": row["miou"],
            "latency_ms": row["latency_ms"],
            "clustvit_threshold": best["knob_value"] if best else None,
            "clustvit_miou": best["miou"] if best else None,
            "clustvit_latency_ms": best["latency_ms"] if best else None,
            "clustvit_faster": bool(best and best["latency_ms"] < row["latency_ms"]),
        })
    return verdicts


def comparison_table(rows: list[dict]) -> str:
    lines = ["| strategy | knob | mIoU | latency ms | speed-up | GFLOPs | tokens | Pareto |",
             "|---|---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        knob = "" if r["knob"] is None else f"{r['knob']}={r['knob_value']:g}"
        lines.append(f"| {r['strategy']} | {knob} | {r['miou']:.2f} | {r['latency_ms']:.1f} | "
                     f"{r['latency_ratio']:.2f}x | {r['gflops']:.2f} | {r['mean_tokens_after_merge']:.0f} | "
                     f"{'*' if r['pareto'] else ''} |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def plot_comparison(rows: list[dict], path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["latency_ms"])
        axis.plot([p["latency_ms"] for p in points], [p["miou"] for p in points],
                  "*-" if name == "clustvit" else "o-", label=name, markersize=10 if name == "clustvit" else 5)
    axis.set_xlabel("median latency (ms, CPU, batch 1)")
    axis.set_ylabel("mIoU (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"Token reduction on one backbone: {Path(title).name}")
    return _save_figure(figure, path)


def plot_sweep(rows: list[dict], knob: str, path: Path, title: str) -> Path:
    plt = _pyplot()
    values = [r[knob] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(values, [r["miou"] for r in rows], "o-", color="tab:blue")
    left.set_xlabel(knob)
    left.set_ylabel("mIoU (%)", color="tab:blue")
    twin = left.twinx()
    twin.plot(values, [r["merged_fraction"] for r in rows], "s--", color="tab:orange")
    twin.set_ylabel("merged fraction", color="tab:orange")
    left.set_title("accuracy and merging")
    right.plot(values, [r["latency_ratio"] for r in rows], "o-", color="tab:green", label="latency")
    plain_gflops = max(r["gflops"] for r in rows)
    right.plot(values, [plain_gflops / r["gflops"] for r in rows], "s--", color="tab:red", label="GFLOPs")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xlabel(knob)
    right.set_ylabel("speed-up vs plain ViT (x)")
    right.legend()
    right.set_title("speed-up (batch 1)")
    figure.suptitle(f"{rows[0]['strategy']} {knob} sweep: {Path(title).name}")
    return _save_figure(figure, path)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"

