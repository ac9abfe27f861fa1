"""Replication and node-layout decisions, without servers (the cluster drills are in test_cluster_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import bootstrap, kafka_server, stack
from infra.cassandra_server import cassandra_yaml, rackdc_properties
from infra.nodes import cassandra_nodes, cassandra_token, controller_count, kafka_nodes
from kafscribe.settings import Settings, SettingsError
from kafscribe.store.session import consistency_level


@pytest.mark.parametrize(("brokers", "rf", "min_isr"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)])
def test_default_replication_is_min_3_brokers_and_one_less_in_sync(brokers, rf, min_isr):
    assert bootstrap.replication(Settings(), brokers) == (rf, min_isr)


def test_explicit_replication_is_checked_against_the_brokers():
    assert bootstrap.replication(Settings(topic_replication_factor=2, topic_min_insync_replicas=2), 3) == (2, 2)
    with pytest.raises(bootstrap.ReplicationError, match="REPLICATION_FACTOR=3 but the cluster has 2 broker"):
        bootstrap.replication(Settings(topic_replication_factor=3), 2)
    with pytest.raises(bootstrap.ReplicationError, match="above the replication factor"):
        bootstrap.replication(Settings(topic_replication_factor=2, topic_min_insync_replicas=3), 3)


def test_rf_1_on_several_brokers_and_min_isr_equal_rf_are_warned_about():
    assert "replication factor 1 on 3 brokers" in bootstrap.replication_warnings(
        Settings(topic_replication_factor=1), 3)[0]
    assert "one broker down stops every write" in bootstrap.replication_warnings(
        Settings(topic_min_insync_replicas=3), 3)[0]
    assert bootstrap.replication_warnings(Settings(), 3) == []
    assert bootstrap.replication_warnings(Settings(), 1) == []


def test_every_topic_gets_the_min_isr_config():
    specs = bootstrap.topic_specs(Settings(), min_isr=2)
    assert {s.config["min.insync.replicas"] for s in specs} == {"2"}
    assert "min.insync.replicas" not in bootstrap.topic_specs(Settings())[0].config


def test_keyspace_replication_default_and_explicit():
    assert bootstrap.keyspace_replication(Settings(), {"datacenter1": 3}) == {"datacenter1": 3}
    assert bootstrap.keyspace_replication(Settings(), {"datacenter1": 5}) == {"datacenter1": 3}
    assert bootstrap.keyspace_replication(Settings(), {"eu": 1}) == {"eu": 1}
    two = Settings(cassandra_replication="eu:3, us:2")
    assert bootstrap.keyspace_replication(two, {"eu": 3, "us": 3}) == {"eu": 3, "us": 2}
    with pytest.raises(bootstrap.ReplicationError, match="us:2 but the cluster has 1 node"):
        bootstrap.keyspace_replication(two, {"eu": 3, "us": 1})
    with pytest.raises(bootstrap.ReplicationError, match="is not DC:RF"):
        bootstrap.keyspace_replication(Settings(cassandra_replication="eu=3"), {})
    with pytest.raises(bootstrap.ReplicationError, match="several data centres"):
        bootstrap.keyspace_replication(Settings(), {"eu": 3, "us": 3})
    assert bootstrap.keyspace_replication(Settings(cassandra_local_dc="us"), {"eu": 3, "us": 2}) == {"us": 2}


def test_schema_keyspace_statement_gets_the_configured_map():
    cql = bootstrap.replication_cql({"eu": 3, "us": 2})
    assert cql == "{'class': 'NetworkTopologyStrategy', 'eu': 3, 'us': 2}"
    first = bootstrap.cql_statements("ks", cql)[0]
    assert first.startswith("CREATE KEYSPACE IF NOT EXISTS ks") and first.endswith(f"replication = {cql}")
    # Without a map: the file's own one-node literal (what docker compose runs).
    assert "'NetworkTopologyStrategy', 'datacenter1': 1" in bootstrap.cql_statements("ks")[0]


def test_nodes_are_consecutive_loopback_addresses_with_the_same_ports():
    s = Settings(kafka_bootstrap="127.0.0.2:19592", kafka_brokers=3, cassandra_hosts="127.0.0.2",
                 cassandra_port=19542, cassandra_nodes=3)
    assert [(n.name, n.address) for n in kafka_nodes(s)] == [
        ("kafka", "127.0.0.2:19592"), ("kafka-2", "127.0.0.3:19592"), ("kafka-3", "127.0.0.4:19592")]
    assert [n.name for n in cassandra_nodes(s)] == ["cassandra", "cassandra-2", "cassandra-3"]
    # One node keeps the single-node names and directories, on 127.0.0.1 whatever the bootstrap host.
    one = kafka_nodes(Settings(kafka_bootstrap="kafka.example:9092"))
    assert [(n.name, n.host, n.root(Path("/s")), n.log_dir(Path("/s"))) for n in one] == [
        ("kafka", "127.0.0.1", Path("/s/kafka"), Path("/s/logs"))]
    with pytest.raises(ValueError, match="loopback"):
        kafka_nodes(Settings(kafka_bootstrap="10.0.0.5:9092", kafka_brokers=3))
    with pytest.raises(ValueError, match="loopback"):
        kafka_nodes(Settings(kafka_bootstrap="kafka.example:9092", kafka_brokers=2))


def test_tokens_are_evenly_spaced_and_node_1_keeps_token_0():
    assert cassandra_token(1, 1) == 0
    tokens = sorted(cassandra_token(i, 3) for i in (1, 2, 3))
    assert tokens[1] == 0 and all(-(2**63) <= t < 2**63 for t in tokens)
    gaps = [b - a for a, b in zip(tokens, tokens[1:], strict=False)] + [tokens[0] + 2**64 - tokens[-1]]
    assert max(gaps) - min(gaps) <= 2


def test_controller_quorum_and_broker_only_nodes():
    assert [controller_count(n) for n in (1, 2, 3, 5)] == [1, 1, 3, 3]
    s = Settings(kafka_bootstrap="127.0.0.2:19592", kafka_controller_port=19593, kafka_brokers=4)
    props = [dict(line.split("=", 1) for line in kafka_server.server_properties(s, Path("/d"), n).splitlines())
             for n in kafka_nodes(s)]
    voters = "1@127.0.0.2:19593,2@127.0.0.3:19593,3@127.0.0.4:19593"
    assert {p["controller.quorum.voters"] for p in props} == {voters}
    assert [p["process.roles"] for p in props] == ["broker,controller"] * 3 + ["broker"]
    assert "CONTROLLER" not in props[3]["listeners"]
    assert {p["offsets.topic.replication.factor"] for p in props} == {"3"}
    assert {p["transaction.state.log.min.isr"] for p in props} == {"2"}


def test_cassandra_nodes_are_all_seeds_in_the_local_dc():
    s = Settings(cassandra_hosts="127.0.0.2", cassandra_nodes=3, cassandra_storage_port=17500)
    yaml = cassandra_yaml(s, Path("/r"), cassandra_nodes(s)[1])
    assert 'seeds: "127.0.0.2:17500,127.0.0.3:17500,127.0.0.4:17500"' in yaml
    assert "listen_address: 127.0.0.3" in yaml and "endpoint_snitch: SimpleSnitch" in yaml
    other = cassandra_yaml(s.with_(cassandra_local_dc="eu"), Path("/r"), cassandra_nodes(s)[1])
    assert "endpoint_snitch: GossipingPropertyFileSnitch" in other
    assert rackdc_properties(s.with_(cassandra_local_dc="eu")) == "dc=eu\nrack=rack1\n"


def test_a_state_dir_of_another_layout_is_refused(tmp_path):
    stack._check_layout(Settings(state_dir=tmp_path, kafka_brokers=3, cassandra_nodes=3))
    stack._check_layout(Settings(state_dir=tmp_path, kafka_brokers=3, cassandra_nodes=3))
    with pytest.raises(stack.StackError, match="holds a stack of 3 broker"):
        stack._check_layout(Settings(state_dir=tmp_path))


def test_consistency_levels_are_named_clearly():
    assert consistency_level("local_quorum", "x") == consistency_level("LOCAL_QUORUM", "x")
    with pytest.raises(SettingsError, match="KAFSCRIBE_CASSANDRA_READ_CONSISTENCY='QUORM'"):
        consistency_level("QUORM", "cassandra_read_consistency")


def test_a_down_broker_holding_replicas_still_counts():
    from types import SimpleNamespace as NS

    part = NS(replicas=[1, 2, 3])
    metadata = NS(brokers={1: None, 2: None}, topics={"t": NS(partitions={0: part})})  # broker 3 is down
    assert bootstrap.cluster_size(metadata) == 3
    assert bootstrap.cluster_size(NS(brokers={1: None}, topics={})) == 1
