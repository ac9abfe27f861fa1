"""One long recording through the whole pipeline: split across 1 and 2 transcribers.

    python -m bench.longfile                          # a 10-minute clip; 2-hour RSS run too
    python -m bench.longfile --minutes 10 --long-minutes 0  # skip the 2-hour run

Runs ``kafscribe services up`` (against the stack of the ``KAFSCRIBE_*``
settings, on fresh topics) for each configuration and times one job from
submit to ``completed``:

- single pass (``KAFSCRIBE_CHUNK_S=0``) on 1 transcriber -- the reference,
- split (``KAFSCRIBE_CHUNK_S``, default 60 s) on 1 transcriber, then on 2,

each transcriber with 1 thread (each run keeps its services' logs in its own
state directory under ``--dir``, to see which worker took which chunk). Word recall is measured against the spoken
text (``bench.batched.recall``: longest common subsequence of words). The
peak RSS (``VmHWM``) of the transcribers is read when the job is done. The
long run submits a 2-hour recording (the 10-minute clip repeated, as MP3 to
stay under the upload limit) to 1 transcriber, waits until ``--long-chunks``
chunks are merged (the split itself is done before the first chunk), reads
the transcriber's peak RSS, and cancels the job: chunks are transcribed one at
a time, so the peak after the split and a few chunks is the peak of the job.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.batched import compose, recall
from bench.pipeline import bench_settings, prepare_services, service_pids, wait_for_transcribers
from kafscribe.settings import Settings

MIB = 2**20


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def chunk_group_ready(settings: Settings, members: int) -> bool:
    from kafscribe.kafka import clients as kafka_clients

    admin = kafka_clients.admin(settings)
    (future,) = admin.describe_consumer_groups([settings.topic_prefix + "chunk-transcribers"]).values()
    try:
        desc = future.result()
    except Exception:  # noqa: BLE001 - the group does not exist yet
        return False
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions) >= members


def run(base: Settings, clip: Path, transcribers: int, chunk_s: float, state_dir: Path, http_port: int,
        stop_after_chunks: int = 0) -> dict:
    """One pipeline, one job: wall time, text, chunks, and the transcribers' peak RSS."""
    from kafscribe.cli import services
    from producers.client import HttpClient

    settings = bench_settings(base, str(transcribers), 1, http_port, state_dir).with_(chunk_s=chunk_s)
    api_key, env = prepare_services(settings, state_dir)
    http = HttpClient(f"http://127.0.0.1:{http_port}", timeout_s=600, api_key=api_key)
    services.up(settings, names=("ingress", "transcriber", "translator", "sink", "merger"),
                log=lambda line: print(f"  [services] {line}"), env=env)
    try:
        wait_for_transcribers(settings, transcribers)
        deadline = time.monotonic() + 120
        while not chunk_group_ready(settings, transcribers) and time.monotonic() < deadline:
            time.sleep(0.5)
        t0 = time.monotonic()
        job_id = http.submit(clip)["job_id"]
        submitted = time.monotonic() - t0
        while True:
            job = http.job(job_id)
            done = job["status"] in ("completed", "failed", "cancelled")
            chunks = job.get("chunks") or 0
            if stop_after_chunks and chunks and job["progress"]["fraction"] * chunks >= stop_after_chunks:
                break
            if done:
                break
            time.sleep(0.5)
        wall = time.monotonic() - t0
        pids = {n: p for n, p in service_pids(settings, base.state_dir).items() if n.startswith("transcriber")}
        rss = {n: peak_rss(p) for n, p in pids.items()}
        if not done:
            http._request("DELETE", f"/v1/jobs/{job_id}")
    finally:
        services.down(settings, log=lambda line: None)
    result = job.get("result") or {}
    return {"wall": wall, "upload": submitted, "status": job["status"], "chunks": job.get("chunks") or 0,
            "text": result.get("text", ""), "rss": rss, "error": job.get("error")}


def main(argv: list[str] | None = None) -> None:
    base = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chunk-s", type=float, default=base.chunk_s)
    parser.add_argument("--long-minutes", type=float, default=120.0, help="0 = no long run")
    parser.add_argument("--long-chunks", type=int, default=4, help="chunks of the long run merged before reading RSS")
    parser.add_argument("--no-single", action="store_true", help="skip the single-pass reference run")
    parser.add_argument("--http-port", type=int, default=8791)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    clip, spoken = compose(args.dir / f"longfile-{args.minutes:g}min.wav", args.minutes)
    (args.dir / "longfile.spoken.txt").write_text(spoken)
    state = args.dir / "longfile-state"
    print(f"clip {clip} ({args.minutes:g} min); model {base.model}, engine {base.engine}, chunk {args.chunk_s:g} s;"
          f" each transcriber 1 thread; {os.cpu_count()} cores", flush=True)
    rows = []
    configs = ([] if args.no_single else [("single pass, 1 transcriber", 1, 0.0)]) + [
        ("split, 1 transcriber", 1, args.chunk_s), ("split, 2 transcribers", 2, args.chunk_s)]
    for label, n, chunk_s in configs:
        r = run(base, clip, n, chunk_s, state.with_name(f"{state.name}-{n}x-chunk{chunk_s:g}"), args.http_port)
        rows.append((label, r))
        (args.dir / f"longfile.{label.replace(' ', '_').replace(',', '')}.txt").write_text(r["text"])
        print(f"{label:28s}: {r['status']} in {r['wall']:7.1f} s (upload {r['upload']:.1f} s), {r['chunks']} chunks,"
              f" word recall {recall(spoken, r['text']):.3f}, peak RSS "
              + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(r["rss"].items())), flush=True)
    walls = {label: r["wall"] for label, r in rows}
    if "split, 1 transcriber" in walls:
        print(f"2 transcribers / 1: {walls['split, 2 transcribers'] / walls['split, 1 transcriber']:.2f}x", flush=True)
    if "single pass, 1 transcriber" in walls:
        single = dict(rows)["single pass, 1 transcriber"]
        merged = dict(rows)["split, 2 transcribers"]
        print(f"merged recall / single-pass recall: {recall(spoken, merged['text']) / max(1e-9, recall(spoken, single['text'])):.3f}",
              flush=True)
    if args.long_minutes > 0:
        long_clip = args.dir / f"longfile-{args.long_minutes:g}min.mp3"
        if not long_clip.exists():
            loops = int(args.long_minutes // args.minutes)
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", str(loops - 1), "-i", str(clip),
                            "-ac", "1", "-b:a", "32k", str(long_clip)], check=True)
        short_peak = max(dict(rows)["split, 1 transcriber"]["rss"].values())
        r = run(base, long_clip, 1, args.chunk_s, state.with_name(f"{state.name}-long"), args.http_port,
                stop_after_chunks=args.long_chunks)
        peak = max(r["rss"].values())
        print(f"long ({args.long_minutes:g} min), 1 transcriber: {r['chunks']} chunks, peak RSS {peak / MIB:.0f} MiB after"
              f" the split and {args.long_chunks} chunks ({r['wall']:.0f} s) vs {short_peak / MIB:.0f} MiB on the"
              f" {args.minutes:g}-min job: {peak / short_peak:.3f}x", flush=True)


if __name__ == "__main__":
    main()
