"""Replaying ClustViT's reduced blocks from CUDA graphs (batch 1, GPU).

At ViT-Tiny size a GPU spends more time launching kernels than computing them,
and merging makes every frame's sequence length different, so nothing can be
captured once. With ``bucket`` the reduced sequence is padded to a multiple of
a fixed length (padding masked as keys; the labels are the exact path's), so a
frame has one of a few shapes; each shape's blocks after the injection point are
captured once as a CUDA graph and replayed for every later frame of that shape.
The frame's own part (cluster decisions, gathering the kept tokens, restoring
the grid) still runs eagerly: it is a handful of kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.reduction import ClusterMerging
from ..model.reduction.base import SegmentationBackbone
from ..model.reduction.clustvit import ClusterState


class _BlockGraph:
    """The blocks ``start``.. captured for one input shape, with static input/output buffers."""

    def __init__(self, strategy: ClusterMerging, model: SegmentationBackbone, start: int, x: torch.Tensor,
                 mask: Optional[torch.Tensor]):
        self.x = x.clone()
        self.mask = None if mask is None else mask.clone()
        state = ClusterState(stats=None, attn_mask=self.mask)
        run = super(GraphedClusterMerging, strategy).run_reduced
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, kernel selection)
            for _ in range(2):
                run(model, start, self.x, state)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run(model, start, self.x, state)

    def replay(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        self.x.copy_(x)
        if mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the static output


class GraphedClusterMerging(ClusterMerging):
    """ClustViT merging whose reduced blocks replay CUDA graphs, one per bucket length (CUDA, batch 1)."""

    def __init__(self, threshold: Optional[float] = 0.5, bucket: int = 64, max_graphs: int = 64):
        super().__init__(threshold, bucket=bucket)
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _BlockGraph] = {}

    def run_reduced(self, model: SegmentationBackbone, start: int, x: torch.Tensor,
                    state: ClusterState) -> torch.Tensor:
        if x.device.type != "cuda" or x.shape[0] != 1 or model.training or torch.is_grad_enabled():
            return super().run_reduced(model, start, x, state)
        mask = state.attn_mask
        key = (x.shape[1], x.dtype, mask is None, start)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:  # many shapes (a changing inference size): start over
                self._graphs.clear()
            graph = self._graphs[key] = _BlockGraph(self, model, start, x, mask)
        return graph.replay(x, mask)
