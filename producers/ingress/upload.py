"""Reading ``POST /v1/jobs`` bodies: one ``file`` part (in memory, or a temp file), small known text fields.

Everything is refused as it arrives, before it is read whole: an unknown or
repeated field name, a second ``file`` part, a text field over
``MAX_FIELD_BYTES``, an unknown charset, an encoded part, a bad filename. The
temp file is removed on every path out of here except success, where the
caller owns it (and removes it, see ``routes/jobs.py``).

A file part up to ``KAFSCRIBE_INGRESS_MEMORY_UPLOAD_BYTES`` stays in memory
(no temp file, no disk write on the event loop) while the process's small
uploads hold less than ``KAFSCRIBE_INGRESS_MEMORY_UPLOADS_TOTAL_BYTES``; a
larger one, or any past that budget, is spooled to a temp file as it arrives,
written in a thread. Every read of the body runs under ``door.BodyClock``: a
body that stalls or arrives too slowly is refused (408).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from kafscribe.settings import Settings
from kafscribe.speech.decoding import PROMPT_CONTROLS

from ..submission import MAX_FILENAME_CHARS, OPTION_FIELDS, SubmissionError, check_text
from .door import DOOR, BodyClock, Door, end_upload

MAX_FIELD_BYTES = 4096
FILE_FIELD = "file"
TEMP_PREFIX = "kafscribe-upload-"
_PLAIN_TRANSFER = ("", "7bit", "8bit", "binary")

log = logging.getLogger("kafscribe.ingress")


@dataclass
class Received:
    path: Path | None  # the temp file of a large upload
    data: bytes | None  # a small upload, kept in memory
    filename: str
    fields: dict[str, str]

    @property
    def audio(self) -> Path | bytes:
        """What the submitter reads: the bytes or the temp file."""
        return self.path if self.path is not None else self.data  # type: ignore[return-value]


async def read_upload(
    request: web.Request, settings: Settings, allowed: tuple[str, ...] = OPTION_FIELDS,
    repeatable: frozenset[str] = frozenset(),
) -> Received:
    """Stream the multipart body: the ``file`` part to a temp file (size-limited), the rest as options.

    ``allowed`` are the text fields accepted; a field in ``repeatable`` may come
    several times (its values are joined with ``,``).
    """
    if not request.content_type.startswith("multipart/form-data"):
        raise SubmissionError(422, "send multipart/form-data with a 'file' part")
    temp: list[Path] = []  # the temp file, once created
    done = False
    body = Body(BodyClock(settings), request.app.get(DOOR) or Door(settings))  # an app of its own: no shared budget
    try:
        try:
            received = await _read_parts(await request.multipart(), settings, temp, allowed, repeatable, body)
        except (ValueError, LookupError, HttpProcessingError) as exc:  # aiohttp's words for a malformed body
            raise SubmissionError(422, f"malformed multipart body: {exc}") from exc
        done = True
        return received
    finally:
        body.door.give_memory(body.held)
        end_upload(request)
        if not done:  # every path but success (refusal, disconnect, cancellation): the partial file goes
            for path in temp:
                path.unlink(missing_ok=True)


@dataclass
class Body:
    """The limits one body is read under: its clock and the process's memory budget (``held``: bytes of it)."""

    clock: BodyClock
    door: Door
    held: int = 0


