"""Training ClustViT (or the plain ViT, clusters = 0) on a segmentation dataset.

Loss: pixel cross-entropy (void ignored) + ``cluster_loss_weight`` x cluster
cross-entropy against pseudo-cluster targets from the ground truth, and
optionally ``distill_weight`` x the per-pixel KL divergence from a teacher's
predictions (e.g. the plain ViT: merging learns to lose less of it). Merge
decisions follow the paper's argmax rule, or ``train_merge_threshold`` (to
train the later blocks on as much merging as the deployed threshold gives);
during the first ``cluster_warmup_epochs`` they follow the pseudo-cluster
targets instead, so the later blocks are not trained on the random clusters of
an untrained head.

Everything needed to resume (weights, AdamW moments, the weight average,
epoch, history) is saved after every epoch in ``<out stem>.train-state.safetensors``;
``out`` is the best checkpoint by validation mIoU, or (``keep="last"``) the
last epoch's, which is how a model trained on every labelled frame is kept:
no epoch is picked on frames the model trained on.

Frames are chosen by split (several joined by commas), file-name patterns and
list files, so validation can hold out whole drives (``--val-include '0006R0_*'``).

Under ``torchrun --nproc_per_node N`` the same command trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs): the batch size stays the
global one, each process draws its share of the same epoch plan, and only
rank 0 validates and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import AUGMENT_PRESETS, Augment, SegmentationData, TrainingSet, frame_prefix, open_dataset
from .evaluate import evaluate_model
from ..model import (ClusterMerging, ClustViT, ModelConfig, NoReduction, build_model, load_checkpoint,
                    pseudo_cluster_targets, save_checkpoint)
from ..model.checkpoint import CheckpointError, PathLike, make_readable, read_metadata
from ..model.vit import state_dict_mismatch
from ..inference.devices import cpu_bf16_speedup, resolve_device


@dataclass
class TrainSettings:
    data: str
    out: str
    init_backbone: Optional[str] = None
    # A trained checkpoint (ours) to fine-tune: backbone and decode head are
    # loaded; the cluster head and regenerator start fresh, so k and the
    # injection point may differ from the checkpoint's.
    init_from: Optional[str] = None
    # With init_from: load its cluster head and regenerator too (same k and ip),
    # to continue training the whole model rather than a new cluster module.
    keep_cluster_module: bool = False
    # Merge rule while training: None = argmax over keep + k clusters; a value =
    # merge when the best cluster's probability reaches it (as at inference).
    train_merge_threshold: Optional[float] = None
    # A trained checkpoint (same classes and normalisation) whose unmerged
    # predictions the model is distilled towards; weight 0 turns it off.
    distill_from: Optional[str] = None
    distill_weight: float = 1.0
    # The architecture's defaults are the model's own.
    arch: str = ModelConfig.arch
    clusters: int = ModelConfig.clusters
    injection_point: int = ModelConfig.injection_point
    head: str = ModelConfig.head
    # The Segmenter decoder on the merged sequence (ModelConfig.head_on_merged).
    head_on_merged: bool = ModelConfig.head_on_merged
    epochs: int = 80
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.85
    warmup_steps: int = 150
    drop_path: float = 0.1
    cluster_loss_weight: float = 0.1
    cluster_warmup_epochs: int = 2
    # Empty: cluster targets rank each image's classes by frequency (the paper's rule). k class names:
    # cluster i is always the i-th of them (pseudo_cluster_targets' fixed_classes).
    cluster_classes: tuple[str, ...] = ()
    class_weighting: str = "none"  # "none" or "sqrt-inverse" (1/sqrt(pixel frequency))
    input_size: tuple[int, int] = (360, 480)
    crop_size: tuple[int, int] = (352, 480)
    scale_range: tuple[float, float] = (0.75, 1.75)
    void_label: Optional[int] = None
    # Training frames: split(s), then file-stem patterns and an optional list file.
    train_split: str = "train"
    train_include: tuple[str, ...] = ()
    train_exclude: tuple[str, ...] = ()
    train_list: Optional[str] = None
    # Validation frames the same way; val_split None trains without validation.
    val_split: Optional[str] = "val"
    val_include: tuple[str, ...] = ()
    val_exclude: tuple[str, ...] = ()
    val_list: Optional[str] = None
    val_limit: Optional[int] = None
    # Validate every N epochs (and after the last one).
    val_every: int = 1
    # Photometric augmentation preset (data.AUGMENT_PRESETS).
    augment: str = "basic"
    # Rare-class sampling temperature (0 = off): images are drawn by a class,
    # p(c) ~ exp((1 - pixel share of c) / T), and cropped around it.
    rare_class_temperature: float = 0.0
    # Exponential moving average of the weights (0 = off); validated and saved instead of the raw weights.
    ema_decay: float = 0.0
    # "best": keep the epoch with the best validation mIoU; "last": the final epoch.
    keep: str = "best"
    # fp32, or autocast: bf16 (CUDA, or a CPU with bf16 matrix units: AVX512-BF16/AMX), fp16 (CUDA only).
    precision: str = "fp32"
    device: str = "auto"
    workers: int = 1
    seed: int = 0

    # Settings that must not change when a run is resumed.
    IDENTITY = ("data", "init_from", "keep_cluster_module", "distill_from", "arch", "clusters", "injection_point",
                "head", "batch_size", "input_size", "crop_size", "class_weighting", "seed", "train_split",
                "train_include", "train_exclude", "train_list", "augment", "rare_class_temperature", "ema_decay",
                "head_on_merged", "cluster_classes")

    def state_path(self) -> Path:
        return training_state_path(self.out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_state_path(checkpoint: PathLike) -> Path:
    """Where a run whose best checkpoint is ``checkpoint`` keeps its resumable state."""
    out = Path(checkpoint)
    return out.with_name(out.name.removesuffix(".safetensors") + ".train-state.safetensors")


def parameter_groups(model: ClustViT, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise LR decay: block i gets lr * decay^(depth - i).

    New modules (cluster head, regenerator, decode head) and the final norm get
    the full rate; biases, norms, position and class embeddings get no decay.
    """
    depth = model.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "class_embed"))
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def class_weights(masks: list[np.ndarray], num_classes: int, ignore_index: int) -> torch.Tensor:
    """1/sqrt(pixel frequency), normalised to mean 1: helps thin, rare classes."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        valid = mask[(mask != ignore_index) & (mask < num_classes)]
        counts += np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    frequency = counts / max(counts.sum(), 1.0)
    weights = 1.0 / np.sqrt(np.maximum(frequency, 1e-6))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class WeightAverage:
    """Exponential moving average of a model's weights (a frozen copy of the model).

    The decay ramps up over the first updates ((1 + n) / (10 + n), as timm does)
    so the average does not remember the random initial head for long.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def weights_agree(self, model: torch.nn.Module) -> bool:
        """True when every process holds the same weights (DDP keeps them in step; a bug would not).

        Compares a float64 sum and sum of squares of every tensor across processes, exactly.
        """
        if self.world == 1:
            return True
        with torch.no_grad():
            fingerprint = torch.stack([torch.stack([v.double().sum(), v.double().square().sum()])
                                       for v in model.state_dict().values()]).flatten().cpu()
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world)]
        torch.distributed.all_gather_object(gathered, fingerprint)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _save_state(path: Path, model: ClustViT, optimizer: torch.optim.Optimizer, meta: dict,
                average: Optional[WeightAverage] = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.module.state_dict().items()})
        meta = {**meta, "ema_updates": average.updates}
    opt_state = optimizer.state_dict()
    for index, entries in opt_state["state"].items():
        for name, value in entries.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(groups)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    make_readable(tmp)  # as the checkpoint beside it: a run resumed by another user (a cluster's job) reads it
    os.replace(tmp, path)


