"""The HTTP ingress (aiohttp): accept uploads, answer job queries, expose health and metrics.

``POST /v1/jobs`` answers ``202`` only after the ``Upload`` event was
acknowledged by Kafka and the job row written; ``503`` with ``Retry-After``
when Kafka or Cassandra is down. The upload path needs no thread: the probe
runs in-process and yields to the loop, Cassandra writes and the broker ack
are awaited as asyncio futures (``producers/submission.py``).

One app factory (``app.py``) around small route modules (``routes/``).
"""

from .app import build_app, serve

__all__ = ["build_app", "serve"]
