"""GPU memory from the driver (NVML) for every engine, through a fake ``pynvml`` (no GPU is lent here).

Unit tests of ``kafscribe.speech.memory``'s device logic, then real-stack tests: two
workers pinned to different GPUs publish their statuses to Kafka, the
ingress's worker view reads them back and routing prefers the GPU with more
free memory; a faster-whisper transcriber admits jobs by its GPU.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from consumers.stage import Stage
from kafscribe.speech import memory
from kafscribe.speech.engines.base import EngineError, resolve_device, split_device
from tests.fakes import FakeNVML

GIB = 1024**3
PID = os.getpid()


def two_gpus() -> FakeNVML:
    # Small cards, so that the host's available memory (also a bound on CUDA) never is the smaller.
    return FakeNVML([
        {"uuid": "GPU-aaaa", "total": 3 * GIB, "free": 1 * GIB, "procs": {PID: 1 * GIB, 999999: GIB // 2}},
        {"uuid": "GPU-bbbb", "total": 4 * GIB, "free": 2 * GIB, "procs": {PID: GIB // 2}},
    ])


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml (two GPUs) for this test; ``memory`` asks NVML afresh."""
    fake = two_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    memory._nvml.cache_clear()
    yield fake
    memory._nvml.cache_clear()


def test_no_package_or_no_driver_means_none_cleanly(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    memory._nvml.cache_clear()
    assert memory.gpu_status("cuda") is None
    assert memory.gpu_memory("cuda:1") is None
    no_driver = FakeNVML([], driver=False)
    monkeypatch.setitem(sys.modules, "pynvml", no_driver)
    memory._nvml.cache_clear()
    assert memory.gpu_status("cuda") is None
    assert memory.gpu_status("cuda") is None
    assert no_driver.init_calls == 1  # asked once, not on every status tick
    assert resolve_device("auto") == "cpu"
    memory._nvml.cache_clear()


def test_a_cpu_worker_never_asks_the_driver(nvml):
    assert memory.gpu_status("cpu") is None
    assert nvml.init_calls == 0


def test_the_pinned_device_and_this_process_share(nvml):
    first = memory.gpu_status("cuda")
    assert (first.index, first.free, first.total, first.process_used) == (0, 1 * GIB, 3 * GIB, 1 * GIB)
    second = memory.gpu_status("cuda:1")
    assert (second.index, second.free, second.total, second.process_used) == (1, 2 * GIB, 4 * GIB, GIB // 2)
    assert memory.gpu_memory("cuda:1") == (2 * GIB, 4 * GIB)
    assert memory.gpu_process_bytes("cuda:0") == 1 * GIB  # the other process's share is not ours
    assert memory.gpu_status("cuda:2") is None  # not there: None, never an exception


def test_cuda_visible_devices_renumbers_as_cuda_does(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert memory.gpu_status("cuda").index == 1  # cuda:0 of this process is NVML's device 1
    assert memory.gpu_status("cuda:1") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert [memory.gpu_status(d).index for d in ("cuda:0", "cuda:1")] == [1, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")  # CUDA stops at the first invalid entry
    assert memory.gpu_status("cuda:0").index == 0
    assert memory.gpu_status("cuda:1") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert memory.gpu_status("cuda") is None


def test_auto_is_cuda_when_the_driver_reports_a_gpu(nvml):
    assert resolve_device("auto") == "cuda"
    assert memory.gpu_status("auto").index == 0
    assert split_device("cuda:1") == ("cuda", 1)
    assert split_device("cuda") == ("cuda", 0)
    assert split_device("cpu") == ("cpu", 0)
    with pytest.raises(EngineError):
        split_device("cuda:x")


def test_a_driver_that_fails_mid_run_gives_none(nvml, monkeypatch):
    def broken(handle):
        raise nvml.NVMLError("GPU is lost")

    monkeypatch.setattr(nvml, "nvmlDeviceGetMemoryInfo", broken)
    assert memory.gpu_status("cuda") is None


def test_headroom_and_idle_capacity_on_the_gpu(nvml):
    gpu = memory.gpu_status("cuda:1")
    assert memory.headroom_bytes(0, 900 * 2**20, 20 * GIB, gpu.free) == 2 * GIB
    assert memory.headroom_bytes(0, 900 * 2**20, GIB, gpu.free) == GIB  # the host bounds it too
    # Idle, the GPU offers all but this worker's own model.
    assert memory.idle_capacity_bytes(0, 900 * 2**20, 64 * GIB, gpu.total, gpu.process_used) == 3.5 * GIB


# --- real stack ------------------------------------------------------------------------------
class IdleStage(Stage):
    """A stand-in transcriber stage (the status path is under test, not the model)."""

    name = "transcriber"
    group = "transcribers"
    input_topic = "uploads"

    def handle(self, event, message):
        return []

    def failure_outputs(self, event, reason):
        return []

    def can_resume(self) -> bool:
        return True


@pytest.mark.stack
def test_workers_report_their_pinned_gpu_and_routing_prefers_more_free_memory(stack_settings, nvml):
    from bench.harness import wait_until
    from consumers.loop import StageRunner
    from consumers.status import StatusReporter
    from kafscribe.kafka.routing import choose_partition
    from kafscribe.kafka.workers import WorkerView
    from tests.conftest import fresh_settings

    base = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", status_interval_s=0.5,
                          session_timeout_ms=6000)
    runners, threads = [], []
    for device in ("cuda:0", "cuda:1"):
        settings = base.with_(device=device)
        runner = StageRunner(settings, IdleStage(), f"gpu-{device[-1]}")
        reporter = StatusReporter(settings, runner, model="tiny.en")
        runner.on_idle.append(reporter.tick)
        runner.on_close.append(reporter.stopped)
        runners.append(runner)
        threads.append(threading.Thread(target=runner.run, daemon=True))
    view = WorkerView(base)
    try:
        for t in threads:
            t.start()

        def both_live() -> dict:
            ws = {w.status.worker_id: w for w in view.workers() if w.liveness == "live" and w.status.partitions}
            return ws if len(ws) == 2 else {}

        workers = wait_until(both_live, timeout_s=60)
        s0, s1 = workers["gpu-0"].status, workers["gpu-1"].status
        assert (s1.gpu_mem_free, s1.gpu_mem_total, s1.gpu_mem_used, s1.gpu_device) == (2 * GIB, 4 * GIB, GIB // 2, 1)
        assert (s0.gpu_mem_free, s0.gpu_mem_total, s0.gpu_mem_used, s0.gpu_device) == (1 * GIB, 3 * GIB, 1 * GIB, 0)
        assert workers["gpu-1"].headroom == 2 * GIB and workers["gpu-0"].headroom == 1 * GIB
        need = memory.estimate_for(base, 1.5 * GIB / memory.PEAK_PER_SECOND["faster-whisper"])
        assert GIB < need < 2 * GIB  # fits only the GPU with more free memory
        for _ in range(10):
            partition, worker = choose_partition(list(workers.values()), need)
            assert worker == "gpu-1" and partition in s1.partitions

        # The other GPU frees up: the next statuses move the uploads there.
        nvml.devices[0]["free"], nvml.devices[1]["free"] = 2 * GIB, GIB // 2
        moved = wait_until(lambda: (w := both_live()) and w["gpu-0"].headroom == 2 * GIB and w, timeout_s=30)
        assert choose_partition(list(moved.values()), need)[1] == "gpu-0"
    finally:
        for r in runners:
            r.stop()
        for t in threads:
            t.join(30)
        view.close()


@pytest.mark.stack
def test_a_faster_whisper_transcriber_admits_jobs_by_its_gpu(stack_settings, session, nvml):
    """The bug this replaces: faster-whisper never initialises torch's CUDA, so GPU memory was never
    seen. The engine is loaded on the CPU (there is no GPU); the worker is then told it runs on cuda:1,
    which is all admission reads."""
    from consumers.transcriber import Transcriber
    from schemas.events import JobOptions, Upload
    from tests.conftest import fresh_settings

    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", device="cpu")
    worker = Transcriber(settings, session, "gpu-transcriber")
    try:
        assert type(worker.default_engine).__name__ == "FasterWhisperEngine"
        worker.settings = settings.with_(device="cuda:1")
        assert worker.headroom() == 2 * GIB
        assert worker.idle_capacity() == 3.5 * GIB  # 4 GiB card, 0.5 GiB of it this worker's model

        def upload(seconds: float) -> Upload:
            return Upload(job_id=f"gpu-{seconds:.0f}", blob_ref="file:x", audio_sha256="0" * 64, audio_bytes=1,
                          audio_duration=seconds, filename="x.wav", options=JobOptions())

        assert worker.admit(upload(60)) is None
        # More than the 4 GiB card could ever hold, although the host has more: refused at once.
        never = int(4 * GIB / memory.PEAK_PER_SECOND["faster-whisper"]) + 60
        started = time.monotonic()
        reason = worker.admit(upload(never))
        assert reason and "can never offer more than 3584 MiB" in reason
        assert time.monotonic() - started < 5
    finally:
        worker.view.close()
