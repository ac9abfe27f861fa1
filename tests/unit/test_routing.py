"""Memory estimates and the routing rule, on synthetic worker statuses (statuses of workers that report no
speed, as older versions: a job counts as a default length; tests/unit/test_routing_work.py: by work)."""

from __future__ import annotations

import random

import pytest

from kafscribe.kafka.routing import choose_partition
from kafscribe.kafka.workers import classify, liveness
from kafscribe.speech import memory
from schemas.events import WorkerStatus

GIB = 1024**3
NOW = 1_800_000_000_000


def status(worker_id, *, budget=None, rss=1 * GIB, available=8 * GIB, partitions=(0,), state="running",
           in_flight=0, age_s=1.0, stage="transcriber", gpu_free=None, backlog=0) -> WorkerStatus:
    return WorkerStatus(
        job_id="", worker_id=worker_id, host="h", pid=1, stage=stage, state=state, rss_bytes=rss,
        host_mem_available=available, host_mem_total=16 * GIB, memory_budget=budget, gpu_mem_free=gpu_free,
        in_flight=in_flight, partitions=list(partitions), produced_at=NOW - int(age_s * 1000), backlog=backlog,
    )


def test_estimate_grows_with_duration_and_model_size():
    for engine in ("faster-whisper", "openai-whisper"):
        estimates = [memory.estimate_job_bytes(s, "base", engine) for s in (0, 30, 60, 300, 1800, 4 * 3600)]
        assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)
        assert estimates[-1] >= 4 * 3600 * memory.PEAK_PER_SECOND[engine] >= 4 * 3600 * memory.AUDIO_BYTES_PER_SECOND
        assert memory.estimate_job_bytes(10, "medium", engine) > memory.estimate_job_bytes(10, "base", engine)
        assert memory.estimate_job_bytes(10, "base", engine) > memory.estimate_job_bytes(10, "tiny.en", engine)
    assert memory.model_size("/models/ct2/tiny.en") == "tiny"
    assert memory.model_size("my-custom-model") == "medium"  # unknown: assume big
    # An unknown engine is estimated as the hungrier one; the default compute type is int8 on CPU.
    assert memory.estimate_job_bytes(60, "base", "other") == memory.estimate_job_bytes(60, "base", "openai-whisper")
    assert memory.estimate_job_bytes(60, "base", compute_type="default") == memory.estimate_job_bytes(
        60, "base", compute_type="int8")


# Measured with `python -m bench.memory jobs` (docs/memory-and-routing.md, "What a job adds"): (engine, model, compute, seconds, MiB added).
MEASURED = [
    ("faster-whisper", "base", "float32", 30, 143),
    ("faster-whisper", "base", "float32", 300, 285),
    ("faster-whisper", "base", "float32", 1800, 1601),
    ("faster-whisper", "base", "int8", 30, 155),
    ("faster-whisper", "base", "int8", 300, 286),
    ("faster-whisper", "base", "int8", 1800, 1597),
    ("faster-whisper", "tiny.en", "float32", 30, 117),
    ("faster-whisper", "tiny.en", "float32", 300, 285),
    ("faster-whisper", "tiny.en", "float32", 1800, 1601),
    ("faster-whisper", "tiny.en", "int8", 30, 122),
    ("faster-whisper", "tiny.en", "int8", 300, 285),
    ("faster-whisper", "tiny.en", "int8", 300, 285),
    ("faster-whisper", "tiny.en", "int8", 1800, 1601),
    ("openai-whisper", "base", "float32", 30, 259),
    ("openai-whisper", "base", "float32", 300, 173),
    ("openai-whisper", "base", "float32", 1800, 927),
    ("openai-whisper", "tiny.en", "float32", 30, 203),
    ("openai-whisper", "tiny.en", "float32", 300, 169),
    ("openai-whisper", "tiny.en", "float32", 1800, 927),
]
FIT_RATIO = 2.0


@pytest.mark.parametrize("engine,model,compute,seconds,mib", MEASURED)
def test_the_estimate_covers_every_measured_job_without_wasting_much(engine, model, compute, seconds, mib):
    estimate = memory.estimate_job_bytes(seconds, model, engine, compute) / 2**20
    assert mib <= estimate <= FIT_RATIO * mib


def test_the_constants_are_the_fit_of_the_measured_jobs():
    from bench.memory import fit

    rows = [{"engine": e, "model": m, "compute": c, "audio_s": float(sec), "job_bytes": mib * 2**20}
            for e, m, c, sec, mib in MEASURED]
    base, rate = fit(rows)
    for key, value in base.items():
        assert abs(memory.JOB_BASE[key] - value) <= 2**20, key
    for engine, value in rate.items():
        assert abs(memory.PEAK_PER_SECOND[engine] - value) <= 2 * 1024, engine


def test_headroom_uses_budget_then_gpu_then_host():
    assert memory.headroom_bytes(4 * GIB, 1 * GIB, 20 * GIB, None) == 3 * GIB
    assert memory.headroom_bytes(0, 1 * GIB, 20 * GIB, 5 * GIB) == 5 * GIB
    assert memory.headroom_bytes(0, 1 * GIB, 3 * GIB, 5 * GIB) == 3 * GIB  # features are computed on the host
    assert memory.headroom_bytes(0, 1 * GIB, 20 * GIB, None) == 20 * GIB


def test_liveness():
    assert liveness(status("a", age_s=5), NOW, 30) == "live"
    assert liveness(status("a", age_s=31), NOW, 30) == "stale"
    assert liveness(status("a", state="stopped"), NOW, 30) == "stopped"


