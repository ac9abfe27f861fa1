"""What a transcription job costs in memory, and what each service costs idle.

    python -m bench.memory jobs                       # every engine/model/compute type x 30 s, 5 min, 30 min
    python -m bench.memory jobs --durations 30,300 --models tiny.en
    python -m bench.memory table bench-memory.jsonl   # the table of docs/memory-and-routing.md and the fitted estimate
    python -m bench.memory services                   # RSS of sink, notifier, translator, ingress after start

``jobs`` runs each combination in a fresh interpreter (``one``), as a
transcriber does: load the model, read the clip's bytes, decode them with
ffmpeg (``kafscribe.speech.audio.decode``), transcribe. It reports the process's RSS
once the model is loaded (``idle``) and the peak RSS while the job ran
(``peak``; the kernel's high-water mark, reset after loading through
``/proc/self/clear_refs``), so ``peak - idle`` is what the job added -- the
figure ``kafscribe.speech.memory.estimate_job_bytes`` predicts. On CUDA it also
records the process's GPU memory from NVML. Results are appended to a JSON-lines
file (one row per run; rows already there are skipped, so an interrupted run
resumes).

Clips longer than ``--full-up-to-s`` (30 s) are stopped after ``--max-job-s``
(30 s) of transcription: both engines compute the log-mel features of the
whole recording before the first 30 s window, and each window then needs the
same working set, so the peak comes early (a 5-minute run done in full is the
check: see docs/memory-and-routing.md). The row says ``cut_after_s``.

Clips are espeak-ng speech with pauses, repeated to length (30 s of speech
then 5 s of silence, different sentences each time), 16 kHz mono WAV.

``services`` starts each service as ``kafscribe services up`` does (``kafscribe
serve sink|notifier|translator|ingress|transcriber``) with the current
settings, one at a time, waits until it has settled (its RSS unchanged by more
than 1 MiB for 3 s, at least 8 s after start), prints its RSS and whether it
mapped torch or CTranslate2, and stops it. Point it at a running stack
(``KAFSCRIBE_KAFKA_BOOTSTRAP``, ``KAFSCRIBE_CASSANDRA_PORT``; topics and the
keyspace are created if missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

MIB = 2**20
RATE = 16000
SPEECH = [
    "The committee met on Tuesday to review the quarterly results, and the chair opened with a short summary.",
    "Revenue grew in every region except the north, where shipping delays hurt sales for most of the spring.",
    "The new warehouse will open in March and employ two hundred people from the surrounding towns.",
    "Questions from the audience focused on pricing, on the hiring plan and on the cost of energy.",
    "Everyone agreed to meet again after the holidays to decide on the budget for the coming year.",
    "An engineer described how the old machines were replaced one by one without stopping the line.",
]
CONFIGS = [  # (engine, model, compute type); the defaults first, so a cut-short run has them
    ("faster-whisper", "tiny.en", "int8"),
    ("faster-whisper", "base", "int8"),
    ("openai-whisper", "tiny.en", "float32"),
    ("openai-whisper", "base", "float32"),
    ("faster-whisper", "tiny.en", "float32"),
    ("faster-whisper", "base", "float32"),
]


# --- clips ---------------------------------------------------------------------------------
def _speech(text: str, directory: Path) -> np.ndarray:
    path = directory / f"speech-{abs(hash(text)) % 10**8}.wav"
    if not path.exists():
        raw = subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "--stdout", text], check=True,
                             capture_output=True).stdout
        tmp = path.with_suffix(".tmp.wav")
        tmp.write_bytes(raw)
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(tmp), "-ar", str(RATE),
                        "-ac", "1", "-c:a", "pcm_s16le", str(path)], check=True)
        tmp.unlink()
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def make_long_clip(directory: Path, seconds: float) -> Path:
    """A WAV of ``seconds``: blocks of ~30 s of espeak-ng speech followed by 5 s of silence."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"long-{int(seconds)}s.wav"
    if path.exists():
        return path
    pieces = [_speech(" ".join(SPEECH[i:] + SPEECH[:i]), directory) for i in range(len(SPEECH))]
    silence = np.zeros(5 * RATE, np.int16)
    total = int(seconds * RATE)
    out: list[np.ndarray] = []
    have, i = 0, 0
    while have < total:
        for block in (pieces[i % len(pieces)][: 30 * RATE], silence):
            out.append(block[: total - have])
            have += len(out[-1])
        i += 1
    tmp = path.with_suffix(".part")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.concatenate(out).tobytes())
    tmp.rename(path)
    return path


