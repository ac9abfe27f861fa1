"""Avro single-object encoding of kafscribe events, with no schema registry.

Wire format (Avro spec, "Single-object encoding"): ``C3 01``, the 8-byte
little-endian CRC-64-AVRO fingerprint of the writer schema's canonical form,
then the Avro binary body. Any producer with the ``.avsc`` files can write
events. Older schema versions live in ``schemas/history/``; an event written
with one of them is read with the current schema (Avro schema resolution).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parent
MAGIC = b"\xc3\x01"
EVENT_TYPES = ("Upload", "Transcript", "Result", "CallbackAttempt", "WorkerStatus", "DeadLetter", "Chunk",
               "ChunkTranscript")


class DecodeError(ValueError):
    """A message that is not a kafscribe event; consumers send it to the DLQ."""


class UnknownSchemaError(DecodeError):
    """The fingerprint names no schema we know (current or historical)."""


class CorruptEventError(DecodeError):
    """The bytes do not decode with the schema their fingerprint names."""


@dataclass(frozen=True)
class _Writer:
    event_type: str
    schema: Any  # parsed writer schema
    current: bool


def load_schema(path: Path) -> Any:
    return fastavro.parse_schema(json.loads(path.read_text()), _write_hint=False)


def schema_fingerprint(parsed: Any) -> bytes:
    """8-byte CRC-64-AVRO fingerprint as it appears on the wire (little endian)."""
    # fastavro renders the 64-bit Rabin value as little-endian bytes already.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


@lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, Any], dict[bytes, _Writer]]:
    current = {name: load_schema(SCHEMA_DIR / f"{name}.avsc") for name in EVENT_TYPES}
    writers: dict[bytes, _Writer] = {}
    for path in sorted((SCHEMA_DIR / "history").glob("*.avsc")):
        name = path.name.split(".")[0]
        writers[schema_fingerprint(load_schema(path))] = _Writer(name, load_schema(path), False)
    for name, parsed in current.items():
        writers[schema_fingerprint(parsed)] = _Writer(name, parsed, True)
    return current, writers


def schema(event_type: str) -> Any:
    return _registry()[0][event_type]


@cache
def _current_fingerprint(event_type: str) -> bytes:
    """The wire fingerprint of ``event_type``'s current schema (computed once: ~1 ms of CPU each time)."""
    return schema_fingerprint(schema(event_type))


def encode(event_type: str, record: dict[str, Any]) -> bytes:
    """Single-object encode ``record`` with the current schema of ``event_type``."""
    parsed = schema(event_type)
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(_current_fingerprint(event_type))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def decode(data: bytes | None) -> tuple[str, dict[str, Any]]:
    """Return ``(event_type, record)``; raise ``DecodeError`` for anything else."""
    if not data or len(data) < 10 or data[:2] != MAGIC:
        raise CorruptEventError("not an Avro single-object message (missing C3 01 header)")
    current, writers = _registry()
    writer = writers.get(data[2:10])
    if writer is None:
        raise UnknownSchemaError(f"unknown schema fingerprint {data[2:10].hex()}")
    buf = io.BytesIO(data[10:])
    try:
        reader = None if writer.current else current[writer.event_type]
        record = fastavro.schemaless_reader(buf, writer.schema, reader)
    except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds on garbage
        raise CorruptEventError(f"corrupt {writer.event_type} body: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(data) - 10:
        raise CorruptEventError(f"corrupt {writer.event_type} body: {len(data) - 10 - buf.tell()} trailing bytes")
    return writer.event_type, record