def read_training_state(path: Path) -> dict:
    """Epoch, best summary, per-epoch history and settings of a (possibly unfinished) run."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["meta"])


def _model_weights(state_tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A model's state dict out of a training-state file's tensors (saved under ``prefix``)."""
    return {k[len(prefix):]: v for k, v in state_tensors.items() if k.startswith(prefix)}


def load_last_epoch(model: ClustViT, checkpoint: PathLike) -> dict:
    """Replace ``model``'s weights (built from the run's best checkpoint) by its last epoch's.

    The weight average when the run kept one (that is what it validated), else
    the raw weights. The run's state file sits beside the checkpoint; returns
    that run's metadata.
    """
    path = training_state_path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: no training state beside {checkpoint}")
    tensors = load_file(str(path))
    weights = _model_weights(tensors, "ema.") or _model_weights(tensors)
    problems = state_dict_mismatch(model.state_dict(), weights)
    if problems:
        raise CheckpointError(f"{path}: weights do not match {checkpoint}: {problems}")
    model.load_state_dict(weights)
    return read_training_state(path)


def _load_state(path: Path, model: ClustViT, optimizer: torch.optim.Optimizer,
                average: Optional[WeightAverage]) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    model.load_state_dict(_model_weights(tensors))
    meta = json.loads(metadata["meta"])
    if average is not None:
        saved_average = _model_weights(tensors, "ema.")
        average.module.load_state_dict(saved_average or model.state_dict())
        average.updates = int(meta.get("ema_updates", 0))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return meta


