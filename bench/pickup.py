"""Lone-job pickup: how long a job that reaches an idle pipeline waits before its transcriber starts it.

    kafscribe stack up                      # Kafka + Cassandra (make up starts them too)
    python -m bench.pickup                  # 50 lone 4-s clips, one at a time, on an idle pipeline
    python -m bench.pickup --jobs 5         # a quick check that it runs

Starts an ingress, a translator, a sink and ``--transcribers`` transcribers (``bench.harness.Pipeline``,
a fresh topic prefix, against the running stack; the engine settings are the environment's
``KAFSCRIBE_*``), warms them up with one job, then submits ``--jobs`` clips of about ``--clip-s``
seconds one at a time, each once every transcriber reports nothing in flight (plus ``--gap-s``).
For each job:

- pickup: from the ``202`` of ``POST /v1/jobs`` (the client's clock) to the moment its status became
  ``transcribing`` (the transcriber's log line written right after that status, same host clock);
- submit->done minus engine: from just before the upload to the moment the client saw ``completed``
  (asking every ``--poll-s``), less the engine's own seconds (the transcriber's ``phases.engine``).

Then ``--cli`` runs of the real ``kafscribe submit CLIP --wait`` (a fresh process each: its start-up
counts, as for a user), each wall time less that job's engine seconds.

Prints p50, p99 and max of each. Take figures on a quiet machine: anything else running shows up here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from infra import bootstrap
from kafscribe.settings import Settings
from kafscribe.speech import audio

from .clips import SENTENCES
from .harness import Pipeline, wait_until


def lone_clip(directory: Path, target_s: float) -> tuple[Path, float]:
    """A WAV of about ``target_s`` seconds of espeak-ng speech (cut at a word, not a sentence); (path, seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    words = " ".join(SENTENCES).split()
    count = max(3, round(target_s * 2.75))  # espeak-ng at 160 wpm: about 2.75 words a second
    path = directory / f"lone-{target_s:g}s.wav"
    text = " ".join((words * (count // len(words) + 1))[:count])
    subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "-w", str(path), text], check=True)
    return path, audio.probe(path).duration


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by the nearest rank; NaN when there is nothing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<34} (no samples)"
    return (f"{name:<34} n={len(values):<3} p50 {percentile(values, 0.5) * 1000:7.0f} ms   "
            f"p99 {percentile(values, 0.99) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms   "
            f"mean {statistics.fmean(values) * 1000:7.0f} ms")


def log_events(log_dir: Path) -> dict[str, dict[str, float]]:
    """Per job id, from the transcribers' JSON logs: when it started (``transcribing``, epoch seconds) and the
    engine's seconds."""
    found: dict[str, dict[str, float]] = {}
    for path in log_dir.glob("transcriber-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            job_id, message = rec.get("job_id"), str(rec.get("msg") or rec.get("message") or "")
            if not job_id:
                continue
            if message.startswith("transcribing ") and "ts" in rec:
                found.setdefault(job_id, {})["started"] = _epoch(rec["ts"])
            engine = (rec.get("phases") or {}).get("engine")
            if engine is not None:
                found.setdefault(job_id, {})["engine"] = float(engine)
    return found


def _epoch(ts: str) -> float:
    """``2026-12-07T18:40:01.123Z`` (UTC) as epoch seconds."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def idle(pipe: Pipeline, names: list[str]) -> bool:
    status, body, _ = pipe.http._request("GET", "/v1/workers")
    if status != 200:
        return False
    ids = {pipe.worker_ids[n] for n in names}
    seen = [w for w in json.loads(body)["workers"] if w["worker_id"] in ids and w["state"] == "live"]
    return len(seen) == len(ids) and all(w["in_flight"] == 0 and w["partitions"] is not None for w in seen)


def wait_done(pipe: Pipeline, job_id: str, poll_s: float, timeout_s: float = 300) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = pipe.http.job(job_id)
        if job and job["status"] in ("completed", "failed"):
            return job, time.time()
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} not done in {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=50, help="lone jobs to time")
    ap.add_argument("--clip-s", type=float, default=4.0, help="length of the clip (espeak-ng speech)")
    ap.add_argument("--transcribers", type=int, default=1)
    ap.add_argument("--gap-s", type=float, default=0.5, help="wait after the pipeline is idle before each job")
    ap.add_argument("--poll-s", type=float, default=0.05, help="how often the client asks for the job's status")
    ap.add_argument("--cli", type=int, default=3, help="runs of `kafscribe submit --wait` (a process each)")
    args = ap.parse_args(argv)

    base = Settings.from_env()
    settings = base.with_(topic_prefix=f"pickup{uuid.uuid4().hex[:8]}.", metrics_port=-1, prometheus_port=-1,
                          lag_metrics_port=-1)
    bootstrap.ensure_topics(settings)
    work = Path(tempfile.mkdtemp(prefix="kafscribe-pickup-"))
    clip, seconds = lone_clip(work / "clips", args.clip_s)
    print(f"clip: {seconds:.1f} s; engine {settings.engine} {settings.model}; {args.transcribers} transcriber(s);"
          f" logs in {work}", flush=True)
    pipe = Pipeline(settings, work)
    names = [f"transcriber-{i}" for i in range(args.transcribers)]
    try:
        for stage in ("ingress", "translator", "sink"):
            pipe.start(stage)
        for name in names:
            pipe.start("transcriber", name=name)
        wait_until(lambda: idle(pipe, names), timeout_s=180, what="transcribers live")
        wait_done(pipe, pipe.http.submit(clip)["job_id"], args.poll_s)  # warm-up: not counted

        pickups, overheads, cli_overheads = [], [], []
        jobs: list[tuple[str, float, float, float]] = []  # job id, before upload, 202, seen completed
        for i in range(args.jobs):
            wait_until(lambda: idle(pipe, names), timeout_s=120, what="pipeline idle")
            time.sleep(args.gap_s)
            t0 = time.time()
            job_id = pipe.http.submit(clip)["job_id"]
            accepted = time.time()
            job, seen = wait_done(pipe, job_id, args.poll_s)
            if job["status"] != "completed":
                print(f"job {job_id} {job['status']}: {job.get('error')}", file=sys.stderr)
            jobs.append((job_id, t0, accepted, seen))
            print(f"\r{i + 1}/{args.jobs} jobs", end="", flush=True)
        print()
        time.sleep(1.0)  # the last log lines
        events = log_events(work)
        for job_id, t0, accepted, seen in jobs:
            ev = events.get(job_id, {})
            if "started" in ev:
                pickups.append(ev["started"] - accepted)
            if "engine" in ev:
                overheads.append(seen - t0 - ev["engine"])

        env = {**pipe.env(), "KAFSCRIBE_API_KEY": pipe.api_key, "KAFSCRIBE_PUBLIC_URL": pipe.url}
        for _ in range(args.cli):
            wait_until(lambda: idle(pipe, names), timeout_s=120, what="pipeline idle")
            time.sleep(args.gap_s)
            before = set(log_events(work))
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "submit", str(clip), "--wait"], env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.monotonic() - t0
            time.sleep(0.5)
            new = [ev for j, ev in log_events(work).items() if j not in before and "engine" in ev]
            if new:
                cli_overheads.append(wall - new[0]["engine"])

        print(summary("pickup (202 -> transcribing)", pickups))
        print(summary("submit -> completed, less engine", overheads))
        print(summary("`submit --wait` less engine", cli_overheads))
        return 0
    finally:
        pipe.stop()
        if os.environ.get("KAFSCRIBE_BENCH_KEEP_LOGS") is None:
            subprocess.run(["rm", "-rf", str(work / "clips")], check=False)


if __name__ == "__main__":
    sys.exit(main())
