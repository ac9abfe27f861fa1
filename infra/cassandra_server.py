"""One Cassandra 5.0 node on Java 17 as a plain Java process.

The JVM flags are those of upstream ``conf/jvm17-server.options`` that
Cassandra needs to run at all on Java 17 (module exports/opens and the jamm
agent); the rest of upstream's tuning is left out for a small, quick node.
"""

from __future__ import annotations

from pathlib import Path

from kafscribe.settings import Settings

from .jars import find_jar
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


def cassandra_yaml(settings: Settings, root: Path) -> str:
    d = {name: root / name for name in ("data", "commitlog", "saved_caches", "hints", "cdc_raw")}
    return f"""\
cluster_name: kafscribe
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
commitlog_sync: periodic
commitlog_sync_period: 10000ms
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{settings.cassandra_storage_port}"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {settings.cassandra_storage_port}
native_transport_port: {settings.cassandra_port}
start_native_transport: true
endpoint_snitch: SimpleSnitch
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
"""


def prepare(settings: Settings, jars: Path) -> tuple[ServerProcess, list[str]]:
    root = settings.state_dir / "cassandra"
    log_dir = settings.state_dir / "logs"
    for d in (root, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    yaml = root / "cassandra.yaml"
    yaml.write_text(cassandra_yaml(settings, root))
    logback = root / "logback.xml"
    logback.write_text(LOGBACK.format(log_dir=log_dir))
    server = ServerProcess("cassandra", settings.state_dir)
    argv = [
        "java", f"-Xms{settings.cassandra_heap}", f"-Xmx{settings.cassandra_heap}",
        "-XX:+UseG1GC", "-Xss512k", "-Djava.awt.headless=true",
        "-Djdk.attach.allowAttachSelf=true", "-Djava.net.preferIPv4Stack=true",
        *[f"--add-exports={m}=ALL-UNNAMED" for m in ADD_EXPORTS],
        *[f"--add-opens={m}=ALL-UNNAMED" for m in ADD_OPENS],
        f"-javaagent:{find_jar(jars, 'jamm-')}",
        f"-Dcassandra.config={yaml.as_uri()}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.storagedir={root}",
        f"-Dcassandra.logdir={log_dir}",
        f"-Dlogback.configurationFile={logback}",
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=100",
        "-Dcassandra.initial_token=0",
        server.tag,
        "-cp", f"{jars}/*",
        MAIN_CLASS,
    ]
    return server, argv
