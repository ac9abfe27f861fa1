"""How many transcribers a host runs, and with how many engine threads each.

Measured on a 2-core host with faster-whisper ``base`` int8 (docs/benchmarks.md, "Throughput"):
two processes of one thread each finish the same clips faster than one
process of two threads -- CTranslate2's decoding does not keep two threads
busy, two independent decoders do. So ``KAFSCRIBE_TRANSCRIBERS=auto`` means:

- CPU: one transcriber per usable core (``os.sched_getaffinity``), one
  thread each -- as many as host memory holds (a worker's resident model plus
  one job's working set, ``memory``), at most the uploads topic's partitions;
- CUDA: one transcriber per GPU, each pinned to its GPU
  (``CUDA_VISIBLE_DEVICES``); threads as configured.

A number instead of ``auto`` starts that many, sharing the cores
(``KAFSCRIBE_CPU_THREADS=0``: cores / transcribers each). A worker on another
host is still one command (``kafscribe serve transcriber``): alone on its host,
its default threads are all the usable cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from kafscribe.settings import Settings, SettingsError
from kafscribe.speech import memory

TRANSCRIBER = "transcriber"
METRICS_PORT_STEP = 10  # transcriber-2 serves /metrics on the first transcriber's port + 10, and so on


@dataclass(frozen=True)
class Plan:
    transcribers: int
    threads: int  # engine threads per transcriber (CPU)
    gpus: int  # 0 on CPU
    why: str


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cuda_devices() -> int:
    """GPUs CTranslate2 can use (0 where there are none, or no CUDA build)."""
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count())
    except Exception:  # noqa: BLE001 - no usable CUDA
        return 0


def worker_bytes(settings: Settings, model: str | None = None) -> int:
    """Rough memory of one idle transcriber with ``model`` (the model's working set again, a stand-in for
    the loaded weights, plus the interpreter's ~200 MiB) and one 5-minute job (the fitted estimate)."""
    return memory.estimate_for(settings, 0.0, model) + memory.estimate_for(settings, 300.0, model) + 200 * memory.MIB


def plan(settings: Settings, cores: int | None = None, gpus: int | None = None,
         host_available: int | None = None) -> Plan:
    """The transcribers this host should run under ``settings`` (arguments: for tests)."""
    cores = usable_cores() if cores is None else cores
    raw = settings.transcribers.strip().lower()
    if settings.device == "cpu":
        gpus = 0
    elif gpus is None:
        gpus = cuda_devices()
    if raw == "auto":
        if gpus:
            n, why = gpus, f"one per GPU ({gpus})"
        else:
            available = int(psutil.virtual_memory().available) if host_available is None else host_available
            fits = max(1, available // worker_bytes(settings))
            n = max(1, min(cores, fits, settings.uploads_partitions))
            why = f"one per usable core ({cores}), memory for {fits}, {settings.uploads_partitions} partitions"
    else:
        try:
            n = int(raw)
        except ValueError:
            raise SettingsError(
                f"KAFSCRIBE_TRANSCRIBERS={settings.transcribers!r} is neither `auto` nor a number") from None
        if n < 1:
            raise SettingsError("KAFSCRIBE_TRANSCRIBERS must be at least 1")
        why = "KAFSCRIBE_TRANSCRIBERS"
    threads = settings.cpu_threads or max(1, cores // n)
    return Plan(n, threads, gpus, why)


def instance_names(count: int) -> list[str]:
    """``transcriber``, ``transcriber-2``, ...: the services' names (and pid/log files)."""
    return [TRANSCRIBER] + [f"{TRANSCRIBER}-{i}" for i in range(2, count + 1)]


def instance_index(name: str) -> int:
    """1 for ``transcriber``, k for ``transcriber-k``."""
    _, _, suffix = name.partition("-")
    return int(suffix) if suffix.isdigit() else 1


def metrics_port(name: str, settings: Settings, first_port: int) -> int:
    """The /metrics port of transcriber instance ``name`` (``first_port`` is the first one's; <=0 = off)."""
    if first_port <= 0:
        return first_port
    return first_port + METRICS_PORT_STEP * (instance_index(name) - 1)


def instance_env(name: str, the_plan: Plan, settings: Settings, first_port: int) -> dict[str, str]:
    """Environment of one transcriber instance: its threads, its GPU, its metrics port."""
    env = {"KAFSCRIBE_CPU_THREADS": str(the_plan.threads), "KAFSCRIBE_TRANSCRIBERS": str(the_plan.transcribers)}
    if the_plan.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str((instance_index(name) - 1) % the_plan.gpus)
    if instance_index(name) > 1 and first_port > 0:
        env["KAFSCRIBE_METRICS_PORT"] = str(metrics_port(name, settings, first_port))
    return env
