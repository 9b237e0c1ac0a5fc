"""Test-side ROS set-up; the probe and node-process helpers live in the package."""
from __future__ import annotations

import os

from clustvit_ros.tools.ros_process import (NodeProcess, Probe, diagnostic_values, image_message,  # noqa: F401
                                      wait_for)


def configure_ros_environment() -> None:
    """Every ROS process of the tests talks on loopback only, in a domain of its own."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
