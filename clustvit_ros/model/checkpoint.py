"""Self-describing safetensors checkpoints (weights + JSON metadata), no pickle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .clustvit import ClustViT, state_dict_mismatch
from .config import ModelConfig

FORMAT_NAME = "clustvit_ros"
FORMAT_VERSION = "1"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


def _open_tensors(path: Path) -> tuple[dict[str, str], list[str]]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:  # truncated or not safetensors at all
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_metadata(path: PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Model config and the rest of the metadata, without loading the weights."""
    path = Path(path)
    metadata, keys = _open_tensors(path)
    if metadata.get("format") != FORMAT_NAME:
        hint = ""
        if any(k.startswith("blocks.0.") for k in keys):
            hint = " (it looks like a timm ViT backbone: pass it as --init-backbone)"
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} model checkpoint{hint}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {metadata.get('format_version')!r}"
                              f" is not supported (expected {FORMAT_VERSION})")
    try:
        config = ModelConfig.from_json(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model metadata ({exc})") from None
    return config, extra


def save_checkpoint(model: ClustViT, path: PathLike, half: bool = False,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Write weights and metadata atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32) -> ClustViT:
    """Build the model a checkpoint describes and load its weights (strictly)."""
    path = Path(path)
    config, extra = read_metadata(path)
    try:
        model = ClustViT(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = load_file(str(path))
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path}: weights do not match the described architecture: {problems}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.checkpoint_path = str(path)
    model.checkpoint_info = extra
    return model.to(device=device, dtype=dtype).eval()


def load_timm_backbone(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a timm-format ViT state dict (e.g. ../shared/weights/...) for initialisation."""
    path = Path(path)
    metadata, keys = _open_tensors(path)
    if metadata.get("format") == FORMAT_NAME:
        state = load_file(str(path))
        prefix = "backbone."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("blocks.") for k in keys) or "patch_embed.proj.weight" not in keys:
        raise CheckpointError(f"{path}: not a timm ViT state dict (no blocks.* / patch_embed keys)")
    return load_file(str(path))