# --- one run (in a fresh interpreter) ------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_one(engine: str, model: str, compute: str, clip: Path, device: str, threads: int,
            max_job_s: float = 0.0) -> dict:
    from kafscribe.settings import Settings
    from kafscribe.speech import audio, memory
    from kafscribe.speech.engines import EngineOptions, TimeLimitExceeded, load_engine

    settings = Settings.from_env().with_(engine=engine, model=model, compute_type=compute, device=device,
                                         cpu_threads=threads)
    t0 = time.monotonic()
    eng = load_engine(settings)
    load_s = time.monotonic() - t0
    gc.collect()
    idle = _status_kb("VmRSS") * 1024
    gpu_idle = memory.gpu_process_bytes(device)
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    t0 = time.monotonic()
    data = clip.read_bytes()
    samples = audio.decode(data, max_audio_s := 4 * 3600.0)
    del data
    deadline = time.monotonic() + max_job_s if max_job_s > 0 else None
    try:
        words = len(eng.transcribe(samples, EngineOptions(language="en"), deadline=deadline).text.split())
    except TimeLimitExceeded:
        words = None  # stopped after max_job_s of work: the features of the whole clip were computed first
    seconds = time.monotonic() - t0
    peak = _status_kb("VmHWM") * 1024
    gpu_peak = memory.gpu_process_bytes(device)
    return {
        "engine": engine, "model": model, "compute": compute, "device": device, "threads": threads,
        "audio_s": round(len(samples) / RATE, 1), "max_audio_s": max_audio_s, "load_s": round(load_s, 1),
        "job_s": round(seconds, 1), "idle_rss": idle, "peak_rss": peak, "job_bytes": peak - idle,
        "gpu_idle": gpu_idle, "gpu_peak": gpu_peak, "words": words, "cut_after_s": max_job_s if words is None else None,
    }


# --- jobs: every combination ---------------------------------------------------------------
def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["engine"], r["model"], r["compute"], r["device"], round(r["audio_s"] / 10), bool(r.get("cut_after_s")))
            for r in rows}


def run_jobs(args: argparse.Namespace) -> None:
    durations = [float(d) for d in args.durations.split(",")]
    models = set(args.models.split(","))
    engines = set(args.engines.split(","))
    done = _done(args.out)
    clips = {seconds: make_long_clip(args.dir, seconds) for seconds in durations}
    for engine, model, compute in CONFIGS:  # config by config, so a cut-short run has whole rows to fit
        for seconds in durations:
            clip = clips[seconds]
            if model not in models or engine not in engines:
                continue
            cut = seconds > args.full_up_to_s
            if (engine, model, compute, args.device, round(seconds / 10), cut) in done:
                continue
            cmd = [sys.executable, "-m", "bench.memory", "one", "--engine", engine, "--model", model,
                   "--compute", compute, "--clip", str(clip), "--device", args.device,
                   "--threads", str(args.threads)]
            if cut:
                cmd += ["--max-job-s", str(args.max_job_s)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"FAILED {engine} {model} {compute} {seconds:.0f}s: {proc.stderr.strip()[-800:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{engine:15} {model:8} {compute:8} {row['audio_s']:7.0f} s  idle {row['idle_rss'] / MIB:6.0f} MiB"
                  f"  peak {row['peak_rss'] / MIB:6.0f} MiB  job +{row['job_bytes'] / MIB:5.0f} MiB"
                  f"  ({row['job_s']:.0f} s{', cut' if row.get('cut_after_s') else ''})", flush=True)


# --- table: the docs table and the fit ------------------------------------------------------
SHORT_S = 60.0  # rows up to this long fit the window working set
LONG_S = 300.0  # rows from this long fit the per-second peak


def fit(rows: list[dict], margin: float = 1.15) -> tuple[dict[tuple[str, str, str], int], dict[str, int]]:
    """The constants of ``kafscribe.speech.memory``: (``JOB_BASE``, ``PEAK_PER_SECOND``).

    ``JOB_BASE[(engine, size, compute)]``: the largest job of at most ``SHORT_S`` seconds (one or two
    windows: the decoder's working set dominates), times ``margin``. ``PEAK_PER_SECOND[engine]``: the
    largest ``job_bytes / audio_s`` of the jobs of at least ``LONG_S`` seconds (the features of the whole
    recording dominate), times ``margin``."""
    from kafscribe.speech.memory import model_size

    base: dict[tuple[str, str, str], int] = {}
    rate: dict[str, int] = {}
    for r in rows:
        if r["audio_s"] <= SHORT_S:
            key = (r["engine"], model_size(r["model"]), r["compute"])
            base[key] = max(base.get(key, 0), int(r["job_bytes"] * margin))
        if r["audio_s"] >= LONG_S:
            rate[r["engine"]] = max(rate.get(r["engine"], 0), int(r["job_bytes"] / r["audio_s"] * margin))
    return base, rate


