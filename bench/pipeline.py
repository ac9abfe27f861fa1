"""Pipeline vs bare engine, like with like: what does kafscribe cost over calling Whisper directly?

    kafscribe stack up                      # Kafka + Cassandra (make up starts them too)
    python -m bench.pipeline                # 24 clips of 5-40 s, 8 submitters, settings auto and 2x1

For each setting (``--settings``: ``auto`` is what ``make up`` starts, ``NxT`` is N transcribers of T
threads each), one after the other in this one run:

1. bare: N processes, each with the engine loaded with T threads and warmed up, take the clips from
   one shared queue (ffmpeg decode + transcribe, nothing else) -- the same work the pipeline's N
   transcribers share, without Kafka, Cassandra, HTTP or the other stages;
2. pipeline: ``kafscribe services up`` with that setting, on a fresh topic prefix and its own state
   directory and ports (``--http-port``; metrics off), against the running stack. Once its N
   transcribers are live and warmed up, 8 submitters (``--submitters``) send the clips from a shared
   queue, each as one synchronous request, the way a client of a synchronous Whisper service works:
   ``POST /v1/audio/transcriptions`` through the official ``openai`` client (the ingress answers once
   the job is done, woken by its outcome on ``finished``), then the next clip. ``--wait poll`` submits to
   ``/v1/jobs`` and asks for the status every 0.25 s instead (each ask an HTTP request and a Cassandra
   read: the bench's own load, measured before the synchronous endpoint existed).

Prints, per setting: wall time, audio-seconds per second, the ratio pipeline / bare, submit->completed
latency p50/p95, where each job's time went (the transcriber's phases and every stage's commit, from
the services' JSON logs), how busy the transcribers were, whether the transcripts match the bare
ones, and the CPU-seconds of every process (Kafka, Cassandra, ingress, each stage, the bare workers).
The engine settings (engine, model, beam, compute type) are the environment's ``KAFSCRIBE_*``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from infra.process import ServerProcess
from kafscribe.settings import Settings

from .clips import make_clips

POLL_S = 0.25  # how often a submitter asks for its job's status (each ask is an HTTP request + a Cassandra read)


def durations(n: int, low: float = 5.0, high: float = 40.0) -> list[float]:
    """N durations spread evenly over ``low``-``high`` seconds."""
    if n == 1:
        return [(low + high) / 2]
    return [low + i * (high - low) / (n - 1) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def parse_setting(text: str) -> tuple[str, int]:
    """``auto`` -> ("auto", 0); ``2x1`` -> ("2", 1): KAFSCRIBE_TRANSCRIBERS and KAFSCRIBE_CPU_THREADS."""
    if text == "auto":
        return "auto", 0
    n, _, t = text.partition("x")
    return str(int(n)), int(t or 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its waited-for children (ffmpeg), 0 when it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


# --- bare: the engine alone, N processes on one shared queue -----------------------------------------
def _bare_worker(settings: Settings, warm: str, todo, results, ready, go) -> None:
    from kafscribe.speech import audio
    from kafscribe.speech.engines import load_engine

    engine = load_engine(settings)
    engine.transcribe(audio.decode(Path(warm).read_bytes()))
    ready.put(os.getpid())
    go.wait()
    cpu0 = cpu_seconds(os.getpid())
    # a blocking get and one None per worker at the end: get_nowait() raises Empty whenever another
    # process holds the queue's read lock, which once ended one of two workers at the start of every run
    while (item := todo.get(timeout=60)) is not None:
        index, path = item
        out = engine.transcribe(audio.decode(Path(path).read_bytes()))
        results.put(("clip", index, time.time(), out.text))
    results.put(("cpu", os.getpid(), cpu_seconds(os.getpid()) - cpu0, 0.0))


@dataclass
class Run:
    wall: float
    texts: dict[int, str]
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    phases: dict[str, list[float]] = field(default_factory=dict)
    busy: float = 0.0  # share of the transcribers' time spent in jobs (handler + commit)


def run_bare(settings: Settings, processes: int, clips: list[Path], warm: Path) -> Run:
    ctx = mp.get_context("spawn")
    todo, results, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    for i, path in enumerate(clips):
        todo.put((i, str(path)))
    for _ in range(processes):
        todo.put(None)  # one end marker per worker
    procs = [ctx.Process(target=_bare_worker, args=(settings, str(warm), todo, results, ready, go))
             for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    time.sleep(0.5)  # the queue's feeder thread has handed every item over
    start = time.time()
    go.set()
    texts: dict[int, str] = {}
    cpu: dict[str, float] = {}
    last = start
    while len(texts) < len(clips) or len(cpu) < processes:
        kind, key, value, text = results.get(timeout=3600)
        if kind == "clip":
            texts[key], last = text, max(last, value)
        else:
            cpu[f"bare worker {len(cpu) + 1}"] = value
    for p in procs:
        p.join(30)
    if len(cpu) < processes or any(p.exitcode for p in procs):
        raise RuntimeError(f"a bare worker failed: exit codes {[p.exitcode for p in procs]}")
    return Run(last - start, texts, cpu=cpu)


# --- pipeline: kafscribe services with the same transcribers ----------------------------------------
def bench_settings(base: Settings, transcribers: str, threads: int, http_port: int, state_dir: Path) -> Settings:
    return base.with_(
        topic_prefix=f"bench{uuid.uuid4().hex[:8]}.", state_dir=state_dir, http_port=http_port,
        metrics_port=-1, supervisor_metrics_port=-1, transcribers=transcribers, cpu_threads=threads,
        public_url="", worker_id="", log_level="INFO", openai_wait_s=3600.0, prometheus_port=-1,
    )


def service_pids(settings: Settings, stack_state: Path) -> dict[str, int]:
    pids = {}
    for name in ("kafka", "cassandra"):
        pid = ServerProcess(name, stack_state).pid()
        if pid:
            pids[name] = pid
    directory = settings.state_dir / "services"
    for pid_file in sorted(directory.glob("*.pid")):
        pid = ServerProcess(pid_file.stem, directory, tag_prefix="--instance=").pid()
        if pid and pid_file.stem != "supervisor":
            pids[pid_file.stem] = pid
    return pids


def wait_for_transcribers(settings: Settings, count: int, timeout_s: float = 300) -> None:
    from kafscribe.kafka.workers import WorkerView

    view = WorkerView(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [w for w in view.workers() if w.status.stage == "transcriber" and w.liveness == "live"
                    and w.status.partitions]
            if len(live) >= count and sum(len(w.status.partitions) for w in live) >= settings.uploads_partitions:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{count} transcribers did not come up in {timeout_s:.0f}s")
    finally:
        view.close()


def openai_transcribe(client, path: Path) -> tuple[str, str]:
    """One synchronous transcription through the official client: (job id, text)."""
    with open(path, "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=f,
                                                                   response_format="json")
    return raw.headers["x-job-id"], raw.parse().text


def submit_all(http, clips: list[Path], submitters: int,
               wait: str = "openai") -> tuple[float, dict[int, str], list[float], list[str]]:
    """``submitters`` threads take clips from a shared queue: transcribe (``wait``: one synchronous
    OpenAI-compatible request, or submit and poll the job), next."""
    todo: queue.Queue = queue.Queue()
    for item in enumerate(clips):
        todo.put(item)
    texts: dict[int, str] = {}
    latencies: list[float] = []
    job_ids: list[str] = []
    errors: list[str] = []

    def submitter() -> None:
        client = None
        if wait == "openai":
            from openai import OpenAI

            client = OpenAI(base_url=http.base_url + "/v1", api_key=http.api_key, timeout=3600, max_retries=0)
        while True:
            try:
                index, path = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            try:
                if client is not None:
                    job_id, texts[index] = openai_transcribe(client, path)
                    job_ids.append(job_id)
                    latencies.append(time.monotonic() - t0)
                    continue
                job_id = http.submit(path)["job_id"]
                job_ids.append(job_id)
                while (job := http.job(job_id))["status"] not in ("completed", "failed"):
                    time.sleep(POLL_S)
                latencies.append(time.monotonic() - t0)
                if job["status"] != "completed":
                    errors.append(f"{path.name}: {job.get('error')}")
                    continue
                texts[index] = http.transcript(job_id)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{path.name}: {exc!r}")

    start = time.monotonic()
    threads = [threading.Thread(target=submitter) for _ in range(submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("jobs failed: " + "; ".join(errors[:5]))
    return time.monotonic() - start, texts, latencies, job_ids


def job_phases(log_dir: Path, job_ids: set[str]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per phase, its seconds for each measured job (from the services' JSON logs); and per
    transcriber instance, the seconds it spent in jobs (handler + commit)."""
    phases: dict[str, list[float]] = defaultdict(list)
    busy: dict[str, float] = defaultdict(float)
    for path in sorted(log_dir.glob("*.out")):
        for line in path.read_text(errors="replace").splitlines():
            if '"phases"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("job_id") not in job_ids:
                continue
            stage = rec.get("stage") or "transcriber"
            if rec.get("msg") == "committed":
                phases[f"{stage} commit"].append(rec["phases"]["commit"])
                if stage != "transcriber":
                    phases[f"{stage} handler"].append(rec["phases"]["handler"])
                else:
                    busy[path.stem] += rec["phases"]["handler"] + rec["phases"]["commit"]
            elif rec.get("msg", "").startswith("transcribed in"):
                for name, value in rec["phases"].items():
                    phases[f"transcriber {name}"].append(value)
    return phases, busy


