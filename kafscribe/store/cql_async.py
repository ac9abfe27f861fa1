"""Cassandra statements awaited on an asyncio loop, without a thread per request.

The driver's ``execute_async`` returns a ``ResponseFuture`` whose callbacks
run on the driver's own I/O thread; ``execute`` bridges it into an asyncio
future resolved on the caller's loop (``call_soon_threadsafe``), so the
ingress awaits Cassandra writes the way it awaits a socket.
"""

from __future__ import annotations

import asyncio
from typing import Any


def bridge(response_future) -> asyncio.Future:
    """An asyncio future (of the running loop) resolved by the driver's ``ResponseFuture``.

    Resolves to the first page of rows. The driver keeps a finished future
    alive until its request timer fires, and the future holds the statement's
    values (a blob chunk): they are dropped as soon as the answer arrives.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(setter, value) -> None:
        if not done.done():  # the awaiting task may have been cancelled meanwhile
            setter(value)

    def on_rows(rows) -> None:
        _release(response_future)
        loop.call_soon_threadsafe(settle, done.set_result, rows)

    def on_error(exc: BaseException) -> None:
        _release(response_future)
        loop.call_soon_threadsafe(settle, done.set_exception, exc)

    response_future.add_callbacks(on_rows, on_error)
    return done


async def execute(session, statement, parameters: Any = None, timeout: float | None = None):
    """``session.execute`` for a coroutine: the first page of rows, or the driver's exception."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    return await bridge(session.execute_async(statement, parameters, **kwargs))


def _release(response_future) -> None:
    response_future.query = response_future.message = response_future.query_plan = None
