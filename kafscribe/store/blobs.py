"""Where upload audio lives between the door and the worker.

Audio never travels through Kafka: the ingress stores it here, the ``Upload``
event carries a reference (``cassandra:<id>`` or ``file:<id>``) plus the
sha256 the worker verifies. ``cassandra`` works for workers on any host;
``file`` is for one host (or a shared mount).

Stores take the audio as an iterable of chunks (``put_chunks``) so the
ingress never holds a whole upload in memory; ``delete`` removes a blob whose
job was not accepted, so no blob outlives a refused job. ``put_async`` and
``delete_async`` are the same for a coroutine: the ``cassandra`` store awaits
the driver's futures on the loop (no thread), the ``file`` store (fsync) runs
in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections import deque
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from cassandra.query import SimpleStatement

from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.store import cql_async


class BlobError(PermanentError, RuntimeError):
    """The blob is missing or does not match its checksum."""


class BlobStore(Protocol):
    scheme: str

    def ref(self, blob_id: str) -> str: ...
    def put(self, blob_id: str, data: bytes) -> str: ...
    def put_chunks(self, blob_id: str, chunks: Iterable[bytes]) -> str: ...
    async def put_async(self, blob_id: str, chunks: AsyncIterable[bytes]) -> str: ...
    def get(self, ref: str) -> bytes: ...
    def pieces(self, ref: str) -> Iterator[bytes]: ...
    def delete(self, blob_id: str) -> None: ...
    async def delete_async(self, blob_id: str) -> None: ...


_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # never "." or "..": a file name inside the store


def _check_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not _ID.fullmatch(blob_id):
        raise BlobError(f"invalid blob id {blob_id!r}")
    return blob_id


def is_blob_ref(ref: object) -> bool:
    """Whether ``ref`` can name a blob: ``cassandra:<id>`` or ``file:<id>`` with a valid id."""
    if not isinstance(ref, str):
        return False
    scheme, sep, blob_id = ref.partition(":")
    return bool(sep) and scheme in ("cassandra", "file") and _ID.fullmatch(blob_id) is not None


class FileBlobStore:
    scheme = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def ref(self, blob_id: str) -> str:
        """The reference ``put`` returns for ``blob_id``, known before the blob is written."""
        return f"{self.scheme}:{_check_id(blob_id)}"

    def put(self, blob_id: str, data: bytes) -> str:
        return self.put_chunks(blob_id, [data])

    def put_chunks(self, blob_id: str, chunks: Iterable[bytes]) -> str:
        path = self.directory / _check_id(blob_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.ref(blob_id)

    async def put_async(self, blob_id: str, chunks: AsyncIterable[bytes]) -> str:
        _check_id(blob_id)
        data = bytearray()  # the file store is for one host and small uploads: write in one go, in a thread
        async for chunk in chunks:
            data += chunk
        return await asyncio.to_thread(self.put_chunks, blob_id, [bytes(data)])

    def delete(self, blob_id: str) -> None:
        """Remove the blob's file (or a link in its place); a directory or other non-file named by a ref is
        refused (``BlobError``), never followed: the sweep and a deletion log it and go on."""
        path = self.directory / _check_id(blob_id)
        if path.is_symlink() or path.is_file() or not path.exists():
            path.unlink(missing_ok=True)
        else:
            raise BlobError(f"blob file:{blob_id} is not a regular file in {self.directory}; not removed")

    async def delete_async(self, blob_id: str) -> None:
        await asyncio.to_thread(self.delete, blob_id)

    def _path(self, ref: str) -> Path:
        """The regular file ``ref`` names inside the store's directory; a ref that names anything else
        (outside it, a directory, a device, a link out) is a permanent failure, never retried."""
        path = self.directory / _check_id(ref.split(":", 1)[1])
        try:
            resolved = path.resolve(strict=True)
        except (FileNotFoundError, RuntimeError) as exc:
            raise BlobError(f"blob {ref} not found in {self.directory}") from exc
        if resolved.parent != self.directory.resolve() or not resolved.is_file():
            raise BlobError(f"blob {ref} is not a regular file in {self.directory}")
        return resolved

    def get(self, ref: str) -> bytes:
        path = self._path(ref)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobError(f"blob {ref} not found in {self.directory}") from exc

    def pieces(self, ref: str) -> Iterator[bytes]:
        """The blob in pieces of at most 1 MiB (never all of it in memory)."""
        path = self._path(ref)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise BlobError(f"blob {ref} not found in {self.directory}") from exc
        with f:
            while piece := f.read(1 << 20):
                yield piece


class CassandraBlobStore:
    """Chunks of ``blob_chunk_bytes`` in ``audio_chunks``; upserts, so a retried put is harmless.

    At most ``in_flight`` chunk writes are outstanding, so memory stays
    bounded by ``in_flight * chunk_bytes`` whatever the blob's size.
    """

    scheme = "cassandra"

    def __init__(self, session, chunk_bytes: int, in_flight: int = 4) -> None:
        self.session = session
        self.chunk_bytes = chunk_bytes
        self.in_flight = in_flight
        self._insert = session.prepare("INSERT INTO audio_chunks (blob_id, idx, data) VALUES (?, ?, ?)")
        self._select = session.prepare("SELECT idx, data FROM audio_chunks WHERE blob_id = ?")
        self._delete = session.prepare("DELETE FROM audio_chunks WHERE blob_id = ?")

    def ref(self, blob_id: str) -> str:
        """The reference ``put`` returns for ``blob_id``, known before the blob is written."""
        return f"{self.scheme}:{_check_id(blob_id)}"

    def put(self, blob_id: str, data: bytes) -> str:
        return self.put_chunks(blob_id, [data])

    def put_chunks(self, blob_id: str, chunks: Iterable[bytes]) -> str:
        _check_id(blob_id)
        pending: deque = deque()
        for idx, piece in enumerate(rechunk(chunks, self.chunk_bytes)):
            if len(pending) >= self.in_flight:
                _settle(pending.popleft())
            pending.append(self.session.execute_async(self._insert, (blob_id, idx, piece)))
        while pending:
            _settle(pending.popleft())
        return self.ref(blob_id)

    async def put_async(self, blob_id: str, chunks: AsyncIterable[bytes]) -> str:
        """``put_chunks`` on the event loop: the same rows, at most ``in_flight`` writes outstanding."""
        _check_id(blob_id)
        pending: deque[asyncio.Future] = deque()
        try:
            idx = 0
            async for piece in arechunk(chunks, self.chunk_bytes):
                if len(pending) >= self.in_flight:
                    await pending.popleft()
                pending.append(cql_async.bridge(self.session.execute_async(self._insert, (blob_id, idx, piece))))
                idx += 1
            while pending:
                await pending.popleft()
        finally:
            for fut in pending:  # a failed or cancelled put: nobody waits for the others' answers
                fut.cancel()
        return self.ref(blob_id)

    def delete(self, blob_id: str) -> None:
        self.session.execute(self._delete, (_check_id(blob_id),))

    async def delete_async(self, blob_id: str) -> None:
        await cql_async.execute(self.session, self._delete, (_check_id(blob_id),))

    def get(self, ref: str) -> bytes:
        blob_id = _check_id(ref.split(":", 1)[1])
        rows = list(self.session.execute(self._select, (blob_id,)))
        if not rows:
            raise BlobError(f"blob {ref} not found")
        if [r.idx for r in rows] != list(range(len(rows))):
            raise BlobError(f"blob {ref} is missing chunks")
        return b"".join(r.data for r in rows)

    def pieces(self, ref: str) -> Iterator[bytes]:
        """The blob's chunks in order, fetched a few at a time (never all of it in memory)."""
        blob_id = _check_id(ref.split(":", 1)[1])
        query = SimpleStatement("SELECT idx, data FROM audio_chunks WHERE blob_id = %s", fetch_size=4)
        expected = 0
        for row in self.session.execute(query, (blob_id,)):
            if row.idx != expected:
                raise BlobError(f"blob {ref} is missing chunks")
            expected += 1
            yield row.data
        if expected == 0:
            raise BlobError(f"blob {ref} not found")


