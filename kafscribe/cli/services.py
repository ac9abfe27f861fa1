"""`kafscribe services up|down|status`: the pipeline's own processes, supervised.

``up`` starts one detached supervisor (``kafscribe services supervise``),
which starts the ingress and one worker of each stage -- each a ``kafscribe
serve`` process with a pid file and a log under ``<state>/services`` -- and
restarts any of them that exits, whatever the exit status (a crash, a
watchdog exit, a SIGKILL), the way systemd's ``Restart=always`` or a
Kubernetes pod would: after 1 s, doubling up to
``KAFSCRIBE_RESTART_BACKOFF_MAX_S`` while it keeps exiting within
``STABLE_S`` of its start. Restart counts and last exit statuses are written
to ``<state>/services/supervisor.json`` (``kafscribe services status``) and
exported as ``kafscribe_service_restarts_total{service}`` on
``KAFSCRIBE_SUPERVISOR_METRICS_PORT``. ``down`` stops the supervisor
(SIGTERM): it stops the services with SIGTERM (workers finish or hand back
their job), then SIGKILL after a timeout.

Transcribers: ``transcriber`` stands for as many instances as
``kafscribe.speech.sizing.plan`` gives (``KAFSCRIBE_TRANSCRIBERS``, default
``auto``): ``transcriber``, ``transcriber-2``, ... each with its engine
threads (``KAFSCRIBE_CPU_THREADS``), its GPU on CUDA, and its own metrics
port (the first one's + 10 per instance).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from infra import prometheus_server
from infra.process import ServerProcess
from kafscribe import metrics
from kafscribe.settings import Settings
from kafscribe.speech import sizing

DEFAULT_SERVICES = ("ingress", "transcriber", "translator", "sink", "notifier", "merger", "lag")
SUPERVISOR = "supervisor"
PROMETHEUS = "prometheus"
STABLE_S = 60.0  # a service that ran this long before exiting is restarted after the first backoff again
STOP_TIMEOUT_S = 60.0


def _process(name: str, settings: Settings) -> ServerProcess:
    return ServerProcess(name, settings.state_dir / "services", tag_prefix="--instance=")


def _state_file(settings: Settings) -> Path:
    return settings.state_dir / "services" / "supervisor.json"


@dataclass
class ServiceState:
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None  # exit status of the last run; negative = killed by that signal
    quick_exits: int = 0  # consecutive exits within STABLE_S of the start (drives the backoff)
    started_at: float | None = None  # monotonic
    next_start: float = 0.0  # monotonic


class Supervisor:
    """Keeps each named service running; one ``step()`` per half second."""

    def __init__(self, settings: Settings, names: Sequence[str], env: dict[str, str] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.names = list(names)
        self.env = env
        self.log = log
        self.plan: sizing.Plan | None = None
        if sizing.TRANSCRIBER in self.names:
            self.plan = sizing.plan(settings)
            at = self.names.index(sizing.TRANSCRIBER)
            self.names[at:at + 1] = sizing.instance_names(self.plan.transcribers)
            log(f"transcribers: {self.plan.transcribers} x {self.plan.threads} thread(s) ({self.plan.why})")
        self.state = {name: ServiceState() for name in self.names}

    def service_env(self, name: str) -> dict[str, str]:
        """What ``name`` runs with beyond the supervisor's environment (a transcriber's threads, GPU, port)."""
        if self.plan is None or name.split("-")[0] != sizing.TRANSCRIBER:
            return {}
        from consumers.worker import DEFAULT_METRICS_PORTS

        first_port = self.settings.metrics_port or DEFAULT_METRICS_PORTS[sizing.TRANSCRIBER]
        return sizing.instance_env(name, self.plan, self.settings, first_port)

    def step(self) -> None:
        now = time.monotonic()
        for name in self.names:
            proc, st = _process(name, self.settings), self.state[name]
            if st.pid is not None:
                code = _exit_status(st.pid, proc)
                if code is None:
                    continue
                ran = now - (st.started_at or now)
                st.quick_exits = st.quick_exits + 1 if ran < STABLE_S else 1
                delay = min(self.settings.restart_backoff_max_s, 2.0 ** (st.quick_exits - 1))
                st.pid, st.last_exit, st.next_start = None, code, now + delay
                proc.pid_file.unlink(missing_ok=True)
                self.log(f"{name}: exited with status {code} after {ran:.0f}s; restarting in {delay:.0f}s")
                continue
            if now < st.next_start:
                continue
            if proc.alive():  # already running (started before this supervisor): adopt it
                st.pid, st.started_at = proc.pid(), now
                continue
            if st.started_at is not None:
                st.restarts += 1
                metrics.SERVICE_RESTARTS.labels(name).inc()
            stage = name.split("-")[0]
            argv = [sys.executable, "-m", "kafscribe.cli.main", "serve", stage, proc.tag]
            try:
                env = {**os.environ, **(self.env or {}), **metrics_env(name, self.settings), **self.service_env(name)}
                st.pid = proc.start(argv, env=env)
            except RuntimeError as exc:  # exited at once: try again after the backoff
                st.quick_exits += 1
                st.next_start = now + min(self.settings.restart_backoff_max_s, 2.0 ** (st.quick_exits - 1))
                self.log(f"{name}: did not start: {exc}")
                continue
            st.started_at = now
            self.log(f"{name}: started pid {st.pid} (log {proc.log_file})")

    def write_state(self) -> None:
        path = _state_file(self.settings)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "supervisor_pid": os.getpid(),
            "services": {n: {k: v for k, v in asdict(s).items() if k in ("pid", "restarts", "last_exit")}
                         for n, s in self.state.items()},
        }))
        tmp.replace(path)

    def run(self, stop: threading.Event) -> None:
        write_scrape_targets(self.settings, self.names)
        while not stop.is_set():
            self.step()
            self.write_state()
            stop.wait(0.5)
        self.stop_all()

    def stop_all(self) -> None:
        for name in self.names:
            proc = _process(name, self.settings)
            pid = proc.pid()
            if proc.stop(STOP_TIMEOUT_S):
                self.log(f"{name}: stopped pid {pid}")
            self.state[name].pid = None
        self.write_state()


def _exit_status(pid: int, proc: ServerProcess) -> int | None:
    """The exit status of our child ``pid`` once it has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # adopted, not our child: only liveness is known
        return None if proc.alive() else -1
    return os.waitstatus_to_exitcode(status) if done else None


