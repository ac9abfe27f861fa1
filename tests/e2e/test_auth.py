"""API keys, tenant-scoped reads, quota bookkeeping and the redelivery limit on the real Cassandra."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import uuid

import pytest

from kafscribe.settings import Settings, settings_table
from kafscribe.statuses import COMPLETED, FAILED, TRANSCRIBING
from kafscribe.store import apikeys, quotas
from kafscribe.store.jobs import JobStore
from schemas.events import Result, Upload

pytestmark = pytest.mark.stack


def _base_env() -> dict[str, str]:
    """A child's environment without this shell's KAFSCRIBE_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _upload(tenant: str) -> Upload:
    return Upload(job_id=uuid.uuid4().hex, tenant=tenant, blob_ref="file:x", audio_sha256="a", audio_bytes=1,
                  audio_duration=1.0)


def test_a_key_is_stored_hashed_looked_up_and_revoked(session):
    store = apikeys.KeyStore(session)
    tenant = _tenant()
    key, record = store.create(tenant, label="ci")
    assert key.startswith("ksk_") and record.key_id in key and len(key) > 50
    row = session.execute("SELECT * FROM api_keys WHERE key_id=%s", (record.key_id,)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in repr(row)  # the plain key is not stored
    found = store.lookup(key)
    assert (found.tenant, found.admin, found.key_id) == (tenant, False, record.key_id)
    # same id, wrong secret; garbage; a key that never existed
    assert store.lookup(key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")) is None
    assert store.lookup("not a key") is None
    assert store.lookup(f"ksk_{'0' * 12}_{'x' * 43}") is None
    assert [k.key_id for k in store.list(tenant)] == [record.key_id]
    assert store.revoke(record.key_id).revoked_at is not None
    assert store.lookup(key) is None
    assert not store.list(tenant)[0].active
    store.revoke(key)  # by the key itself, again: idempotent
    with pytest.raises(apikeys.ApiKeyError):
        store.revoke("abc")
    with pytest.raises(apikeys.ApiKeyError):
        store.revoke("0" * 12)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "ünï", "a/b", "a\nb"])
def test_bad_tenant_names_are_refused(session, name):
    with pytest.raises(apikeys.ApiKeyError):
        apikeys.KeyStore(session).create(name)


def test_reads_scoped_to_a_tenant_treat_other_jobs_as_missing(session):
    jobs = JobStore(session)
    up = _upload(_tenant())
    jobs.create(up)
    assert jobs.get(up.job_id, tenant=up.tenant)["job_id"] == up.job_id
    assert jobs.get(up.job_id, tenant="someone-else") is None
    assert jobs.get(up.job_id)["tenant"] == up.tenant  # unscoped (admin, workers)


def test_unfinished_jobs_leave_the_tenants_set_when_they_finish(session):
    jobs = JobStore(session)
    tenant = _tenant()
    a, b, c = _upload(tenant), _upload(tenant), _upload(tenant)
    for up in (a, b, c):
        jobs.create(up)
    assert sorted(jobs.unfinished_jobs(tenant, 10)) == sorted([a.job_id, b.job_id, c.job_id])
    jobs.start_attempt(a.job_id, TRANSCRIBING, "w")
    jobs.transition(b.job_id, FAILED, error="x")
    jobs.save_result(Result(job_id=a.job_id, status=COMPLETED, attempt=1, text="hi", tenant=tenant))
    jobs.save_result(Result(job_id=a.job_id, status=COMPLETED, attempt=1, text="hi", tenant=tenant))  # replay
    assert jobs.transition(a.job_id, TRANSCRIBING) is False  # a late event does not bring it back
    assert jobs.unfinished_jobs(tenant, 10) == [c.job_id]


def test_stale_quota_entries_are_pruned_at_the_limit(session):
    jobs = JobStore(session)
    tenant = _tenant()
    live = _upload(tenant)
    jobs.create(live)
    # entries a crash could leave behind: a job that finished without the bookkeeping write, and no job at all
    finished = _upload(tenant)
    jobs.create(finished)
    session.execute("UPDATE jobs SET status='completed' WHERE job_id=%s", (finished.job_id,))
    session.execute("INSERT INTO tenant_unfinished_jobs (tenant, job_id) VALUES (%s, %s)", (tenant, "ghost"))
    assert len(jobs.unfinished_jobs(tenant, 10)) == 3  # below the limit nothing is checked
    assert jobs.unfinished_jobs(tenant, 3) == [live.job_id]
    assert jobs.unfinished_jobs(tenant, 10) == [live.job_id]


