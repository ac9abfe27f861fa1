"""Dispatch by expected work: the routing rule on constructed statuses, the idle-peer hand-on, the speed and
work a transcriber reports (no broker)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from consumers.stage import hand_on
from consumers.status import WorkMeter
from kafscribe.kafka.routing import (
    DEFAULT_SPEED,
    TIE_S,
    choose_partition,
    default_speed,
    expected_finish_s,
    idle_peer,
    speed_for,
)
from kafscribe.kafka.workers import check_worker_status, classify
from kafscribe.settings import Settings
from schemas.events import Upload, WorkerStatus, decode_event

GIB = 1024**3
NOW = 1_800_000_000_000
NEED = 300 * 1024**2


def status(worker_id, *, work_s=0.0, speed=None, budget=4 * GIB, partitions=(0,), in_flight=0, backlog=0, age_s=0.0,
           state="running", stage="transcriber", model="base") -> WorkerStatus:
    return WorkerStatus(
        job_id="", worker_id=worker_id, host="h", pid=1, stage=stage, state=state, rss_bytes=GIB,
        host_mem_available=8 * GIB, host_mem_total=16 * GIB, memory_budget=budget, in_flight=in_flight,
        partitions=list(partitions), produced_at=NOW - int(age_s * 1000), backlog=backlog, model=model,
        work_s=work_s, speed={"base": 0.5} if speed is None else speed,
    )


def route(statuses, audio_s, **kw):
    return choose_partition(classify(statuses, NOW, 30), NEED, audio_s=audio_s, now_ms=NOW, **kw)


def test_a_short_job_goes_to_the_worker_that_finishes_it_first_not_to_the_fewest_jobs():
    """One long job running (1 job, 40 s of work) against three short ones (3 jobs, 6 s): by count the first
    would win; by work the second does."""
    long_one = status("long", work_s=40.0, in_flight=1, partitions=(0, 1))
    shorts = status("shorts", work_s=6.0, in_flight=1, backlog=2, partitions=(2, 3))
    for _ in range(20):
        partition, worker = route([long_one, shorts], 4.0, rng=random.Random())
        assert worker == "shorts" and partition in (2, 3)


def test_the_faster_worker_wins_an_idle_tie_only_when_it_finishes_clearly_first():
    fast, slow = status("fast", speed={"base": 0.1}), status("slow", speed={"base": 0.5}, partitions=(1,))
    assert route([fast, slow], 30.0)[1] == "fast"  # 3 s against 15 s
    # a 1-s clip: 0.1 s against 0.5 s is a tie (estimates are not finer than TIE_S): the most headroom
    roomy = status("slow", speed={"base": 0.5}, partitions=(1,), budget=9 * GIB)
    assert 0.5 - 0.1 < TIE_S and route([fast, roomy], 1.0)[1] == "slow"


def test_work_held_shrinks_with_the_age_of_the_status_and_grows_with_what_was_routed_since():
    w = classify([status("a", work_s=10.0, age_s=4.0)], NOW, 30)[0]
    assert expected_finish_s(w, 2.0, now_ms=NOW) == pytest.approx(6.0 + 1.0)
    assert expected_finish_s(w, 2.0, now_ms=NOW, routed_s={"a": 5.0}) == pytest.approx(12.0)
    old = classify([status("a", work_s=3.0, age_s=9.0)], NOW, 30)[0]
    assert expected_finish_s(old, 0.0, now_ms=NOW) == 0.0, "never below nothing"
    # eight jobs in a burst against two equal idle workers (statuses unchanged meanwhile): 4 and 4
    workers = [status("a"), status("b", partitions=(1,))]
    routed_s: dict[str, float] = {}
    for _ in range(8):
        _, worker = route(workers, 10.0, routed_s=routed_s, rng=random.Random(5))
        routed_s[worker] = routed_s.get(worker, 0.0) + 10.0 * 0.5
    assert routed_s == {"a": 20.0, "b": 20.0}


def test_memory_decides_first_an_idle_worker_without_headroom_loses_to_a_busy_one():
    idle_small = status("small", budget=GIB + 100 * 1024**2)  # 100 MiB of headroom < NEED
    busy = status("busy", work_s=50.0, in_flight=1, partitions=(1,))
    assert route([idle_small, busy], 5.0) == (1, "busy")
    throttled = status("throttled", state="throttled", partitions=(2,))
    assert route([throttled, busy], 5.0) == (1, "busy")
    # nobody fits: every live one is a candidate, and the first to finish wins
    assert route([idle_small, status("b2", budget=GIB, work_s=9.0, partitions=(1,))], 5.0) == (0, "small")


def test_the_chunk_loop_of_a_process_shares_its_engine_and_its_work_counts():
    a, b = status("a"), status("b", work_s=5.0, partitions=(1,))
    loop_a = status("chunks@a", work_s=30.0, stage="chunk-transcriber", partitions=(0, 1))
    assert route([a, b, loop_a], 4.0)[1] == "b"
    assert route([a, b], 4.0)[1] == "a"


def test_speed_per_model_with_defaults():
    w = classify([status("a", speed={"base": 0.2, "tiny.en": 0.05})], NOW, 30)[0]
    assert speed_for(w, "tiny.en") == 0.05 and speed_for(w, "") == 0.2 and speed_for(w, "small") == 0.2
    older = classify([status("old", speed={})], NOW, 30)[0]
    assert speed_for(older, "base") == DEFAULT_SPEED["cpu"]
    assert default_speed("cpu") == DEFAULT_SPEED["cpu"] and default_speed("cuda:1") == DEFAULT_SPEED["cuda"]


def test_an_idle_peer_is_one_with_nothing_running_waiting_held_or_routed():
    def peers(statuses, me="me", routed_s=None, need=NEED):
        return idle_peer(classify(statuses, NOW, 30), me, need, now_ms=NOW, routed_s=routed_s)

    me = status("me", work_s=30.0, in_flight=1, backlog=3)
    assert peers([me, status("idle", partitions=(5,))]) == (5, "idle")
    assert peers([me]) is None, "never itself"
    assert peers([me, status("busy", in_flight=1, work_s=3.0)]) is None
    assert peers([me, status("queued", backlog=1)]) is None
    assert peers([me, status("holding", work_s=4.0)]) is None
    assert peers([me, status("idle")], routed_s={"idle": 2.0}) is None, "something was just sent there"
    assert peers([me, status("gone", state="stopped")]) is None
    assert peers([me, status("throttled", state="throttled")]) is None
    assert peers([me, status("stale", age_s=60)]) is None
    assert peers([me, status("small", budget=GIB + 10 * 1024**2)]) is None, "no memory for the job"
    busy_chunks = status("chunks@idle", stage="chunk-transcriber", in_flight=1, work_s=20.0)
    assert peers([me, status("idle"), busy_chunks]) is None, "its engine is busy with chunks"


@dataclass
class FakeView:
    statuses: list[WorkerStatus]
    sent: dict[str, float] = field(default_factory=dict)

    def workers(self):
        return classify(self.statuses, NOW, 30)

    def routed_s(self) -> dict[str, float]:
        return dict(self.sent)

    def reserve(self, worker_id: str, need: int, work_s: float = 0.0) -> None:
        self.sent[worker_id] = self.sent.get(worker_id, 0.0) + work_s


def test_a_job_about_to_start_is_handed_on_to_an_idle_peer_only_while_more_wait_behind_it(monkeypatch):
    import kafscribe.kafka.routing as routing

    monkeypatch.setattr(routing, "_now_ms", lambda: NOW)
    settings = Settings(topic_prefix="t.")
    upload = Upload(job_id="j1", blob_ref="file:j1", audio_sha256="0" * 64, audio_bytes=1, audio_duration=4.0)
    view = FakeView([status("me", in_flight=1, work_s=9.0), status("peer", partitions=(3,))])
    assert hand_on(settings, view, "me", upload, waiting=0, max_moves=3) is None, "nothing waits: start it here"
    assert hand_on(settings, None, "me", upload, waiting=2, max_moves=3) is None
    moved = hand_on(settings, view, "me", upload, waiting=2, max_moves=3)
    assert moved is not None and (moved.topic, moved.partition) == ("t.uploads", 3)
    assert moved.event.job_id == "j1" and moved.event.attempt == 2 and moved.event.audio_duration == 4.0
    assert hand_on(settings, view, "me", upload, waiting=2, max_moves=3) is None, "the peer is no longer idle"
    far = Upload(job_id="j2", blob_ref="file:j2", audio_sha256="0" * 64, audio_bytes=1, audio_duration=4.0,
                 attempt=4)
    assert hand_on(settings, FakeView(view.statuses), "me", far, waiting=2, max_moves=3) is None, "moved enough"


def test_the_meter_reports_a_default_until_it_measures_then_a_moving_average():
    meter = WorkMeter("base", "cpu")
    assert meter.report() == {"base": DEFAULT_SPEED["cpu"]}
    meter.measured("base", 10.0, 2.0)
    assert meter.speed() == pytest.approx(0.2)
    meter.measured(None, 10.0, 4.0)
    assert meter.speed("base") == pytest.approx(0.2 + WorkMeter.ALPHA * (0.4 - 0.2))
    meter.measured("tiny.en", 0.0, 1.0)  # nothing to measure by
    assert "tiny.en" not in meter.report()
    assert meter.held_s(False, 0) == 0.0
    meter.began("base", 20.0)
    estimate = 20.0 * meter.speed()
    assert meter.held_s(True, 0) == pytest.approx(estimate, abs=0.05)
    assert meter.held_s(True, 2, audio_s=5.0) == pytest.approx(estimate + 2 * 5.0 * meter.speed(), abs=0.05)
    assert meter.held_s(False, 1, audio_s=5.0) == pytest.approx(5.0 * meter.speed())


def test_statuses_with_bad_work_or_speed_are_ignored_and_the_previous_version_still_reads():
    settings = Settings()
    good = status("w", work_s=3.0, speed={"base": 0.3})
    assert check_worker_status(settings, good, 4, now=NOW) is None
    for bad in (status("w", work_s=-1.0), status("w", work_s=math.nan), status("w", speed={"base": 0.0}),
                status("w", speed={"base": math.inf})):
        assert check_worker_status(settings, bad, 4, now=NOW) is not None
    # a worker of the previous version (no work_s, no speed) is read with the defaults
    import io
    import json

    import fastavro

    from schemas import codec

    old = fastavro.parse_schema(json.loads((codec.SCHEMA_DIR / "history" / "WorkerStatus.v2.avsc").read_text()),
                                _write_hint=False)
    record = {k: v for k, v in good.to_record().items() if k not in ("work_s", "speed")}
    buf = io.BytesIO()
    buf.write(codec.MAGIC + codec.schema_fingerprint(old))
    fastavro.schemaless_writer(buf, old, record)
    event = decode_event(buf.getvalue())
    assert isinstance(event, WorkerStatus) and (event.work_s, event.speed, event.backlog) == (0.0, {}, 0)
    older = classify([event], NOW, 30)[0]
    assert expected_finish_s(older, 0.0, now_ms=NOW) == 0.0
