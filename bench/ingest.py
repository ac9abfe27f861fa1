"""Ingest throughput: how many uploads a second does the door accept, and what does each cost?

    kafscribe serve ingress &        # an ingress (transcribers may be stopped: only the door is measured)
    python -m bench.ingest --uploads 600 --clients 16 --clip 2s
    python -m bench.ingest --uploads 600 --clients 16 --clip 100k

Sends N ``POST /v1/jobs`` of one clip from C concurrent clients (one asyncio
loop, the multipart body built once) after a short warm-up, and prints:
accepted/s (202s over the wall time), latency p50/p99 of the 202s, other
answers by status, and CPU-seconds per accepted upload of the ingress
(every process listening on the URL's port, and their parent), Kafka and
Cassandra (the processes listening on the bootstrap and CQL ports), and of
this client -- process CPU times read from /proc (psutil) before and after.

Clips: ``2s`` is espeak-ng speech of about 2 s as 16-bit WAV (about 90 KB);
``100k`` is about 100 KB of MP3 (about 25 s of speech at 32 kbit/s, 22 kHz mono).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import psutil

from kafscribe.settings import Settings

from .clips import SENTENCES
from .pipeline import percentile

WARMUP = 20


def make_clip(kind: str, directory: Path) -> Path:
    """The benchmark clip ``kind`` (``2s`` or ``100k``), made once with espeak-ng (+ ffmpeg)."""
    directory.mkdir(parents=True, exist_ok=True)
    wav = directory / f"ingest-{kind}.wav"
    text = SENTENCES[0][:30] if kind == "2s" else " ".join([*SENTENCES, SENTENCES[0]])
    if not wav.exists():
        subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "-w", str(wav), text], check=True)
    if kind == "2s":
        return wav
    mp3 = directory / "ingest-100k.mp3"
    if not mp3.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-b:a", "32k", "-ac", "1",
                        str(mp3)], check=True)
    return mp3


def multipart(path: Path) -> tuple[bytes, str]:
    """The request body of one upload of ``path`` and its content type (built once, sent N times)."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def listeners(port: int) -> set[psutil.Process]:
    """The processes listening on ``port`` (all of them under SO_REUSEPORT), and a parent that groups them."""
    pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            and c.laddr and c.laddr.port == port and c.pid}
    procs = {psutil.Process(pid) for pid in pids}
    for proc in list(procs):
        parent = proc.parent()
        if parent is not None and len(procs) > 1 and all(p.ppid() == parent.pid for p in procs):
            procs.add(parent)
    return procs


def cpu_seconds(procs: set[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()  # with the subprocesses it has reaped (an ingress that runs ffprobe)
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


async def run(url: str, api_key: str, body: bytes, content_type: str, uploads: int, clients: int):
    """Send ``uploads`` bodies from ``clients`` concurrent connections; returns (wall s, latencies, statuses)."""
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    todo = iter(range(uploads))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def client() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    async with http.post(f"{url}/v1/jobs", data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                statuses[status] += 1
                if status == 202:
                    latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start, latencies, statuses


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--clip", choices=["2s", "100k"], default="2s")
    parser.add_argument("--url", default=settings.public_url or f"http://127.0.0.1:{settings.http_port}")
    parser.add_argument("--api-key", default=settings.api_key)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench")
    args = parser.parse_args(argv)

    clip = make_clip(args.clip, args.dir)
    body, content_type = multipart(clip)
    groups = {
        "ingress": listeners(urlparse(args.url).port or 80),
        "kafka": listeners(settings.kafka_port),
        "cassandra": listeners(settings.cassandra_port),
        "client": {psutil.Process()},
    }
    missing = [name for name, procs in groups.items() if not procs]
    print(f"clip {clip.name}: {len(body)} bytes; {args.uploads} uploads from {args.clients} clients to {args.url}"
          + (f" (no local process found for: {', '.join(missing)})" if missing else ""))
    asyncio.run(run(args.url, args.api_key, body, content_type, WARMUP, min(args.clients, WARMUP)))
    before = {name: cpu_seconds(procs) for name, procs in groups.items()}
    wall, latencies, statuses = asyncio.run(run(args.url, args.api_key, body, content_type, args.uploads, args.clients))
    after = {name: cpu_seconds(procs) for name, procs in groups.items()}
    accepted = len(latencies)
    others = ", ".join(f"{status or 'no answer'}: {n}" for status, n in sorted(statuses.items()) if status != 202)
    print(f"accepted : {accepted}/{args.uploads} in {wall:.2f} s = {accepted / wall:.1f}/s" + (f"   ({others})" if others else ""))
    if latencies:
        print(f"latency  : p50 {percentile(latencies, 0.5) * 1000:.0f} ms   p99 {percentile(latencies, 0.99) * 1000:.0f} ms"
              f"   max {max(latencies) * 1000:.0f} ms")
    per = max(accepted, 1)
    print("CPU/upload: " + "   ".join(
        f"{name} {(after[name] - before[name]) / per * 1000:.1f} ms" for name in groups if groups[name]
    ) + f"   (ingress: {len(groups['ingress'])} process(es); cores busy: "
        + ", ".join(f"{name} {(after[name] - before[name]) / wall:.2f}" for name in groups if groups[name]) + ")")


if __name__ == "__main__":
    main()