def print_table(path: Path) -> None:
    from kafscribe.speech import memory

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["engine"], r["model"], r["compute"], r["audio_s"]))
    print("| engine | model | compute | audio | RSS idle | peak RSS | job adds | estimate | job time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = memory.estimate_job_bytes(r["audio_s"], r["model"], r["engine"], r["compute"], r["device"])
        cut = " (stopped after the first windows)" if r.get("cut_after_s") else ""
        print(f"| {r['engine']} | {r['model']} | {r['compute']} | {_dur(r['audio_s'])} | {r['idle_rss'] / MIB:.0f} MiB"
              f" | {r['peak_rss'] / MIB:.0f} MiB | {r['job_bytes'] / MIB:.0f} MiB | {est / MIB:.0f} MiB"
              f" | {r['job_s']:.0f} s{cut} |")
    base, rate = fit(rows)
    print()
    print("fitted (kafscribe/speech/memory.py):")
    for key, value in sorted(base.items()):
        print(f"  JOB_BASE[{key}] = {value / MIB:.0f} MiB")
    for engine, value in sorted(rate.items()):
        print(f"  PEAK_PER_SECOND[{engine!r}] = {value / 1024:.0f} KiB/s")
    print("largest estimate / measured:", max(
        memory.estimate_job_bytes(r["audio_s"], r["model"], r["engine"], r["compute"]) / r["job_bytes"] for r in rows))


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --- services: RSS after start -------------------------------------------------------------
def services_rss(names: list[str], settle_s: float = 3.0, min_s: float = 8.0, timeout_s: float = 180.0) -> None:
    import psutil

    from infra import bootstrap
    from kafscribe.settings import Settings

    settings = Settings.from_env()
    bootstrap.ensure_topics(settings)
    bootstrap.ensure_schema(settings)
    for name in names:
        args = ["serve", name]
        log = tempfile.NamedTemporaryFile(prefix=f"kafscribe-rss-{name}-", suffix=".log", delete=False)
        proc = subprocess.Popen([sys.executable, "-m", "kafscribe.cli.main", *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            p = psutil.Process(proc.pid)
            start = time.monotonic()
            last, stable_since = 0, time.monotonic()
            while time.monotonic() - start < timeout_s and proc.poll() is None:
                rss = p.memory_info().rss
                if abs(rss - last) > MIB:
                    last, stable_since = rss, time.monotonic()
                if time.monotonic() - start >= min_s and time.monotonic() - stable_since >= settle_s:
                    break
                time.sleep(0.25)
            if proc.poll() is not None:
                print(f"{name:10} exited ({proc.returncode}); log: {log.name}")
                continue
            heavy = _heavy_modules(proc.pid)
            print(f"{name:10} {p.memory_info().rss / MIB:6.0f} MiB RSS after {time.monotonic() - start:4.1f} s"
                  f"   torch/whisper/ctranslate2 mapped: {heavy or 'none'}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _heavy_modules(pid: int) -> list[str]:
    """Which of the model libraries' shared objects a process has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [lib for lib in ("libtorch", "libctranslate2") if lib in maps]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    jobs = sub.add_parser("jobs", help="peak RSS per engine, model, compute type and duration")
    jobs.add_argument("--durations", default="30,300,1800")
    jobs.add_argument("--models", default="tiny.en,base")
    jobs.add_argument("--engines", default="faster-whisper,openai-whisper")
    jobs.add_argument("--device", default="cpu")
    jobs.add_argument("--threads", type=int, default=2)
    jobs.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench-memory")
    jobs.add_argument("--out", type=Path, default=Path("bench-memory.jsonl"))
    jobs.add_argument("--full-up-to-s", type=float, default=30.0,
                      help="clips longer than this are stopped after --max-job-s of transcription")
    jobs.add_argument("--max-job-s", type=float, default=30.0)
    one = sub.add_parser("one", help="(internal) one run in this interpreter; prints a JSON row")
    one.add_argument("--engine", required=True)
    one.add_argument("--model", required=True)
    one.add_argument("--compute", required=True)
    one.add_argument("--clip", type=Path, required=True)
    one.add_argument("--device", default="cpu")
    one.add_argument("--threads", type=int, default=2)
    one.add_argument("--max-job-s", type=float, default=0.0, help="stop the transcription after this long")
    table = sub.add_parser("table", help="the docs/memory-and-routing.md table and the least-squares fit from a results file")
    table.add_argument("results", type=Path, nargs="?", default=Path("bench-memory.jsonl"))
    services = sub.add_parser("services", help="RSS of each service after start")
    services.add_argument("--stages", default="sink,notifier,translator,ingress,transcriber")
    args = parser.parse_args(argv)
    if args.cmd == "jobs":
        run_jobs(args)
    elif args.cmd == "one":
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        print(json.dumps(run_one(args.engine, args.model, args.compute, args.clip, args.device, args.threads,
                                    args.max_job_s)))
    elif args.cmd == "table":
        print_table(args.results)
    else:
        services_rss(args.stages.split(","))


if __name__ == "__main__":
    main()
