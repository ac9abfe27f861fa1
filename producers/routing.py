"""Which partition a new upload goes to: the live transcriber with the most memory to spare.

Pure functions over the latest ``WorkerStatus`` of each worker, so the rule is
easy to read and to test:

1. Candidates are transcribers that are live (status younger than
   ``worker_stale_s`` and not from the future, not ``stopped``) and own
   partitions of the uploads topic (others are dropped: a partition that
   does not exist would make every upload fail).
2. Prefer those whose headroom (minus what the ingress already routed to
   them since their last status) covers the job's estimate and that are not
   ``throttled``; if none does, every live candidate (the job waits in the
   chosen worker's admission rather than nowhere).
3. Most headroom wins, compared in 256 MiB steps so near-equal workers tie;
   ties go to the fewest in-flight jobs, then to chance.
4. The partition is one of the winner's, at random.

No candidate -> ``None``: the producer's key hashing decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from kafscribe import memory
from schemas.events import WorkerStatus

HEADROOM_STEP = 256 * 1024 * 1024


@dataclass
class WorkerState:
    """A worker as the views see it."""

    status: WorkerStatus
    liveness: str  # live | stale | stopped
    headroom: int


FUTURE_TOLERANCE_S = 300.0  # clock skew between hosts; a status further ahead is not live


def liveness(status: WorkerStatus, now_ms: int, stale_s: float) -> str:
    if status.state == "stopped":
        return "stopped"
    age_s = (now_ms - status.produced_at) / 1000
    return "live" if -FUTURE_TOLERANCE_S <= age_s <= stale_s else "stale"


def headroom(status: WorkerStatus) -> int:
    return memory.headroom_bytes(
        status.memory_budget or 0, status.rss_bytes, status.host_mem_available, status.gpu_mem_free
    )


def classify(
    statuses: list[WorkerStatus], now_ms: int, stale_s: float, partition_count: int | None = None
) -> list[WorkerState]:
    """Each status with its liveness and headroom; partitions outside ``partition_count`` are dropped."""
    states = []
    for s in statuses:
        if partition_count is not None:
            s = replace(s, partitions=sorted({p for p in s.partitions if 0 <= p < partition_count}))
        states.append(WorkerState(s, liveness(s, now_ms, stale_s), headroom(s)))
    return states


def choose_partition(
    workers: list[WorkerState], need_bytes: int, reserved: dict[str, int] | None = None,
    rng: random.Random | None = None,
) -> tuple[int, str] | None:
    """(partition, worker_id) for a job needing ``need_bytes``, or None for key hashing."""
    rng = rng or random.Random()
    reserved = reserved or {}
    live = [w for w in workers if w.liveness == "live" and w.status.stage == "transcriber" and w.status.partitions]
    if not live:
        return None

    def spare(w: WorkerState) -> int:
        return w.headroom - reserved.get(w.status.worker_id, 0)

    fitting = [w for w in live if spare(w) >= need_bytes and w.status.state != "throttled"]
    pool = fitting or live
    best_key = max((spare(w) // HEADROOM_STEP, -w.status.in_flight) for w in pool)
    best = rng.choice([w for w in pool if (spare(w) // HEADROOM_STEP, -w.status.in_flight) == best_key])
    return rng.choice(best.status.partitions), best.status.worker_id
