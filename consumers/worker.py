"""`kafscribe serve <stage>`: one stage worker process.

Sets up logging, metrics and the Cassandra session, builds the stage, and
runs its consume loop until SIGTERM/SIGINT (which let the current job finish
or abandon it cleanly; see ``loop.StageRunner``).
"""

from __future__ import annotations

import logging
import signal

from kafscribe import cassandra_session, logs, metrics
from kafscribe.settings import Settings

from .loop import StageRunner

STAGES = ("transcriber", "translator", "sink")
DEFAULT_METRICS_PORTS = {"transcriber": 9101, "translator": 9102, "sink": 9103, "notifier": 9104}

log = logging.getLogger("kafscribe.worker")


def build_stage(name: str, settings: Settings, session, worker_id: str):
    if name == "transcriber":
        from .transcriber import Transcriber

        return Transcriber(settings, session, worker_id)
    if name == "translator":
        from .translator import TranslatorStage

        return TranslatorStage(settings, session, worker_id)
    if name == "sink":
        from .sink import Sink

        return Sink(settings, session, worker_id)
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")


def build_runner(name: str, settings: Settings) -> StageRunner:
    worker_id = settings.effective_worker_id(name)
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    stage = build_stage(name, settings, session, worker_id)
    return StageRunner(settings, stage, worker_id)


def serve(name: str, settings: Settings) -> int:
    logs.setup(settings.log_level)
    port = settings.metrics_port or DEFAULT_METRICS_PORTS.get(name, 0)
    metrics.serve(port, settings.metrics_host)
    runner = build_runner(name, settings)

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: stopping after the current job", signum, extra={"stage": name})
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.run()
    return 0
