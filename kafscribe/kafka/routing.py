"""Which partition a new upload goes to: the live transcriber with the most memory to spare, then the
shortest queue.

Pure functions over the latest ``WorkerStatus`` of each worker, so the rule is
easy to read and to test:

1. Candidates are transcribers that are live (``kafscribe.kafka.workers.liveness``:
   status younger than ``worker_stale_s`` and not from the future, not ``stopped``) and own
   partitions of the uploads topic (others are dropped: a partition that
   does not exist would make every upload fail).
2. Prefer those whose headroom (minus what the ingress already routed to
   them since their last status) covers the job's estimate and that are not
   ``throttled``; if none does, every live candidate (the job waits in the
   chosen worker's admission rather than nowhere).
3. Most headroom wins, compared in 256 MiB steps so near-equal workers tie
   (the seed's rule: work goes to the nodes with the most free memory).
4. Ties go to the shortest queue: jobs running (``in_flight``) plus waiting
   in its partitions (``backlog``) plus routed to it by this ingress since its
   last status, plus the chunks running or waiting in the same process's
   chunk loop (``chunks@<worker_id>``: it shares the engine). Before, ties went
   to the fewest in-flight jobs alone, and two equal transcribers were seen
   getting 5 and 3 of 8 jobs, one idle for 73 s while the other had two queued.
   Then chance; the partition is one of the winner's, at random.

No candidate -> ``None``: the producer's key hashing decides.
"""

from __future__ import annotations

import random

from kafscribe.kafka.workers import THROTTLED, WorkerState

HEADROOM_STEP = 256 * 1024 * 1024
CHUNK_LOOP_PREFIX = "chunks@"  # consumers.chunk_transcriber.ChunkTranscriber.runner_id


def choose_partition(
    workers: list[WorkerState], need_bytes: int, reserved: dict[str, int] | None = None,
    rng: random.Random | None = None, routed: dict[str, int] | None = None,
) -> tuple[int, str] | None:
    """(partition, worker_id) for a job needing ``need_bytes``, or None for key hashing.

    ``reserved`` and ``routed``: bytes and jobs this ingress sent to each worker since its last status.
    """
    rng = rng or random.Random()
    reserved = reserved or {}
    routed = routed or {}
    live = [w for w in workers if w.live and w.status.stage == "transcriber" and w.status.partitions]
    if not live:
        return None

    def spare(w: WorkerState) -> int:
        return w.headroom - reserved.get(w.status.worker_id, 0)

    # the chunk loop of a transcriber process (``chunks@<worker_id>``) shares its engine: its queue counts too
    chunk_loops = {w.status.worker_id.removeprefix(CHUNK_LOOP_PREFIX): w for w in workers
                   if w.live and w.status.worker_id.startswith(CHUNK_LOOP_PREFIX)}

    def rank(w: WorkerState) -> tuple[int, int]:
        queue = w.status.in_flight + max(0, w.status.backlog) + routed.get(w.status.worker_id, 0)
        loop = chunk_loops.get(w.status.worker_id)
        if loop is not None:
            queue += loop.status.in_flight + max(0, loop.status.backlog)
        return spare(w) // HEADROOM_STEP, -queue

    fitting = [w for w in live if spare(w) >= need_bytes and w.status.state != THROTTLED]
    pool = fitting or live
    best_key = max(rank(w) for w in pool)
    best = rng.choice([w for w in pool if rank(w) == best_key])
    return rng.choice(best.status.partitions), best.status.worker_id
