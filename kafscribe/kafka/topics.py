"""The topics: one file (``topics.toml`` beside this module) that every part reads.

``infra.bootstrap`` creates them from it; the notifier and the lag exporter
read its callback retry tiers from it. Logical names here; ``Settings.topic``
adds the deployment's prefix.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

TOPICS_FILE = Path(__file__).resolve().parent / "topics.toml"
RETRY_TOPIC = "callbacks.retry"


@cache
def definitions() -> dict[str, dict[str, Any]]:
    """Every topic of ``topics.toml`` by logical name: partitions, config, delay_s."""
    return tomllib.loads(TOPICS_FILE.read_text())


@cache
def retry_tiers() -> tuple[tuple[str, float], ...]:
    """(logical topic, delay in seconds) of every retry topic, shortest first; ``callbacks.retry`` is 0."""
    tiers = [(name, float(spec.get("delay_s", 0))) for name, spec in definitions().items()
             if name == RETRY_TOPIC or name.startswith(RETRY_TOPIC + ".")]
    return tuple(sorted(tiers, key=lambda t: t[1]))
