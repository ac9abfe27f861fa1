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


class Gossip:
    """A cluster whose driver metadata learns one more node each time it is refreshed, up to ``total``."""

    def __init__(self, first: int, total: int) -> None:
        self.seen, self.total, self.refreshes = first, total, 0
        self.metadata = SimpleNamespace(all_hosts=lambda: [SimpleNamespace(datacenter="dc1")] * self.seen)

    def refresh_nodes(self, force_token_rebuild: bool = False) -> None:
        self.refreshes += 1
        self.seen = min(self.total, self.seen + 1)


def test_the_keyspace_waits_until_the_driver_sees_every_node_the_stack_started(monkeypatch) -> None:
    monkeypatch.setattr(bootstrap.time, "sleep", lambda s: None)
    cluster, warnings = Gossip(first=2, total=3), []
    nodes = bootstrap.await_nodes_seen(SimpleNamespace(cluster=cluster), 3, warnings.append)
    assert nodes == {"dc1": 3} and cluster.refreshes == 1 and warnings == []
    assert bootstrap.keyspace_replication(bootstrap.Settings(), nodes) == {"dc1": 3}


def test_nodes_never_seen_are_reported_and_the_schema_goes_on(monkeypatch) -> None:
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr(bootstrap.time, "sleep", lambda s: None)
    monkeypatch.setattr(bootstrap.time, "monotonic", lambda: next(clock))
    cluster, warnings = Gossip(first=2, total=2), []
    assert bootstrap.await_nodes_seen(SimpleNamespace(cluster=cluster), 3, warnings.append) == {"dc1": 2}
    assert len(warnings) == 1 and "sees 2 of the 3" in warnings[0]
