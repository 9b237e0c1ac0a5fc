"""ament_python package that also installs with pip (pip install -e .[ros])."""
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "clustvit_ros"
HERE = Path(__file__).resolve().parent

setup(
    name=PACKAGE,
    version="0.1.0",
    description="ClustViT token-merging ViT semantic segmentation as a ROS 2 node",
    # Relative to this file: colcon runs setup.py from build/ (--symlink-install too).
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/models", glob("models/*.safetensors") + glob("models/*.md") + glob("models/*.png")),
        (f"share/{PACKAGE}/demo", glob("demo/*.mp4") + glob("demo/*.md")),
    ],
    install_requires=[
        "numpy",
        "opencv-python-headless",
        "torch>=2.1",
        "torchvision",
        "timm>=1.0.20",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        # ROS 2 from pip wheels, for machines without a ROS installation (tests, CI).
        "ros": ["ros-rclpy[fastrtps]", "ros-sensor-msgs", "ros-std-msgs", "ros-diagnostic-msgs",
                "ros-rcl-interfaces"],
        "test": ["pytest", "ruff"],
    },
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "clustvit = clustvit_ros.tools.cli:main",
            "segment_node = clustvit_ros.ros.segment_node:main",
            "segment_lifecycle_node = clustvit_ros.ros.segment_node:lifecycle_main",
            "image_source = clustvit_ros.ros.image_source:main",
        ],
    },
)
