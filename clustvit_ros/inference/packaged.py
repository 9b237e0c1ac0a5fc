"""Files the package ships (the default model, the demo video), wherever it was installed."""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "clustvit_ros"
DEFAULT_MODEL_NAME = "clustvit_tiny_camvid.safetensors"
SOURCE_TREE = Path(__file__).resolve().parents[2]


def share_file(*parts: str) -> Path:
    """``share/clustvit_ros/<parts>``: the ament share folder (colcon), the pip prefix, or the source tree.

    Returns where the file should be (the first candidate) when it is nowhere.
    """
    candidates = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)).joinpath(*parts))
        except (PackageNotFoundError, OSError, ValueError):  # no sourced workspace (AMENT_PREFIX_PATH unset)
            pass
    except ImportError:  # no ROS installation: pip install or source checkout
        pass
    candidates.append(SOURCE_TREE.joinpath(*parts))  # source tree or editable install
    candidates.append(Path(sys.prefix, "share", PACKAGE).joinpath(*parts))  # pip install
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def packaged_model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The default model shipped in models/."""
    return share_file("models", name)


def demo_video_path() -> Path:
    return share_file("demo", "vtest_excerpt.mp4")
