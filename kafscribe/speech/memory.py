"""How much memory a job needs, and how much a worker has to spare.

``estimate_job_bytes`` is fitted to measured peaks (``python -m bench.memory``;
the table and the fit are in docs/memory-and-routing.md). A job adds to a
worker whose model is already loaded the larger of

* the decoder's working set (encoder activations, the KV cache of the beams,
  one 30 s window), by engine, model size and compute type, plus what stays
  resident while the windows are decoded (samples and log-mel features:
  ``KEEP_PER_SECOND``); and
* the peak of computing the log-mel features of the whole recording at once,
  which both engines do before the first window (STFT frames and spectra in
  several copies): ``PEAK_PER_SECOND`` by engine -- the larger term from a few
  minutes of audio on.

Both fitted figures are the largest measured value times ``FIT_MARGIN``.
Sizes that could not be measured here (small, medium, large, turbo) scale
base's working set by their parameter count.

``headroom_bytes`` is what a worker reports and admits jobs by: its budget
minus its RSS when ``KAFSCRIBE_MEMORY_BUDGET_BYTES`` is set, else the host's
available memory -- on CUDA, the smaller of that and its GPU's free memory.

GPU memory comes from the driver (NVML, the ``nvidia-ml-py`` package, imported
on first use): free/total of the device this worker is pinned to
(``KAFSCRIBE_DEVICE=cuda:N``, counted within ``CUDA_VISIBLE_DEVICES``) and
what this process holds on it. It works the same for both engines and never
imports torch. No package, no driver or a CPU worker -> ``None``.

``idle_capacity_bytes`` is the most a worker could ever offer a job (idle,
no other process using memory): a job above it fails at once instead of
waiting for memory that cannot come. With a budget it equals the headroom
of an idle worker: only other processes make a shortage temporary.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("kafscribe.speech.memory")

MIB = 1024 * 1024
SIZES = ("tiny", "base", "small", "medium", "large", "turbo")
# Parameters relative to base (74 M), for sizes not measured here: activations grow with width x depth.
SIZE_SCALE = {"tiny": 0.5, "base": 1.0, "small": 3.3, "medium": 10.4, "large": 20.8, "turbo": 10.9}
FIT_MARGIN = 1.15
# Fitted decoder working set (bytes) by (engine, size, compute): the largest job of <= 60 s x FIT_MARGIN.
JOB_BASE: dict[tuple[str, str, str], int] = {
    ("faster-whisper", "tiny", "int8"): 140 * MIB,
    ("faster-whisper", "tiny", "float32"): 135 * MIB,
    ("faster-whisper", "base", "int8"): 178 * MIB,
    ("faster-whisper", "base", "float32"): 164 * MIB,
    ("openai-whisper", "tiny", "float32"): 233 * MIB,
    ("openai-whisper", "base", "float32"): 298 * MIB,
}
# Fitted peak of the whole recording's features, bytes per second of audio: the largest
# job_bytes / seconds of the jobs of >= 5 min x FIT_MARGIN.
PEAK_PER_SECOND: dict[str, int] = {
    "faster-whisper": 1121 * 1024,
    "openai-whisper": 681 * 1024,
}
# Resident while windows are decoded: int16 PCM (32 KB/s), float32 samples (64 KB/s), 80 mel bins x
# 100 frames x float32 (32 KB/s).
KEEP_PER_SECOND = 128 * 1000
# The smallest per-second cost of any engine: every estimate grows at least this fast.
AUDIO_BYTES_PER_SECOND = min(PEAK_PER_SECOND.values())


def model_size(model: str) -> str:
    name = Path(model).name.lower()
    for size in ("large", "medium", "small", "base", "tiny", "turbo"):
        if size in name:
            return size
    return "medium"  # unknown: assume a large-ish model rather than run out of memory


def _compute(engine: str, compute_type: str, device: str) -> str:
    if engine == "openai-whisper":
        return "float32"  # openai-whisper runs fp32 on CPU (fp16 on CUDA holds less: fp32 is the bound)
    if compute_type in ("default", "auto", ""):
        return "float32" if device_kind(device) == "cuda" else "int8"
    # float16/bfloat16/int8_float16... hold no more than their float32/int8 counterparts
    return "int8" if compute_type.startswith("int8") else "float32"


def estimate_job_bytes(duration_s: float, model: str, engine: str = "faster-whisper",
                       compute_type: str = "default", device: str = "cpu") -> int:
    """Memory a job of ``duration_s`` seconds adds to a worker that has ``model`` loaded."""
    engine = engine if engine in PEAK_PER_SECOND else "openai-whisper"  # unknown: the hungrier one
    size = model_size(model)
    compute = _compute(engine, compute_type, device)
    base = JOB_BASE.get((engine, size, compute))
    if base is None:
        measured = JOB_BASE.get((engine, "base", compute)) or JOB_BASE[(engine, "base", "float32")]
        base = int(measured * max(SIZE_SCALE[size], 1.0))
    seconds = max(duration_s, 0.0)
    return int(max(base + seconds * KEEP_PER_SECOND, seconds * PEAK_PER_SECOND[engine]))


def estimate_for(settings: Any, duration_s: float, model: str | None = None) -> int:
    """``estimate_job_bytes`` for a worker configured by ``settings`` (engine, compute type, device)."""
    return estimate_job_bytes(duration_s, model or settings.model, settings.engine, settings.compute_type,
                              settings.device)


def process_rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


# --- GPU memory from the driver (NVML) -------------------------------------------------------
@dataclass(frozen=True)
class GpuMemory:
    """One device as NVML sees it, and what this process holds on it (None: not reported)."""

    index: int  # NVML's index of the device
    free: int
    total: int
    process_used: int | None


def device_kind(device: str) -> str:
    return device.split(":", 1)[0].strip().lower()


def cuda_ordinal(device: str) -> int | None:
    """The CUDA ordinal a worker set to ``device`` uses (``cuda`` -> 0, ``cuda:1`` -> 1), None on CPU.

    ``auto`` counts as ``cuda`` when the driver reports a device."""
    kind = device_kind(device)
    if kind == "auto":
        return 0 if _nvml() is not None and _visible_handles() else None
    if kind != "cuda":
        return None
    _, _, index = device.partition(":")
    try:
        return int(index) if index.strip() else 0
    except ValueError:
        return None


@functools.cache
def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None without the package or a driver (asked once)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
        log.debug("no NVML: %s", exc)
        return None
    return pynvml


def _visible_handles() -> list[Any]:
    """NVML handles of the devices this process's CUDA sees, in ``CUDA_VISIBLE_DEVICES`` order.

    NVML numbers devices by PCI bus; CUDA does too when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set it on
    hosts with mixed GPUs, where CUDA's default puts the fastest first)."""
    nvml = _nvml()
    count = nvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            break
        try:  # CUDA stops at the first invalid entry; so do we
            if item.lstrip("-").isdigit():
                if not 0 <= int(item) < count:
                    break
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
        except Exception:  # noqa: BLE001 - an unknown UUID ends the list, as in CUDA
            break
    return handles


