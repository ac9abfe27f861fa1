"""The soak drill: steady uploads while a chaos monkey SIGKILLs one service at a time.

    kafscribe stack up        # Kafka + Cassandra started by this checkout (the drill kills and restarts the broker)
    python -m bench.soak --minutes 20 --kill-every 60 --seed 1

What it does, against the stack the environment's ``KAFSCRIBE_*`` name:

1. ``kafscribe services`` (the supervisor, ``kafscribe/cli/services.py``) starts the ingress, two
   transcribers (tiny.en, one thread each), the translator, the sink, the notifier and the merger on a
   fresh topic prefix, with their own state directory and ports; a tenant of its own gets an API key,
   and a local webhook receiver takes every job's callback. Long recordings are split at 10 s
   (``KAFSCRIBE_CHUNK_S``), so the merger has work. After a warm-up job (short and long) the clock starts.
2. For ``--minutes``: an HTTP client uploads a clip every ``--http-every`` seconds (``POST /v1/jobs``)
   and a direct Kafka producer (``producers.submission.Submitter``: blob, job row, ``Upload`` event)
   every ``--direct-every`` seconds; the clips are 4-8 s of speech and, one upload in six, a 32 s
   recording that is split into chunks. A job counts as accepted when the ingress answered 202 or the
   direct producer returned; a 503 during an outage, or a connection cut by a killed ingress, is a
   refusal (the client would retry) and is counted as such.
3. Meanwhile the chaos monkey SIGKILLs a service 5 s into the uploads and then every ``--kill-every``
   seconds: a transcriber (either instance), the merger, the sink, the notifier, the ingress or the
   Kafka broker. The order is a shuffled cycle over those kinds (every kind once per cycle, the seed
   fixes the shuffle), so every kind is hit once within the first six kills. The supervisor restarts
   the services; the broker is restarted by the drill (``infra.stack.up``), as an operator's init
   system would. Every 2 s each service's RSS is sampled.
4. When the uploads stop, it waits for every accepted job to finish and its callback to arrive, then
   for the consumer groups' lag to reach 0 (``kafscribe.kafka.lag.LagReader``, the lag exporter's
   reader), and reads the ``results`` and ``finished`` topics as a downstream consumer would.

Pass/fail (exit status 1 on any failure, each printed): every accepted job ``completed``, none lost
(still unfinished at the end) or failed; exactly one ``Result`` and one ``finished`` event per job
(none doubled); each job's callbacks carry one webhook id (a notifier killed mid-delivery may deliver
that id again: receivers dedup by it, so redeliveries are counted, not failed); every kind was killed
and every killed service came back; RSS of the ingress and of every worker flat: the median of the
samples in the last third of the upload window within +-15 % of the median of the first third,
leaving out each process's first ``--warmup`` seconds; no partition of any group left with lag.

The shortened form runs in the test suite (``tests/e2e/test_soak.py``); docs/testing.md has both forms
and the figures of a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import psutil

from bench.harness import free_port, read_committed
from bench.pipeline import wait_for_transcribers
from infra import bootstrap, stack
from infra.process import ServerProcess
from kafscribe.cli import services
from kafscribe.kafka.lag import LagReader
from kafscribe.settings import Settings
from kafscribe.speech import sizing
from kafscribe.statuses import TERMINAL
from producers.client import HttpClient, HttpError
from schemas.events import Result

from .clips import make_clips

# What the chaos monkey kills: "transcriber" is one of the transcriber instances, "broker" the Kafka broker.
KINDS = ("transcriber", "merger", "sink", "notifier", "ingress", "broker")
SERVICES = ("ingress", "transcriber", "translator", "sink", "notifier", "merger")
FIRST_KILL_S = 5.0  # the first kill, into the uploads; then one every --kill-every seconds
SHORT_CLIPS_S = (4.0, 6.0, 8.0)
LONG_CLIP_S = 32.0  # split at CHUNK_S into about three chunks: the merger's work
CHUNK_S = 10.0
LONG_EVERY = 6  # one upload in six is the long recording
RSS_EVERY_S = 2.0
RSS_TOLERANCE = 0.15


class Receiver(Protocol):
    """A webhook endpoint that records what it gets (``tests/fakes.py`` ``WebhookReceiver`` is one)."""

    url: str
    requests: list[dict]

    def close(self) -> None: ...


class CallbackReceiver:
    """The drill's own webhook endpoint: answers 200, records headers (lower-cased) and body."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the schedule -------------------------------------------------------------------------------------
