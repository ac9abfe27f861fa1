"""A job id given by a direct client must never have been used: not by a job that exists, nor by a deleted one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from producers.submission import SubmissionError, Submitter


class Jobs:
    def __init__(self, existing: set[str], deleted: set[str]) -> None:
        self.existing, self.deleted = existing, deleted

    def get(self, job_id: str):
        return {"job_id": job_id} if job_id in self.existing else None

    def is_deleted(self, job_id: str) -> bool:
        return job_id in self.deleted


def check(job_id: str, jobs: Jobs) -> None:
    asyncio.run(Submitter._check_unused(SimpleNamespace(jobs=jobs), job_id))


@pytest.mark.parametrize(("job_id", "words"), [("live", "exists"), ("gone", "was deleted")])
def test_a_used_job_id_is_refused_with_409(job_id: str, words: str) -> None:
    with pytest.raises(SubmissionError) as err:
        check(job_id, Jobs(existing={"live"}, deleted={"gone"}))
    assert err.value.status == 409 and words in str(err.value)


def test_a_new_job_id_passes() -> None:
    check("new", Jobs(existing={"live"}, deleted={"gone"}))