def prepare_services(settings: Settings, state_dir: Path) -> tuple[str, dict[str, str]]:
    """A clean state dir, the topics and schema of this code, and an API key of a tenant of its own
    (an earlier run's or bench.ingest's unfinished jobs hold no quota there); returns the key and the
    services' environment (``settings`` only, nothing of the caller's ``KAFSCRIBE_*``)."""
    from infra import bootstrap
    from kafscribe.store import session as cassandra_session
    from kafscribe.store.apikeys import KeyStore

    shutil.rmtree(state_dir, ignore_errors=True)
    bootstrap.ensure_topics(settings)
    bootstrap.ensure_schema(settings)  # the tables and columns of this code (idempotent)
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    try:
        api_key = KeyStore(session).create(f"bench-{uuid.uuid4().hex[:8]}", label="bench")[0]
    finally:
        session.cluster.shutdown()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    env.update(settings.to_env())
    return api_key, env


def run_pipeline(base: Settings, transcribers: str, threads: int, processes: int, clips: list[Path],
                 warm: Path, submitters: int, http_port: int, state_dir: Path, wait: str = "openai") -> Run:
    from kafscribe.cli import services
    from producers.client import HttpClient

    settings = bench_settings(base, transcribers, threads, http_port, state_dir)
    api_key, env = prepare_services(settings, state_dir)
    http = HttpClient(f"http://127.0.0.1:{http_port}", timeout_s=120, api_key=api_key)
    services.up(settings, log=lambda line: print(f"  [services] {line}"), env=env)
    try:
        wait_for_transcribers(settings, processes)
        submit_all(http, [warm] * (2 * processes), 2 * processes, wait)  # every transcriber warmed up
        pids = service_pids(settings, base.state_dir)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        wall, texts, latencies, job_ids = submit_all(http, clips, submitters, wait)
        time.sleep(1.5)  # the notifier's last commits (a job is `completed` before its webhook)
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        services.down(settings, log=lambda line: None)
    phases, busy = job_phases(settings.state_dir / "services" / "logs", set(job_ids))
    return Run(wall, texts, latencies, cpu, phases, sum(busy.values()) / (processes * wall) if wall else 0.0)