def kill_order(seed: int, count: int, kinds: Sequence[str] = KINDS) -> list[str]:
    """``count`` kinds: shuffled cycles over ``kinds`` (each kind once per cycle), never one kind twice in a row."""
    rng = random.Random(f"{seed}:kills")
    order: list[str] = []
    while len(order) < count:
        cycle = list(kinds)
        rng.shuffle(cycle)
        if order and len(cycle) > 1 and cycle[0] == order[-1]:
            cycle[0], cycle[-1] = cycle[-1], cycle[0]
        order += cycle
    return order[:count]


def kill_times(window_s: float, every_s: float, first_s: float = FIRST_KILL_S) -> list[float]:
    """Seconds into the upload window at which the monkey kills: ``first_s``, then every ``every_s``."""
    times, at = [], first_s
    while at < window_s:
        times.append(at)
        at += every_s
    return times


# --- what the drill records ------------------------------------------------------------------------
@dataclass
class Accepted:
    job_id: str
    via: str  # "http" | "direct"
    at_s: float
    long: bool


@dataclass
class Kill:
    at_s: float
    kind: str
    name: str  # the service ("transcriber-2", "kafka", ...)
    pid: int | None
    back_s: float | None = None  # until the supervisor's (or the drill's) new process; None: never came back
    note: str = ""


@dataclass
class Sample:
    t_s: float  # seconds into the upload window
    pid: int
    rss: int
    age_s: float  # how long this process had been running


@dataclass
class RssFigure:
    name: str
    start: int | None  # median RSS of the first third (bytes), warm-up left out
    end: int | None  # of the last third
    peak: int
    samples: int

    @property
    def change(self) -> float | None:
        return None if not self.start or self.end is None else self.end / self.start - 1

    @property
    def flat(self) -> bool:
        return self.change is not None and abs(self.change) <= RSS_TOLERANCE