def test_quota_check_refuses_at_the_limit(session):
    jobs = JobStore(session)
    tenant = _tenant()
    settings = Settings(tenant_max_unfinished=2, quota_retry_after_s=7)
    quotas.check_unfinished(jobs, tenant, settings)
    jobs.create(_upload(tenant))
    quotas.check_unfinished(jobs, tenant, settings)
    jobs.create(_upload(tenant))
    with pytest.raises(quotas.LimitExceeded) as err:
        quotas.check_unfinished(jobs, tenant, settings)
    assert err.value.retry_after_s == 7
    quotas.check_unfinished(jobs, _tenant(), settings)  # other tenants are not affected
    quotas.check_unfinished(jobs, tenant, settings.with_(tenant_max_unfinished=0))  # 0 = no limit


def test_async_quota_check_matches_the_sync_one(session):
    """The ingress's check (awaited on the loop, no thread) refuses at the same point and prunes the same."""
    jobs = JobStore(session)
    tenant = _tenant()
    settings = Settings(tenant_max_unfinished=2, quota_retry_after_s=5)

    async def check(s: Settings = settings) -> None:
        await quotas.check_unfinished_async(jobs, tenant, s)

    asyncio.run(check())
    jobs.create(_upload(tenant))
    session.execute("INSERT INTO tenant_unfinished_jobs (tenant, job_id) VALUES (%s, %s)", (tenant, "ghost"))
    asyncio.run(check())  # at the limit: the ghost entry is pruned, one live job is under 2
    assert asyncio.run(jobs.unfinished_jobs_async(tenant, 10)) == jobs.unfinished_jobs(tenant, 10)
    jobs.create(_upload(tenant))
    with pytest.raises(quotas.LimitExceeded) as err:
        asyncio.run(check())
    assert err.value.retry_after_s == 5
    asyncio.run(check(settings.with_(tenant_max_unfinished=0)))  # 0 = no limit


def test_redelivery_slot_once_per_interval(session):
    limiter = quotas.RedeliverLimiter(session, Settings(redeliver_interval_s=30))
    job_id = uuid.uuid4().hex
    limiter.claim(job_id)
    with pytest.raises(quotas.LimitExceeded) as err:
        limiter.claim(job_id)
    assert 28 <= err.value.retry_after_s <= 30
    limiter.claim(uuid.uuid4().hex)  # per job
    limiter.release(job_id)
    limiter.claim(job_id)
    short = quotas.RedeliverLimiter(session, Settings(redeliver_interval_s=1))
    other = uuid.uuid4().hex
    short.claim(other)
    time.sleep(2.2)  # the slot's row expires with its TTL
    short.claim(other)


def test_secrets_are_masked_in_the_settings_listing():
    from dataclasses import fields

    from kafscribe.settings import is_secret

    names = [f.name for f in fields(Settings) if is_secret(f.name) and f.type in ("str", str)]
    assert {"api_key", "llm_api_key"} <= set(names)
    values = {name: f"s3cr3t-{name}-0123456789" for name in names}
    shown = {var: value for var, value, _ in settings_table(Settings(**values))}
    for name, secret in values.items():
        var = "KAFSCRIBE_" + name.upper()
        assert secret not in shown[var] and shown[var].startswith("****"), var
    assert shown["KAFSCRIBE_KAFKA_BOOTSTRAP"] == Settings().kafka_bootstrap  # not a secret, shown as is
    assert Settings(api_key="short").shown("api_key") == "****"  # short values show nothing of themselves
    env = {"KAFSCRIBE_API_KEY": values["api_key"], "KAFSCRIBE_LLM_API_KEY": values["llm_api_key"], **_base_env()}
    out = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "settings"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert values["api_key"] not in out and values["llm_api_key"] not in out


def test_keys_cli_prints_the_key_last_and_revokes_it(stack_settings, session):
    env = {**stack_settings.to_env(), **_base_env()}
    tenant = _tenant()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    made = cli("create", "--tenant", tenant, "--admin")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    record = apikeys.KeyStore(session).lookup(key)
    assert record is not None and record.tenant == tenant and record.admin
    listed = cli("list", "--tenant", tenant)
    assert record.key_id in listed.stdout and "active" in listed.stdout and key not in listed.stdout
    assert cli("revoke", record.key_id).returncode == 0
    assert apikeys.KeyStore(session).lookup(key) is None
    assert "revoked" in cli("list", "--tenant", tenant).stdout
    assert cli("create", "--tenant", "bad name").returncode == 1


def test_local_key_is_made_once_kept_private_and_remade_when_revoked(stack_settings, session, tmp_path):
    env = {**stack_settings.with_(state_dir=tmp_path).to_env(), **_base_env()}

    def local() -> str:
        out = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "keys", "local"], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return out.strip().splitlines()[-1]

    key = local()
    record = apikeys.KeyStore(session).lookup(key)
    assert record is not None and record.admin and record.tenant == "default"
    assert (tmp_path / "local-api-key").stat().st_mode & 0o077 == 0
    assert local() == key  # make up again: the same key
    apikeys.KeyStore(session).revoke(key)
    fresh = local()
    assert fresh != key and apikeys.KeyStore(session).lookup(fresh) is not None
