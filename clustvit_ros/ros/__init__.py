"""The ROS 2 layer: thin rclpy nodes over the inference engine.

Before torch (and its OpenMP runtime) loads, idle OpenMP threads are told to
sleep rather than spin (unless the user chose otherwise): on a robot other
processes share the cores, and spinning threads turn one busy neighbour into
a many-fold tail latency (models/README.md has the measurement).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
