"""Every worker's heartbeat on ``kafscribe.worker-status`` (compacted, key = worker_id).

Published from a thread of its own (``start``), never from the consume loop's:
a snapshot reads psutil and NVML and produces to Kafka, and a job that reaches
an idle worker must not wait behind that. It publishes every
``KAFSCRIBE_STATUS_INTERVAL_S``, and sooner (at most every ``MIN_GAP_S``) when
what routing reads changes -- a job starts or ends, work arrives, partitions
move -- so the views see a worker go busy or idle within a fraction of a
second. A worker that stops polling still stops reporting: the loop stamps
``StageRunner.last_beat`` every iteration, and the reporter publishes only
while that stamp is younger than ``fresh_s``. Once more with
``state=stopped`` on a clean shutdown. The ingress routes uploads by it and
``GET /v1/workers`` shows it.

What a transcriber holds (``work_s``) and how fast it is (``speed``) come from
its ``WorkMeter``: the running job's estimated remainder plus the jobs waiting
in its partitions, in engine-seconds, from the speed it measured per model
(``kafscribe.kafka.routing`` routes each upload to the worker expected to
finish it first).

GPU memory is the driver's view (``kafscribe.speech.memory.gpu_status``, NVML) of the
device this worker is pinned to (``KAFSCRIBE_DEVICE``): free and total, and
what this process holds there -- the same for both engines, and without
importing torch, so a stage that loads no model stays small.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import psutil

from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka import routing
from kafscribe.kafka.workers import RUNNING, STOPPED, THROTTLED
from kafscribe.settings import Settings
from kafscribe.speech import memory
from schemas.events import WorkerStatus

from .loop import StageRunner

log = logging.getLogger("kafscribe.status")
# whose backlog the ingress routes by: a transcriber process's two loops (the runner's background probe
# asks the broker; a snapshot only reads its cache)
ROUTED_STAGES = ("transcriber", "chunk-transcriber")
CHECK_S = 0.1  # how often the reporter thread looks for a change worth publishing at once
MIN_GAP_S = 0.2  # the least time between two statuses published for a change


class WorkMeter:
    """A transcriber's speed per model and the job it runs, for the work it reports (thread-safe).

    Speed is engine seconds per second of audio, a moving average (weight ``ALPHA`` for the newest
    job) of what the engine took; before the first job of a model, ``routing.default_speed`` of the
    device. A job waiting in a partition counts as the moving average of the audio lengths seen.
    """

    ALPHA = 0.3

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.model = model
        self.default = routing.default_speed(device)
        self.speeds: dict[str, float] = {}
        self.mean_audio_s = routing.DEFAULT_AUDIO_S
        self._running: tuple[float, float] | None = None  # (monotonic start, estimated engine-seconds)
        self._lock = threading.Lock()

    def speed(self, model: str = "") -> float:
        return self.speeds.get(model or self.model, self.default)

    def report(self) -> dict[str, float]:
        """Speed per model as the status carries it: the loaded model's default until it is measured."""
        with self._lock:
            return {self.model: self.default, **self.speeds}

    def began(self, model: str | None, audio_s: float) -> None:
        """A job of ``audio_s`` seconds of ``model`` starts (it replaces whatever ran before)."""
        with self._lock:
            self._running = (time.monotonic(), max(0.0, audio_s) * self.speed(model or ""))
            self.mean_audio_s += self.ALPHA * (max(0.0, audio_s) - self.mean_audio_s)

    def measured(self, model: str | None, audio_s: float, engine_s: float) -> None:
        """The engine took ``engine_s`` for ``audio_s`` seconds of ``model``: the speed moves toward that."""
        if audio_s <= 0 or engine_s <= 0:
            return
        with self._lock:
            key = model or self.model
            old = self.speeds.get(key)
            rate = engine_s / audio_s
            self.speeds[key] = rate if old is None else old + self.ALPHA * (rate - old)

    def held_s(self, running: bool, waiting: int, audio_s: float | None = None) -> float:
        """Engine-seconds held: the running job's remainder (at least a tenth of its estimate while it
        runs) plus ``waiting`` jobs of ``audio_s`` seconds each (None: the average seen)."""
        with self._lock:
            remainder = 0.0
            if running and self._running is not None:
                started, estimate = self._running
                remainder = max(estimate - (time.monotonic() - started), 0.1 * estimate)
            per_job = (self.mean_audio_s if audio_s is None else audio_s) * self.speeds.get(self.model, self.default)
            return remainder + max(0, waiting) * per_job


