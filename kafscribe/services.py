"""`kafscribe services up|down|status`: the pipeline's own processes, in the background.

``make up`` starts the ingress and one worker of each stage after the stack;
each is a ``kafscribe serve`` process with a pid file and a log under the
state directory. ``down`` stops them with SIGTERM (workers finish or hand
back their job), then SIGKILL after a timeout.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable

from infra.process import ServerProcess

from .settings import Settings

DEFAULT_SERVICES = ("ingress", "transcriber", "translator", "sink", "notifier")


def _process(name: str, settings: Settings) -> ServerProcess:
    return ServerProcess(name, settings.state_dir / "services", tag_prefix="--instance=")


def up(settings: Settings, names=DEFAULT_SERVICES, log: Callable[[str], None] = print,
       env: dict[str, str] | None = None) -> list[str]:
    (settings.state_dir / "services").mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        proc = _process(name, settings)
        if proc.alive():
            log(f"{name}: already running (pid {proc.pid()})")
            continue
        stage = name.split("-")[0]
        argv = [sys.executable, "-m", "kafscribe.cli", "serve", stage, proc.tag]
        pid = proc.start(argv, env={**os.environ, **(env or {})})
        started.append(name)
        log(f"{name}: started pid {pid} (log {proc.log_file})")
    if "ingress" in started:
        _wait_port(settings.http_host, settings.http_port, 60, _process("ingress", settings))
        log(f"ingress: listening on http://{settings.http_host}:{settings.http_port}")
    return started


def _wait_port(host: str, port: int, timeout_s: float, proc: ServerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} is not listening on {port} after {timeout_s:.0f}s:\n{proc.log_tail()}")


def down(settings: Settings, log: Callable[[str], None] = print, timeout_s: float = 60.0) -> None:
    directory = settings.state_dir / "services"
    for pid_file in sorted(directory.glob("*.pid")) if directory.exists() else []:
        proc = _process(pid_file.stem, settings)
        pid = proc.pid()
        if proc.stop(timeout_s):
            log(f"{proc.name}: stopped pid {pid}")


def status(settings: Settings) -> list[tuple[str, int | None]]:
    directory = settings.state_dir / "services"
    names = sorted({p.stem for p in directory.glob("*.pid")} | set(DEFAULT_SERVICES)) if directory.exists() else list(DEFAULT_SERVICES)
    return [(name, _process(name, settings).pid()) for name in names]