def supervise(settings: Settings, names: Sequence[str]) -> int:
    """The supervisor process (``kafscribe services supervise``): runs until SIGTERM/SIGINT."""
    from prometheus_client import start_http_server

    from kafscribe import logs

    logs.setup(settings.log_level)
    if settings.supervisor_metrics_port > 0:
        start_http_server(settings.supervisor_metrics_port, addr=settings.metrics_host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(settings, names, log=lambda line: print(line, flush=True))
    sup.run(stop)
    return 0


def up(settings: Settings, names=DEFAULT_SERVICES, log: Callable[[str], None] = print,
       env: dict[str, str] | None = None) -> list[str]:
    """Start the supervisor (which starts ``names``); wait for the ingress to listen.

    ``env`` is the supervisor's (and so the services') whole environment; default: this process's.
    """
    (settings.state_dir / "services").mkdir(parents=True, exist_ok=True)
    sup = _process(SUPERVISOR, settings)
    if sup.alive():
        log(f"{SUPERVISOR}: already running (pid {sup.pid()})")
        _prometheus_up(settings, log)
        return []
    _state_file(settings).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "kafscribe.cli.main", "services", "supervise", "--names", ",".join(names), sup.tag]
    pid = sup.start(argv, env=dict(os.environ) if env is None else env)
    log(f"{SUPERVISOR}: started pid {pid} (log {sup.log_file}); it starts and restarts {', '.join(names)}")
    if "ingress" in names:
        _wait_port(settings.http_host, settings.http_port, 60, sup)
        log(f"ingress: listening on http://{settings.http_host}:{settings.http_port}")
    _prometheus_up(settings, log)
    return list(names)


def _prometheus_up(settings: Settings, log: Callable[[str], None]) -> None:
    try:
        prometheus_server.up(settings, log=log)
    except prometheus_server.PrometheusError as exc:  # the pipeline runs without it; say so plainly
        log(f"{PROMETHEUS}: NOT running ({exc}); KAFSCRIBE_PROMETHEUS_PORT=-1 runs none on purpose")


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
    raise RuntimeError(f"ingress is not listening on {port} after {timeout_s:.0f}s:\n{proc.log_tail()}")


