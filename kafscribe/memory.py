"""How much memory a job needs, and how much a worker has to spare.

``estimate_job_bytes`` is deliberately simple and conservative: the model's
weights are already resident (they count in the worker's RSS), so a job adds

* decoding working set per model size (encoder activations, decoder KV cache,
  beams) -- constant, because Whisper works in 30 s windows; and
* the audio itself: 16 kHz float32 samples (64 KB per second), counted
  three times (the ffmpeg PCM buffer, the float copy, the engine's copy).

``headroom_bytes`` is what a worker reports and admits jobs by: its budget
minus its RSS when ``KAFSCRIBE_MEMORY_BUDGET_BYTES`` is set, else the host's
available memory -- or free GPU memory, when it runs on CUDA.

``idle_capacity_bytes`` is the most a worker could ever offer a job (idle,
no other process using memory): a job above it fails at once instead of
waiting for memory that cannot come. With a budget it equals the headroom
of an idle worker: only other processes make a shortage temporary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

MIB = 1024 * 1024
# Working set of one decode beyond the resident weights, by model size (measured
# on CPU with faster-whisper int8/openai-whisper fp32 for tiny/base; the rest scaled).
MODEL_WORKING_SET = {
    "tiny": 120 * MIB,
    "base": 250 * MIB,
    "small": 600 * MIB,
    "medium": 1500 * MIB,
    "large": 3000 * MIB,
    "turbo": 2000 * MIB,
}
AUDIO_BYTES_PER_SECOND = 16000 * 4 * 3


def model_size(model: str) -> str:
    name = Path(model).name.lower()
    for size in ("large", "medium", "small", "base", "tiny", "turbo"):
        if size in name:
            return size
    return "medium"  # unknown: assume a large-ish model rather than run out of memory


def estimate_job_bytes(duration_s: float, model: str) -> int:
    """Memory a job of ``duration_s`` seconds adds to a worker that has ``model`` loaded."""
    return int(MODEL_WORKING_SET[model_size(model)] + max(duration_s, 0.0) * AUDIO_BYTES_PER_SECOND)


def process_rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device, or None off CUDA.

    Only asks torch if this process already imported it: importing it here (from a poll loop's
    status tick) stalled a notifier's first deliveries for 10-20 s, and torch cannot have
    initialised CUDA in a process that never imported it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def headroom_bytes(budget: int, rss: int, host_available: int, gpu_free: int | None) -> int:
    """What this worker can still spend on a job."""
    if budget > 0:
        return budget - rss
    return gpu_free if gpu_free is not None else host_available


def idle_capacity_bytes(budget: int, idle_rss: int, host_total: int, gpu_total: int | None) -> int:
    """The headroom this worker would have idle and alone: budget (or host memory) minus its idle RSS,
    or the whole GPU."""
    if budget > 0:
        return budget - idle_rss
    if gpu_total is not None:
        return gpu_total
    return host_total - idle_rss