def _settle(future) -> None:
    """Wait for a chunk write, then let go of its chunk.

    The driver keeps a finished ``ResponseFuture`` alive until its request
    timer expires (the timer heap holds it), and the future holds the chunk
    (via ``query``, ``message`` and the query plan's generator): without this,
    a fast upload keeps every chunk in memory for the timeout.
    """
    try:
        future.result()
    finally:
        future.query = future.message = future.query_plan = None


class _Pieces:
    """Bytes in, pieces of exactly ``size`` out; ``rest`` gives the last (shorter) one, and one empty
    piece when nothing came, so every blob has at least one row. Shared by ``rechunk`` and ``arechunk``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray()
        self.emitted = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self.buf += chunk
        while len(self.buf) >= self.size:
            yield bytes(self.buf[:self.size])
            del self.buf[:self.size]
            self.emitted = True

    def rest(self) -> Iterator[bytes]:
        if self.buf or not self.emitted:
            yield bytes(self.buf)


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The bytes of ``chunks`` again, in pieces of exactly ``size`` (the last may be shorter; at least one)."""
    pieces = _Pieces(size)
    for chunk in chunks:
        yield from pieces.feed(chunk)
    yield from pieces.rest()


async def arechunk(chunks: AsyncIterable[bytes], size: int) -> AsyncIterable[bytes]:
    """``rechunk`` for an async iterable."""
    pieces = _Pieces(size)
    async for chunk in chunks:
        for piece in pieces.feed(chunk):
            yield piece
    for piece in pieces.rest():
        yield piece


def open_store(settings: Settings, session=None, scheme: str | None = None) -> BlobStore:
    """The store for ``scheme`` (default: the configured one)."""
    scheme = scheme or settings.blob_store
    if scheme == "file":
        return FileBlobStore(settings.blob_dir)
    if scheme == "cassandra":
        if session is None:
            raise ValueError("the cassandra blob store needs a Cassandra session")
        return CassandraBlobStore(session, settings.blob_chunk_bytes)
    raise ValueError(f"unknown blob store {scheme!r} (KAFSCRIBE_BLOB_STORE: cassandra | file)")


def spool_verified(settings: Settings, session, ref: str, sha256: str, dest: BinaryIO) -> int:
    """Copy blob ``ref`` into ``dest`` piece by piece, checking its sha256; returns its size.

    For audio too long to hold in memory (a split recording: ``kafscribe.speech.chunking``)."""
    store = open_store(settings, session, scheme=ref.split(":", 1)[0])
    digest, size = hashlib.sha256(), 0
    for piece in store.pieces(ref):  # type: ignore[attr-defined]
        digest.update(piece)
        dest.write(piece)
        size += len(piece)
    if digest.hexdigest() != sha256:
        raise BlobError(f"blob {ref} checksum mismatch (expected {sha256[:12]}…, got {digest.hexdigest()[:12]}…)")
    return size


def read_verified(settings: Settings, session, ref: str, sha256: str) -> bytes:
    """Fetch ``ref`` from the store its scheme names and check its sha256."""
    store = open_store(settings, session, scheme=ref.split(":", 1)[0])
    data = store.get(ref)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise BlobError(f"blob {ref} checksum mismatch (expected {sha256[:12]}…, got {actual[:12]}…)")
    return data
