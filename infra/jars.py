"""Resolve the Kafka and Cassandra classpaths from Maven Central, once.

Each server has a tiny POM under ``infra/maven/<server>/``. ``mvn
dependency:copy-dependencies`` copies its runtime closure into
``<cache_dir>/jars/<server>-<pom hash>/``; a ``.complete`` marker makes later
calls free. Kafka's and Cassandra's jars live apart because their slf4j,
netty and jackson versions clash.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

MAVEN_DIR = Path(__file__).resolve().parent / "maven"
SERVERS = ("kafka", "cassandra")


class JarResolutionError(RuntimeError):
    """Maven could not produce the classpath of a server."""


def jar_dir(server: str, cache_dir: Path) -> Path:
    pom = MAVEN_DIR / server / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    return cache_dir / "jars" / f"{server}-{digest}"


def resolve(server: str, cache_dir: Path) -> Path:
    """Return the directory holding ``server``'s jars, fetching them if needed."""
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}")
    target = jar_dir(server, cache_dir)
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise JarResolutionError("`mvn` is not on PATH; install Maven 3.8+ and Java 17")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        "mvn", "-B", "-q", "-f", str(MAVEN_DIR / server / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime",
        f"-DoutputDirectory={partial}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise JarResolutionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    (partial / ".complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def find_jar(directory: Path, prefix: str) -> Path:
    """The jar in ``directory`` whose name starts with ``prefix`` (e.g. ``jamm-``)."""
    matches = sorted(directory.glob(f"{prefix}*.jar"))
    if not matches:
        raise JarResolutionError(f"no {prefix}*.jar in {directory}")
    return matches[-1]


if __name__ == "__main__":  # `python -m infra.jars`: fetch both classpaths now
    from kafscribe.settings import Settings

    cache = Settings.from_env().cache_dir
    for name in SERVERS:
        print(f"{name}: {resolve(name, cache)}")
