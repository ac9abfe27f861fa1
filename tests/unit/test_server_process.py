"""Stopping the local servers: one at a time, or a group together under one deadline (real processes)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from infra.process import ServerProcess, stop_together

# A stand-in server that ignores SIGTERM when asked to, tagged like our JVMs (-Dkafscribe.server=NAME).
SERVER = """
import pathlib, signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[2]).touch()
time.sleep(60)
"""


def start(tmp_path: Path, name: str, behaviour: str) -> ServerProcess:
    proc = ServerProcess(name, tmp_path)
    ready = tmp_path / f"{name}.ready"
    proc.start([sys.executable, "-c", SERVER, behaviour, str(ready), f"{proc.tag_prefix}{name}"])
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:  # its SIGTERM handler is in place
        time.sleep(0.01)
    return proc


def test_a_group_stops_within_one_deadline_and_a_stubborn_member_is_killed(tmp_path: Path) -> None:
    procs = [start(tmp_path, f"polite-{i}", "polite") for i in range(3)] + [start(tmp_path, "stubborn", "stubborn")]
    t0 = time.monotonic()
    stopped = stop_together(procs, timeout_s=2.0)
    took = time.monotonic() - t0
    assert {p.name for p in stopped} == {p.name for p in procs}
    assert not any(p.alive() for p in procs) and not any(p.pid_file.exists() for p in procs)
    assert 2.0 <= took < 2.0 + 3.0, took  # the stubborn one waited for, once for the group, then killed


def test_stopping_what_is_not_running_stops_nothing(tmp_path: Path) -> None:
    assert stop_together([ServerProcess("absent", tmp_path)]) == []
    assert ServerProcess("absent", tmp_path).stop(1.0) is False
