"""Reading a whole topic as a downstream consumer would (read_committed)."""

from __future__ import annotations

import uuid

from bench.harness import read_committed
from kafscribe.settings import Settings
from schemas.events import Event


def read_topic(settings: Settings, logical: str, timeout_s: float = 5.0) -> list[Event]:
    """Every committed event on the topic, decoded (skips undecodable bytes)."""
    return read_committed(settings, logical, timeout_s, f"reader-{uuid.uuid4()}")[0]
