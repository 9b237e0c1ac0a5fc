"""What the launch files and the parameter file reference must exist and agree with the node.

CI cannot run `ros2 launch` (launch/launch_ros are not installable here), so the
launch files are checked structurally, the colcon-style install layout is built
for real, and the parameter file is loaded by a real node process.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ros_helpers import NodeProcess, Probe, wait_for

REPO = Path(__file__).resolve().parents[2]
SEGMENT_LAUNCH = REPO / "launch" / "segment.launch.py"
DEMO_LAUNCH = REPO / "launch" / "demo.launch.py"
PARAMS = REPO / "config" / "segment.yaml"


def _calls(path: Path, name: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == name]


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return ast.literal_eval(keyword.value) if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def _console_scripts() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return {entry.value.split("=")[0].strip() for entry in value.elts}
    raise AssertionError("no console_scripts in setup.py")


def _dict_calls(path: Path) -> list[ast.Call]:
    return _calls(path, "dict")


def test_launch_files_start_our_executables():
    scripts = _console_scripts()
    for path in (SEGMENT_LAUNCH, DEMO_LAUNCH):
        compile(path.read_text(), str(path), "exec")
        # Keyword arguments shared by both node kinds live in a dict(...) passed as **common.
        shared = {keyword.arg: keyword.value for call in _dict_calls(path) for keyword in call.keywords}
        nodes = _calls(path, "Node") + _calls(path, "LifecycleNode")
        assert nodes, path
        for call in nodes:
            package = _keyword(call, "package")
            if package is None and "package" in shared:
                package = ast.literal_eval(shared["package"])
            assert package == "clustvit_ros", path
            assert _keyword(call, "executable") in scripts, path
    executables = {_keyword(call, "executable") for call in _calls(SEGMENT_LAUNCH, "Node")
                   + _calls(SEGMENT_LAUNCH, "LifecycleNode")}
    assert executables == {"segment_node", "segment_lifecycle_node"}


def _overrides(source: str) -> dict:
    """segment.launch.py's OVERRIDES: the arguments that override the parameter file, declared from it."""
    assignment = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
                      and getattr(node.targets[0], "id", None) == "OVERRIDES")
    return ast.literal_eval(assignment.value)


def test_segment_launch_arguments_are_the_contract():
    source = SEGMENT_LAUNCH.read_text()
    calls = _calls(SEGMENT_LAUNCH, "DeclareLaunchArgument")
    names = {ast.literal_eval(call.args[0]) for call in calls if isinstance(call.args[0], ast.Constant)}
    assert "for name, description in OVERRIDES.items()" in source  # the overrides are declared from OVERRIDES
    names |= set(_overrides(source))
    assert names == {"image_topic", "namespace", "params_file", "model_path", "device", "input_transport",
                     "precision", "lifecycle", "autostart"}
    demo_names = {ast.literal_eval(call.args[0]) for call in _calls(DEMO_LAUNCH, "DeclareLaunchArgument")}
    assert demo_names == {"source", "rate", "loop", "image_topic", "model_path", "device"}
    assert '("image", LaunchConfiguration("image_topic"))' in source  # the remap
    assert '"config",' in source and '"segment.yaml"' in source  # default params_file
    # Every per-run override the launch file forwards is a real node parameter in the file.
    in_file = yaml.safe_load(PARAMS.read_text())["/**"]["ros__parameters"]
    assert set(_overrides(source)) <= set(in_file)
    demo = DEMO_LAUNCH.read_text()
    assert '"segment.launch.py"' in demo and '"vtest_excerpt.mp4"' in demo
    assert (REPO / "demo" / "vtest_excerpt.mp4").is_file()


@pytest.mark.slow
def test_colcon_style_install_layout(tmp_path):
    """`setup.py install` (what colcon runs for ament_python) puts everything where ROS looks."""
    prefix = tmp_path / "install"
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", f"--egg-base={tmp_path}", "build",
         f"--build-base={tmp_path / 'build'}", "install", f"--prefix={prefix}",
         "--single-version-externally-managed", f"--record={tmp_path / 'record.txt'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    share = prefix / "share" / "clustvit_ros"
    for relative in ("package.xml", "launch/segment.launch.py", "launch/demo.launch.py", "config/segment.yaml",
                     "demo/vtest_excerpt.mp4"):
        assert (share / relative).is_file(), relative
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "clustvit_ros").is_file()
    for executable in ("segment_node", "segment_lifecycle_node", "image_source", "clustvit"):
        assert (prefix / "lib" / "clustvit_ros" / executable).is_file(), executable
    # Every layer's package is installed (a folder without __init__.py would be left out).
    installed = {p.relative_to(prefix).parts[-2] for p in prefix.rglob("clustvit_ros/*/__init__.py")}
    assert {"model", "inference", "ros", "tools"} <= installed, installed
    assert list(prefix.rglob("clustvit_ros/model/reduction/registry.py"))
    if (REPO / "models" / "clustvit_tiny_camvid.safetensors").is_file():
        assert (share / "models" / "clustvit_tiny_camvid.safetensors").is_file()


@pytest.mark.ros
@pytest.mark.slow
def test_parameter_file_holds_every_node_parameter(node_model):
    from rcl_interfaces.srv import ListParameters
    declared_in_file = yaml.safe_load(PARAMS.read_text())["/**"]["ros__parameters"]
    # The file the launch file passes, loaded by the node itself; model_path is the one override.
    process = NodeProcess("segment_node", {"model_path": node_model}, {"__node": "clustvit_params"},
                          name="params", params_file=PARAMS)
    probe = Probe("params_probe")
    try:
        client = probe.node.create_client(ListParameters, "/clustvit_params/list_parameters")
        assert client.wait_for_service(timeout_sec=120), process.log()
        future = client.call_async(ListParameters.Request())
        assert wait_for(future.done, 20)
        node_parameters = {name for name in future.result().result.names if not name.startswith("qos_overrides.")}
        node_parameters -= {"use_sim_time", "start_type_description_service"}
        # merge_threshold defaults to the checkpoint's own value and cameras to none: in the file, commented,
        # with how to set them; the class map is the checkpoint's (read-only).
        from_checkpoint = {"merge_threshold", "class_names", "class_colors"}
        assert node_parameters == set(declared_in_file) | from_checkpoint | {"cameras"}, \
            node_parameters ^ set(declared_in_file)
        assert "# merge_threshold:" in PARAMS.read_text() and "# cameras:" in PARAMS.read_text()
        names = sorted(declared_in_file)
        values = dict(zip(names, probe.get_parameters("/clustvit_params", *names)))
        assert values == {**declared_in_file, "model_path": str(node_model)}
        from clustvit_ros.model import read_metadata
        model_default = read_metadata(node_model)[0].default_merge_threshold
        assert probe.get_parameters("/clustvit_params", "merge_threshold") == [model_default]
    finally:
        probe.close()
        process.stop()