def open_training_frames(settings: TrainSettings) -> tuple[SegmentationData, Optional[SegmentationData]]:
    """The training and validation frames the settings name (validation None when off)."""
    train_data = open_dataset(settings.data, settings.train_split, settings.void_label,
                              settings.train_include, settings.train_exclude, settings.train_list)
    val_data = None
    if settings.val_split:
        val_data = open_dataset(settings.data, settings.val_split, train_data.ignore_index,
                                settings.val_include, settings.val_exclude,
                                settings.val_list).spread(settings.val_limit)
    return train_data, val_data


def describe_frames(train_data: SegmentationData, val_data: Optional[SegmentationData]) -> list[str]:
    """Log lines: frames per drive (file-name prefix), and what validation can and cannot measure."""
    def per_prefix(data: SegmentationData) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in data.images:
            counts[frame_prefix(path)] = counts.get(frame_prefix(path), 0) + 1
        return counts

    def show(counts: dict[str, int]) -> str:
        return ", ".join(f"{name or '(no prefix)'} {n}" for name, n in sorted(counts.items()))

    train_counts = per_prefix(train_data)
    lines = [f"training on {len(train_data)} frames: {show(train_counts)}"]
    if val_data is None:
        lines.append("no validation: the last epoch is kept")
        return lines
    val_counts = per_prefix(val_data)
    lines.append(f"validating on {len(val_data)} frames: {show(val_counts)}")
    shared_frames = {p.resolve() for p in train_data.images} & {p.resolve() for p in val_data.images}
    if shared_frames:
        lines.append(f"warning: {len(shared_frames)} validation frames are also training frames")
    shared_drives = sorted(set(val_counts) & set(train_counts) - {""})
    if shared_drives:
        lines.append(f"note: validation drive(s) {', '.join(shared_drives)} also in training: "
                     "validation measures memorising those drives, not unseen scenes")
    return lines


def _validate_settings(settings: TrainSettings, device: torch.device) -> None:
    if settings.augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment {settings.augment!r}: expected one of {', '.join(AUGMENT_PRESETS)}")
    if settings.keep not in ("best", "last"):
        raise ValueError(f"keep {settings.keep!r}: expected best or last")
    if settings.keep == "best" and not settings.val_split:
        raise ValueError("keeping the best epoch needs validation frames: give a validation split "
                         "or keep the last epoch")
    if settings.val_every < 1:
        raise ValueError("val_every must be >= 1")
    if settings.val_limit is not None and settings.val_limit < 1:
        raise ValueError(f"val_limit {settings.val_limit}: expected at least 1 image (None: all)")
    if not 0.0 <= settings.ema_decay < 1.0:
        raise ValueError(f"ema_decay {settings.ema_decay}: expected 0 (off) or a decay in (0, 1)")
    if settings.rare_class_temperature < 0:
        raise ValueError("rare_class_temperature must be >= 0 (0 = off)")
    if settings.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {settings.precision!r}: expected fp32, bf16 or fp16")
    if settings.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16: fp16 autocast training needs a CUDA device; "
                         "on the CPU train in fp32, or bf16 where the CPU has bf16 matrix units")


def cluster_class_ids(config: ModelConfig, names: tuple[str, ...]) -> tuple[int, ...]:
    """The class ids of ``cluster_classes`` (empty: per-image ranks), checked against the model's classes."""
    if not names:
        return ()
    if len(names) != config.clusters:
        raise ValueError(f"cluster_classes names {len(names)} classes ({', '.join(names)}) for a model with "
                         f"{config.clusters} clusters: give exactly {config.clusters}")
    unknown = [n for n in names if n not in config.class_names]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"cluster_classes {list(names)}: expected {config.clusters} distinct names of "
                         f"{', '.join(config.class_names)}" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    return tuple(config.class_names.index(n) for n in names)


