"""The schema bootstrap waits for the nodes to agree after a DDL change the driver left unagreed (no servers)."""

from __future__ import annotations

from types import SimpleNamespace

from infra import bootstrap


class Session:
    """A CQL session whose DDL answers say the nodes do not agree yet, and whose wait says when they do."""

    def __init__(self, agree_after_wait: bool) -> None:
        self.agree_after_wait = agree_after_wait
        self.waits: list[float] = []
        self.cluster = SimpleNamespace(control_connection=SimpleNamespace(wait_for_schema_agreement=self._wait))

    def _wait(self, wait_time: float) -> bool:
        self.waits.append(wait_time)
        return self.agree_after_wait


def test_an_unagreed_change_is_waited_for_before_the_next_statement() -> None:
    session, warnings = Session(agree_after_wait=True), []
    assert bootstrap.await_schema_agreement(session, "CREATE KEYSPACE k ...", warnings.append)
    assert session.waits == [bootstrap.SCHEMA_AGREEMENT_WAIT_S] and bootstrap.SCHEMA_AGREEMENT_WAIT_S > 10
    assert warnings == []


def test_nodes_that_never_agree_are_reported_not_hidden() -> None:
    session, warnings = Session(agree_after_wait=False), []
    assert not bootstrap.await_schema_agreement(session, "CREATE TABLE k.jobs (\\n  job_id text)", warnings.append)
    assert len(warnings) == 1 and "CREATE TABLE k.jobs (" in warnings[0] and "disagree" in warnings[0]
