"""What one ingress process allows at once, and how it reads bodies that arrive too slowly.

- ``Door``: counts of uploads in progress (all, and per API key) and of open
  event streams per key, each with its cap (``KAFSCRIBE_INGRESS_MAX_UPLOADS``,
  ``..._PER_KEY``, ``KAFSCRIBE_EVENTS_MAX_STREAMS_PER_KEY``): past a cap the
  request is refused (429) before anything is read. It also holds the budget
  of bytes kept in memory by small uploads (past it they are spooled to a temp
  file), and gives freed heap back to the system when the last upload ends
  (glibc keeps it otherwise: 150 stalled uploads left the process 200 MB
  larger after they were gone).
- ``BodyClock``: every read of an upload's body waits at most
  ``KAFSCRIBE_INGRESS_BODY_IDLE_S``, the body must average
  ``KAFSCRIBE_INGRESS_BODY_MIN_RATE`` bytes/s once ``..._GRACE_S`` have passed,
  and take no longer than ``KAFSCRIBE_INGRESS_BODY_MAX_S`` in all; otherwise
  ``SlowBody`` (408), and the route closes the connection at once.
- ``Redact``: a log filter that keeps credentials out of every log line,
  aiohttp's own included (a malformed ``Authorization`` header is written into
  the exception aiohttp logs when it refuses the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from kafscribe.settings import Settings

from ..submission import SubmissionError

T = TypeVar("T")
log = logging.getLogger("kafscribe.ingress")


class Busy(Exception):
    """A cap of the door is reached (429 with ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Door:
    """Counts and caps of one ingress process (the event loop is its only user: no lock)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uploads = 0
        self.uploads_by_key: Counter[str] = Counter()
        self.streams_by_key: Counter[str] = Counter()
        self.memory_bytes = 0  # held by small uploads right now

    def enter_upload(self, key_id: str) -> Callable[[], None]:
        """Count one upload of ``key_id`` whose body is being read; ``Busy`` past a cap. Returns the
        function that ends it (idempotent): called once the body is read, so a request that then waits
        for its job (``/v1/audio/*``) holds no place."""
        s = self.settings
        if 0 < s.ingress_max_uploads <= self.uploads:
            raise Busy(f"this ingress is reading {self.uploads} uploads, its limit; retry in a moment")
        if 0 < s.ingress_max_uploads_per_key <= self.uploads_by_key[key_id]:
            raise Busy(f"this API key has {self.uploads_by_key[key_id]} uploads in progress, its limit;"
                       " retry when one has finished")
        self.uploads += 1
        self.uploads_by_key[key_id] += 1
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            self.uploads -= 1
            self.uploads_by_key[key_id] -= 1
            if self.uploads_by_key[key_id] <= 0:
                del self.uploads_by_key[key_id]
            if self.uploads == 0:
                trim_heap()

        return end

    @contextlib.contextmanager
    def stream(self, key_id: str) -> Iterator[None]:
        """One open event stream of ``key_id``; ``Busy`` past the cap."""
        cap = self.settings.events_max_streams_per_key
        if 0 < cap <= self.streams_by_key[key_id]:
            raise Busy(f"this API key has {self.streams_by_key[key_id]} event streams open, its limit; close one"
                       " first")
        self.streams_by_key[key_id] += 1
        try:
            yield
        finally:
            self.streams_by_key[key_id] -= 1
            if self.streams_by_key[key_id] <= 0:
                del self.streams_by_key[key_id]

    def take_memory(self, size: int) -> bool:
        """Whether a small upload may hold ``size`` more bytes in memory (then they are counted)."""
        if self.memory_bytes + size > self.settings.ingress_memory_uploads_total_bytes:
            return False
        self.memory_bytes += size
        return True

    def give_memory(self, size: int) -> None:
        self.memory_bytes = max(0, self.memory_bytes - size)


DOOR = web.AppKey("door", Door)
UPLOAD_END = web.RequestKey("upload_end", object)  # ``Door.enter_upload``'s end function of this request


def end_upload(request: web.Request) -> None:
    """The body of this request is read (or refused): it no longer counts as an upload in progress."""
    end = request.get(UPLOAD_END)
    if end is not None:
        end()


def door(request: web.Request) -> Door:
    return request.app[DOOR]


_LIBC = None


def trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``; elsewhere nothing)."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False  # not glibc


class SlowBody(SubmissionError):
    """The body stalled or arrives too slowly (408); the connection is closed after the answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(408, reason)


class BodyClock:
    """Time limits of one request body (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.received = 0

    async def read(self, reading: Awaitable[T]) -> T:
        """Await one read of the body under the limits; counts what it returned (bytes)."""
        s = self.settings
        left = s.ingress_body_max_s - (time.monotonic() - self.started)
        if left <= 0:
            raise SlowBody(f"the upload took more than {s.ingress_body_max_s:g} s")
        idle = s.ingress_body_idle_s if s.ingress_body_idle_s > 0 else left
        try:
            async with asyncio.timeout(min(idle, left)):
                data = await reading
        except TimeoutError:
            if idle <= left:
                raise SlowBody(f"the upload sent nothing for {idle:g} s") from None
            raise SlowBody(f"the upload took more than {s.ingress_body_max_s:g} s") from None
        if isinstance(data, bytes | bytearray):
            self.received += len(data)
        elapsed = time.monotonic() - self.started
        if s.ingress_body_min_rate > 0 and elapsed > s.ingress_body_grace_s:
            if self.received < s.ingress_body_min_rate * elapsed:
                raise SlowBody(f"the upload arrives at {self.received / elapsed:.0f} bytes/s; the least accepted is"
                               f" {s.ingress_body_min_rate} bytes/s")
        return data


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` now and close the connection: the rest of a refused slow body is not waited for
    (aiohttp would read on for up to 10 s, for a client that sends nothing)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client is gone already
    protocol = request.protocol
    if protocol is not None:
        protocol.force_close()
    return response


def client_gone(request: web.Request) -> bool:
    """Whether the client of ``request`` has disconnected."""
    transport = request.transport
    return transport is None or transport.is_closing()


# --- credentials never logged ----------------------------------------------------------------------------
_SECRETS = re.compile(
    r"((?i:authorization)\s*[:=]\s*(?:\w+\s+)?|(?i:bearer)\s+|Basic\s+)[^\s'\"\\,;]+"  # a header's credential
    r"|ksk_[0-9a-f]{12}_[A-Za-z0-9_-]+"  # an API key wherever it appears
    r"|whsec_[A-Za-z0-9+/=]+"  # a webhook secret
)


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``[redacted]``."""
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class Redact(logging.Filter):
    """Rewrite a record so that neither its message nor its exception shows a credential.

    aiohttp's error path logs the parser's exception, whose text holds the raw
    header line; the record's exception is replaced by its redacted text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            exc = record.exc_info[1]
            if isinstance(exc, HttpProcessingError):  # a refused request: its words suffice, not a traceback
                message = f"{message}: {type(exc).__name__}: {exc}"
            elif exc is not None:
                message = f"{message}\n{''.join(traceback.format_exception(exc)).rstrip()}"
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = redact(message), None
        return True


REDACTED_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "kafscribe.ingress",
                    "kafscribe.ingress.auth", "kafscribe.ingress.openai", "kafscribe.submission", "kafscribe.quotas")


def install_redaction() -> None:
    """Put ``Redact`` on every logger the ingress (and aiohttp under it) writes to, and redact the text of
    aiohttp's own 400 answers (they quote the refused header line back); idempotent."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redact) for f in logger.filters):
            logger.addFilter(Redact())
    original = RequestHandler.handle_error
    if getattr(original, "redacts", False):
        return

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None):
        return original(self, request, status, exc, redact(message) if message else message)

    handle_error.redacts = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]
