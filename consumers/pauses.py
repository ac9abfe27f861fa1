"""Why each partition is paused: reasons per partition, fetching resumes when none is left.

The consume loop pauses partitions for several independent reasons -- the
producer is being recovered, a job runs with the next message already kept,
the concurrent pool is full, a message is not due yet, a redo is backing
off, the worker is stopping. Each is set and cleared on its own
(``add`` / ``discard``); a partition is paused while any reason names it,
and resumed when the last one goes. A reason may name every partition
(``keys=None``): it also covers partitions assigned later.

librdkafka keeps a partition's pause flag across revoke and re-assign, so a
partition that is assigned is explicitly paused or resumed (``assigned``).
Used from the loop's thread only (the rebalance callbacks run inside its
``poll``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from confluent_kafka import KafkaException, TopicPartition

PartitionKey = tuple[str, int]
STOPPING = "stopping"  # a reason both modes use: nothing new is fetched once the worker stops


class Pauses:
    """The pause reasons of a consumer's partitions, applied to the consumer as they change."""

    def __init__(self, consumer, on_resume: Callable[[list[PartitionKey]], None] | None = None) -> None:
        """``on_resume`` is told which partitions were just resumed (the concurrent mode seeks there)."""
        self.consumer = consumer
        self.on_resume = on_resume
        self.owned: set[PartitionKey] = set()
        self._all: set[str] = set()  # reasons that pause every partition
        self._one: dict[PartitionKey, set[str]] = {}  # reasons that pause one partition

    def reasons(self, key: PartitionKey) -> set[str]:
        return self._all | self._one.get(key, set())

    def paused(self, key: PartitionKey) -> bool:
        return bool(self._all or self._one.get(key))

    def has(self, reason: str, key: PartitionKey | None = None) -> bool:
        """Whether ``reason`` pauses every partition (``key`` None) or partition ``key``."""
        return reason in self._all if key is None else reason in self.reasons(key)

    def add(self, reason: str, keys: Iterable[PartitionKey] | None = None) -> None:
        """Pause ``keys`` (None: every partition, also those assigned later) for ``reason``."""
        self._change(reason, keys, add=True)

    def discard(self, reason: str, keys: Iterable[PartitionKey] | None = None) -> None:
        """``reason`` no longer pauses ``keys`` (None: anywhere, the per-partition uses included)."""
        self._change(reason, keys, add=False)

    def set(self, reason: str, on: bool, keys: Iterable[PartitionKey] | None = None) -> None:
        self._change(reason, keys, add=on)

    def assigned(self, keys: Iterable[PartitionKey]) -> None:
        """New partitions: paused if a reason covers them, else resumed (whatever librdkafka remembers)."""
        keys = set(keys)
        self.owned |= keys
        self._apply([k for k in keys if self.paused(k)], [k for k in keys if not self.paused(k)])

    def revoked(self, keys: Iterable[PartitionKey]) -> None:
        """Partitions gone: their own reasons go with them."""
        for key in keys:
            self.owned.discard(key)
            self._one.pop(key, None)

    def reapply(self) -> None:
        """Pause or resume every owned partition as its reasons say (a safety net: librdkafka's flags
        may have drifted, as they do across a revoke and re-assign)."""
        self._apply([k for k in self.owned if self.paused(k)], [k for k in self.owned if not self.paused(k)])

    def _change(self, reason: str, keys: Iterable[PartitionKey] | None, add: bool) -> None:
        before = {k: self.paused(k) for k in self.owned}
        if keys is None:
            if add:
                self._all.add(reason)
            else:
                self._all.discard(reason)
                for key in list(self._one):
                    self._drop(key, reason)
        else:
            for key in keys:
                if add:
                    self._one.setdefault(key, set()).add(reason)
                else:
                    self._drop(key, reason)
        pause = [k for k, was in before.items() if not was and self.paused(k)]
        resume = [k for k, was in before.items() if was and not self.paused(k)]
        self._apply(pause, resume)

    def _drop(self, key: PartitionKey, reason: str) -> None:
        reasons = self._one.get(key)
        if reasons is not None:
            reasons.discard(reason)
            if not reasons:
                del self._one[key]

    def _apply(self, pause: list[PartitionKey], resume: list[PartitionKey]) -> None:
        try:
            if pause:
                self.consumer.pause([TopicPartition(*k) for k in sorted(pause)])
            if resume:
                self.consumer.resume([TopicPartition(*k) for k in sorted(resume)])
        except (KafkaException, RuntimeError):
            return
        if resume and self.on_resume is not None:
            self.on_resume(sorted(resume))
