"""Token reduction around the blocks of a timm ViT: one interface, one registry, one file per strategy."""
from .base import (KnobSpec, NoReduction, ReductionState, ReductionStats, SegmentationBackbone, StrategySpec,
                   TokenReduction, run_blocks)
from .clustvit import ClusterMerging, assign_clusters
from .registry import STRATEGIES, make_strategy, spec_of, strategy_names, strategy_spec

__all__ = [
    "STRATEGIES", "ClusterMerging", "KnobSpec", "NoReduction", "ReductionState", "ReductionStats",
    "SegmentationBackbone", "StrategySpec", "TokenReduction", "assign_clusters", "make_strategy", "run_blocks",
    "spec_of", "strategy_names", "strategy_spec",
]
