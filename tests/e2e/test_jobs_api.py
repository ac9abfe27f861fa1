"""GET /v1/jobs and DELETE /v1/jobs/{id} on a real ingress (no workers: jobs stay queued until cancelled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kafscribe.statuses import FAILED
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import JobStore
from producers.client import HttpClient
from tests.conftest import fresh_settings, make_pipeline

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    p = make_pipeline(fresh_settings(stack_settings), tmp_path_factory, "jobs-api")
    p.start("ingress")
    yield p
    p.stop()


def call(client: HttpClient, method: str, path: str) -> tuple[int, dict]:
    status, body, _ = client._request(method, path, None, {})
    return status, json.loads(body) if body else {}


def test_list_pages_newest_first_and_only_the_callers_tenant(pipe, clips):
    mine, theirs = pipe.client(pipe.key(f"ls-{uuid.uuid4().hex[:8]}")), pipe.client(pipe.key(f"ls-{uuid.uuid4().hex[:8]}"))
    ids = [mine.submit(clips["en"])["job_id"] for _ in range(5)]
    other = theirs.submit(clips["en"])["job_id"]

    seen, path = [], "/v1/jobs?limit=2"
    while True:
        status, page = call(mine, "GET", path)
        assert status == 200 and len(page["jobs"]) <= 2
        seen += [j["job_id"] for j in page["jobs"]]
        if page["next_cursor"] is None:
            break
        path = page["links"]["next"]
    assert seen == list(reversed(ids)) and other not in seen
    assert all(j["status"] == "queued" and j["links"]["self"].endswith(j["job_id"]) for j in page["jobs"])

    assert [j["job_id"] for j in call(theirs, "GET", "/v1/jobs")[1]["jobs"]] == [other]
    assert call(mine, "GET", "/v1/jobs?status=completed")[1]["jobs"] == []
    for bad in ("limit=0", "limit=101", "limit=x", "status=done", "cursor=%%%", "cursor=bm9wZQ"):
        status, body = call(mine, "GET", f"/v1/jobs?{bad}")
        assert status == 422 and body["error"], bad
    assert call(pipe.client(), "GET", "/v1/jobs")[0] == 401


def test_delete_cancels_unfinished_then_deletes_finished(pipe, clips, session):
    tenant = f"rm-{uuid.uuid4().hex[:8]}"
    owner, stranger = pipe.client(pipe.key(tenant)), pipe.client(pipe.key(f"rm-{uuid.uuid4().hex[:8]}"))
    job_id = owner.submit(clips["en"])["job_id"]
    assert call(stranger, "DELETE", f"/v1/jobs/{job_id}")[0] == 404  # another tenant's job is missing

    status, body = call(owner, "DELETE", f"/v1/jobs/{job_id}")
    assert (status, body["status"]) == (202, "cancelled")
    assert owner.job(job_id)["status"] == "cancelled"
    assert [j["job_id"] for j in call(owner, "GET", "/v1/jobs?status=cancelled")[1]["jobs"]] == [job_id]
    ref = JobStore(session).get(job_id)["blob_ref"]

    status, body = call(owner, "DELETE", f"/v1/jobs/{job_id}")
    assert (status, body) == (200, {"job_id": job_id, "deleted": True})
    assert owner.job(job_id) is None
    assert call(owner, "DELETE", f"/v1/jobs/{job_id}")[0] == 404
    assert call(owner, "GET", "/v1/jobs")[1]["jobs"] == []
    with pytest.raises(blobstore.BlobError):
        blobstore.open_store(pipe.settings, session, scheme="cassandra").get(ref)

    failed = owner.submit(clips["en"])["job_id"]
    JobStore(session).transition(failed, FAILED, error="as the sink would")
    assert call(owner, "DELETE", f"/v1/jobs/{failed}")[0] == 200 and owner.job(failed) is None


def cli(pipe, key: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    return subprocess.run([sys.executable, "-m", "kafscribe.cli.main", *argv, "--url", pipe.url, "--api-key", key],
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_submits_a_directory_then_lists_shows_and_removes(pipe, clips, tmp_path):
    key = pipe.key(f"cli-{uuid.uuid4().hex[:8]}")
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("a.wav", "b.mp3"):
        shutil.copy(clips["en_mp3" if name.endswith("mp3") else "en"], folder / name)
    (folder / "notes.txt").write_text("not audio")  # skipped: not an audio suffix

    submitted = cli(pipe, key, "submit", str(folder))
    assert submitted.returncode == 0, submitted.stderr
    lines = [ln.split("\t") for ln in submitted.stdout.splitlines()]
    assert [Path(p).name for _, p in lines] == ["a.wav", "b.mp3"]
    ids = [job_id for job_id, _ in lines]

    listed = cli(pipe, key, "jobs", "ls")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("job_id")
    assert [ln.split()[0] for ln in listed.stdout.splitlines()[1:]] == list(reversed(ids))
    paged = cli(pipe, key, "jobs", "ls", "--limit", "1")
    assert len(paged.stdout.splitlines()) == 2 and "--cursor" in paged.stderr
    assert len(cli(pipe, key, "jobs", "ls", "--limit", "1", "--all").stdout.splitlines()) == 3

    shown = cli(pipe, key, "jobs", "show", ids[0])
    assert shown.returncode == 0 and json.loads(shown.stdout)["audio"]["filename"] == "a.wav"

    removed = cli(pipe, key, "jobs", "rm", *ids)
    assert removed.returncode == 0 and removed.stdout.split() == [ids[0], "cancelled", ids[1], "cancelled"]
    again = cli(pipe, key, "jobs", "rm", ids[0])
    assert again.stdout.split() == [ids[0], "deleted"]
    gone = cli(pipe, key, "jobs", "show", ids[0])
    assert gone.returncode == 1 and "no job" in gone.stderr
    missing = cli(pipe, key, "submit", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
