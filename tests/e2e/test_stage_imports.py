"""Stages load only what they use: no torch, Whisper or CTranslate2 where no model runs.

Each non-model stage is built in a fresh interpreter against the real stack
(its Cassandra session, its consume loop's Kafka clients, a status snapshot,
and the checks it runs on every event it reads); the ingress app is built and
validates options. None of them may have imported a model library: torch
alone costs ~650 MB of RSS. The translator loads its Whisper model on first
need, so building it and its backends imports none either.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kafscribe.languages import CODES, LANGUAGES, language_name
from kafscribe.settings import PROJECT_ROOT

HEAVY = ("torch", "whisper", "ctranslate2", "faster_whisper")

SCRIPT = r"""
import json, sys, threading
from kafscribe.settings import Settings

settings = Settings.from_env()
report = {}
HEAVY = json.loads(sys.argv[1])


def heavy():
    return [m for m in HEAVY if m in sys.modules]


from producers.ingress import build_app
from producers.submission import parse_options

app = build_app(settings)
parse_options({"language": "de", "translate_to": "en", "task": "translate"}, settings)
app["backends"].submitter()  # the Cassandra side of a submission
app["backends"].close()
report["ingress"] = heavy()

from consumers.loop import StageRunner
from consumers.status import StatusReporter
from kafscribe.validation import check_event
from consumers.worker import build_stages
from kafscribe.store import session as cassandra_session
from schemas.events import JobOptions, Result, Transcript

session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
options = JobOptions(language="de", translate_to="en")
transcript = Transcript(job_id="j", blob_ref="file:x", audio_sha256="0" * 64, audio_bytes=1,
                        audio_duration=1.0, filename="x.wav", options=options, language="de",
                        language_probability=0.9, duration=1.0, text="hallo", segments=[],
                        engine="faster-whisper", model="base", worker_id="w", processing_seconds=0.5)
for stage in ("sink", "notifier", "translator"):
    stages = build_stages(stage, settings, session, "imports-test", threading.Event())
    assert check_event(settings, "transcripts", transcript) is None
    assert check_event(settings, "results", Result(job_id="j", status="completed", options=options)) is None
    StatusReporter(settings, StageRunner(settings, stages[0], "imports-test")).snapshot()
    if stage == "translator":
        translator = stages[0]
        translator.backend("whisper")  # built; its model is loaded on the first job
        translator.backend("llm")
        from kafscribe.translation.base import language_name
        assert language_name("de") == "German"
    report[stage] = heavy()
session.cluster.shutdown()
# VmHWM, not ru_maxrss: the latter keeps the peak of the process image before exec (pytest's).
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
report["max_rss_mib"] = int(hwm.split()[1]) // 1024
print(json.dumps(report))
"""


@pytest.mark.stack
def test_stages_without_a_model_import_no_model_library(stack_settings):
    """The ingress, then the sink, notifier and translator, built one after another in one fresh
    interpreter: after each, none of torch/whisper/ctranslate2/faster_whisper may be loaded."""
    from tests.conftest import fresh_settings

    settings = fresh_settings(stack_settings, device="auto")  # auto asks the driver, never torch
    env = {**settings.to_env(), "PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(HEAVY)], capture_output=True, text=True, timeout=180,
                          env=env, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in ("ingress", "sink", "notifier", "translator"):
        assert report[stage] == [], f"{stage} imported {report[stage]}"
    assert report["max_rss_mib"] < 150, report  # all four stages' code in one process


def _literal(package: str, module: str, name: str):
    """A literal assigned in a package's source, read without importing it (that would load torch)."""
    spec = importlib.util.find_spec(package)
    source = Path(next(iter(spec.submodule_search_locations)), module).read_text()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(getattr(t, "id", "") == name for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{package}/{module} has no {name}")


def test_the_static_language_table_is_whisper_s():
    """Checked against both engines' own tables (independent references), read from their source."""
    assert LANGUAGES == _literal("whisper", "tokenizer.py", "LANGUAGES")
    assert list(LANGUAGES) == list(_literal("whisper", "tokenizer.py", "LANGUAGES"))
    assert CODES == frozenset(_literal("faster_whisper", "tokenizer.py", "_LANGUAGE_CODES"))
    assert language_name("es") == "Spanish" and language_name("xx") == "Xx"
