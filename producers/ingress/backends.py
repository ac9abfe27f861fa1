"""The ingress's handles on Cassandra (job store, callback store) and Kafka (publisher, worker view,
outcomes watch)."""

from __future__ import annotations

import threading
import time

from kafscribe.kafka.workers import WorkerView
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session
from kafscribe.store.callbacks import CallbackStore
from kafscribe.store.jobs import JobStore

from ..completions import Completions
from ..publisher import Publisher
from ..submission import Submitter, Unavailable


class Backends:
    """Lazily (re)connected Cassandra session + the Kafka publisher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher = Publisher(settings)
        self.view = WorkerView(settings)
        self.completions = Completions(settings)  # outcomes on `finished`, for requests that wait
        self._session = None
        self._submitter: Submitter | None = None
        self._callbacks: CallbackStore | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0

    def connected(self) -> bool:
        """True once the Cassandra session is open: ``submitter()`` then returns at once (no I/O)."""
        return self._submitter is not None

    def submitter(self) -> Submitter:
        """The submitter over a (re)connected Cassandra session; blocking while it connects."""
        with self._lock:
            if self._submitter is None:
                if time.monotonic() < self._next_try:
                    raise Unavailable("Cassandra unavailable (reconnecting)")
                try:
                    self._session = cassandra_session.connect(
                        self.settings, keyspace=self.settings.cassandra_keyspace, timeout_s=5
                    )
                except Exception as exc:  # noqa: BLE001
                    self._next_try = time.monotonic() + 2
                    raise Unavailable(f"Cassandra unavailable: {exc}") from exc
                self._submitter = Submitter(self.settings, self._session, self.publisher, self.view)
            return self._submitter

    def jobs(self) -> JobStore:
        return self.submitter().jobs

    def callbacks(self) -> CallbackStore:
        submitter = self.submitter()  # connects to Cassandra if needed
        with self._lock:
            if self._callbacks is None:  # statements are prepared once, not per request
                self._callbacks = CallbackStore(submitter.session)
            return self._callbacks

    def close(self) -> None:
        self.view.close()
        self.completions.close()
        self.publisher.close()
        if self._session is not None:
            self._session.cluster.shutdown()
