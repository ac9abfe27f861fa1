"""Which partition of the chunks topic a chunk goes to (issue 12), beside ``producers.routing``.

Chunks of one job are spread over consecutive partitions from a point fixed by
the job id (``(hash(job_id) + index) % partitions``), so the transcribers that
own different partitions each get some of them, and a redone split puts every
chunk where it went before. Uploads are routed by memory (``routing``); a
chunk's estimate is the same small one for every chunk, so spreading is what
matters here.
"""

from __future__ import annotations

import zlib


def chunk_partition(job_id: str, index: int, partitions: int) -> int:
    """The partition of chunk ``index`` of ``job_id`` on a topic of ``partitions`` partitions."""
    if partitions <= 0:
        raise ValueError("a topic has at least one partition")
    return (zlib.crc32(job_id.encode()) + index) % partitions