def use_matmul_attention(model: torch.nn.Module) -> int:
    """Attention as two matrix products and a softmax instead of PyTorch's fused kernel; returns how many.

    For bf16 autocast on the CPU: there the fused kernel's backward pass is not
    vectorised for bf16 and takes half of a training step, while the two products
    run on the bf16 matrix units (AVX512-BF16/AMX): about 1.5x more samples/s
    for ViT-Ti at 352x480 crops, batch 8 (models/README.md). Same arithmetic:
    the weights and the result do not depend on it.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
            changed += 1
    return changed


def _training_device(settings: TrainSettings, dist: Distributed) -> torch.device:
    device = resolve_device(settings.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


class _EpochItems(torch.utils.data.Sampler):
    """The current epoch's items (set before each epoch), so one loader serves every epoch."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


def _rank_items(plan: list, batch_size: int, dist: Distributed) -> list:
    """This process's share of an epoch plan: its slice of every global batch."""
    per_rank = batch_size // dist.world
    steps = len(plan) // batch_size
    return [plan[step * batch_size + dist.rank * per_rank + j] for step in range(steps) for j in range(per_rank)]


def train(settings: TrainSettings, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train; returns the kept epoch's validation summary (empty without validation).

    With ``resume`` an interrupted run continues from its state file; without
    it an existing state file is an error rather than silently overwritten.
    """
    dist = Distributed.from_environment()
    device = _training_device(settings, dist)
    _validate_settings(settings, device)
    if settings.batch_size % dist.world:
        raise ValueError(f"batch size {settings.batch_size} is not a multiple of the {dist.world} processes")
    if not dist.main:
        log = lambda _line: None  # noqa: E731  one process speaks
    dist.start(device)
    try:
        return _train(settings, resume, log, dist, device)
    finally:
        dist.stop()


def _train(settings: TrainSettings, resume: bool, log: Callable[[str], None], dist: Distributed,
           device: torch.device) -> dict:
    torch.manual_seed(settings.seed)
    run = _Run.build(settings, dist, device, log)
    start_epoch = run.resume(resume)
    for line in describe_frames(run.train_data, run.val_data):
        log(line)
    if settings.precision == "bf16" and device.type == "cpu":
        speedup = cpu_bf16_speedup()
        log(f"bf16 autocast on the CPU: bf16 matrix products {speedup:.1f}x as fast as fp32 here"
            + ("" if speedup > 1.0 else " (no bf16 matrix units: fp32 will train faster)"))
    for epoch in range(start_epoch, settings.epochs):
        started = time.time()
        losses = run.train_epoch(epoch)
        run.end_epoch(epoch, losses, started, time.time() - started)
        dist.barrier()  # the other processes wait while rank 0 validates and saves
    if dist.world > 1:
        if not dist.weights_agree(run.model):
            raise RuntimeError("the training processes ended with different weights")
        log(f"weights identical on all {dist.world} processes")
    return run.best or {}


def _build_model(settings: TrainSettings, train_data: SegmentationData, device: torch.device) -> ClustViT:
    config = ModelConfig.for_dataset(
        train_data.class_names, train_data.palette, arch=settings.arch, clusters=settings.clusters,
        injection_point=settings.injection_point, head=settings.head, head_on_merged=settings.head_on_merged,
        input_size=tuple(settings.input_size), ignore_index=train_data.ignore_index)
    model = build_model(config, settings.init_backbone, drop_path_rate=settings.drop_path)
    if settings.init_from is not None:
        load_trunk(model, settings.init_from, with_cluster_module=settings.keep_cluster_module)
    elif settings.keep_cluster_module:
        raise ValueError("keep_cluster_module needs init_from (the checkpoint to take it from)")
    cluster_class_ids(config, settings.cluster_classes)  # a wrong name stops here, not at the first step
    model = model.to(device)
    if config.clusters:  # validation merges by the training rule's threshold, or the default one
        threshold = settings.train_merge_threshold
        model.reduction = ClusterMerging(config.default_merge_threshold if threshold is None else threshold)
    return model


def _build_dataset(settings: TrainSettings, train_data: SegmentationData, config: ModelConfig) -> TrainingSet:
    augment = Augment(base_size=tuple(settings.input_size), crop_size=tuple(settings.crop_size),
                      scale_range=tuple(settings.scale_range), ignore_index=train_data.ignore_index,
                      **AUGMENT_PRESETS[settings.augment])
    return TrainingSet(train_data, augment, config.mean, config.std, seed=settings.seed,
                       rare_class_temperature=settings.rare_class_temperature)


@dataclass
class _Run:
    """One training run's pieces, and its epoch loop split in the two halves every process / rank 0 runs."""

    settings: TrainSettings
    dist: Distributed
    device: torch.device
    log: Callable[[str], None]
    train_data: SegmentationData
    val_data: Optional[SegmentationData]
    model: ClustViT
    network: torch.nn.Module  # the model, or its DDP wrapper
    dataset: TrainingSet
    optimizer: torch.optim.Optimizer
    average: Optional[WeightAverage]
    teacher: Optional[ClustViT]
    class_weights: Optional[torch.Tensor]
    scaler: Optional[torch.amp.GradScaler]
    autocast_dtype: Optional[torch.dtype]
    best: Optional[dict] = None
    history: list = dataclasses.field(default_factory=list)
    sampler: "_EpochItems" = dataclasses.field(default_factory=lambda: _EpochItems())
    loader: Optional[torch.utils.data.DataLoader] = None

    @classmethod
    def build(cls, settings: TrainSettings, dist: Distributed, device: torch.device, log) -> "_Run":
        train_data, val_data = open_training_frames(settings)
        model = _build_model(settings, train_data, device)
        config = model.config
        distilling = settings.distill_from is not None and settings.distill_weight > 0
        dataset = _build_dataset(settings, train_data, config)
        weights = None
        if settings.class_weighting == "sqrt-inverse":
            weights = class_weights([m for _, m in dataset.samples], config.num_classes,
                                    config.ignore_index).to(device)
        elif settings.class_weighting != "none":
            raise ValueError(f"unknown class weighting {settings.class_weighting!r}")
        if len(dataset) // settings.batch_size == 0:
            raise ValueError(f"batch size {settings.batch_size} exceeds the {len(dataset)} training images")
        optimizer = torch.optim.AdamW(parameter_groups(model, settings.lr, settings.weight_decay,
                                                       settings.layer_decay), lr=settings.lr, betas=(0.9, 0.999))
        if settings.precision == "bf16" and device.type == "cpu":
            use_matmul_attention(model)
        network = model if dist.world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        return cls(settings, dist, device, log, train_data, val_data, model, network, dataset, optimizer,
                   WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None,
                   load_teacher(settings.distill_from, config, device) if distilling else None, weights,
                   torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None,
                   {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.settings.batch_size

    def resume(self, resume: bool) -> int:
        """The epoch to start at: 0, or after the last one saved (``resume``); refuses to overwrite a run."""
        settings, state_path = self.settings, self.settings.state_path()
        if state_path.exists() and not resume:
            raise ValueError(f"{state_path} exists: pass --resume to continue that run, "
                             "or delete it to start over")
        if not state_path.exists():
            if resume:
                self.log(f"no training state at {state_path}: starting a new run")
            return 0
        meta = _load_state(state_path, self.model, self.optimizer, self.average)
        # A setting added after the run started is taken at its default (what the run used).
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
        saved = {k: meta["settings"].get(k, defaults[k]) for k in TrainSettings.IDENTITY}
        current = settings.to_dict()
        changed = [k for k in TrainSettings.IDENTITY if saved[k] != current[k]
                   and not (isinstance(current[k], tuple) and list(current[k]) == list(saved[k]))]
        if changed:
            raise ValueError(f"{state_path}: cannot resume, settings changed: {changed}")
        self.best, self.history = meta["best"], meta["history"]
        self.log(f"resuming {state_path} at epoch {meta['epoch'] + 2}/{settings.epochs}")
        return meta["epoch"] + 1

    def train_epoch(self, epoch: int) -> list[dict]:
        """One pass over this process's share of the epoch plan; the loss parts of every step."""
        settings, dist, device = self.settings, self.dist, self.device
        self.sampler.items = _rank_items(self.dataset.epoch_plan(epoch), settings.batch_size, dist)
        if self.loader is None:
            # Built once, its workers kept for the whole run: a worker forked at every epoch would
            # copy the trainer's heap as it then is (activations, allocator caches: several GB on
            # the CPU) and keep that copy while the trainer rewrites its own, doubling its memory;
            # two 1-thread CPU runs on 24 GB were killed for it.
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=settings.batch_size // dist.world, drop_last=True, sampler=self.sampler,
                num_workers=settings.workers, persistent_workers=settings.workers > 0,
                worker_init_fn=_single_thread_worker, pin_memory=device.type == "cuda",
                # Worker seeds from a generator of its own: the global one (drop path) then draws the
                # same numbers whatever the number of workers (augmentations are seeded per item).
                generator=torch.Generator().manual_seed(settings.seed))
        loader = self.loader
        self.model.train()
        oracle_phase = epoch < settings.cluster_warmup_epochs
        total_steps = self.steps_per_epoch * settings.epochs
        losses = []
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False,
                        disable=not (_interactive() and dist.main))
        for step_in_epoch, (images, masks) in enumerate(progress):
            factor = lr_factor(epoch * self.steps_per_epoch + step_in_epoch, total_steps, settings.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = settings.lr * group["lr_scale"] * factor
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                  else contextlib.nullcontext()):
                loss, parts = _loss(self.network, self.model, images, masks, self.model.config, settings,
                                    self.class_weights, oracle_phase, self.teacher)
            self._step(loss)
            losses.append(parts)
            progress.set_postfix(loss=f"{parts['loss']:.3f}")
        return losses

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        parameters = self.model.parameters()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 5.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 5.0)
            self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model)

    def end_epoch(self, epoch: int, losses: list[dict], started: float, train_time: float) -> None:
        """Rank 0: validate (when due), keep the checkpoint, log, and save the resumable state."""
        if not self.dist.main:
            return
        settings = self.settings
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean([p["loss"] for p in losses])),
            "cluster_loss": float(np.mean([p.get("cluster", 0.0) for p in losses])),
            "train_merged_fraction": float(np.mean([p.get("merged", 0.0) for p in losses])),
            "distill_loss": float(np.mean([p.get("distill", 0.0) for p in losses])),
            "train_seconds": round(train_time, 1),
            "samples_per_second": round(self.steps_per_epoch * settings.batch_size / max(train_time, 1e-9), 2),
        }
        kept = self.average.module if self.average is not None else self.model
        summary = None
        if self.val_data is not None and ((epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs):
            summary = evaluate_model(kept, self.val_data, device=str(self.device))
            record.update({"val_miou": summary["miou"], "val_merged_fraction": summary["merged_fraction"],
                           "val_per_prefix_miou": {k: v["miou"] for k, v in summary["per_prefix"].items()}})
        record["seconds"] = round(time.time() - started, 1)
        self.history.append(record)
        best = self.best
        improved = summary is not None and (best is None or "miou" not in best or summary["miou"] > best["miou"])
        if settings.keep == "last" or improved:
            self.best = {**(summary or {}), "epoch": epoch + 1}
            save_checkpoint(kept, settings.out, extra=_provenance(settings, self.train_data, self.val_data,
                                                                   self.best))
        validation = f" val mIoU {summary['miou']:.2f} merged {summary['merged_fraction']:.3f}" if summary else ""
        self.log(f"epoch {epoch + 1}/{settings.epochs} loss {record['loss']:.4f} "
                 f"cluster {record['cluster_loss']:.4f}{validation} ({record['seconds']:.0f} s, "
                 f"{record['samples_per_second']:.1f} samples/s)" + ("  *best*" if improved else ""))
        _save_state(settings.state_path(), self.model, self.optimizer,
                    {"epoch": epoch, "best": self.best, "history": self.history, "settings": settings.to_dict()},
                    self.average)


TRUNK_PREFIXES = ("backbone.", "decode_head.")
CLUSTER_MODULE_PREFIXES = ("cluster_head.", "regenerator.")


def load_trunk(model: ClustViT, path: PathLike, with_cluster_module: bool = False) -> None:
    """Load backbone and decode head (and the cluster module) from a trained checkpoint.

    The checkpoint must describe the same architecture, head and classes, and
    with the cluster module the same k and injection point (anything else is a
    CheckpointError naming the file).
    """
    path = Path(path)
    config, _ = read_metadata(path)  # validates the file and names it in errors
    if (config.arch, config.head, config.num_classes) != (model.config.arch, model.config.head,
                                                           model.config.num_classes):
        raise CheckpointError(
            f"{path}: {config.arch}/{config.head}/{config.num_classes} classes cannot initialise "
            f"{model.config.arch}/{model.config.head}/{model.config.num_classes} classes")
    prefixes = TRUNK_PREFIXES
    if with_cluster_module:
        if (config.clusters, config.injection_point) != (model.config.clusters, model.config.injection_point) \
                or config.clusters == 0:
            raise CheckpointError(
                f"{path}: its cluster module (k={config.clusters}, ip={config.injection_point}) cannot serve "
                f"k={model.config.clusters}, ip={model.config.injection_point}")
        prefixes = TRUNK_PREFIXES + CLUSTER_MODULE_PREFIXES
    state = {k: v.float() for k, v in load_file(str(path)).items() if k.startswith(prefixes)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    problems = state_dict_mismatch(own, state)
    if problems:
        raise CheckpointError(f"{path}: weights do not fit: {problems}")
    model.load_state_dict(state, strict=False)


def load_teacher(path: PathLike, config: ModelConfig, device: torch.device) -> ClustViT:
    """A frozen checkpoint to distil from; it must predict the same classes from the same inputs."""
    teacher = load_checkpoint(path)
    theirs = teacher.config
    # Its logits come back at the input size, so its architecture and patch size may differ.
    if (theirs.num_classes, tuple(theirs.mean), tuple(theirs.std)) != (
            config.num_classes, tuple(config.mean), tuple(config.std)):
        raise CheckpointError(f"{path}: a teacher must predict the same {config.num_classes} classes from "
                              f"images normalised the same way (mean {config.mean}, std {config.std})")
    teacher.reduction = NoReduction()
    return teacher.to(device).eval().requires_grad_(False)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """Mean per-pixel KL(teacher || student) over labelled pixels; logits (B, C, H, W)."""
    per_pixel = F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1),
                         log_target=True, reduction="none").sum(1)
    valid = masks != ignore_index
    return per_pixel[valid].sum() / valid.sum().clamp(min=1)