async def _read_parts(
    reader: MultipartReader, settings: Settings, temp: list[Path], allowed: tuple[str, ...],
    repeatable: frozenset[str], body: Body,
) -> Received:
    fields: dict[str, str] = {}
    received: Received | None = None
    while (part := await body.clock.read(reader.next())) is not None:
        if not isinstance(part, BodyPartReader):
            raise SubmissionError(422, "nested multipart parts are not accepted")
        name = part.name
        if name is None:
            raise SubmissionError(422, "every part needs a form-data name")
        _check_plain(part, name)
        if name == FILE_FIELD:
            if received is not None:
                raise SubmissionError(422, "send one 'file' part; this request has a second one")
            filename = check_text("filename", part.filename or "upload", MAX_FILENAME_CHARS)
            path, data = await _save_file(part, settings, temp, body)
            received = Received(path, data, filename, fields)
        elif name in allowed:
            value = await _read_field(part, name, body.clock)
            if name in fields and name not in repeatable:
                raise SubmissionError(422, f"field {name!r} is given twice")
            fields[name] = f"{fields[name]},{value}" if name in fields else value
            if len(fields[name]) > MAX_FIELD_BYTES:
                raise SubmissionError(422, f"field {name!r} exceeds the limit of {MAX_FIELD_BYTES} bytes")
        else:
            names = ", ".join((FILE_FIELD, *allowed))
            raise SubmissionError(422, f"unknown field {ascii(name)[:80]}; allowed: {names}")
    if received is None:
        raise SubmissionError(422, "missing the 'file' part")
    return received


def _check_plain(part: BodyPartReader, name: str) -> None:
    """Parts are sent as they are: no Content-Encoding (a gzip bomb) nor base64/quoted-printable."""
    encoding = part.headers.get("Content-Encoding", "").strip().lower()
    transfer = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
    if encoding not in ("", "identity") or transfer not in _PLAIN_TRANSFER:
        raise SubmissionError(422, f"part {ascii(name)[:80]}: encoded parts are not accepted; send the bytes as they are")


async def _save_file(
    part: BodyPartReader, settings: Settings, temp: list[Path], body: Body,
) -> tuple[Path | None, bytes | None]:
    """The file part: its bytes if small and the memory budget allows, else the temp file it was spooled to
    (0: always spooled)."""
    buffer = bytearray()
    size = 0
    out = None

    def spool():
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        temp.append(Path(tmp))
        return open(fd, "wb")  # noqa: SIM115 - closed below

    if settings.ingress_memory_upload_bytes <= 0:
        out = spool()
    try:
        while chunk := await body.clock.read(part.read_chunk(1 << 16)):
            size += len(chunk)
            if size > settings.max_upload_bytes:
                raise SubmissionError(413, f"file exceeds the limit of {settings.max_upload_bytes} bytes")
            if out is None:
                if size <= settings.ingress_memory_upload_bytes and body.door.take_memory(len(chunk)):
                    body.held += len(chunk)
                    buffer += chunk
                    continue
                out = spool()
                chunk, buffer = bytes(buffer) + chunk, bytearray()
                body.door.give_memory(body.held)
                body.held = 0
            await asyncio.to_thread(out.write, chunk)  # a slow disk must not stall the event loop
    finally:
        if out is not None:
            out.close()
    return (temp[-1], None) if out is not None else (None, bytes(buffer))


async def _read_field(part: BodyPartReader, name: str, clock: BodyClock) -> str:
    charset = part.get_charset(default="utf-8")
    try:
        codec = codecs.lookup(charset)
    except LookupError as exc:
        raise SubmissionError(422, f"field {name!r}: unknown charset {ascii(charset)[:60]}") from exc
    data = bytearray()
    while chunk := await clock.read(part.read_chunk(MAX_FIELD_BYTES + 1)):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise SubmissionError(422, f"field {name!r} exceeds the limit of {MAX_FIELD_BYTES} bytes")
    try:
        value = codec.decode(bytes(data))[0]
    except (UnicodeDecodeError, ValueError) as exc:
        raise SubmissionError(422, f"field {name!r} is not valid {codec.name}: {exc}") from exc
    controls = PROMPT_CONTROLS if name == "prompt" else ""  # a prompt may span lines
    return check_text(f"field {name!r}", value.strip(), MAX_FIELD_BYTES, controls)



def remove_orphans(directory: str | None = None) -> int:
    """Remove temp files of ingress processes that no longer run (killed mid-upload); returns how many.

    Temp file names carry the writer's pid, so ingresses sharing a TMPDIR never
    remove each other's uploads in progress.
    """
    directory = directory or tempfile.gettempdir()
    removed = 0
    for entry in os.scandir(directory):
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %d temp file(s) left by ingress processes that died mid-upload", removed)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
