"""``clustvit bench``: merged vs unmerged on the same weights, batch 1, real images.

Method: every image is prepared once (normalised, padded); after a warm-up the
arms run interleaved (A B C, then C B A, ...) so the machine's drift cancels in
their ratio; latencies are medians over images x repeats. GFLOPs count matrix
multiplies, convolutions and attention at 2 FLOPs per multiply-add
(torch.utils.flop_counter), over the whole model: embedding, blocks,
clustering, regeneration, head and upsampling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .data import open_dataset, to_tensor
from .engine import class_indices, resolve_device
from .metrics import ConfusionMatrix
from .model import (ClusterMerging, ClustViT, ModelConfig, NoReduction, build_model, load_checkpoint,
                    pseudo_cluster_targets)
from .model.reduction import TokenReduction

DEFAULT_BACKBONE = "weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
SWEEP_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


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
    oracle_clusters: bool = False
    clusters: int = 3
    injection_point: int = 4
    head: str = "segmenter"
    init_backbone: Optional[str] = None
    sweep_threshold: bool = False
    plot: Optional[str] = None
    threads: Optional[int] = None
    void_label: Optional[int] = None


@dataclass
class Sample:
    image: torch.Tensor  # (1, 3, H, W) normalised, on the device
    mask: torch.Tensor  # (H, W) int64, on the CPU
    oracle: Optional[torch.Tensor]  # (1, N) pseudo-cluster targets


def find_shared_backbone() -> Path:
    """The offline ViT-Ti weights in ../shared, looked up from the cwd and the repository."""
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd() / ".." / "shared", here / ".." / "shared", Path.cwd() / "shared"):
        candidate = base / DEFAULT_BACKBONE
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no --model given and ../shared/{DEFAULT_BACKBONE} not found: "
                            "pass --model or --init-backbone")


def _load_model(settings: BenchSettings, num_classes: int, class_names, palette, ignore: int) -> ClustViT:
    if settings.model:
        return load_checkpoint(settings.model)
    backbone = settings.init_backbone or find_shared_backbone()
    config = ModelConfig.for_dataset(class_names, palette, clusters=settings.clusters,
                                     injection_point=settings.injection_point, head=settings.head,
                                     ignore_index=ignore)
    torch.manual_seed(0)  # untrained head and cluster module: reproducible
    return build_model(config, backbone).eval()


def _prepare(settings: BenchSettings, model: ClustViT, device: torch.device, dtype) -> list[Sample]:
    data = open_dataset(settings.data, settings.split, settings.void_label).subset(settings.limit)
    samples = []
    for index in range(len(data)):
        rgb, mask = data.load(index)
        if settings.height or settings.width:
            size = (settings.width or rgb.shape[1], settings.height or rgb.shape[0])
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST).astype(np.int64)
        image = to_tensor(rgb, model.config.mean, model.config.std).unsqueeze(0)
        height, width = model.padded_size(*image.shape[-2:])
        image = F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
        oracle = None
        if settings.oracle_clusters:
            if model.config.clusters == 0:
                raise ValueError("--oracle-clusters needs a model with a cluster module (clusters > 0)")
            oracle = pseudo_cluster_targets(torch.from_numpy(mask)[None], model.config.clusters,
                                            model.patch_size, data.ignore_index).to(device)
        samples.append(Sample(image.to(device, dtype), torch.from_numpy(mask), oracle))
    if not samples:
        raise ValueError(f"{settings.data}: no images in split {settings.split!r}")
    return samples


def timm_reference_forward(model: ClustViT, images: torch.Tensor) -> torch.Tensor:
    """The plain timm path (timm's own forward_features) + the same head: overhead reference."""
    features = model.backbone.forward_features(images)[:, model.backbone.num_prefix_tokens:]
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    logits = model.forward_head(features, grid)
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def count_gflops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
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


def _merged_strategy(model: ClustViT, sample: Sample, threshold: Optional[float]) -> TokenReduction:
    if model.config.clusters == 0:
        raise ValueError("this model has no cluster module: nothing to merge")
    if threshold is None:
        threshold = model.config.default_merge_threshold
    return ClusterMerging(threshold, assignment=sample.oracle)


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


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    data_info = open_dataset(settings.data, settings.split, settings.void_label)
    model = _load_model(settings, len(data_info.class_names), data_info.class_names, data_info.palette,
                        data_info.ignore_index).to(device)
    dtype = torch.float32
    samples = _prepare(settings, model, device, dtype)
    timer = Timer(device)
    unmerged = NoReduction()

    def run(strategy_for: Callable[[Sample], TokenReduction]):
        return lambda sample: model(sample.image, strategy_for(sample))

    merged_arm = run(lambda s: _merged_strategy(model, s, settings.merge_threshold))
    unmerged_arm = run(lambda s: unmerged)
    reference_arm = lambda s: timm_reference_forward(model, s.image)  # noqa: E731
    arms = {"merged": merged_arm, "unmerged": unmerged_arm, "timm_reference": reference_arm}

    with torch.inference_mode():
        log(f"bench: {len(samples)} images {tuple(samples[0].image.shape[-2:])} on {device}, "
            f"{settings.repeats} repeats, warm-up {settings.warmup}")
        for _ in range(settings.warmup):
            for arm in arms.values():
                arm(samples[0])
        times = _interleaved(arms, samples, settings.repeats, timer)
        stats = [model(s.image, _merged_strategy(model, s, settings.merge_threshold)).stats for s in samples]
    # FLOP counting cannot run under inference_mode (it dispatches through a mode stack).
    with torch.no_grad():
        gflops_merged = float(np.mean([count_gflops(lambda: merged_arm(s)) for s in samples]))
        gflops_unmerged = float(np.mean([count_gflops(lambda: unmerged_arm(s)) for s in samples]))

    median = {name: float(np.median(values)) for name, values in times.items()}
    tokens_in = sum(s.tokens_in for s in stats)
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
        "oracle_clusters": settings.oracle_clusters,
        "merge_threshold": (settings.merge_threshold if settings.merge_threshold is not None
                            else model.config.default_merge_threshold),
        "model": settings.model or "untrained ClustViT (backbone from shared weights)",
        "torch_threads": torch.get_num_threads(),
        "flop_convention": "2 FLOPs per multiply-add; matmul, convolution and attention",
    }
    if settings.sweep_threshold:
        result["sweep"] = threshold_sweep(model, samples, settings, timer, data_info, log)
    return result


