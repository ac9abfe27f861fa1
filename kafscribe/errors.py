"""What went wrong, as types: the consume loop and the stages decide what to do by a failure's class.

A failure's message is for people (it becomes a job's ``error``); its class is
for code. Every library error that the stages can meet subclasses one of
these kinds, so that ``isinstance`` -- never the text of a message -- says
whether to retry, to fail the job, or to park its input:

- ``TransientError``: it may work if tried again (a broken connection, a busy
  server). Retried with backoff inside the job (``consumers.retry``).
- ``PermanentError``: the input itself is bad (undecodable audio, a missing
  blob, an unusable model) or the job cannot succeed. Retrying cannot help;
  the job ends as ``failed`` and ``str()`` is the reason shown to the client.
- ``RetriesExhausted``: transient failures that outlasted every retry. The job
  fails like a permanent one, and its input is also parked in the DLQ for an
  operator (the fault may be ours, not the client's).

An unreachable job store (Cassandra) is a third thing, neither the job's fault
nor worth failing it for: ``kafscribe.store.session.is_outage`` recognises the
driver's exceptions, and the consume loop redoes the event after a backoff.

This module imports nothing of ours, so any layer can raise these.
"""

from __future__ import annotations


class KafscribeError(Exception):
    """The root of kafscribe's own failure kinds."""


class TransientError(KafscribeError):
    """May succeed if tried again: retried with backoff, then the job fails (``RetriesExhausted``)."""


class PermanentError(KafscribeError):
    """The job cannot succeed; ``str()`` is the reason shown to the client."""


class RetriesExhausted(PermanentError):
    """Transient failures outlasted the retries: the job fails, and its input goes to the DLQ as well."""
