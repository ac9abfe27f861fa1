"""Every worker's heartbeat on ``kafscribe.worker-status`` (compacted, key = worker_id).

Published every ``KAFSCRIBE_STATUS_INTERVAL_S`` from the poll thread (so a
worker that stops polling also stops reporting), and once more with
``state=stopped`` on a clean shutdown. The ingress routes uploads by it and
``GET /v1/workers`` shows it.

GPU memory is the driver's view (``kafscribe.speech.memory.gpu_status``, NVML) of the
device this worker is pinned to (``KAFSCRIBE_DEVICE``): free and total, and
what this process holds there -- the same for both engines, and without
importing torch, so a stage that loads no model stays small.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import psutil

from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka.workers import RUNNING, STOPPED, THROTTLED
from kafscribe.settings import Settings
from kafscribe.speech import memory
from schemas.events import WorkerStatus

from .loop import StageRunner

log = logging.getLogger("kafscribe.status")
# whose backlog the ingress routes by: a transcriber process's two loops (the runner's background probe
# asks the broker; a snapshot only reads its cache)
ROUTED_STAGES = ("transcriber", "chunk-transcriber")


class StatusReporter:
    def __init__(self, settings: Settings, runner: StageRunner, model: str = "") -> None:
        self.settings = settings
        self.runner = runner
        self.model = model
        self.topic = settings.topic("worker-status")
        self.producer = kafka_clients.producer(settings, **{"message.timeout.ms": 10000})
        self._last = 0.0

    def tick(self) -> None:
        if time.monotonic() - self._last >= self.settings.status_interval_s:
            self.publish()

    def state(self) -> str:
        if self.runner.stopped:
            return STOPPED
        return THROTTLED if self.runner.stage.throttled else RUNNING

    def snapshot(self, state: str | None = None) -> WorkerStatus:
        vm = psutil.virtual_memory()
        gpu = memory.gpu_status(self.settings.device)  # NVML: the pinned device, for either engine
        return WorkerStatus(
            job_id="", worker_id=self.runner.worker_id, host=socket.gethostname(), pid=os.getpid(),
            stage=self.runner.stage.name, state=state or self.state(), rss_bytes=memory.process_rss(),
            host_mem_available=int(vm.available), host_mem_total=int(vm.total),
            gpu_mem_free=gpu.free if gpu else None, gpu_mem_total=gpu.total if gpu else None,
            gpu_mem_used=gpu.process_used if gpu else None, gpu_device=gpu.index if gpu else None,
            memory_budget=self.settings.memory_budget_bytes or None,
            in_flight=self.runner.in_flight_count, partitions=self.runner.assignment(), model=self.model,
            backlog=self.runner.backlog() if self.runner.stage.name in ROUTED_STAGES and state != STOPPED else 0,
        )

    def publish(self, state: str | None = None) -> None:
        self._last = time.monotonic()
        status = self.snapshot(state)
        try:
            self.producer.produce(self.topic, key=status.worker_id.encode(), value=status.encode())
            self.producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must never stop the worker
            log.warning("could not publish worker status: %s", exc)

    def stopped(self) -> None:
        self.publish(STOPPED)
        self.producer.flush(5)
