"""The few lines every node's ``main`` needs: init, construct, spin, shut down cleanly.

Two things no peer and no terminal may do to a running node:

- end it with a request: an exception raised while serving any callback
  (a malformed parameter request, say) is logged and spinning goes on;
- abort it with signals: SIGINT and SIGTERM only ask it to stop (the first one;
  later ones are ignored), so a double Ctrl-C under ``ros2 launch`` still
  leaves through the normal shutdown, with exit code 0.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from .limits import bounded

CALLBACK_ERROR_LOG_PERIOD_S = 2.0


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the spin loop polls it."""

    def __init__(self):
        self._event = threading.Event()
        self.signal_name = ""

    def __call__(self, signum, _frame) -> None:
        if not self._event.is_set():
            self.signal_name = signal.Signals(signum).name
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _install_signal_handlers(stop: StopRequest) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)


def spin_guarded(node: Node, stop: StopRequest, finished: Optional[Callable[[Node], bool]] = None) -> None:
    """Spin until a stop request, the context's shutdown or ``finished(node)``.

    A callback that raises is that callback's failure, not the node's: it is
    logged (at most every few seconds per kind of error) and spinning continues.
    """
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    logger = node.get_logger()
    last_logged: dict[str, float] = {}
    suppressed: dict[str, int] = {}
    try:
        while not stop.is_set() and node.context.ok() and not (finished is not None and finished(node)):
            try:
                executor.spin_once(timeout_sec=0.1)
            except (KeyboardInterrupt, ExternalShutdownException):
                break
            except Exception as exc:  # noqa: BLE001 - whatever a peer's request raised
                kind = type(exc).__name__
                now = time.monotonic()
                if now - last_logged.get(kind, -1e9) >= CALLBACK_ERROR_LOG_PERIOD_S:
                    extra = f" ({suppressed.pop(kind)} more since)" if suppressed.get(kind) else ""
                    logger.error(f"a callback failed and was skipped: {kind}: {bounded(exc)}{extra}")
                    last_logged[kind] = now
                else:
                    suppressed[kind] = suppressed.get(kind, 0) + 1
    finally:
        executor.remove_node(node)
        executor.shutdown(timeout_sec=1.0)


def run_node(factory: Callable[[], Node], name: str, startup_errors: tuple, args=None,
             finished: Optional[Callable[[Node], bool]] = None) -> int:
    """Exit code 1 (and a FATAL log naming the problem) when construction fails with ``startup_errors``.

    ``finished``: spin until it returns True (a player at the end of its input), else until a signal.
    """
    stop = StopRequest()
    _install_signal_handlers(stop)
    # rclpy's own handlers would turn a second Ctrl-C into an exception inside shutdown.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    code = 0
    try:
        node = factory()
        spin_guarded(node, stop, finished)
        if stop.is_set():
            node.get_logger().info(f"{stop.signal_name}: shutting down")
    except startup_errors as exc:
        rclpy.logging.get_logger(name).fatal(bounded(exc, 1000))
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        # From here on the process only exits. Python's finalisation would put SIG_DFL back
        # for our handler (not for SIG_IGN), and a late second Ctrl-C would then kill it (-2).
        _ignore_signals()
    return code


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
