"""How long does a job take to finish elsewhere after its worker is killed with -9?

    make up                      # Kafka + Cassandra must be running (the services need not)
    python -m bench.failover

For the default session timeout (30 s) and a shortened one (6 s): start two
transcribers (plus ingress, translator, sink) on fresh topics, time one
undisturbed job, then submit the same clip, kill -9 the worker as soon as it
reports ``transcribing``, and time kill -> completed elsewhere. Prints that
time and the extra time over the undisturbed job. Reuses the test suite's
process harness (``bench/harness.py``), so run it from the checkout.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
import uuid
from pathlib import Path

from bench.harness import Pipeline, wait_until
from infra import bootstrap
from kafscribe.settings import Settings

from .clips import make_clips


def one_run(settings: Settings, clip: Path, log_dir: Path) -> tuple[float, float, float]:
    pipe = Pipeline(settings, log_dir)
    try:
        for stage in ("ingress", "translator", "sink"):
            pipe.start(stage)
        for name in ("w1", "w2"):
            pipe.start("transcriber", name=name)
        time.sleep(3)
        t0 = time.monotonic()
        pipe.wait_job(pipe.http.submit(clip)["job_id"], timeout_s=600)
        undisturbed = time.monotonic() - t0

        t_submit = time.monotonic()
        job_id = pipe.http.submit(clip)["job_id"]
        job = wait_until(lambda: (j := pipe.http.job(job_id)) and j["status"] == "transcribing" and j, 120)
        victim = "w1" if job["worker_id"].startswith("w1-") else "w2"
        t_kill = time.monotonic()
        pipe.kill(victim, signal.SIGKILL)
        done = pipe.wait_job(job_id, timeout_s=600)
        t_done = time.monotonic()
        assert done["status"] == "completed" and done["attempts"] == 2, done
        return undisturbed, t_done - t_kill, (t_done - t_submit) - undisturbed
    finally:
        pipe.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the test clip")
    args = parser.parse_args(argv)
    base = Settings.from_env()
    work = Path(tempfile.mkdtemp(prefix="kafscribe-failover-"))
    (clip, duration), = make_clips(work / "clips", [args.seconds])
    print(f"clip {duration:.1f} s; engine {base.engine}, model {base.model}; 2 transcribers")
    for timeout_ms in (30000, 6000):
        settings = base.with_(topic_prefix=f"bench{uuid.uuid4().hex[:8]}.", session_timeout_ms=timeout_ms,
                              heartbeat_ms=min(base.heartbeat_ms, timeout_ms // 3), metrics_port=-1)
        bootstrap.ensure_topics(settings)
        log_dir = work / f"logs-{timeout_ms}"
        log_dir.mkdir()
        undisturbed, after_kill, extra = one_run(settings, clip, log_dir)
        print(f"session timeout {timeout_ms / 1000:>4.0f} s: undisturbed job {undisturbed:6.1f} s | "
              f"kill -9 -> completed elsewhere {after_kill:6.1f} s | extra over undisturbed {extra:6.1f} s")


if __name__ == "__main__":
    main()
