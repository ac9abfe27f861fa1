"""Pipeline vs bare engine: what does the Kafka pipeline cost over calling Whisper directly?

    make up                     # the pipeline must be running
    python -m bench.pipeline --clips 8

Submits N espeak-ng clips (5-60 s) through the running ingress, all at once,
and waits for every job; then, in this process, runs the same clips through
the bare engine with the same engine/model settings, one after another.
Prints both times, their ratio (pipeline/bare), audio seconds per second,
and p50/p95 submit->completed latency.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kafscribe import audio
from kafscribe.engines import load_engine
from kafscribe.settings import Settings
from producers.client import HttpClient, wait_for

from .clips import make_clips


def durations(n: int) -> list[float]:
    """N durations spread evenly over 5-60 s."""
    if n == 1:
        return [30.0]
    return [5 + i * 55 / (n - 1) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_pipeline(url: str, clips: list[tuple[Path, float]], api_key: str = "") -> tuple[float, list[float]]:
    http = HttpClient(url, api_key=api_key)
    start = time.monotonic()

    def one(path: Path) -> float:
        t0 = time.monotonic()
        job_id = http.submit(path)["job_id"]
        job = wait_for(lambda: http.job(job_id), timeout_s=3600, interval_s=0.1)
        if job["status"] != "completed":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        return time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=len(clips)) as pool:
        latencies = list(pool.map(one, [p for p, _ in clips]))
    return time.monotonic() - start, latencies


def run_bare(settings: Settings, clips: list[tuple[Path, float]]) -> tuple[float, float]:
    t0 = time.monotonic()
    engine = load_engine(settings)
    load_s = time.monotonic() - t0
    start = time.monotonic()
    for path, _ in clips:
        engine.transcribe(audio.decode(path.read_bytes()), language=None, task="transcribe")
    return time.monotonic() - start, load_s


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--url", default=settings.public_url or f"http://127.0.0.1:{settings.http_port}")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench")
    args = parser.parse_args(argv)

    clips = make_clips(args.dir, durations(args.clips))
    audio_s = sum(d for _, d in clips)
    print(f"{len(clips)} clips, {audio_s:.1f} s of audio; engine {settings.engine}, model {settings.model}, "
          f"device {settings.device}")
    wall, latencies = run_pipeline(args.url, clips, settings.api_key)
    bare, load_s = run_bare(settings, clips)
    print(f"pipeline : {wall:7.2f} s wall   {audio_s / wall:6.2f} audio-s/s")
    print(f"bare     : {bare:7.2f} s        {audio_s / bare:6.2f} audio-s/s   (model load {load_s:.1f} s, not counted)")
    print(f"ratio    : {wall / bare:7.3f} (pipeline / bare)")
    print(f"latency  : p50 {percentile(latencies, 0.5):.2f} s   p95 {percentile(latencies, 0.95):.2f} s "
          "(submit -> completed, all submitted at once)")


if __name__ == "__main__":
    main()
