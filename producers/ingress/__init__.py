"""The HTTP ingress (aiohttp): accept uploads, answer job queries, expose health and metrics.

``POST /v1/jobs`` answers ``202`` only after the ``Upload`` event was
acknowledged by Kafka and the job row written; ``503`` with ``Retry-After``
when Kafka or Cassandra is down. Blocking calls (ffprobe, Cassandra, the
broker ack) run in threads so the event loop stays free.

One app factory (``app.py``) around small route modules (``routes/``).
"""

from .app import build_app, serve

__all__ = ["build_app", "serve"]