def _loss(network: torch.nn.Module, model: ClustViT, images, masks, config: ModelConfig,
          settings: TrainSettings, weights, oracle_phase: bool,
          teacher: Optional[ClustViT] = None) -> tuple[torch.Tensor, dict]:
    """The training loss; ``network`` runs the forward (``model`` itself, or its DDP wrapper)."""
    if config.clusters:
        targets = pseudo_cluster_targets(masks, config.clusters, model.patch_size, config.ignore_index,
                                         cluster_class_ids(config, settings.cluster_classes))
        strategy = ClusterMerging(settings.train_merge_threshold,
                                  assignment=targets if oracle_phase else None)
    else:
        targets, strategy = None, NoReduction()
    output = network(images, strategy)
    loss = F.cross_entropy(output.logits.float(), masks, weight=weights, ignore_index=config.ignore_index)
    parts = {"segmentation": loss.item()}
    if output.cluster_logits is not None:
        cluster = F.cross_entropy(output.cluster_logits.flatten(0, 1).float(), targets.flatten())
        loss = loss + settings.cluster_loss_weight * cluster
        parts["cluster"] = cluster.item()
        parts["merged"] = float(np.mean(output.stats.merged_fraction))
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(images).logits
        distill = distillation_loss(output.logits, teacher_logits, masks, config.ignore_index)
        loss = loss + settings.distill_weight * distill
        parts["distill"] = distill.item()
    parts["loss"] = loss.item()
    return loss, parts


def _provenance(settings: TrainSettings, train_data, val_data, best: dict) -> dict:
    return {
        "training": {
            "data": str(Path(settings.data).resolve().name),
            "train_images": len(train_data),
            "train_prefixes": sorted({frame_prefix(p) for p in train_data.images}),
            "val_images": len(val_data) if val_data is not None else 0,
            "val_prefixes": sorted({frame_prefix(p) for p in val_data.images}) if val_data is not None else [],
            "kept_epoch": best.get("epoch"),
            "settings": {k: v for k, v in settings.to_dict().items() if k not in ("data", "out")},
        },
        "val_metrics": {k: best[k] for k in ("miou", "per_class_iou", "pixel_accuracy", "merged_fraction",
                                             "mean_tokens_after_merge", "epoch", "per_prefix") if k in best},
    }


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # the main process owns the cores for the model


def _interactive() -> bool:
    return os.environ.get("CLUSTVIT_PROGRESS", "auto") == "1" or (
        os.environ.get("CLUSTVIT_PROGRESS", "auto") == "auto" and os.isatty(2))