class StatusReporter:
    def __init__(self, settings: Settings, runner: StageRunner, model: str = "", *, meter: WorkMeter | None = None,
                 unit_audio_s: float | None = None) -> None:
        """``meter``: the process's transcriber speeds (routed stages); ``unit_audio_s``: the audio of each job
        this loop runs or holds, when the meter does not follow them (the chunk loop: a chunk's length)."""
        self.settings = settings
        self.runner = runner
        self.model = model
        self.meter = meter
        self.unit_audio_s = unit_audio_s
        self.topic = settings.topic("worker-status")
        self.producer = kafka_clients.producer(settings, **{"message.timeout.ms": 10000})
        self._last = 0.0
        self._shown: tuple | None = None  # what routing read in the last status published
        # the loop's stamp must be younger than this to publish (a few loop turns, or two intervals)
        self.fresh_s = max(2 * settings.status_interval_s, 2.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the reporter thread ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.runner.stage.name}-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_S):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must never stop the worker
                log.warning("worker status not published: %s", exc)

    def fresh(self) -> bool:
        """Whether the consume loop turned lately (a worker that stops polling stops reporting)."""
        return time.monotonic() - self.runner.last_beat <= self.fresh_s

    def shown(self) -> tuple:
        """What routing reads that can change between two intervals (cheap: no psutil, no broker)."""
        r = self.runner
        return r.in_flight_count, self._backlog(), tuple(r.assignment()), self.state()

    def tick(self) -> None:
        """Publish if due (the interval), or if what routing reads changed; nothing while the loop is stuck."""
        if not self.fresh():
            return
        since = time.monotonic() - self._last
        if since >= self.settings.status_interval_s or (since >= MIN_GAP_S and self.shown() != self._shown):
            self.publish()

    # --- what a status says -------------------------------------------------------------------
    def state(self) -> str:
        if self.runner.stopped:
            return STOPPED
        return THROTTLED if self.runner.stage.throttled else RUNNING

    def _backlog(self) -> int:
        return self.runner.backlog() if self.runner.stage.name in ROUTED_STAGES else 0

    def work(self, backlog: int) -> float:
        """Estimated engine-seconds this loop holds (0 without a meter)."""
        if self.meter is None:
            return 0.0
        running = self.runner.in_flight_count
        if self.unit_audio_s is not None:
            return self.meter.held_s(False, running + backlog, self.unit_audio_s)
        return self.meter.held_s(running > 0, backlog)

    def snapshot(self, state: str | None = None) -> WorkerStatus:
        vm = psutil.virtual_memory()
        gpu = memory.gpu_status(self.settings.device)  # NVML: the pinned device, for either engine
        backlog = self._backlog() if state != STOPPED else 0
        return WorkerStatus(
            job_id="", worker_id=self.runner.worker_id, host=socket.gethostname(), pid=os.getpid(),
            stage=self.runner.stage.name, state=state or self.state(), rss_bytes=memory.process_rss(),
            host_mem_available=int(vm.available), host_mem_total=int(vm.total),
            gpu_mem_free=gpu.free if gpu else None, gpu_mem_total=gpu.total if gpu else None,
            gpu_mem_used=gpu.process_used if gpu else None, gpu_device=gpu.index if gpu else None,
            memory_budget=self.settings.memory_budget_bytes or None,
            in_flight=self.runner.in_flight_count, partitions=self.runner.assignment(), model=self.model,
            backlog=backlog, work_s=self.work(backlog) if state != STOPPED else 0.0,
            speed=self.meter.report() if self.meter is not None else {},
        )

    def publish(self, state: str | None = None) -> None:
        with self._lock:
            if self._stop.is_set() and state != STOPPED:
                return  # stopped: nothing after the last word
            self._last = time.monotonic()
            self._shown = self.shown()
            status = self.snapshot(state)
            try:
                self.producer.produce(self.topic, key=status.worker_id.encode(), value=status.encode())
                self.producer.poll(0)
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must never stop the worker
                log.warning("could not publish worker status: %s", exc)

    def stopped(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.publish(STOPPED)
        self.producer.flush(5)