def down(settings: Settings, log: Callable[[str], None] = print, timeout_s: float = STOP_TIMEOUT_S) -> None:
    sup = _process(SUPERVISOR, settings)
    pid = sup.pid()
    if sup.stop(timeout_s + 15):  # it stops its services first
        log(f"{SUPERVISOR}: stopped pid {pid}")
    directory = settings.state_dir / "services"
    for pid_file in sorted(directory.glob("*.pid")) if directory.exists() else []:
        proc = _process(pid_file.stem, settings)  # left over (the supervisor was killed)
        pid = proc.pid()
        if proc.stop(timeout_s):
            log(f"{proc.name}: stopped pid {pid}")
    prometheus_server.down(settings, log=log)


@dataclass
class ServiceRow:
    name: str
    pid: int | None
    restarts: int | None = None  # None: not a supervised service (the supervisor itself)
    last_exit: int | None = None

    def line(self) -> str:
        state = f"running pid {self.pid}" if self.pid else "stopped"
        extra = "" if self.restarts is None else f", restarts {self.restarts}"
        extra += f", last exit {self.last_exit}" if self.last_exit is not None else ""
        return f"{self.name:<14} {state}{extra}"


def status(settings: Settings) -> list[ServiceRow]:
    """Each service's pid (None = not running) and the supervisor's restart count for it."""
    directory = settings.state_dir / "services"
    names = set(DEFAULT_SERVICES)
    if directory.exists():
        names |= {p.stem for p in directory.glob("*.pid")} - {SUPERVISOR}
    try:
        known = json.loads(_state_file(settings).read_text())["services"]
    except (FileNotFoundError, ValueError, KeyError):
        known = {}
    names |= set(known)
    rows = [ServiceRow(SUPERVISOR, _process(SUPERVISOR, settings).pid())]
    if settings.prometheus_port >= 0:
        rows.append(ServiceRow(PROMETHEUS, prometheus_server.process(settings).pid()))
    for name in sorted(names):
        info = known.get(name, {})
        rows.append(ServiceRow(name, _process(name, settings).pid(), info.get("restarts", 0), info.get("last_exit")))
    return rows


# --- what Prometheus scrapes (obs) ------------------------------------------------------------
INSTANCE_PORT_STEP = 10  # "transcriber-2" listens on the transcriber's port + 10, "transcriber-3" + 20, ...


def service_metrics_port(name: str, settings: Settings) -> int | None:
    """Port of service ``name``'s /metrics (None: it exports none).

    Stage workers listen on their stage's port (9101-9104, merger 9106; a ``KAFSCRIBE_METRICS_PORT`` moves
    the whole block: transcriber there, translator +1, sink +2, notifier +3, merger +5); a further instance
    ``<stage>-<k>`` on its stage's port + 10 x (k - 1), so several transcribers on one host never
    collide.
    """
    from consumers.worker import DEFAULT_METRICS_PORTS

    stage, _, instance = name.partition("-")
    if stage == "ingress":
        return settings.http_port
    if stage == "lag":
        return settings.lag_metrics_port if settings.lag_metrics_port > 0 else None
    if stage not in DEFAULT_METRICS_PORTS or settings.metrics_port < 0:
        return None
    first = min(DEFAULT_METRICS_PORTS.values())
    base = DEFAULT_METRICS_PORTS[stage] - first + (settings.metrics_port or first)
    k = int(instance) if instance.isdigit() else 1
    return base + INSTANCE_PORT_STEP * (k - 1)


def metrics_env(name: str, settings: Settings) -> dict[str, str]:
    """The environment a supervised worker needs to listen where ``service_metrics_port`` says."""
    stage = name.split("-")[0]
    port = service_metrics_port(name, settings)
    if stage in ("ingress", "lag") or port is None:
        return {}
    return {"KAFSCRIBE_METRICS_PORT": str(port)}


def write_scrape_targets(settings: Settings, names: Sequence[str]) -> None:
    """File-SD targets of every supervised service and of the supervisor itself."""
    targets = []
    for name in names:
        port = service_metrics_port(name, settings)
        if port is not None:
            host = settings.http_host if name.split("-")[0] == "ingress" else settings.metrics_host
            targets.append((name, f"{_reachable(host)}:{port}", {"stage": name.split("-")[0]}))
    if settings.supervisor_metrics_port > 0:
        targets.append((SUPERVISOR, f"{_reachable(settings.metrics_host)}:{settings.supervisor_metrics_port}",
                        {"stage": SUPERVISOR}))
    prometheus_server.write_targets(settings, "services", targets)


def _reachable(host: str) -> str:
    """An address to scrape a server listening on ``host`` at (a wildcard address means loopback here)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
