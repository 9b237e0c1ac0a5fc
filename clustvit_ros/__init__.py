"""clustvit_ros: ClustViT token-merging ViT segmentation for ROS 2 robots.

Layers: ``clustvit_ros.model`` (torch + timm) -> ``clustvit_ros.engine`` (frames in,
labels and stats out) -> ``clustvit_ros.segment_node`` (rclpy adapter).
"""
__version__ = "0.1.0"
