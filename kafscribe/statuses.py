"""A job's statuses (the job store moves them; ``kafscribe.store.jobs``); importable without the Cassandra driver."""

QUEUED, TRANSCRIBING, TRANSLATING, COMPLETED, FAILED, CANCELLED = (
    "queued", "transcribing", "translating", "completed", "failed", "cancelled",
)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
STATUSES = (QUEUED, TRANSCRIBING, TRANSLATING, COMPLETED, FAILED, CANCELLED)
