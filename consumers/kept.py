"""No gap between jobs: the messages the one-at-a-time loop fetched while a job ran, and their prefetch.

While a job runs, the loop keeps polling (to stay in its group); what it
fetches meanwhile is kept here and handled next, in the order fetched --
never rewound and fetched again. The head of the kept messages may be
prepared while the job runs (``Stage.prefetch``, depth 1): the transcriber
reads and decodes the next job's audio, so the next job starts at the engine.
Kept messages and their prefetch are dropped whenever their partition is
revoked, lost or rewound; ``taken`` makes sure an offset is never handled twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from confluent_kafka import Message

from kafscribe import metrics
from schemas.events import Event

from .pauses import PartitionKey
from .stage import Stage

log = logging.getLogger("kafscribe.loop")


@dataclass
class Prefetch:
    """The stage's preparation of the head kept message; ``future`` None: nothing to prepare."""

    msg: Message
    future: Future | None


class Kept:
    """Messages fetched while a job ran, in fetch order, and the prefetch of the first one."""

    def __init__(self, stage: Stage, parse: Callable[[Message], tuple[Event | None, str | None]],
                 stopping: Callable[[], bool]) -> None:
        """``parse``: the loop's decode-and-validate (event, why it cannot be handled), without side effects;
        ``stopping``: whether the worker stops (nothing new is prepared then)."""
        self.stage = stage
        self.parse = parse
        self.stopping = stopping
        self.messages: deque[Message] = deque()
        # Per partition, the offset after the last message taken (kept or handled): an older one is a
        # repeat (never handled twice). Forgotten wherever the partition is rewound, moved or re-assigned.
        self.taken: dict[PartitionKey, int] = {}
        self.prefetch: Prefetch | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __bool__(self) -> bool:
        return bool(self.messages)

    def pop(self) -> Message:
        return self.messages.popleft()

    def count(self, topic: str) -> int:
        return sum(1 for m in list(self.messages) if m.topic() == topic)

    def take(self, msg: Message) -> bool:
        """Note ``msg`` as taken; False if it is a repeat of one taken already (it is skipped)."""
        key = (msg.topic(), msg.partition())
        if msg.offset() < self.taken.get(key, -1):
            log.warning("skipping offset %d of partition %d: already taken", msg.offset(), msg.partition(),
                        extra={"stage": self.stage.name})
            return False
        self.taken[key] = msg.offset() + 1
        return True

    def keep(self, msg: Message, owned: set[PartitionKey]) -> None:
        """A message fetched while a job runs: handled after it (unless its partition moved meanwhile)."""
        if (msg.topic(), msg.partition()) in owned and self.take(msg):
            self.messages.append(msg)

    def drop(self, keys: set[PartitionKey] | None) -> int:
        """Forget kept messages of partitions ``keys`` (None: all): they will be fetched again from
        wherever the partition is read next. A prefetch of a dropped message is discarded."""
        for key in list(self.taken) if keys is None else keys:
            self.taken.pop(key, None)
        if not self.messages:
            return 0
        kept = [m for m in self.messages if keys is not None and (m.topic(), m.partition()) not in keys]
        dropped = len(self.messages) - len(kept)
        if dropped:
            self.messages = deque(kept)
            if self.prefetch is not None and (not kept or self.prefetch.msg is not kept[0]):
                self.discard_prefetch()
        return dropped

    def start_prefetch(self) -> None:
        """Let the stage prepare the head kept message while the current job runs (depth 1)."""
        if not self.stage.prefetches or not self.messages or self.prefetch is not None or self.stopping():
            return
        head = self.messages[0]
        event, reason = self.parse(head)
        future: Future | None = None
        if event is not None and reason is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage.name}-prefetch")
            future = self._pool.submit(self.stage.prefetch, event, head)
        self.prefetch = Prefetch(head, future)

    def take_prefetch(self, msg: Message) -> Future | None:
        """The prefetch of ``msg`` if there is one (any other one is stale and discarded)."""
        pre, self.prefetch = self.prefetch, None
        if pre is None or pre.future is None:
            return None
        if pre.msg is msg:
            return pre.future
        pre.future.cancel()
        return None

    def discard_prefetch(self) -> None:
        pre, self.prefetch = self.prefetch, None
        if pre is not None and pre.future is not None:
            pre.future.cancel()  # if it already runs, its result is simply never used
            metrics.PREFETCHES.labels(self.stage.name, "discarded").inc()

    def close(self) -> None:
        self.discard_prefetch()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
