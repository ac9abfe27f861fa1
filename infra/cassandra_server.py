"""Cassandra 5.0 nodes on Java 17 as plain Java processes: one node, or a local cluster.

The JVM flags are those of upstream ``conf/jvm17-server.options`` that
Cassandra needs to run at all on Java 17 (module exports/opens and the jamm
agent); the rest of upstream's tuning is left out for a small, quick node.
In a cluster (``infra.nodes``) every node is a seed (any one can restart while
another is down), tokens are evenly spaced (one token per node, node 1 keeps
token 0), all in data centre ``KAFSCRIBE_CASSANDRA_LOCAL_DC`` and rack ``rack1``:
SimpleSnitch for ``datacenter1`` (the default, and what every node made before
clusters existed was started with: a node refuses a snitch that moves it),
GossipingPropertyFileSnitch for any other name. Caches and memtables are sized
for small heaps: three nodes fit beside everything else.
"""

from __future__ import annotations

from pathlib import Path

from kafscribe.settings import Settings

from .jars import find_jar
from .nodes import Node, cassandra_nodes, cassandra_token
from .process import ServerProcess

MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"

ADD_EXPORTS = [
    "java.base/jdk.internal.misc", "java.management.rmi/com.sun.jmx.remote.internal.rmi",
    "java.management/com.sun.jmx.remote.security", "java.rmi/sun.rmi.registry",
    "java.rmi/sun.rmi.server", "java.sql/java.sql", "java.base/java.lang.ref",
    "jdk.unsupported/sun.misc", "jdk.compiler/com.sun.tools.javac.file",
    "jdk.attach/sun.tools.attach",
]
ADD_OPENS = [
    "java.base/java.lang.module", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math",
    "java.base/jdk.internal.module", "java.base/jdk.internal.util.jar",
    "jdk.management/com.sun.management.internal", "java.base/sun.nio.ch", "java.base/java.io",
    "java.base/java.lang.reflect", "jdk.compiler/com.sun.tools.javac", "java.base/java.lang",
    "java.base/java.util", "java.base/java.nio",
]

LOGBACK = """\
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log_dir}/cassandra-system.log</file>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
  <logger name="org.apache.cassandra" level="INFO"/>
</configuration>
"""


def cassandra_yaml(settings: Settings, root: Path, node: Node | None = None) -> str:
    nodes = cassandra_nodes(settings)
    node = node or nodes[0]
    d = {name: root / name for name in ("data", "commitlog", "saved_caches", "hints", "cdc_raw")}
    seeds = ",".join(f"{n.host}:{settings.cassandra_storage_port}" for n in nodes)
    return f"""\
cluster_name: kafscribe
num_tokens: 1
initial_token: {cassandra_token(node.index, len(nodes))}
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
commitlog_sync: periodic
commitlog_sync_period: 10000ms
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{seeds}"
listen_address: {node.host}
rpc_address: {node.host}
storage_port: {settings.cassandra_storage_port}
native_transport_port: {node.port}
start_native_transport: true
endpoint_snitch: {snitch(settings)}
auto_bootstrap: false
auto_snapshot: false
data_file_directories:
  - {d['data']}
commitlog_directory: {d['commitlog']}
saved_caches_directory: {d['saved_caches']}
hints_directory: {d['hints']}
cdc_raw_directory: {d['cdc_raw']}
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_compactors: 1
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
key_cache_size: 8MiB
file_cache_size: 32MiB
networking_cache_size: 16MiB
prepared_statements_cache_size: 8MiB
hinted_handoff_enabled: true
max_hint_window: 3h
"""


def snitch(settings: Settings) -> str:
    return "SimpleSnitch" if local_dc(settings) == "datacenter1" else "GossipingPropertyFileSnitch"


def local_dc(settings: Settings) -> str:
    return settings.cassandra_local_dc or "datacenter1"


def rackdc_properties(settings: Settings) -> str:
    return f"dc={local_dc(settings)}\nrack=rack1\n"


def prepare(settings: Settings, jars: Path, node: Node | None = None) -> tuple[ServerProcess, list[str]]:
    """Write config and return the launch argv of ``node`` (default: node 1)."""
    node = node or cassandra_nodes(settings)[0]
    root = node.root(settings.state_dir)
    log_dir = node.log_dir(settings.state_dir)
    for d in (root, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    yaml = root / "cassandra.yaml"
    yaml.write_text(cassandra_yaml(settings, root, node))
    rackdc = root / "cassandra-rackdc.properties"
    rackdc.write_text(rackdc_properties(settings))
    logback = root / "logback.xml"
    logback.write_text(LOGBACK.format(log_dir=log_dir))
    server = ServerProcess(node.name, settings.state_dir)
    argv = [
        "java", f"-Xms{settings.cassandra_heap}", f"-Xmx{settings.cassandra_heap}",
        "-XX:+UseG1GC", "-Xss512k", "-Djava.awt.headless=true",
        # Two cores shared by everything: few GC and JIT threads, bounded off-heap buffers.
        "-XX:ParallelGCThreads=2", "-XX:ConcGCThreads=1", "-XX:CICompilerCount=2",
        "-XX:MaxDirectMemorySize=256m", "-XX:ReservedCodeCacheSize=96m",
        "-Djdk.attach.allowAttachSelf=true", "-Djava.net.preferIPv4Stack=true",
        *[f"--add-exports={m}=ALL-UNNAMED" for m in ADD_EXPORTS],
        *[f"--add-opens={m}=ALL-UNNAMED" for m in ADD_OPENS],
        f"-javaagent:{find_jar(jars, 'jamm-')}",
        f"-Dcassandra.config={yaml.as_uri()}",
        f"-Dcassandra-rackdc.properties={rackdc.as_uri()}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.storagedir={root}",
        f"-Dcassandra.logdir={log_dir}",
        f"-Dlogback.configurationFile={logback}",
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=100",
        server.tag,
        "-cp", f"{jars}/*",
        MAIN_CLASS,
    ]
    return server, argv
