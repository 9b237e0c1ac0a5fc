"""ROS 2 nodes: camera images in; labels, confidence, overlay, token counts, latency and diagnostics out.

Thin adapters around ``SegmentationPipeline``: ``SegmentNode`` starts segmenting
as soon as it is constructed; ``SegmentLifecycleNode`` is a managed node
(configure loads the model and creates the publishers, activate subscribes,
deactivate stops, cleanup frees the model and its GPU memory).
"""
from __future__ import annotations

import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node

from .parameters import StartupError, declare_startup
from .pipeline import SegmentationPipeline
from .runner import run_node

NODE_NAME = "clustvit"


class SegmentNode(Node):
    """The segmentation node: configured and active from construction on."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.pipeline = SegmentationPipeline(self, declare_startup(self))
        self.pipeline.configure()
        self.pipeline.activate()

    def destroy_node(self) -> None:
        # Also called on a node whose construction failed half-way: nothing may be assumed.
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.shutdown()
        super().destroy_node()


class SegmentLifecycleNode(LifecycleNode):
    """The same node as a managed (lifecycle) node: nothing loaded until configured."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.pipeline = SegmentationPipeline(self, declare_startup(self), lifecycle=True)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pipeline.configure()
        except StartupError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.activate()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.cleanup()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.shutdown()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.pipeline.shutdown()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.shutdown()
        super().destroy_node()


def main(args=None) -> int:
    return run_node(SegmentNode, NODE_NAME, (StartupError,), args)


def lifecycle_main(args=None) -> int:
    return run_node(SegmentLifecycleNode, NODE_NAME, (StartupError,), args)


if __name__ == "__main__":
    sys.exit(main())
