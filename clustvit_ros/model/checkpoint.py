"""Self-describing safetensors checkpoints (weights + JSON metadata), no pickle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .vit import ClustViT, state_dict_mismatch
from .config import ModelConfig

FORMAT_NAME = "clustvit_ros"
FORMAT_VERSION = "1"
MAX_EXTRA_CHARS = 16_000_000
# Storage types a model's floating-point weights may have (int8 weights would be read as garbage).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
    if "config" not in metadata:
        raise CheckpointError(f"{path}: no model config in its metadata")
    try:
        config = ModelConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None
    try:
        if len(metadata.get("extra", "")) > MAX_EXTRA_CHARS:
            raise ValueError(f"over {MAX_EXTRA_CHARS} characters")
        extra = json.loads(metadata.get("extra", "{}"))
        if not isinstance(extra, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise CheckpointError(f"{path}: invalid 'extra' metadata: nested too deeply") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid 'extra' metadata: {exc}") from None
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
    make_readable(tmp)
    os.replace(tmp, path)
    return path


def make_readable(path: PathLike) -> None:
    """Give a written file the permissions the umask allows (as open() would).

    safetensors creates its files 0600: a model exported by one user could not be read by a
    node running as another (a robot's service user, a container)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32) -> ClustViT:
    """Build the model a checkpoint describes and load its weights (strictly)."""
    path = Path(path)
    config, extra = read_metadata(path)
    try:
        model = ClustViT(config)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. an injection point beyond the depth
        raise CheckpointError(f"{path}: {exc}") from None
    state = load_file(str(path))
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path}: weights do not match the described architecture: {problems}")
    check_weights(path, model.state_dict(), state)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.checkpoint_path = str(path)
    model.checkpoint_info = extra
    return model.to(device=device, dtype=dtype).eval()


def check_weights(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Floating-point weights stored as floating point, and every value finite.

    NaN or infinite weights would publish garbage labels with healthy-looking
    diagnostics; integer storage of a float weight would be silently converted.
    """
    for name, reference in expected.items():
        tensor = found[name]
        if reference.is_floating_point() and tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: weight {name!r} is stored as {str(tensor.dtype).replace('torch.', '')}"
                                  ", expected float32, float16 or bfloat16")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: weight {name!r} has {bad} non-finite values (NaN or inf)")


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