def threshold_sweep(model: ClustViT, samples: list[Sample], settings: BenchSettings, timer: Timer,
                    data_info, log: Callable[[str], None]) -> list[dict]:
    """Latency (interleaved with the unmerged arm), GFLOPs, tokens and mIoU per threshold."""
    if settings.oracle_clusters:
        raise ValueError("--sweep-threshold measures the learned clustering; drop --oracle-clusters")
    rows = []
    unmerged = NoReduction()
    for threshold in SWEEP_THRESHOLDS:
        strategy = ClusterMerging(threshold)
        arms = {"merged": lambda s: model(s.image, strategy), "unmerged": lambda s: model(s.image, unmerged)}
        confusion = ConfusionMatrix(model.config.num_classes, data_info.ignore_index)
        merged_tokens = tokens_in = 0
        with torch.inference_mode():
            times = _interleaved(arms, samples, settings.repeats, timer)
            for sample in samples:
                output = model(sample.image, strategy)
                height, width = sample.mask.shape
                confusion.update(class_indices(output.logits[0, :, :height, :width]).cpu(), sample.mask)
                merged_tokens += output.stats.merged_tokens[0]
                tokens_in += output.stats.tokens_in
        with torch.no_grad():
            gflops = float(np.mean([count_gflops(lambda: model(s.image, strategy)) for s in samples]))
        merged_ms, unmerged_ms = float(np.median(times["merged"])), float(np.median(times["unmerged"]))
        row = {"merge_threshold": threshold, "miou": 100.0 * confusion.miou(),
               "merged_fraction": merged_tokens / tokens_in, "gflops": gflops,
               "latency_ms": merged_ms, "latency_ratio": unmerged_ms / merged_ms}
        rows.append(row)
        log("sweep: threshold {merge_threshold:.2f} mIoU {miou:.2f} merged {merged_fraction:.3f} "
            "GFLOPs {gflops:.2f} latency ratio {latency_ratio:.3f}".format(**row))
    plot_sweep(rows, Path(settings.plot or "clustvit_sweep.png"), settings.model or "untrained")
    return rows


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    thresholds = [r["merge_threshold"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(thresholds, [r["miou"] for r in rows], "o-", color="tab:blue", label="mIoU (%)")
    left.set_xlabel("merge threshold")
    left.set_ylabel("mIoU (%)", color="tab:blue")
    twin = left.twinx()
    twin.plot(thresholds, [r["merged_fraction"] for r in rows], "s--", color="tab:orange")
    twin.set_ylabel("merged fraction", color="tab:orange")
    left.set_title("accuracy and merging")
    right.plot(thresholds, [r["latency_ratio"] for r in rows], "o-", color="tab:green", label="latency")
    gflops_unmerged = rows[-1]["gflops"]
    right.plot(thresholds, [gflops_unmerged / r["gflops"] for r in rows], "s--", color="tab:red",
               label="GFLOPs")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xlabel("merge threshold")
    right.set_ylabel("speed-up vs unmerged (x)")
    right.legend()
    right.set_title("speed-up (CPU, batch 1)")
    figure.suptitle(f"ClustViT threshold sweep: {Path(title).name}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"

