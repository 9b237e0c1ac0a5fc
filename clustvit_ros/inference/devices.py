"""Where and how a model runs: the device, the precision and the CPU threads users ask for."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; ValueError with a reason."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"device {name!r}: expected cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The dtype the model runs in, and why it was chosen (reported in diagnostics)."""

    name: str  # fp32, bf16 or fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def resolve_precision(name: str, device: torch.device) -> Precision:
    """'auto' -> fp16 on CUDA; bf16 on a CPU whose bf16 matrix path is measurably faster; else fp32.

    An explicit choice the device cannot run is a ValueError with the reason.
    """
    name = (name or "auto").strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: expected {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16: half precision needs a CUDA device (use fp32, or bf16, on the CPU)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16: {torch.cuda.get_device_name(device)} has no bf16 support")
    if name != "auto":
        return Precision(name, "requested")
    if device.type == "cuda":
        return Precision("fp16", "auto: CUDA")
    speedup = cpu_bf16_speedup()
    if speedup >= 1.2:
        return Precision("bf16", f"auto: bf16 matrix products {speedup:.1f}x faster than fp32 on this CPU")
    return Precision("fp32", f"auto: bf16 not faster on this CPU ({speedup:.2f}x)")


def cpu_bf16_speedup(rounds: int = 3, repeats: int = 10) -> float:
    """fp32 time / bf16 time of a ViT-Ti-sized linear layer on this CPU (a short start-up probe).

    CPUs with native bf16 matrix units (AVX512-BF16, AMX) run it several times
    faster; without them bf16 is emulated and slower. Interleaved, best of rounds.
    """
    tokens = torch.randn(1200, 192)
    weight = torch.randn(768, 192)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    with torch.inference_mode():
        for _ in range(rounds):
            for dtype in best:
                x, w = tokens.to(dtype), weight.to(dtype)
                torch.nn.functional.linear(x, w)  # warm-up of this dtype's kernel
                start = time.perf_counter()
                for _ in range(repeats):
                    torch.nn.functional.linear(x, w)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def set_cpu_threads(count: int) -> int:
    """torch's intra-op CPU threads (0 = leave the library default); returns the number in use."""
    if count < 0:
        raise ValueError(f"num_threads {count}: expected 0 (library default) or a positive count")
    if count:
        torch.set_num_threads(count)
    return torch.get_num_threads()
