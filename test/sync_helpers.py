"""Detecting host syncs on the CPU: ops that would make the host wait for a CUDA device."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for a CUDA device (data-dependent output size or a scalar read).
SYNCING_OPS = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique", "_unique",
               "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "item"}


class OpRecorder(TorchDispatchMode):
    """Records every aten op a forward runs; ``syncing_ops()`` lists those that would sync."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        index_args = args[1] if name in ("index", "index_put", "index_put_") else []
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in index_args or []):
            name = "boolean-mask indexing"  # hides a nonzero
        self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def syncing_ops(self) -> list[str]:
        return sorted(set(self.ops) & (SYNCING_OPS | {"boolean-mask indexing"}))


class HostReads:
    """Counts ``Tensor.tolist()`` calls (on the CPU they bypass the dispatcher): each is a read-back."""

    def __init__(self):
        self.shapes: list[tuple] = []
        self._original = torch.Tensor.tolist

    def __enter__(self) -> "HostReads":
        original = self._original

        def counting_tolist(tensor):
            self.shapes.append(tuple(tensor.shape))
            return original(tensor)
        torch.Tensor.tolist = counting_tolist
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist = self._original
