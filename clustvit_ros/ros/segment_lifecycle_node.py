"""``python -m clustvit_ros.ros.segment_lifecycle_node``: the managed (lifecycle) segmentation node."""
import sys

from .segment_node import lifecycle_main

if __name__ == "__main__":
    sys.exit(lifecycle_main())
