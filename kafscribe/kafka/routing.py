"""Which partition a new upload goes to: among the live transcribers with memory for it, the one expected
to finish it first.

Pure functions over the latest ``WorkerStatus`` of each worker, so the rule is
easy to read and to test:

1. Candidates are transcribers that are live (``kafscribe.kafka.workers.liveness``:
   status younger than ``worker_stale_s`` and not from the future, not ``stopped``) and own
   partitions of the uploads topic (others are dropped: a partition that
   does not exist would make every upload fail).
2. Memory decides first: only those whose headroom (minus what the ingress already routed to them
   since their last status) covers the job's estimate and that are not ``throttled`` qualify; if
   none does, every live candidate (the job waits in the chosen worker's admission rather than
   nowhere).
3. Among them, the one expected to finish the job first (``expected_finish_s``): the work it holds
   (``WorkerStatus.work_s``, estimated engine-seconds: its running job's remainder plus what waits in
   its partitions), less the time since that status (it has worked meanwhile), plus what this
   ingress routed to it since, plus the same for its process's chunk loop (``chunks@<worker_id>``:
   it shares the engine), plus the job itself: its decoded duration times the worker's measured
   speed for the job's model (``WorkerStatus.speed``, engine seconds per audio second). Clip lengths
   vary many-fold, so a count of jobs says little: two equal transcribers given 8 clips of 5-38 s by
   queue length ran 65 and 49 s of work, the second idle for 12 s while the first had jobs queued.
   A worker of an older version (no ``speed`` in its status) holds ``DEFAULT_JOB_S`` per job running
   or waiting.
4. Finishes less than ``TIE_S`` apart are ties (the estimates are not finer than that): the most
   headroom (in 256 MiB steps), then chance; the partition is one of the winner's, at random.

No candidate -> ``None``: the producer's key hashing decides.

``idle_peer`` is the other half (nobody idle while work waits): a transcriber about to start a job
while more wait behind it hands that job on to a peer with nothing to do (``consumers.stage.hand_on``).
"""

from __future__ import annotations

import random

from kafscribe.kafka.workers import RUNNING, THROTTLED, WorkerState, status_age_s
from schemas.events import now_ms as _now_ms

HEADROOM_STEP = 256 * 1024 * 1024
CHUNK_LOOP_PREFIX = "chunks@"  # consumers.chunk_transcriber.ChunkTranscriber.runner_id
# Engine seconds per second of audio before a worker has measured its own (faster-whisper ``base`` int8 on one
# CPU thread took 2 s for a 3.8-s clip; a GPU is far faster). A worker reports its default until it has measured.
DEFAULT_SPEED = {"cpu": 0.5, "cuda": 0.1}
DEFAULT_AUDIO_S = 10.0  # audio per job waiting in a partition before a worker has seen any job
DEFAULT_JOB_S = DEFAULT_AUDIO_S * DEFAULT_SPEED["cpu"]  # engine-seconds per job of a worker that reports no speed
TIE_S = 1.0
IDLE_WORK_S = 0.5  # a peer holding less than this (and nothing running or waiting) is idle


def default_speed(device: str) -> float:
    """Engine seconds per audio second assumed on ``device`` (``cuda``, ``cuda:1``; anything else, ``auto``
    included, as the CPU: a slower guess only sends a worker less work until it has measured)."""
    return DEFAULT_SPEED["cuda"] if device.startswith("cuda") else DEFAULT_SPEED["cpu"]


def speed_for(w: WorkerState, model: str) -> float:
    """The worker's engine seconds per audio second for ``model`` ('': the one it has loaded)."""
    speeds = w.status.speed or {}
    value = speeds.get(model or w.status.model) or speeds.get(w.status.model)
    if value is None and speeds:
        value = max(speeds.values())  # another model than it measured: no faster than its slowest
    return value if value and value > 0 else DEFAULT_SPEED["cpu"]


def held_s(w: WorkerState, now_ms: int, routed_s: float = 0.0, routed: int = 0) -> float:
    """Engine-seconds of work the worker still holds now, by its status (less the time since) and what was
    routed to it since (``routed_s`` seconds, or ``routed`` jobs for a worker that reports no speed)."""
    s = w.status
    if not s.speed:  # an older worker: its queue length, at a default cost per job
        return (s.in_flight + max(0, s.backlog) + routed) * DEFAULT_JOB_S
    return max(0.0, s.work_s - max(0.0, status_age_s(s, now_ms))) + routed_s


