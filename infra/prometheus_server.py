"""A real Prometheus (Debian's ``prometheus`` package) for the local pipeline.

``kafscribe services up`` starts one on ``KAFSCRIBE_PROMETHEUS_HOST:PORT``
(127.0.0.1:9090) with our config and data under ``<state>/prometheus`` --
never the Debian package's own daemon or ``/etc/prometheus``. What it scrapes
comes from file-based service discovery: ``<state>/prometheus/targets/*.json``,
written by the ``kafscribe services`` supervisor for every process it runs
(ingress, each stage worker, extra transcribers, the lag exporter, itself),
so a new worker appears without a config reload. Rules are
``infra/prometheus/rules.yml`` (recording rules for the dashboard, alerts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from kafscribe.settings import PROJECT_ROOT, Settings

from .process import ServerProcess

RULES_FILE = PROJECT_ROOT / "infra" / "prometheus" / "rules.yml"
JOB = "kafscribe"


class PrometheusError(RuntimeError):
    """Prometheus is not installed, or did not become ready (the message has its log)."""


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError("the `prometheus` binary is missing: `make system-deps` (or apt-get install prometheus)")
    return path


def home(settings: Settings) -> Path:
    return settings.state_dir / "prometheus"


def targets_dir(settings: Settings) -> Path:
    return home(settings) / "targets"


def process(settings: Settings) -> ServerProcess:
    # The tag must be a real flag: our data directory (relative to the process's cwd, ``home``).
    return ServerProcess("prometheus", home(settings), tag_prefix="--storage.tsdb.path=")


def config(settings: Settings, rules: Path = RULES_FILE) -> dict:
    """The Prometheus config: one job fed by file SD, our rules."""
    interval = f"{max(1, round(settings.prometheus_scrape_s))}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": f"{max(1, round(settings.prometheus_scrape_s * 0.8))}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": JOB,
            # Our processes' own labels win (the supervisor's `service`, the exporter's `stage`); the
            # target's `service`/`stage` labels fill in where a series has none.
            "honor_labels": True,
            "file_sd_configs": [{"files": [str(targets_dir(settings) / "*.json")], "refresh_interval": "5s"}],
        }],
    }


def write_targets(settings: Settings, name: str, targets: Iterable[tuple[str, str, dict[str, str]]]) -> Path:
    """Write ``<state>/prometheus/targets/<name>.json``: (service, host:port, extra labels) per target.

    Written atomically (rename), as Prometheus's file SD expects.
    """
    directory = targets_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [address], "labels": {"service": service, **labels}}
              for service, address, labels in targets]
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(path)
    return path


def url(settings: Settings) -> str:
    return f"http://{settings.prometheus_host}:{settings.prometheus_port}"


def ready(settings: Settings, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url(settings) + "/-/ready", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def up(settings: Settings, log: Callable[[str], None] = print, timeout_s: float = 60.0) -> int | None:
    """Start our Prometheus unless it runs already; wait until ready. Returns its pid (None: off)."""
    if settings.prometheus_port < 0:
        return None
    proc = process(settings)
    targets_dir(settings).mkdir(parents=True, exist_ok=True)
    conf = home(settings) / "prometheus.yml"
    conf.write_text(yaml.safe_dump(config(settings), sort_keys=False))
    pid = proc.pid()
    if pid is not None:  # keep its data; SIGHUP makes it read the config (and rules) again
        os.kill(pid, signal.SIGHUP)
        log(f"prometheus: already running (pid {pid}, {url(settings)}); config reloaded")
        return pid
    argv = [binary(), f"--config.file={conf}", proc.tag,
            f"--web.listen-address={settings.prometheus_host}:{settings.prometheus_port}",
            f"--storage.tsdb.retention.time={settings.prometheus_retention}"]
    pid = proc.start(argv)
    deadline = time.monotonic() + timeout_s
    while not ready(settings):
        if not proc.alive():
            raise PrometheusError(f"prometheus exited during start-up:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            proc.stop(10)
            raise PrometheusError(f"prometheus not ready after {timeout_s:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.3)
    log(f"prometheus: started pid {pid} on {url(settings)} (config {conf}, log {proc.log_file})")
    return pid


def down(settings: Settings, log: Callable[[str], None] = print) -> bool:
    proc = process(settings)
    pid = proc.pid()
    if proc.stop(30):
        log(f"prometheus: stopped pid {pid}")
        return True
    return False


def query(settings: Settings, expr: str, timeout_s: float = 10.0) -> list[dict]:
    """An instant query's result vector (raises on an error answer)."""
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{url(settings)}/api/v1/query?{urlencode({'query': expr})}",
                                timeout=timeout_s) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise PrometheusError(f"query {expr!r}: {body}")
    return body["data"]["result"]
