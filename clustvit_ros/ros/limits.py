"""Bounds on what peers can make the node write: their strings end up in logs and diagnostics."""
from __future__ import annotations

from typing import Any

MAX_REASON_CHARS = 200


def bounded(text: Any, limit: int = MAX_REASON_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text)} chars)"