@dataclass
class Report:
    seed: int
    window_s: float
    kill_every_s: float
    accepted: list[Accepted] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # "http 503", "direct Unavailable", ...
    kills: list[Kill] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)  # job id -> final status seen
    errors: dict[str, str] = field(default_factory=dict)  # job id -> error of a failed job
    results: Counter = field(default_factory=Counter)  # job id -> Result events on `results`
    finished: Counter = field(default_factory=Counter)  # job id -> events on `finished`
    callback_ids: dict[str, set[str]] = field(default_factory=dict)  # job id -> distinct webhook ids
    deliveries: Counter = field(default_factory=Counter)  # job id -> callbacks received
    rss: list[RssFigure] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)  # "group topic[p]" -> lag, partitions still lagging
    lag_checked: bool = False
    phases_s: dict[str, float] = field(default_factory=dict)
    log_dir: str = ""  # the services' logs

    @property
    def lost(self) -> list[str]:
        return [a.job_id for a in self.accepted if self.statuses.get(a.job_id) not in TERMINAL]

    @property
    def failed(self) -> list[str]:
        return [a.job_id for a in self.accepted if self.statuses.get(a.job_id) == "failed"]

    @property
    def completed(self) -> list[str]:
        return [a.job_id for a in self.accepted if self.statuses.get(a.job_id) == "completed"]

    @property
    def doubled(self) -> list[str]:
        return [a.job_id for a in self.accepted if self.results[a.job_id] > 1 or self.finished[a.job_id] > 1]

    @property
    def missing_events(self) -> list[str]:
        """Completed jobs without their Result or finished event (a job row that ran ahead of the log)."""
        return [j for j in self.completed if self.results[j] == 0 or self.finished[j] == 0]

    @property
    def no_callback(self) -> list[str]:
        return [a.job_id for a in self.accepted if not self.callback_ids.get(a.job_id)]

    @property
    def several_callback_ids(self) -> list[str]:
        return [a.job_id for a in self.accepted if len(self.callback_ids.get(a.job_id, ())) > 1]

    @property
    def redeliveries(self) -> int:
        return sum(n - 1 for n in self.deliveries.values() if n > 1)

    @property
    def kills_by_kind(self) -> Counter:
        return Counter(k.kind for k in self.kills)

    @property
    def not_back(self) -> list[Kill]:
        return [k for k in self.kills if k.back_s is None]

    def failures(self, kinds: Sequence[str] = KINDS) -> list[str]:
        out = []
        if not self.accepted:
            out.append("no upload was accepted")
        for name, jobs in (("lost (unfinished at the end)", self.lost), ("failed", self.failed),
                           ("doubled (more than one Result or finished event)", self.doubled),
                           ("completed without their Result/finished event", self.missing_events),
                           ("without a callback", self.no_callback),
                           ("with more than one callback id", self.several_callback_ids)):
            if jobs:
                out.append(f"{len(jobs)} job(s) {name}: {', '.join(jobs[:5])}"
                           + (" ..." if len(jobs) > 5 else ""))
        missed = [k for k in kinds if not self.kills_by_kind[k]]
        if missed:
            out.append(f"never killed: {', '.join(missed)} (the window holds too few kills)")
        for kill in self.not_back:
            out.append(f"{kill.name} killed at {kill.at_s:.0f}s did not come back ({kill.note})")
        for fig in self.rss:
            if not fig.flat:
                change = "no samples in the first or last third" if fig.change is None else f"{100 * fig.change:+.1f} %"
                out.append(f"RSS of {fig.name} not flat: {change} (bound +-{100 * RSS_TOLERANCE:.0f} %)")
        if not self.lag_checked:
            out.append("the final lag could not be read from the broker")
        elif self.lag:
            out.append(f"partitions left with lag: {dict(list(self.lag.items())[:6])}")
        return out

    def lines(self) -> list[str]:
        by_via = Counter(a.via for a in self.accepted)
        mb = 1 << 20
        out = [
            f"soak: seed {self.seed}, {self.window_s / 60:.1f} min of uploads, a kill every {self.kill_every_s:.0f} s",
            "  phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.phases_s.items())
            + (f"; services' logs in {self.log_dir}" if self.log_dir else ""),
            f"  jobs accepted {len(self.accepted)} (http {by_via['http']}, direct {by_via['direct']}),"
            f" {sum(a.long for a in self.accepted)} of them split into chunks;"
            f" refused {sum(self.refused.values())}"
            + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())) + ")" if self.refused else ""),
            f"  completed {len(self.completed)}, lost {len(self.lost)}, failed {len(self.failed)},"
            f" doubled {len(self.doubled)}",
            f"  callbacks: {sum(self.deliveries.values())} received, jobs with more than one callback id"
            f" {len(self.several_callback_ids)}, without a callback {len(self.no_callback)},"
            f" redeliveries of the same id {self.redeliveries}",
            "  kills: " + ", ".join(f"{k} {self.kills_by_kind[k]}" for k in KINDS if self.kills_by_kind[k])
            + f" ({len(self.kills)} in all)",
        ]
        for kill in self.kills:
            back = f"back after {kill.back_s:.1f} s" if kill.back_s is not None else f"NOT back ({kill.note})"
            out.append(f"    {kill.at_s:7.1f} s  {kill.name:<14} pid {kill.pid}  {back}")
        out.append(f"  RSS (median of the first / last third, first process seconds left out; bound"
                   f" +-{100 * RSS_TOLERANCE:.0f} %):")
        for fig in self.rss:
            start = f"{fig.start / mb:7.1f}" if fig.start else "    n/a"
            end = f"{fig.end / mb:7.1f}" if fig.end else "    n/a"
            change = f"{100 * fig.change:+6.1f} %" if fig.change is not None else "   n/a"
            out.append(f"    {fig.name:<14} start {start} MB  end {end} MB  {change}  peak {fig.peak / mb:7.1f} MB"
                       f"  ({fig.samples} samples){'' if fig.flat else '  NOT FLAT'}")
        lag = "not read" if not self.lag_checked else (sum(self.lag.values()) if self.lag else 0)
        out.append(f"  final lag: {lag}" + (f" on {len(self.lag)} partition(s)" if self.lag else
                                             " (every partition of every group)"))
        return out


# --- the drill -------------------------------------------------------------------------------------
def drill_settings(base: Settings, work: Path, model: str = "tiny.en", transcribers: int = 2) -> Settings:
    """The services' settings: ``base``'s stack, a fresh topic prefix, own state directory and ports."""
    return base.with_(
        topic_prefix=f"soak{uuid.uuid4().hex[:8]}.", state_dir=work / "state", http_port=free_port(),
        engine="faster-whisper", model=model, transcribers=str(transcribers), cpu_threads=1, beam_size=1,
        chunk_s=CHUNK_S, session_timeout_ms=6000, heartbeat_ms=min(base.heartbeat_ms, 1000),
        status_interval_s=1.0, retry_after_s=1, kafka_call_timeout_s=10.0, watchdog_s=90.0,
        callback_allow_networks="127.0.0.0/8", tenant_max_unfinished=0, ingress_processes=1,
        metrics_port=-1, supervisor_metrics_port=-1, lag_metrics_port=-1, prometheus_port=-1,
        public_url="", worker_id="", log_level="INFO",
    )


