"""`kafscribe serve <stage>`: one stage worker process.

Sets up logging, metrics and the Cassandra session, builds the stage, and
runs its consume loop until SIGTERM/SIGINT (which let the current job finish
or abandon it cleanly; see ``loop.StageRunner``). A watchdog ends the process
(status 70) when a poll loop stops turning (``consumers.watchdog``). ``notifier`` runs two
loops in one process: first deliveries (``finished``) and retries
(``callbacks.retry``); so does ``transcriber``: uploads, and the chunks of long recordings
(``consumers.chunk_transcriber``, sharing the engine). ``merger`` assembles chunked jobs.
"""

from __future__ import annotations

import logging
import signal
import threading

from kafscribe import logs
from kafscribe.kafka.workers import check_worker_id
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session

from .loop import StageRunner
from .stage import Stage
from .status import StatusReporter
from .watchdog import Watchdog
from .watchdog import serve as serve_http

STAGES = ("transcriber", "translator", "sink", "notifier", "merger")
# 9105 is the lag exporter's (KAFSCRIBE_LAG_METRICS_PORT)
DEFAULT_METRICS_PORTS = {"transcriber": 9101, "translator": 9102, "sink": 9103, "notifier": 9104, "merger": 9106}

log = logging.getLogger("kafscribe.worker")


def build_stages(name: str, settings: Settings, session, worker_id: str, stop: threading.Event) -> list[Stage]:
    if name == "transcriber":
        from .chunk_transcriber import ChunkTranscriber
        from .transcriber import Transcriber

        transcriber = Transcriber(settings, session, worker_id)
        return [transcriber, ChunkTranscriber(transcriber)]  # chunks of long recordings: a second loop
    if name == "merger":
        from .merger import Merger

        return [Merger(settings, session, worker_id)]
    if name == "translator":
        from .translator import TranslatorStage

        return [TranslatorStage(settings, session, worker_id)]
    if name == "sink":
        from .sink import Sink

        return [Sink(settings, session, worker_id)]
    if name == "notifier":
        from .notifier import CallbackRetrier, Notifier

        return [Notifier(settings, session, worker_id), CallbackRetrier(settings, session, worker_id, stop)]
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")


def build_runners(name: str, settings: Settings, stop: threading.Event) -> list[StageRunner]:
    """The stage's runners, each publishing its WorkerStatus (from a thread of its own) while it polls."""
    worker_id = settings.effective_worker_id(name)
    reason = check_worker_id(worker_id)
    if reason:  # every view would ignore its statuses: refuse to start rather than run unseen
        raise ValueError(f"worker id {worker_id[:140]!r} (KAFSCRIBE_WORKER_ID or stage-host-pid): {reason}")
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    runners = []
    for i, stage in enumerate(build_stages(name, settings, session, worker_id, stop)):
        runner = StageRunner(settings, stage, worker_id if i == 0 else stage.runner_id(worker_id))
        stage.queued = runner.backlog  # what waits behind the job it starts (a job may be handed on)
        # a transcriber's speed and work; its chunk loop shares the engine (each chunk about KAFSCRIBE_CHUNK_S)
        meter = getattr(stage, "meter", None) or getattr(getattr(stage, "transcriber", None), "meter", None)
        reporter = StatusReporter(settings, runner, model=stage.model_name, meter=meter,
                                  unit_audio_s=settings.chunk_s if i > 0 and meter is not None else None)
        runner.on_close.append(reporter.stopped)
        reporter.start()  # its own thread, publishing while the loop turns (StageRunner.last_beat)
        runners.append(runner)
    return runners


def serve(name: str, settings: Settings) -> int:
    logs.setup(settings.log_level)
    port = settings.metrics_port or DEFAULT_METRICS_PORTS.get(name, 0)
    if 0 < settings.watchdog_s < 4 * settings.kafka_call_timeout_s:
        log.warning("KAFSCRIBE_WATCHDOG_S=%g is below 4x KAFSCRIBE_KAFKA_CALL_TIMEOUT_S=%g: a worker waiting out "
                    "its deadlines may be ended by its watchdog", settings.watchdog_s, settings.kafka_call_timeout_s)
    watchdog = Watchdog([], settings.watchdog_s)
    serve_http(port, settings.metrics_host, watchdog)  # /metrics and /healthz
    stop = threading.Event()
    runners = build_runners(name, settings, stop)
    watchdog.runners = runners
    watchdog.start()  # from here on, a poll loop that stops turning ends the process

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: stopping after the current job", signum, extra={"stage": name})
        stop.set()
        for runner in runners:
            runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=r.run, name=r.stage.name) for r in runners[1:]]
    for thread in threads:
        thread.start()
    try:
        runners[0].run()
    finally:
        for runner in runners[1:]:
            runner.stop()
        for thread in threads:
            thread.join()
    return 0