def gpu_status(device: str) -> GpuMemory | None:
    """Free/total memory of the GPU a worker set to ``device`` runs on, and this process's share.

    None on CPU, without NVML, or when the device is not visible. Never raises."""
    ordinal = cuda_ordinal(device)
    if ordinal is None:
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handles = _visible_handles()
        if ordinal >= len(handles):
            _warn_once(f"device {device} is not visible ({len(handles)} visible GPUs): no GPU figures")
            return None
        handle = handles[ordinal]
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuMemory(int(nvml.nvmlDeviceGetIndex(handle)), int(info.free), int(info.total),
                         _process_used(nvml, handle))
    except Exception as exc:  # noqa: BLE001 - a status tick must never fail on the driver
        _warn_once(f"NVML could not report {device}: {exc}")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a driver problem once per process, not on every 5 s status tick."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _process_used(nvml: Any, handle: Any) -> int | None:
    pid = os.getpid()
    used = None
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, getter)(handle)
        except Exception:  # noqa: BLE001 - not supported on this device/driver
            continue
        for p in procs:
            value = getattr(p, "usedGpuMemory", None)
            if p.pid == pid and isinstance(value, int) and value >= 0:
                used = (used or 0) + value
    return used


def gpu_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes of this worker's GPU, or None off CUDA / without NVML."""
    gpu = gpu_status(device)
    return (gpu.free, gpu.total) if gpu else None


def gpu_process_bytes(device: str) -> int | None:
    """GPU memory this process holds on its device (None where the driver does not say)."""
    gpu = gpu_status(device)
    return gpu.process_used if gpu else None


def headroom_bytes(budget: int, rss: int, host_available: int, gpu_free: int | None) -> int:
    """What this worker can still spend on a job.

    On CUDA the smaller of the GPU's free memory and the host's available memory: the model's working
    set lives on the GPU, but both engines compute the log-mel features of the whole recording on the
    CPU -- the larger term of a long job's estimate."""
    if budget > 0:
        return budget - rss
    return min(gpu_free, host_available) if gpu_free is not None else host_available


def idle_capacity_bytes(budget: int, idle_rss: int, host_total: int, gpu_total: int | None,
                        gpu_idle_used: int | None = None) -> int:
    """The headroom this worker would have idle and alone: budget (or host memory) minus its idle RSS;
    on CUDA also at most its GPU's memory minus what this process holds there idle (its model)."""
    if budget > 0:
        return budget - idle_rss
    host = host_total - idle_rss
    if gpu_total is not None:
        return min(gpu_total - (gpu_idle_used or 0), host)
    return host
