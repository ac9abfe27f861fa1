"""Prometheus metrics of every kafscribe process (``/metrics``).

Names follow Prometheus conventions: ``kafscribe_`` prefix, ``_total``
counters, ``_seconds`` histograms, small-cardinality labels. Process memory
(``process_resident_memory_bytes``) comes from prometheus-client's default
process collector. Workers serve them with ``/healthz`` (``consumers.watchdog.serve``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "kafscribe_http_requests_total", "Ingress HTTP requests", ["method", "route", "status"]
)
UPLOADS = Counter("kafscribe_uploads_total", "Uploads accepted (202) by the ingress")
UPLOAD_BYTES = Counter("kafscribe_upload_bytes_total", "Audio bytes accepted by the ingress")
JOBS = Counter("kafscribe_jobs_total", "Events handled by a stage, by outcome", ["stage", "outcome"])
STAGE_SECONDS = Histogram(
    "kafscribe_stage_seconds", "Time a stage spent on one event", ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
AUDIO_SECONDS = Counter("kafscribe_audio_seconds_total", "Seconds of audio processed", ["stage"])
REALTIME_FACTOR = Histogram(
    "kafscribe_realtime_factor", "Processing seconds per audio second", ["engine"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5),
)
CONSUMER_LAG = Gauge("kafscribe_consumer_lag", "Messages behind the end of an owned partition", ["stage", "partition"])
TRANSIENT_RETRIES = Counter("kafscribe_transient_retries_total", "In-process retries of transient failures", ["stage"])
DEAD_LETTERS = Counter("kafscribe_dead_letters_total", "Messages sent to the DLQ", ["stage"])
REDONE_JOBS = Counter("kafscribe_redone_jobs_total", "Jobs started again after an earlier attempt died", ["stage"])
THROTTLED_SECONDS = Counter("kafscribe_throttled_seconds_total", "Time workers waited for memory", ["stage"])
REBALANCES = Counter("kafscribe_rebalances_total", "Partition assignment changes seen", ["stage", "kind"])


# Self-healing of the consume loop and the supervisor.
PRODUCER_RESETS = Counter(
    "kafscribe_producer_resets_total", "Transactional producers dropped and created again", ["stage", "reason"]
)
GROUP_EVICTIONS = Counter(
    "kafscribe_group_evictions_total", "Times a worker found itself evicted by max.poll.interval.ms", ["stage"]
)
IDLE_PARTITION_LAG = Gauge(
    "kafscribe_idle_partition_lag", "Lag of a partition owned by a worker that is idle (stuck if > 0)",
    ["stage", "partition"],
)
SERVICE_RESTARTS = Counter(
    "kafscribe_service_restarts_total", "Services restarted by the `kafscribe services` supervisor", ["service"]
)

# Observability: webhook outcomes and the memory a job is expected to need. Lag, job age,
# worker headroom and DLQ size come from the lag exporter (kafscribe/kafka/lag.py), which asks the broker.
WEBHOOK_DELIVERIES = Counter(
    "kafscribe_webhook_deliveries_total", "Callback delivery attempts, by outcome (delivered, retrying, gave_up)",
    ["stage", "outcome"],
)
JOB_ESTIMATE_BYTES = Gauge(
    "kafscribe_job_estimate_bytes", "Memory estimate of the last job a transcriber admitted", ["stage"]
)
# Where a job's time goes: queue_wait, status, admission, blob_read, decode, prefetch_wait,
# engine (the stage's own phases) and commit (the consume loop's transaction).
JOB_PHASE_SECONDS = Histogram(
    "kafscribe_job_phase_seconds", "Seconds one job spent in a phase of its stage", ["stage", "phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PREFETCHES = Counter(
    "kafscribe_prefetches_total", "Next-job preparations while a job runs, by outcome", ["stage", "outcome"]
)