def expected_finish_s(w: WorkerState, audio_s: float, model: str = "", *, now_ms: int | None = None,
                      routed_s: dict[str, float] | None = None, routed: dict[str, int] | None = None,
                      chunk_loop: WorkerState | None = None) -> float:
    """Seconds from now until the worker would finish a job of ``audio_s`` seconds of ``model`` sent to it now."""
    now = _now_ms() if now_ms is None else now_ms
    routed_s, routed = routed_s or {}, routed or {}
    wid = w.status.worker_id
    ahead = held_s(w, now, routed_s.get(wid, 0.0), routed.get(wid, 0))
    if chunk_loop is not None:
        ahead += held_s(chunk_loop, now)
    return ahead + max(0.0, audio_s) * speed_for(w, model)


def _chunk_loops(workers: list[WorkerState]) -> dict[str, WorkerState]:
    """The live chunk loop of each transcriber process, by the transcriber's worker id."""
    return {w.status.worker_id.removeprefix(CHUNK_LOOP_PREFIX): w for w in workers
            if w.live and w.status.worker_id.startswith(CHUNK_LOOP_PREFIX)}


def choose_partition(
    workers: list[WorkerState], need_bytes: int, reserved: dict[str, int] | None = None,
    rng: random.Random | None = None, routed: dict[str, int] | None = None, *, audio_s: float = 0.0,
    model: str = "", routed_s: dict[str, float] | None = None, now_ms: int | None = None,
) -> tuple[int, str] | None:
    """(partition, worker_id) for a job of ``audio_s`` seconds of ``model`` needing ``need_bytes``, or None
    for key hashing.

    ``reserved``, ``routed`` and ``routed_s``: bytes, jobs and engine-seconds this ingress sent to each
    worker since its last status.
    """
    rng = rng or random.Random()
    reserved = reserved or {}
    now = _now_ms() if now_ms is None else now_ms
    live = [w for w in workers if w.live and w.status.stage == "transcriber" and w.status.partitions]
    if not live:
        return None

    def spare(w: WorkerState) -> int:
        return w.headroom - reserved.get(w.status.worker_id, 0)

    loops = _chunk_loops(workers)
    fitting = [w for w in live if spare(w) >= need_bytes and w.status.state != THROTTLED]
    pool = fitting or live
    finish = {w.status.worker_id: expected_finish_s(w, audio_s, model, now_ms=now, routed_s=routed_s, routed=routed,
                                                    chunk_loop=loops.get(w.status.worker_id)) for w in pool}
    first = min(finish.values())
    tied = [w for w in pool if finish[w.status.worker_id] < first + TIE_S]
    roomiest = max(spare(w) // HEADROOM_STEP for w in tied)
    best = rng.choice([w for w in tied if spare(w) // HEADROOM_STEP == roomiest])
    return rng.choice(best.status.partitions), best.status.worker_id


def idle_peer(workers: list[WorkerState], me: str, need_bytes: int, *, now_ms: int | None = None,
              routed_s: dict[str, float] | None = None, rng: random.Random | None = None) -> tuple[int, str] | None:
    """(partition, worker_id) of a live transcriber other than ``me`` with nothing to do -- nothing running or
    waiting, no work held, nothing sent to it that its status may not show yet (``routed_s``), its chunk loop
    idle too -- and the memory for a job of ``need_bytes``; None if there is none."""
    now = _now_ms() if now_ms is None else now_ms
    routed_s = routed_s or {}
    loops = _chunk_loops(workers)

    def idle(w: WorkerState) -> bool:
        s = w.status
        return (s.in_flight == 0 and s.backlog <= 0 and held_s(w, now) < IDLE_WORK_S
                and s.worker_id not in routed_s)

    peers = [w for w in workers if w.live and w.status.stage == "transcriber" and w.status.partitions
             and w.status.worker_id != me and w.status.state == RUNNING and w.headroom >= need_bytes
             and idle(w) and (w.status.worker_id not in loops or idle(loops[w.status.worker_id]))]
    if not peers:
        return None
    rng = rng or random.Random()
    best = rng.choice(peers)
    return rng.choice(best.status.partitions), best.status.worker_id
