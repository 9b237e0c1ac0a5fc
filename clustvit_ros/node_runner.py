"""The few lines every node's ``main`` needs: init, construct, spin, shut down cleanly."""
from __future__ import annotations

from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node


def run_node(factory: Callable[[], Node], name: str, startup_errors: tuple, args=None,
             finished: Optional[Callable[[Node], bool]] = None) -> int:
    """Exit code 1 (and a FATAL log naming the problem) when construction fails with ``startup_errors``.

    ``finished``: spin until it returns True (a player at the end of its input), else until Ctrl-C.
    """
    rclpy.init(args=args)
    node = None
    try:
        node = factory()
        if finished is None:
            rclpy.spin(node)
        else:
            while rclpy.ok() and not finished(node):
                rclpy.spin_once(node, timeout_sec=0.1)
    except startup_errors as exc:
        rclpy.logging.get_logger(name).fatal(str(exc))
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
