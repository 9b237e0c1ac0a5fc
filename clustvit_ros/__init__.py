"""clustvit_ros: ClustViT token-merging ViT segmentation for ROS 2 robots.

Layers, each usable without the ones above: ``clustvit_ros.model`` (torch + timm)
-> ``clustvit_ros.inference`` (frames in, labels and stats out) -> ``clustvit_ros.ros``
(rclpy nodes) -> launch/config; ``clustvit_ros.tools`` (the clustvit command,
training, benchmarks) on top.
"""
__version__ = "0.1.0"
