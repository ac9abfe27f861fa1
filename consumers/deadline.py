"""Calls that really end by a deadline, even when the library's own timeout does not hold.

librdkafka's transactional calls take a timeout, yet one was seen blocked for
more than six minutes in a transaction's offset commit (timeout 30 s) after a
broker crash. ``call`` runs the function in a daemon thread and
stops waiting at the deadline: the caller gets ``Overrun`` and must treat the
object it called (a producer) as lost; the stuck thread is left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Overrun(Exception):
    """A call did not return by its deadline (it may still be running, and may still succeed)."""


def call(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``'s value or exception, or ``Overrun`` after ``timeout_s`` seconds."""
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"deadline:{what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise Overrun(f"{what} did not return within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