def test_most_headroom_wins_and_stale_or_stopped_never_chosen():
    workers = classify([
        status("small", budget=3 * GIB, partitions=(0, 1)),
        status("big", budget=9 * GIB, partitions=(2, 3)),
        status("dead", budget=64 * GIB, partitions=(4,), age_s=60),
        status("gone", budget=64 * GIB, partitions=(5,), state="stopped"),
        status("other-stage", budget=64 * GIB, partitions=(6,), stage="sink"),
    ], NOW, 30)
    rng = random.Random(1)
    picks = {choose_partition(workers, 500 * 1024**2, rng=rng) for _ in range(50)}
    assert picks == {(2, "big"), (3, "big")}


def test_a_worker_below_the_estimate_is_avoided_and_ties_go_to_fewest_in_flight():
    workers = classify([
        status("capped", budget=GIB + 100 * 1024**2, partitions=(0,)),
        status("busy", partitions=(1,), in_flight=1),
        status("idle", partitions=(2,), in_flight=0),
    ], NOW, 30)
    assert choose_partition(workers, 300 * 1024**2) == (2, "idle")


def test_reservations_spread_a_burst_across_equal_workers():
    workers = classify([status("a", budget=3 * GIB, partitions=(0,)),
                        status("b", budget=3 * GIB, partitions=(1,))], NOW, 30)
    reserved: dict[str, int] = {}
    chosen = []
    for _ in range(4):
        partition, worker = choose_partition(workers, 600 * 1024**2, reserved, random.Random(0))
        reserved[worker] = reserved.get(worker, 0) + 600 * 1024**2
        chosen.append(worker)
    assert sorted(chosen) == ["a", "a", "b", "b"]


def test_headroom_qualifies_and_then_the_shorter_queue_wins_over_more_headroom():
    """Memory decides first (who qualifies), then who finishes first: more headroom no longer outranks a
    shorter queue; it only breaks ties."""
    workers = classify([
        status("roomy-but-queued", budget=9 * GIB, partitions=(0,), in_flight=1, backlog=2),
        status("short-queue", budget=3 * GIB, partitions=(1,), in_flight=1, backlog=0),
        status("empty-but-too-small", budget=GIB + 100 * 1024**2, partitions=(2,)),
    ], NOW, 30)
    assert choose_partition(workers, 500 * 1024**2) == (1, "short-queue")
    # equal queues: the one with more headroom
    even = classify([status("a", budget=3 * GIB, partitions=(0,), backlog=1),
                     status("b", budget=5 * GIB, partitions=(1,), in_flight=1)], NOW, 30)
    assert choose_partition(even, 500 * 1024**2) == (1, "b")


def test_jobs_routed_since_the_last_status_count_as_queued():
    """Eight submitters against two equal workers whose statuses do not change meanwhile: 4 and 4."""
    workers = classify([status("a", partitions=(0,)), status("b", partitions=(1,))], NOW, 30)
    routed: dict[str, int] = {}
    rng = random.Random(3)
    for _ in range(8):
        _, worker = choose_partition(workers, 100 * 1024**2, rng=rng, routed=routed)
        routed[worker] = routed.get(worker, 0) + 1
    assert routed == {"a": 4, "b": 4}
    # a worker that reports a longer backlog gets fewer
    workers = classify([status("a", partitions=(0,), backlog=3), status("b", partitions=(1,))], NOW, 30)
    routed = {}
    for _ in range(5):
        _, worker = choose_partition(workers, 100 * 1024**2, rng=rng, routed=routed)
        routed[worker] = routed.get(worker, 0) + 1
    assert routed == {"a": 1, "b": 4}


def test_chunks_queued_in_a_processs_chunk_loop_count_against_its_transcriber():
    workers = classify([
        status("a", partitions=(0,)),
        status("b", partitions=(1,), in_flight=1),
        status("chunks@a", partitions=(0, 1), stage="chunk-transcriber", in_flight=1, backlog=2),
        status("chunks@b", partitions=(2,), stage="chunk-transcriber"),
    ], NOW, 30)
    assert choose_partition(workers, 100 * 1024**2) == (1, "b")  # a's engine has three chunks to go


def test_no_live_transcriber_means_key_hashing():
    assert choose_partition([], GIB) is None
    assert choose_partition(classify([status("old", age_s=99)], NOW, 30), GIB) is None


def test_a_status_older_than_worker_stale_s_is_dead_in_every_view():
    """One staleness rule (``kafscribe.kafka.workers.liveness``) for upload routing, chunk routing and the
    lag exporter's worker metrics: 30 s by default, a second past it is dead everywhere."""
    from kafscribe.kafka import lag
    from kafscribe.kafka.chunk_routing import chunk_partition, chunk_partitions
    from kafscribe.settings import Settings

    settings = Settings()
    assert settings.worker_stale_s == 30.0
    for age_s, alive in ((settings.worker_stale_s - 1, True), (settings.worker_stale_s + 1, False)):
        statuses = [status("t", age_s=age_s, partitions=(1,)), status("c", age_s=age_s, partitions=(2,),
                                                                      stage="chunk-transcriber")]
        workers = classify(statuses, NOW, settings.worker_stale_s, 4)
        assert [w.live for w in workers] == [alive, alive]
        assert choose_partition(workers, GIB) == ((1, "t") if alive else None)
        assert chunk_partitions("job", 1, 4, workers, GIB) == ([2] if alive else [chunk_partition("job", 0, 4)])
        families = {f.name: f for f in lag.worker_families(lag.Snapshot(workers=workers, taken_ms=NOW), settings)}
        assert bool(families["kafscribe_worker_headroom_bytes"].samples) is alive
        assert len(families["kafscribe_worker_status_age_seconds"].samples) == 2  # stale: its age still shows
