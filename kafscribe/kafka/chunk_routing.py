"""Which partition of the chunks topic each chunk of a split recording goes to.

Beside ``kafscribe.kafka.routing`` (uploads): the same live view of the workers,
a different rule. The goal is that the chunks of one recording are shared
evenly by the transcribers that can take them:

1. Candidates are live, not throttled chunk loops (``WorkerStatus`` stage
   ``chunk-transcriber``: their partitions are partitions of the chunks topic)
   whose headroom covers one chunk's estimate; if none does, every live one.
2. Chunk ``i`` goes to candidate ``(h + i) % n`` (``h`` from the job id, so
   every recording starts elsewhere), on that worker's partitions in turn:
   n workers get the chunks dealt like cards, whatever partitions they own.
3. No candidate (no status yet): ``(h + i) % partitions``, consecutive
   partitions from a point fixed by the job id.

A worker that dies meanwhile costs nothing but time: its partitions move to
another worker, which takes its chunks.
"""

from __future__ import annotations

import zlib

from kafscribe.kafka.workers import THROTTLED, WorkerState

CHUNK_STAGE = "chunk-transcriber"


def chunk_partition(job_id: str, index: int, partitions: int) -> int:
    """The partition of chunk ``index`` of ``job_id`` when no worker's status is known."""
    if partitions <= 0:
        raise ValueError("a topic has at least one partition")
    return (zlib.crc32(job_id.encode()) + index) % partitions


def chunk_partitions(job_id: str, count: int, partitions: int, workers: list[WorkerState],
                     need_bytes: int) -> list[int]:
    """The partition of each of the ``count`` chunks of ``job_id`` (see the module's rules)."""
    live = [w for w in workers if w.live and w.status.stage == CHUNK_STAGE
            and w.status.state != THROTTLED and any(0 <= p < partitions for p in w.status.partitions)]
    pool = sorted([w for w in live if w.headroom >= need_bytes] or live, key=lambda w: w.status.worker_id)
    if not pool:
        return [chunk_partition(job_id, i, partitions) for i in range(count)]
    start = zlib.crc32(job_id.encode())
    out = []
    for i in range(count):
        turn = start + i
        owned = sorted(p for p in pool[turn % len(pool)].status.partitions if 0 <= p < partitions)
        out.append(owned[(turn // len(pool)) % len(owned)])
    return out
