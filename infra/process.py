"""Start, find and stop the local server processes by pid file.

A server is started detached (its own session) with stdout/stderr in a log
file, and its pid written to ``<state>/<name>.pid``. We only ever signal a
pid whose command line still carries our ``-Dkafscribe.server=<name>`` tag,
so a stale pid file can never make us kill a stranger. The kafscribe
services (ingress, stage workers) use ``--instance=<name>`` as their tag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerProcess:
    name: str
    state_dir: Path
    tag_prefix: str = "-Dkafscribe.server="

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.out"

    @property
    def tag(self) -> str:
        """The argv element that marks the process as ours."""
        return f"{self.tag_prefix}{self.name}"

    def pid(self) -> int | None:
        """The pid of our running server, or None (clears a stale pid file)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _cmdline_has(pid, self.tag):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,
            )
        # Until the child has exec'ed java its cmdline is ours, without the tag:
        # wait for it, so that pid() never mistakes a starting server for a stale one.
        deadline = time.monotonic() + 10
        while not _cmdline_has(proc.pid, self.tag):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
            time.sleep(0.01)
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def alive(self) -> bool:
        return self.pid() is not None

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns True if a process was stopped."""
        return bool(stop_together([self], timeout_s))

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])


def _cmdline_has(pid: int, tag: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if _is_zombie(pid):
        return False
    return tag.encode() in raw.split(b"\0")


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_together(procs: list[ServerProcess], timeout_s: float = 30.0) -> list[ServerProcess]:
    """SIGTERM every running one at once, wait for all within one deadline, then SIGKILL the rest.

    Returns the ones that were running. Stopping a group together costs the slowest member's shutdown,
    not the sum of all of them (the test session's two stacks: eight JVMs).
    """
    running = [(proc, pid) for proc in procs if (pid := proc.pid()) is not None]
    for _, pid in running:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_exists(pid) for _, pid in running):
        for _, pid in running:
            _reap(pid)
        time.sleep(0.2)
    for proc, pid in running:
        if _exists(pid):
            _signal(pid, signal.SIGKILL)
            while _exists(pid):
                _reap(pid)
                time.sleep(0.1)
        proc.pid_file.unlink(missing_ok=True)
    return [proc for proc, _ in running]