class Drill:
    def __init__(self, base: Settings, work: Path, *, minutes: float, kill_every_s: float, seed: int,
                 receiver: Receiver | None = None, kinds: Sequence[str] = KINDS, http_every_s: float = 4.0,
                 direct_every_s: float = 8.0, warmup_s: float = 30.0, drain_s: float = 300.0,
                 model: str = "tiny.en", transcribers: int = 2, log: Callable[[str], None] = print) -> None:
        self.base = base  # the stack's settings: where the broker's pid file is
        self.work = work
        self.settings = drill_settings(base, work, model, transcribers)
        self.window_s = minutes * 60
        self.seed = seed
        self.kinds = tuple(kinds)
        self.http_every_s, self.direct_every_s = http_every_s, direct_every_s
        self.warmup_s, self.drain_s = warmup_s, drain_s
        self.receiver = receiver
        self.log = log
        self.report = Report(seed, self.window_s, kill_every_s, log_dir=str(self.settings.state_dir / "services" / "logs"))
        self.schedule = list(zip(kill_times(self.window_s, kill_every_s),
                                 kill_order(seed, len(kill_times(self.window_s, kill_every_s)), self.kinds),
                                 strict=True))
        self.rng = random.Random(f"{seed}:picks")
        self.lock = threading.Lock()
        self.t0 = 0.0
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        self.names: list[str] = []

    # -- helpers
    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
        env.update(self.settings.to_env())
        return env

    def service_pid(self, name: str) -> int | None:
        return ServerProcess(name, self.settings.state_dir / "services", tag_prefix="--instance=").pid()

    def broker(self) -> ServerProcess:
        return ServerProcess("kafka", self.base.state_dir)

    # -- the whole run
    def run(self) -> Report:
        if "broker" in self.kinds and not self.broker().alive():
            raise RuntimeError(f"the broker at {self.base.kafka_bootstrap} was not started by this checkout's"
                               f" `kafscribe stack up` (state {self.base.state_dir}): the drill cannot kill it")
        own_receiver = self.receiver is None
        receiver = self.receiver or CallbackReceiver()
        started = time.monotonic()
        clips = self.make_clips()
        api_key = self.prepare()
        http = HttpClient(f"http://127.0.0.1:{self.settings.http_port}", timeout_s=60, api_key=api_key)
        try:
            services.up(self.settings, names=SERVICES, log=lambda line: self.log(f"[services] {line}"), env=self.env())
            self.names = self.service_names()
            self.warm_up(http, clips, receiver)
            self.report.phases_s["start-up"] = time.monotonic() - started
            self.t0 = time.monotonic()
            self.window(http, clips, receiver)
            self.report.phases_s["uploads"] = self.now_s()
            drain_from = time.monotonic()
            self.drain(receiver)
            self.report.phases_s["drain"] = time.monotonic() - drain_from
        finally:
            if not self.broker().alive():
                stack.up(self.base, log=lambda line: None, bootstrap_schema=False)
            services.down(self.settings, log=lambda line: None)
            if own_receiver:
                receiver.close()
        self.report.phases_s["total"] = time.monotonic() - started
        return self.report

    def service_names(self) -> list[str]:
        names = []
        for name in SERVICES:
            names += sizing.instance_names(int(self.settings.transcribers)) if name == sizing.TRANSCRIBER else [name]
        return names

    def make_clips(self) -> dict[str, list[Path]]:
        made = make_clips(self.work / "clips", [*SHORT_CLIPS_S, LONG_CLIP_S])
        return {"short": [p for p, _ in made[:-1]], "long": [made[-1][0]]}

    def prepare(self) -> str:
        """Topics of the fresh prefix and an API key of a tenant of the drill's own (``stack.up`` made the schema)."""
        from kafscribe.store import session as cassandra_session
        from kafscribe.store.apikeys import KeyStore

        bootstrap.ensure_topics(self.settings)
        self.tenant = f"soak-{uuid.uuid4().hex[:8]}"
        session = cassandra_session.connect(self.settings, keyspace=self.settings.cassandra_keyspace)
        try:
            return KeyStore(session).create(self.tenant, label="soak")[0]
        finally:
            session.cluster.shutdown()

    def warm_up(self, http: HttpClient, clips: dict[str, list[Path]], receiver: Receiver) -> None:
        """Every transcriber owns partitions; every clip goes through every stage twice, at once.

        A transcriber's memory grows with the lengths it has decoded (the engine keeps buffers of the
        largest), so both of them see every length before the RSS baseline is taken.
        """
        wait_for_transcribers(self.settings, int(self.settings.transcribers), timeout_s=180)
        every = [*clips["short"], *clips["long"]] * 2
        jobs = [http.submit(clip, callback_url=receiver.url + "/warm-up")["job_id"] for clip in every]
        deadline = time.monotonic() + 240
        while any((http.job(j) or {}).get("status") not in TERMINAL for j in jobs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up jobs {jobs} did not finish in 240 s")
            time.sleep(0.5)
        self.log("warm-up done: " + ", ".join(str((http.job(j) or {}).get("status")) for j in jobs))

    # -- the upload window
    def window(self, http: HttpClient, clips: dict[str, list[Path]], receiver: Receiver) -> None:
        stop = threading.Event()
        threads = [
            threading.Thread(target=self.sample_rss, args=(stop,), name="rss"),
            threading.Thread(target=self.upload_http, args=(http, clips, receiver.url + "/http"), name="http"),
            threading.Thread(target=self.upload_direct, args=(clips, receiver.url + "/direct"), name="direct"),
            threading.Thread(target=self.chaos_monkey, name="monkey"),
        ]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()

    def pick_clip(self, clips: dict[str, list[Path]]) -> tuple[Path, bool]:
        with self.lock:
            if self.rng.randrange(LONG_EVERY) == 0:
                return clips["long"][0], True
            return self.rng.choice(clips["short"]), False

    def accept(self, job_id: str, via: str, at_s: float, long: bool) -> None:
        with self.lock:
            self.report.accepted.append(Accepted(job_id, via, at_s, long))

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.report.refused[reason] += 1

    def ticks(self, every_s: float, offset_s: float = 0.0):
        """Seconds into the window of each upload, on a fixed beat (a slow answer does not shift the beat)."""
        at = offset_s
        while at < self.window_s:
            delay = at - self.now_s()
            if delay > 0:
                time.sleep(delay)
            if self.now_s() >= self.window_s:
                return
            yield at
            at += every_s
            at = max(at, self.now_s())  # a late answer: the next upload now, not a burst of missed ones

    def upload_http(self, http: HttpClient, clips: dict[str, list[Path]], callback: str) -> None:
        for at in self.ticks(self.http_every_s):
            clip, long = self.pick_clip(clips)
            try:
                self.accept(http.submit(clip, callback_url=callback)["job_id"], "http", at, long)
            except HttpError as err:
                self.refuse(f"http {err.status}")
            except Exception as err:  # noqa: BLE001 - the ingress was killed: refused, cut or reset connections
                self.refuse(f"http {type(getattr(err, 'reason', err)).__name__}")

    def upload_direct(self, clips: dict[str, list[Path]], callback: str) -> None:
        from kafscribe.store import session as cassandra_session
        from producers.publisher import Publisher
        from producers.submission import Submitter, parse_options

        options = parse_options({"callback_url": callback}, self.settings)
        session = cassandra_session.connect(self.settings, keyspace=self.settings.cassandra_keyspace)
        publisher = Publisher(self.settings)
        submitter = Submitter(self.settings, session, publisher)
        try:
            for at in self.ticks(self.direct_every_s, offset_s=self.direct_every_s / 2):
                clip, long = self.pick_clip(clips)
                try:
                    upload = submitter.submit(clip, options, tenant=self.tenant)
                except Exception as exc:  # noqa: BLE001 - the broker is down: Unavailable, counted
                    self.refuse(f"direct {type(exc).__name__}")
                    continue
                self.accept(upload.job_id, "direct", at, long)
        finally:
            publisher.close()
            session.cluster.shutdown()

    def sample_rss(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for name in self.names:
                pid = self.service_pid(name)
                if pid is None:
                    continue
                try:
                    proc = psutil.Process(pid)
                    sample = Sample(self.now_s(), pid, proc.memory_info().rss, time.time() - proc.create_time())
                except psutil.Error:
                    continue
                self.samples[name].append(sample)
            stop.wait(RSS_EVERY_S)

    # -- the chaos monkey
    def chaos_monkey(self) -> None:
        for at, kind in self.schedule:
            delay = at - self.now_s()
            if delay > 0:
                time.sleep(delay)
            kill = self.kill_broker() if kind == "broker" else self.kill_service(kind)
            self.report.kills.append(kill)
            back = f"back after {kill.back_s:.1f} s" if kill.back_s is not None else f"not back: {kill.note}"
            self.log(f"[monkey] {kill.at_s:6.1f} s: SIGKILL {kill.name} (pid {kill.pid}); {back}")

    def kill_service(self, kind: str, timeout_s: float = 90.0) -> Kill:
        names = [n for n in self.names if n.split("-")[0] == kind]
        with self.lock:
            name = self.rng.choice(names)
        deadline = time.monotonic() + timeout_s
        while (pid := self.service_pid(name)) is None:  # still coming back from an earlier kill
            if time.monotonic() > deadline:
                return Kill(self.now_s(), kind, name, None, note="not running when its turn came")
            time.sleep(0.2)
        kill = Kill(self.now_s(), kind, name, pid)
        before = self.restarts(name)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        while time.monotonic() < t_kill + timeout_s:
            row = services.status(self.settings)
            new = next((r for r in row if r.name == name), None)
            if new and new.pid and new.pid != pid and (new.restarts or 0) > before:
                kill.back_s = time.monotonic() - t_kill
                return kill
            time.sleep(0.2)
        kill.note = f"no new process within {timeout_s:.0f} s"
        return kill

    def restarts(self, name: str) -> int:
        try:
            state = json.loads((self.settings.state_dir / "services" / "supervisor.json").read_text())
            return int(state["services"][name]["restarts"])
        except (OSError, ValueError, KeyError):
            return 0

    def kill_broker(self) -> Kill:
        broker = self.broker()
        kill = Kill(self.now_s(), "broker", broker.name, broker.pid())
        if kill.pid is None:
            kill.note = "the broker was not running"
            return kill
        os.kill(kill.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        # Gone means its port is closed too: a killed JVM shows as a zombie while its other threads still
        # exit holding the listener, and ``stack.up`` would take a server on that port for a foreign one.
        node = next(n for n in stack.nodes(self.base) if n.server == "kafka")
        while broker.alive() or port_open(node.host, node.port):
            if time.monotonic() > t_kill + 60:
                kill.note = f"{node.address} still open 60 s after the kill"
                return kill
            time.sleep(0.1)
        try:
            stack.up(self.base, log=lambda line: None, bootstrap_schema=False)
        except stack.StackError as exc:
            kill.note = f"restart failed: {str(exc)[:200]}"
            return kill
        kill.back_s = time.monotonic() - t_kill
        return kill

    # -- after the uploads
    def drain(self, receiver: Receiver) -> None:
        from kafscribe.store import session as cassandra_session
        from kafscribe.store.jobs import JobStore

        rep = self.report
        session = cassandra_session.connect(self.settings, keyspace=self.settings.cassandra_keyspace)
        try:
            jobs = JobStore(session)
            deadline = time.monotonic() + self.drain_s
            pending = [a.job_id for a in rep.accepted]
            while True:
                still = []
                for job_id in pending:
                    job = jobs.get(job_id)
                    status = job["status"] if job else "missing"
                    rep.statuses[job_id] = status
                    if status == "failed":
                        rep.errors[job_id] = str(job.get("error"))
                    if status not in TERMINAL:
                        still.append(job_id)
                pending = still
                self.collect_callbacks(receiver)
                if not pending and not rep.no_callback or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
        finally:
            session.cluster.shutdown()
        self.log(f"drained: {len(rep.completed)} completed, {len(rep.lost)} unfinished, {len(rep.failed)} failed")
        time.sleep(2.0)  # a redelivery of a callback in flight would still be counted
        self.collect_callbacks(receiver)
        self.final_lag(timeout_s=max(30.0, deadline - time.monotonic()))
        for logical, counter in (("results", rep.results), ("finished", rep.finished)):
            for event in committed_events(self.settings, logical):
                if logical != "results" or isinstance(event, Result):
                    counter[event.job_id] += 1
        rep.rss = rss_figures(self.samples, self.window_s, self.warmup_s)
        with open(self.work / "rss.jsonl", "w") as f:  # every sample, for a closer look
            for name, series in self.samples.items():
                for sample in series:
                    f.write(json.dumps({"name": name, **asdict(sample)}) + "\n")

    def collect_callbacks(self, receiver: Receiver) -> None:
        ids: dict[str, set[str]] = defaultdict(set)
        deliveries: Counter = Counter()
        for request in list(receiver.requests):
            try:
                job_id = json.loads(request["body"])["data"]["job_id"]
            except (ValueError, KeyError, TypeError):
                continue
            ids[job_id].add(request["headers"].get("webhook-id", ""))
            deliveries[job_id] += 1
        self.report.callback_ids, self.report.deliveries = dict(ids), deliveries

    def final_lag(self, timeout_s: float) -> None:
        """Wait until no partition of any consumer group has lag (two snapshots in a row); record what is left."""
        reader = LagReader(self.settings)
        try:
            deadline = time.monotonic() + timeout_s
            clean = 0
            while True:
                snap = reader.snapshot()
                if snap.ok:
                    self.report.lag_checked = True
                    self.report.lag = {f"{p.group} {p.topic}[{p.partition}]": p.lag
                                       for p in snap.partitions if p.lag > 0}
                    clean = clean + 1 if not self.report.lag else 0
                if clean >= 2 or time.monotonic() > deadline:
                    return
                time.sleep(1.0)
        finally:
            reader.close()


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def rss_figures(samples: dict[str, list[Sample]], window_s: float, warmup_s: float) -> list[RssFigure]:
    """Per service: median RSS of the window's first and last third, each process's first ``warmup_s`` left out."""
    out = []
    for name, series in samples.items():
        warm = [s for s in series if s.age_s >= warmup_s and 0 <= s.t_s <= window_s]
        first = [s.rss for s in warm if s.t_s < window_s / 3]
        last = [s.rss for s in warm if s.t_s >= 2 * window_s / 3]
        out.append(RssFigure(name, int(statistics.median(first)) if first else None,
                             int(statistics.median(last)) if last else None,
                             max((s.rss for s in series), default=0), len(warm)))
    return out


def committed_events(settings: Settings, logical: str, timeout_s: float = 30.0) -> list:
    """Every committed event of a topic, decoded, as a read_committed consumer sees it."""
    group = f"{settings.topic_prefix}soak-reader-{uuid.uuid4().hex[:8]}"
    events, complete = read_committed(settings, logical, timeout_s, group)
    if not complete:
        raise RuntimeError(f"{settings.topic(logical)}: not read to its end in {timeout_s:.0f} s")
    return events


def run(base: Settings, work: Path, **kwargs: Any) -> Report:
    """One drill (``Drill``'s keyword arguments); the report, its ``failures()`` empty when it passed."""
    work.mkdir(parents=True, exist_ok=True)
    return Drill(base, work, **kwargs).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the upload window")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=1, help="fixes the kill order, the instances and the clips")
    parser.add_argument("--http-every", type=float, default=4.0, help="seconds between HTTP uploads")
    parser.add_argument("--direct-every", type=float, default=8.0, help="seconds between direct-producer uploads")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of each process's RSS left out")
    parser.add_argument("--drain", type=float, default=300.0, help="longest wait for the jobs after the uploads")
    parser.add_argument("--kinds", default=",".join(KINDS), help="what the monkey kills (default: all six)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    base = Settings.from_env()
    stack.up(base, log=lambda line: print(f"[stack] {line}"))
    work = args.dir or Path(tempfile.mkdtemp(prefix="kafscribe-soak-"))
    print(f"work directory {work} (services' logs in {work / 'state' / 'services' / 'logs'})", flush=True)
    report = run(base, work, minutes=args.minutes, kill_every_s=args.kill_every, seed=args.seed,
                 http_every_s=args.http_every, direct_every_s=args.direct_every, warmup_s=args.warmup,
                 drain_s=args.drain, kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
                 log=lambda line: print(line, flush=True))
    print("\n".join(report.lines()))
    failures = report.failures([k.strip() for k in args.kinds.split(",") if k.strip()])
    for line in failures:
        print(f"FAIL: {line}")
    print("soak: PASSED" if not failures else f"soak: FAILED ({len(failures)})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
