"""Pure PyTorch + timm ClustViT (no ROS imports).

``vit`` the segmentation model, ``heads`` its decoders, ``clustering`` ClustViT's
learned merging pieces, ``config`` and ``checkpoint`` what a model file holds,
``reduction`` the token-reduction strategies and their registry.
"""
from .checkpoint import (CheckpointError, load_checkpoint, load_timm_backbone, read_metadata,
                         save_checkpoint)
from .clustering import pseudo_cluster_targets
from .config import CAMVID_CLASSES, CAMVID_PALETTE, ModelConfig
from .reduction import ClusterMerging, NoReduction, ReductionStats, TokenReduction, assign_clusters, run_blocks
from .vit import ClustViT, Features, Segmentation

__all__ = [
    "CAMVID_CLASSES", "CAMVID_PALETTE", "CheckpointError", "ClusterMerging", "ClustViT",
    "Features", "ModelConfig", "NoReduction", "ReductionStats", "Segmentation", "TokenReduction",
    "assign_clusters", "build_model", "load_checkpoint", "load_timm_backbone", "pseudo_cluster_targets",
    "read_metadata", "run_blocks", "save_checkpoint",
]


def build_model(config: ModelConfig, init_backbone=None, drop_path_rate: float = 0.0) -> ClustViT:
    """A new model; ``init_backbone`` is a timm ViT safetensors file to start from."""
    model = ClustViT(config, drop_path_rate=drop_path_rate)
    if init_backbone is not None:
        model.load_backbone(load_timm_backbone(init_backbone), source=str(init_backbone))
    return model
