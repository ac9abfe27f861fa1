"""`kafscribe submit` (files and directories, a progress bar per file) and `kafscribe jobs ls|show|rm|watch`.

Both talk to the ingress over HTTP (``--url``, ``--api-key`` or
``KAFSCRIBE_API_KEY``); ``submit --direct`` produces to Kafka instead. The
progress bars go to stderr, so stdout carries only what a script wants: job
ids, the transcript, the listing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kafscribe.settings import Settings
from kafscribe.speech import decoding
from kafscribe.statuses import COMPLETED, QUEUED, STATUSES, TERMINAL, TRANSCRIBING, TRANSLATING

AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".m4a", ".mp4", ".flac", ".ogg", ".oga", ".opus", ".webm", ".aac",
                            ".wma", ".aiff", ".aif", ".mkv", ".mov", ".amr"})
# Where a job stands when the job view carries no `progress` yet (a bar needs a number).
STATUS_FRACTION = {QUEUED: 0.02, TRANSCRIBING: 0.1, TRANSLATING: 0.9}


def audio_files(paths: list[str]) -> list[Path]:
    """The files to submit: each file as given, each directory's audio files (by suffix), sorted; no duplicates."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                          and not p.name.startswith("."))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{raw}: no such file or directory")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def prompt_arg(value: str) -> str:
    """``--prompt``: refused by argparse (exit 2, the reason) when no job could take it."""
    problem = decoding.prompt_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def temperature_arg(value: str) -> float:
    """``--temperature``: a number from 0 to 1, else argparse's usage error."""
    try:
        parsed = decoding.parse_temperature(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if parsed is None:
        raise argparse.ArgumentTypeError("temperature must be a number from 0 to 1")
    return parsed


def output_path(audio: Path, fmt: str, lang: str | None = None) -> Path:
    """Where ``--format`` writes the result of ``audio``: beside it, ``clip.wav`` -> ``clip.srt`` (``clip.de.srt``
    with ``--lang de``)."""
    return audio.with_name(audio.stem + (f".{lang}" if lang else "") + f".{fmt}")


def fraction(job: dict[str, Any]) -> float:
    """How far the job is, 0..1: the job's own ``progress.fraction`` when it has one, else by status."""
    if job.get("status") in TERMINAL:
        return 1.0
    progress = job.get("progress") or {}
    if isinstance(progress.get("fraction"), int | float):
        return max(0.0, min(1.0, float(progress["fraction"])))
    return STATUS_FRACTION.get(job.get("status", ""), 0.0)


def http_client(args: argparse.Namespace, settings: Settings):
    from producers.client import HttpClient

    return HttpClient(args.url or settings.public_url or f"http://127.0.0.1:{settings.http_port}",
                      api_key=args.api_key or settings.api_key)


def _err(message: str) -> None:
    print(f"kafscribe: {message}", file=sys.stderr)


def submit(args: argparse.Namespace, settings: Settings) -> int:
    from producers import client

    try:
        files = audio_files(args.paths)
    except FileNotFoundError as exc:
        _err(str(exc))
        return 2
    if not files:
        _err("no audio files found in " + ", ".join(args.paths))
        return 2
    if args.direct and args.format:
        _err("--format reads the transcript over HTTP; leave out --direct")
        return 2
    outputs = {f: output_path(f, args.format, args.lang) for f in files} if args.format else {}
    clash = [f for f, out in outputs.items() if out.resolve() == f.resolve()]
    if clash:
        _err(f"{clash[0]}: the {args.format} result would overwrite its own input")
        return 2
    wait = args.wait or bool(args.format)
    options: dict[str, Any] = {"language": args.language, "task": args.task, "translate_to": args.translate_to,
                               "callback_url": args.callback, "model": args.model, "prompt": args.prompt,
                               "temperature": args.temperature}
    for flag in ("word_timestamps", "vad_filter"):
        if getattr(args, flag):
            options[flag] = True if args.direct else "true"
    http = None if args.direct else http_client(args, settings)
    jobs: dict[Path, str] = {}
    refused = 0
    for path in files:
        try:
            if args.direct:
                jobs[path] = client.submit(path, settings=settings, **options)
            else:
                jobs[path] = http.submit(path, **{k: v for k, v in options.items() if v is not None})["job_id"]
        except client.HttpError as exc:
            refused += 1
            _err(f"{path}: upload refused: {exc}")
            if exc.status == 401:
                _err("pass --api-key or set KAFSCRIBE_API_KEY (`kafscribe keys create`)")
                return 1
            continue
        print(f"job {jobs[path]} queued for {path}", file=sys.stderr)
    if not wait:
        for path, job_id in jobs.items():
            print(job_id if len(files) == 1 else f"{job_id}\t{path}")
        return 1 if refused else 0
    if args.direct:
        read = client.direct_job_reader(settings)
        get = lambda job_id: read(job_id)  # noqa: E731
    else:
        get = http.job
    finished = follow(jobs, get, args.timeout)
    failed = refused
    for path, job_id in jobs.items():
        job = finished.get(job_id)
        if job is None or job["status"] != COMPLETED:
            failed += 1
            why = "timed out" if job is None else f"{job['status']}: {job.get('error')}"
            _err(f"{path}: job {job_id} {why}")
            continue
        if args.format:
            outputs[path].write_text(http.transcript(job_id, args.format, args.lang))
            print(f"{outputs[path]}", file=sys.stderr)
        elif args.direct:
            print(json.dumps(job, default=str))
        elif len(files) == 1:
            print(http.transcript(job_id, "txt", args.lang), end="")
        else:
            print(f"{job_id}\t{path}\tcompleted")
    return 1 if failed else 0


def follow(jobs: dict[Path, str], get, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Poll every job until it ends (or ``timeout_s``), a progress bar per file on stderr; the final views."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]:<12}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bars:
        tasks = {job_id: bars.add_task(path.name, total=1.0, status=QUEUED) for path, job_id in jobs.items()}
        while len(done) < len(jobs) and time.monotonic() < deadline:
            for job_id, task in tasks.items():
                if job_id in done:
                    continue
                try:
                    job = get(job_id)
                except Exception as exc:  # noqa: BLE001 - the ingress restarting: keep following
                    bars.update(task, status=f"({type(exc).__name__})")
                    continue
                if job is None:
                    continue
                bars.update(task, completed=fraction(job), status=job["status"])
                if job["status"] in TERMINAL:
                    done[job_id] = job
            time.sleep(0.5)
    return done


def _each_job(ids: list[str], call, render) -> int:
    """``call`` the API for each job id and print ``render(job_id, answer)``; 1 if any job was missing."""
    missing = 0
    for job_id in ids:
        answer = call(job_id)
        if answer is None:
            missing += 1
            _err(f"no job {job_id}")
        else:
            print(render(job_id, answer))
    return 1 if missing else 0


def jobs_command(args: argparse.Namespace, settings: Settings) -> int:
    from producers.client import HttpError

    http = http_client(args, settings)
    try:
        if args.action == "ls":
            return _ls(http, args)
        if not args.ids:
            _err(f"jobs {args.action} needs a job id")
            return 2
        if args.action == "show":
            return _each_job(args.ids, http.job, lambda _id, job: json.dumps(job, indent=2, default=str))
        if args.action == "rm":
            return _each_job(args.ids, http.delete,
                             lambda job_id, a: f"{job_id}\t{'deleted' if a.get('deleted') else a.get('status')}")
        # watch
        if http.job(args.ids[0]) is None:
            _err(f"no job {args.ids[0]}")
            return 1
        final = follow({Path(args.ids[0]): args.ids[0]}, http.job, args.timeout).get(args.ids[0])
        if final is None:
            _err(f"job {args.ids[0]} not finished after {args.timeout:.0f} s")
            return 1
        print(f"{final['job_id']}\t{final['status']}" + (f"\t{final['error']}" if final.get("error") else ""))
        return 0 if final["status"] == COMPLETED else 1
    except HttpError as exc:
        _err(str(exc))
        return 1
    except OSError as exc:
        _err(f"cannot reach the ingress at {http.base_url}: {exc}")
        return 1


def _ls(http, args: argparse.Namespace) -> int:
    page = http.jobs(limit=args.limit, cursor=args.cursor, status=args.status)
    rows = list(page["jobs"])
    while args.all and page.get("next_cursor"):
        page = http.jobs(limit=args.limit, cursor=page["next_cursor"], status=args.status)
        rows += page["jobs"]
    print(f"{'job_id':<32}  {'status':<12}  {'created_at':<25}  {'seconds':>8}  filename")
    for job in rows:
        audio = job.get("audio") or {}
        duration = f"{audio['duration']:.1f}" if audio.get("duration") is not None else ""
        print(f"{job['job_id']:<32}  {job['status']:<12}  {str(job['created_at'])[:25]:<25}  {duration:>8}  "
              f"{audio.get('filename') or ''}")
    if page.get("next_cursor") and not args.all:
        print(f"more: kafscribe jobs ls --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """The `submit` and `jobs` subcommands."""
    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="ingress base URL (default http://127.0.0.1:$KAFSCRIBE_HTTP_PORT)")
        p.add_argument("--api-key", help="API key for the ingress (default: $KAFSCRIBE_API_KEY)")

    p = sub.add_parser("submit", help="submit audio files (or every audio file of a directory)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files and/or directories")
    p.add_argument("--language")
    p.add_argument("--task", choices=["transcribe", "translate"])
    p.add_argument("--translate-to")
    p.add_argument("--callback")
    p.add_argument("--model")
    p.add_argument("--word-timestamps", action="store_true", help="words with their times in the result")
    p.add_argument("--vad-filter", action="store_true", help="skip silence before transcribing")
    p.add_argument("--prompt", type=prompt_arg,
                   help=f"Whisper's initial prompt: names, spellings, style (at most {decoding.MAX_PROMPT_CHARS} chars)")
    p.add_argument("--temperature", type=temperature_arg,
                   help="the one decoding temperature, 0-1 (default: 0 with fallback to hotter ones)")
    p.add_argument("--wait", action="store_true",
                   help="follow the jobs (a progress bar per file); one file: print its transcript")
    p.add_argument("--format", choices=["json", "txt", "srt", "vtt"],
                   help="wait, then write each result beside its input (clip.wav -> clip.srt)")
    p.add_argument("--lang", help="which language's transcript (the translation's, e.g.)")
    p.add_argument("--timeout", type=float, default=1800.0)
    connection(p)
    p.add_argument("--direct", action="store_true", help="produce straight to Kafka instead of HTTP")
    p.set_defaults(func=submit)

    p = sub.add_parser("jobs", help="your tenant's jobs: ls, show, rm (cancel or delete), watch")
    p.add_argument("action", choices=["ls", "show", "rm", "watch"])
    p.add_argument("ids", nargs="*", metavar="JOB_ID")
    p.add_argument("--status", choices=STATUSES, help="ls: only jobs in this status")
    p.add_argument("--limit", type=int, default=20, help="ls: jobs per page (1-100)")
    p.add_argument("--cursor", help="ls: continue where a previous ls stopped")
    p.add_argument("--all", action="store_true", help="ls: every page")
    p.add_argument("--timeout", type=float, default=1800.0, help="watch: give up after this many seconds")
    connection(p)
    p.set_defaults(func=jobs_command)