# --- report -----------------------------------------------------------------------------------------
def same_text(a: str, b: str) -> bool:
    def norm(s: str) -> list[str]:
        return [w.strip(".,!?;:\"'").lower() for w in s.split()]

    return norm(a) == norm(b)


def report(name: str, processes: int, threads: int, audio_s: float, bare: Run, pipe: Run) -> list[str]:
    lines = [f"== setting {name}: {processes} transcriber(s) x {threads} thread(s)"]
    lines.append(f"  pipeline : {pipe.wall:7.1f} s wall  {audio_s / pipe.wall:6.2f} audio-s/s   "
                 f"latency p50 {percentile(pipe.latencies, 0.5):.1f} s  p95 {percentile(pipe.latencies, 0.95):.1f} s")
    lines.append(f"  bare     : {bare.wall:7.1f} s wall  {audio_s / bare.wall:6.2f} audio-s/s")
    lines.append(f"  ratio    : {pipe.wall / bare.wall:7.3f} (pipeline / bare)   transcribers busy "
                 f"{100 * pipe.busy:.0f} % of the wall time")
    same = sum(same_text(bare.texts.get(i, ""), pipe.texts.get(i, "")) for i in bare.texts)
    lines.append(f"  transcripts identical to bare: {same}/{len(bare.texts)}")
    lines.append("  per job (mean / total s):")
    for key in sorted(pipe.phases, key=lambda k: (not k.startswith("transcriber"), k)):
        values = pipe.phases[key]
        lines.append(f"    {key:<32} {sum(values) / len(values):8.3f} {sum(values):9.2f}   ({len(values)} jobs)")
    total_p, total_b = sum(pipe.cpu.values()), sum(bare.cpu.values())
    lines.append(f"  CPU ratio: {total_p / total_b:.2f} (pipeline CPU-seconds / bare; less sensitive to a busy host)")
    lines.append(f"  CPU-seconds: pipeline {total_p:.1f} (" + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(pipe.cpu.items(), key=lambda kv: -kv[1])) + ")")
    lines.append(f"               bare {total_b:.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in bare.cpu.items()) + ")")
    return lines


def main(argv: list[str] | None = None) -> None:
    from kafscribe.speech import sizing

    base = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--min-s", type=float, default=5.0)
    parser.add_argument("--max-s", type=float, default=40.0)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--wait", choices=["openai", "poll"], default="openai",
                        help="openai: one synchronous POST /v1/audio/transcriptions per clip (default); "
                             "poll: POST /v1/jobs, then GET the job every 0.25 s")
    parser.add_argument("--settings", default="auto,2x1", help="comma-separated: auto or NxT (default: auto,2x1)")
    parser.add_argument("--http-port", type=int, default=28000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench")
    parser.add_argument("--state-dir", type=Path, default=None, help="services' state (default: DIR/state)")
    args = parser.parse_args(argv)

    made = make_clips(args.dir, durations(args.clips, args.min_s, args.max_s))
    random.Random(0).shuffle(made)  # lengths mixed, the same order for both runs
    clips = [p for p, _ in made]
    audio_s = sum(d for _, d in made)
    warm = make_clips(args.dir / "warm", [3.0])[0][0]
    print(f"{len(clips)} clips, {audio_s:.0f} s of audio; engine {base.engine}, model {base.model}, "
          f"beam {base.beam_size}, device {base.device}; {args.submitters} submitters; "
          f"{sizing.usable_cores()} usable cores", flush=True)
    out: list[str] = []
    for setting in args.settings.split(","):
        transcribers, threads = parse_setting(setting.strip())
        plan = sizing.plan(base.with_(transcribers=transcribers, cpu_threads=threads))
        processes, threads = plan.transcribers, plan.threads
        engine_settings = base.with_(cpu_threads=threads)
        print(f"-- {setting}: bare, {processes} x {threads}", flush=True)
        bare = run_bare(engine_settings, processes, clips, warm)
        print(f"-- {setting}: pipeline ({bare.wall:.1f} s bare)", flush=True)
        pipe = run_pipeline(base, transcribers, threads, processes, clips, warm, args.submitters, args.http_port,
                            args.state_dir or args.dir / "state" / setting, args.wait)
        lines = report(setting, processes, threads, audio_s, bare, pipe)
        print("\n".join(lines), flush=True)
        out += lines
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
