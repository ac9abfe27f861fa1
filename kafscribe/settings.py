"""Every tunable of kafscribe in one object, read from ``KAFSCRIBE_*`` variables.

Each field's environment variable is ``KAFSCRIBE_`` + the field name in upper
case (``kafka_bootstrap`` -> ``KAFSCRIBE_KAFKA_BOOTSTRAP``). The defaults run
everything on one machine against the local stack that ``kafscribe stack up``
starts. ``kafscribe settings`` prints the table with current values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "KAFSCRIBE_"
TEST_ENV_PREFIX = "KAFSCRIBE_TEST_"  # the test session's own knobs (tests/conftest.py), never settings


class SettingsError(ValueError):
    """A ``KAFSCRIBE_*`` variable holds a value that cannot be used."""


def _doc(text: str, default: Any = dataclasses.MISSING, secret: bool = False, **kw: Any) -> Any:
    """A setting with its description; ``secret=True``: its value is never shown (see ``shown_value``)."""
    meta = {"doc": text, "secret": secret}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Settings:
    # --- local stack -----------------------------------------------------
    state_dir: Path = _doc(
        "Data and logs of the local Kafka/Cassandra and pid files.",
        PROJECT_ROOT / ".kafscribe",
    )
    cache_dir: Path = _doc(
        "Resolved server jars and prepared models (shared by checkouts).",
        Path.home() / ".cache" / "kafscribe",
    )
    kafka_bootstrap: str = _doc("Kafka bootstrap servers.", "127.0.0.1:9092")
    kafka_controller_port: int = _doc("KRaft controller port of the local broker.", 9093)
    kafka_heap: str = _doc("JVM heap of the local broker.", "512m")
    cassandra_hosts: str = _doc("Comma-separated Cassandra contact points.", "127.0.0.1")
    cassandra_port: int = _doc("Cassandra native (CQL) port.", 9042)
    cassandra_storage_port: int = _doc("Cassandra inter-node port of the local node.", 7000)
    cassandra_heap: str = _doc("JVM heap of the local Cassandra node.", "1g")
    cassandra_keyspace: str = _doc("Keyspace holding jobs, blobs and callbacks.", "kafscribe")
    stack_timeout_s: float = _doc("How long `stack up` waits for each server.", 240.0)
    # --- cluster
    kafka_brokers: int = _doc(
        "Local stack: Kafka brokers to run (KRaft). Broker n listens on the first bootstrap address + n-1"
        " (127.0.0.1, .2, ...) with the same ports; brokers 1-3 (1 if fewer than 3) form the controller quorum.", 1
    )
    cassandra_nodes: int = _doc(
        "Local stack: Cassandra nodes to run, node n on the first CASSANDRA_HOSTS address + n-1, same ports.", 1
    )
    topic_replication_factor: int = _doc(
        "Replication factor of every kafscribe topic (0 = min(3, brokers in the cluster)); `stack up` refuses"
        " more than there are brokers.", 0
    )
    topic_min_insync_replicas: int = _doc(
        "`min.insync.replicas` of every kafscribe topic (0 = replication factor - 1, at least 1).", 0
    )
    cassandra_local_dc: str = _doc(
        "Data centre of this process's Cassandra clients (DC-aware routing, LOCAL_* levels); empty = the contact"
        " points' DC. The local stack's nodes are in it (`datacenter1` when empty).", ""
    )
    cassandra_replication: str = _doc(
        "Keyspace replication (NetworkTopologyStrategy) as `DC:RF[,DC:RF...]`; empty = the local DC with"
        " RF min(3, its nodes). Applies when `stack up` creates the keyspace.", ""
    )
    cassandra_write_consistency: str = _doc("Consistency level of every write (batches and LWTs included).", "LOCAL_QUORUM")
    cassandra_read_consistency: str = _doc("Consistency level of every read (SELECT).", "LOCAL_QUORUM")
    cassandra_serial_consistency: str = _doc(
        "Serial consistency of lightweight transactions (`IF NOT EXISTS`): LOCAL_SERIAL or SERIAL.", "LOCAL_SERIAL"
    )

    # --- topics ----------------------------------------------------------
    topic_prefix: str = _doc("Prefix of every kafscribe topic.", "kafscribe.")
    uploads_partitions: int = _doc("Partitions of the uploads topic (max transcribers).", 12)
    topic_partitions: int = _doc("Partitions of the other stage topics.", 6)

    # --- ingress ---------------------------------------------------------
    http_host: str = _doc("Ingress listen address.", "127.0.0.1")
    http_port: int = _doc("Ingress listen port.", 8000)
    public_url: str = _doc("Base URL of links handed to clients (wins over the request's Host).", "")
    allowed_hosts: str = _doc(
        "Host headers (`name` or `name:port`, comma-separated) links may be built from when PUBLIC_URL is empty;"
        " any other Host gets relative links.", "localhost,127.0.0.1,[::1]",
    )
    max_upload_bytes: int = _doc("Largest accepted upload (413 above).", 200 * 1024 * 1024)
    retry_after_s: int = _doc("Retry-After sent with 503 when Kafka/Cassandra is down.", 5)
    # --- api
    openai_wait_s: float = _doc(
        "How long `POST /v1/audio/*` waits for the job's result; past it the answer is"
        " 504 with the job id and its link to poll (the job goes on).", 300.0,
    )
    audio_retention_s: int = _doc(
        "Audio is removed this many seconds after its job finished (0 = kept); the ingress sweeps every"
        " KAFSCRIBE_RETENTION_SWEEP_S.", 86400,
    )
    result_ttl_s: int = _doc(
        "Finished jobs, results and segments expire this many seconds after the job finished (Cassandra TTL;"
        " 0 = kept). Applied to the tables by the schema bootstrap (`kafscribe stack up`).", 30 * 86400,
    )
    retention_sweep_s: float = _doc("How often the ingress removes audio past KAFSCRIBE_AUDIO_RETENTION_S (0 = never).", 300.0)
    jobs_list_days: int = _doc("How many UTC days back `GET /v1/jobs` looks for a tenant's jobs.", 31)
    # --- ingest
    ingress_processes: int = _doc(
        "Ingress processes serving HTTP_PORT on this host (SO_REUSEPORT; the kernel spreads connections);"
        " 0 = one per CPU core.", 1,
    )
    ingress_memory_upload_bytes: int = _doc(
        "Uploads up to this size are kept in memory (probed and stored without a temp file); larger ones"
        " are spooled to a temp file. Memory bound: concurrent uploads x this.", 1024 * 1024,
    )
    ingress_linger_ms: int = _doc("How long the ingress's producer waits to batch Upload events (linger.ms).", 1)

    # --- auth and quotas ---------------------------------------------------
    auth_required: bool = _doc(
        "`/v1/*` needs `Authorization: Bearer KEY`. `false` is for local development only (loopback"
        " HTTP_HOST only; every request then acts as an admin).", True,
    )
    auth_cache_s: float = _doc("How long the ingress trusts a looked-up API key (a revocation takes effect within this).", 2.0)
    api_key: str = _doc("API key `kafscribe submit` sends (`kafscribe keys create` makes one).", "", secret=True)
    tenant_max_unfinished: int = _doc("Unfinished jobs a tenant may have; more get 429 + Retry-After (0 = no limit).", 100)
    quota_retry_after_s: int = _doc("Retry-After sent with a quota 429.", 30)
    redeliver_interval_s: int = _doc("A job's callback may be redelivered once per this many seconds (429 inside).", 60)

    # --- blobs -----------------------------------------------------------
    blob_store: str = _doc("Where audio lives: `cassandra` (any host) or `file` (one host).", "cassandra")
    blob_dir: Path = _doc("Directory of the `file` blob store.", PROJECT_ROOT / ".kafscribe" / "blobs")
    blob_chunk_bytes: int = _doc("Chunk size of the `cassandra` blob store.", 1024 * 1024)

    # --- workers ---------------------------------------------------------
    worker_id: str = _doc("Identity of this worker process.", "")
    engine: str = _doc("Transcription engine: `faster-whisper` or `openai-whisper`.", "faster-whisper")
    model: str = _doc("Model name (prepared offline) or a local model directory.", "base")
    device: str = _doc(
        "`cpu`, `cuda`, `cuda:N` (GPU N of those `CUDA_VISIBLE_DEVICES` shows; its memory is what the worker"
        " reports and admits by) or `auto` (`cuda` when the driver reports a GPU).", "cpu",
    )
    compute_type: str = _doc("faster-whisper compute type (`default` = int8 on CPU, float16 on CUDA).", "default")
    cpu_threads: int = _doc(
        "Threads an engine may use on CPU (0 = auto: the usable cores divided among the host's transcribers;"
        " `kafscribe services` sets it per transcriber).", 0
    )
    beam_size: int = _doc("Beam size for decoding.", 5)
    # --- perf
    transcribers: str = _doc(
        "Transcriber processes `kafscribe services up` starts: a number, or `auto` (CPU: one per usable core,"
        " one thread each, as far as host memory allows; CUDA: one per GPU).", "auto"
    )
    engine_batch_size: int = _doc(
        "faster-whisper only: >0 transcribes audio of at least KAFSCRIBE_ENGINE_BATCH_MIN_AUDIO_S with the"
        " batched pipeline (Silero VAD cuts speech into windows decoded this many at a time); 0 = sequential.", 0
    )
    engine_batch_min_audio_s: float = _doc("Shortest audio the batched pipeline is used for (see above).", 60.0)
    # --- chunks
    chunk_s: float = _doc(
        "Long recordings: audio longer than 1.5 x this many seconds is cut at silences (VAD) into chunks of"
        " about this length, transcribed by any transcriber and merged in order (0 = never split).", 60.0
    )
    session_timeout_ms: int = _doc("Consumer group session timeout: a silent worker is dead after this.", 30000)
    heartbeat_ms: int = _doc("Consumer group heartbeat interval.", 5000)
    max_poll_interval_ms: int = _doc("Longest gap between polls (workers keep polling while busy).", 300000)
    transient_retries: int = _doc("In-process retries of a transient failure before the job fails.", 3)
    max_attempts: int = _doc("Attempts (redos after crashes included) before a job fails and goes to the DLQ.", 3)
    status_interval_s: float = _doc("How often a worker publishes its WorkerStatus.", 5.0)
    worker_stale_s: float = _doc("A worker whose last status is older than this is dead in every view.", 30.0)
    memory_budget_bytes: int = _doc(
        "Cap on the memory a worker may use (0 = host/GPU memory decides); its headroom is budget - RSS.", 0
    )
    throttle_leave_s: float = _doc(
        "A worker short of memory this long leaves the group so its partitions move; it rejoins later.", 60.0
    )
    kafka_call_timeout_s: float = _doc(
        "Deadline of each transactional/consumer call of a worker, really enforced: on overrun the producer "
        "is replaced (same transactional id) and the event redone.", 30.0
    )
    watchdog_s: float = _doc(
        "A worker whose poll loop completes no iteration for this long logs why and exits non-zero, "
        "so its supervisor restarts it (0 = off; keep it above 4x the call timeout); also `GET /healthz` on its metrics port.", 180.0
    )
    max_audio_s: float = _doc(
        "Longest audio accepted, in decoded seconds (refused at the door with 413, re-checked by workers).",
        4 * 3600.0,
    )
    job_time_limit_min_s: float = _doc(
        "Per-job time limit: this many seconds plus KAFSCRIBE_JOB_TIME_LIMIT_FACTOR x the audio's duration;"
        " a job over it fails.", 300.0
    )
    job_time_limit_factor: float = _doc("Seconds a job may take per second of audio (see the minimum above).", 10.0)
    allowed_models: str = _doc(
        "Comma-separated models a job may ask for (names or local paths); empty = KAFSCRIBE_MODEL plus the"
        " packaged offline models. Nothing else is ever loaded or downloaded for a job.", ""
    )
    max_clock_skew_s: float = _doc(
        "An event whose produced_at lies further in the future than this is refused (workers) or ignored"
        " (the ingress's worker view).", 300.0
    )
    metrics_port: int = _doc(
        "Port of a worker's /metrics (0 = stage default 9101-9104, merger 9106, -1 = off). Under `kafscribe services`"
        " the first of the block: transcriber here, translator +1, sink +2, notifier +3, merger +5, each further"
        " instance +10.", 0
    )
    metrics_host: str = _doc("Address a worker's /metrics listens on.", "127.0.0.1")

    restart_backoff_max_s: float = _doc(
        "Longest wait of `kafscribe services` before restarting a service that exited (1 s, doubling).", 30.0
    )
    supervisor_metrics_port: int = _doc(
        "Port of the `kafscribe services` supervisor's /metrics (restart counts; -1 = off).", 9100
    )
    # --- obs
    lag_metrics_port: int = _doc(
        "Port of the lag exporter's /metrics (`kafscribe serve lag`: committed offsets vs high watermarks,"
        " oldest unfinished job; -1 = off).", 9105
    )
    prometheus_host: str = _doc("Address the Prometheus that `kafscribe services up` runs listens on.", "127.0.0.1")
    prometheus_port: int = _doc("Port of that Prometheus (-1 = do not run one).", 9090)
    prometheus_scrape_s: float = _doc("Scrape (and rule evaluation) interval of that Prometheus.", 5.0)
    prometheus_retention: str = _doc("How long that Prometheus keeps samples (its --storage.tsdb.retention.time).", "7d")

    # --- admin: what forged worker statuses can cost (kafscribe/kafka/lag.py) --------------------------
    lag_max_workers: int = _doc(
        "Most workers whose status series the lag exporter exports (live ones first, then recently stale ones);"
        " the rest are counted in kafscribe_workers_not_exported. Bounds /metrics against forged WorkerStatus"
        " events.", 100,
    )

    # --- events: progress, live segments, cancel checks (kafscribe/store/progress.py, routes/events.py) ----
    progress_interval_s: float = _doc(
        "Least seconds between two progress writes of a running job (each decoded segment is written anyway).", 1.0
    )
    progress_ttl_s: int = _doc("Seconds a job's progress and live segments are kept (Cassandra TTL).", 7 * 86400)
    cancel_check_s: float = _doc("A transcriber checks at most this often, between segments, whether its job was cancelled.", 1.0)
    events_poll_s: float = _doc("How often `GET /v1/jobs/{id}/events` (and the OpenAI stream) reads the job.", 0.5)
    events_keepalive_s: float = _doc("An event stream with nothing to send writes a comment line this often.", 15.0)

    # --- the door under abuse: listing work, audio quotas, slow uploads, event streams (producers/ingress) ----
    jobs_list_max_reads: int = _doc(
        "Cassandra reads one `GET /v1/jobs` request may make (day partitions and job rows); past it the page ends"
        " early with a `next_cursor` to continue from.", 400,
    )
    tenant_max_audio_s_in_flight: float = _doc(
        "Decoded audio seconds a tenant's unfinished jobs may hold together (counted over the slots of"
        " TENANT_MAX_UNFINISHED, so 0 there means no limit here either; 0 = no limit); more get 429.", 36000.0,
    )
    tenant_max_audio_s_per_day: float = _doc(
        "Decoded audio seconds a tenant may have accepted per UTC day (0 = no limit); more get 429 until the next"
        " UTC day.", 720000.0,
    )
    ingress_body_idle_s: float = _doc(
        "An upload whose body sends no byte for this long is refused (408) and its connection closed.", 30.0,
    )
    ingress_body_min_rate: int = _doc(
        "Bytes per second an upload's body must average once INGRESS_BODY_GRACE_S have passed; slower: 408 and"
        " the connection closed (0 = no minimum).", 8192,
    )
    ingress_body_grace_s: float = _doc("Seconds an upload's body may take before INGRESS_BODY_MIN_RATE applies.", 10.0)
    ingress_body_max_s: float = _doc("Longest an upload's body may take to arrive (408 past it).", 3600.0)
    ingress_max_uploads: int = _doc(
        "Uploads one ingress process reads at once; more get 429 before their body is read (0 = no limit).", 64,
    )
    ingress_max_uploads_per_key: int = _doc(
        "Uploads one API key may have in progress at once on one ingress process; more get 429 (0 = no limit).", 8,
    )
    ingress_memory_uploads_total_bytes: int = _doc(
        "Bytes of small uploads one ingress process holds in memory at once (see INGRESS_MEMORY_UPLOAD_BYTES);"
        " past it uploads are spooled to temp files instead.", 16 * 1024 * 1024,
    )
    events_max_streams_per_key: int = _doc(
        "Open `GET /v1/jobs/{id}/events` streams (and OpenAI streams) per API key per ingress process; more get"
        " 429 (0 = no limit).", 16,
    )

    # --- translation -----------------------------------------------------
    translator: str = _doc(
        "Translation backend: `auto` (whisper for English targets, else llm), `whisper` or `llm`.", "auto"
    )
    llm_base_url: str = _doc("OpenAI-compatible API base (vLLM, Ollama, OpenAI), e.g. http://host:8000/v1.", "")
    llm_model: str = _doc("Chat model used for translation.", "")
    llm_api_key: str = _doc("Bearer token for the LLM endpoint (empty = none).", "", secret=True)
    llm_timeout_s: float = _doc("Timeout of one LLM request.", 60.0)
    llm_retries: int = _doc("Retries of an LLM request on 429/5xx/timeouts.", 4)
    llm_retry_base_s: float = _doc("First backoff of an LLM retry (doubles each time).", 1.0)
    llm_batch_segments: int = _doc("Most segments translated per LLM request.", 40)
    llm_batch_chars: int = _doc("Most source characters per LLM request (fits the context).", 6000)

    # --- callbacks ---------------------------------------------------------
    callback_secret_overlap_s: float = _doc(
        "After `kafscribe webhooks secret --rotate`, how long the previous secret keeps signing beside the new one.",
        86400.0,
    )
    callback_timeout_s: float = _doc("Timeout of one callback POST.", 10.0)
    callback_concurrency: int = _doc(
        "Callbacks delivered at once by each notifier loop (first deliveries; retries): a slow receiver holds one.", 16
    )
    callback_max_attempts: int = _doc("Delivery attempts before the event goes to the DLQ.", 10)
    callback_backoff_base_s: float = _doc("Delay before the 2nd attempt; grows by the factor, with jitter.", 15.0)
    callback_backoff_factor: float = _doc("Growth of the callback retry delay.", 3.0)
    callback_backoff_max_s: float = _doc("Longest delay between two attempts (defaults span ~24 h).", 36000.0)
    callback_allow_networks: str = _doc(
        "CIDRs callbacks may reach although not globally routable (e.g. `127.0.0.0/8` for local dev).", ""
    )

    # --- secured clusters ------------------------------------------------
    kafka_security_protocol: str = _doc(
        "Kafka `security.protocol`: `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.", "PLAINTEXT"
    )
    kafka_sasl_mechanism: str = _doc("Kafka `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.", "")
    kafka_sasl_username: str = _doc("Kafka SASL user name.", "")
    kafka_sasl_password: str = _doc("Kafka SASL password.", "", secret=True)
    kafka_ssl_ca_file: str = _doc("PEM file of the CA that signed the brokers' certificates.", "")
    kafka_ssl_cert_file: str = _doc("PEM client certificate, for brokers that require TLS client auth.", "")
    kafka_ssl_key_file: str = _doc("PEM private key of the client certificate.", "")
    kafka_ssl_key_password: str = _doc("Password of the client key file (empty = unencrypted).", "", secret=True)
    kafka_sasl_port: int = _doc(
        "Local stack only: also open a SASL_PLAINTEXT (PLAIN) listener on this port (0 = none).", 0
    )
    cassandra_username: str = _doc("Cassandra user (PasswordAuthenticator); empty = no authentication.", "")
    cassandra_password: str = _doc("Cassandra password.", "", secret=True)
    cassandra_ssl_ca_file: str = _doc("PEM CA file: set it to talk TLS to Cassandra (client encryption).", "")
    cassandra_ssl_cert_file: str = _doc("PEM client certificate, for nodes that require TLS client auth.", "")
    cassandra_ssl_key_file: str = _doc("PEM private key of the Cassandra client certificate.", "")

    # --- logging ---------------------------------------------------------
    log_level: str = _doc("Python log level.", "INFO")

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def cassandra_contact_points(self) -> list[str]:
        return [h.strip() for h in self.cassandra_hosts.split(",") if h.strip()]

    def topic(self, name: str) -> str:
        """Full topic name of a logical topic (``uploads`` -> ``kafscribe.uploads``)."""
        return f"{self.topic_prefix}{name}"

    def effective_worker_id(self, stage: str) -> str:
        return self.worker_id or f"{stage}-{socket.gethostname()}-{os.getpid()}"

    def allowed_model_names(self) -> frozenset[str]:
        """Models a job may name: the operator's list, else the configured model and the packaged ones."""
        listed = {m.strip() for m in self.allowed_models.split(",") if m.strip()}
        if listed:
            return frozenset(listed | {self.model})
        from kafscribe.speech.models.offline import PACKAGED

        return frozenset({self.model, *PACKAGED})

    def job_time_limit_s(self, audio_duration_s: float) -> float:
        """How long one job of ``audio_duration_s`` seconds may take before it fails."""
        return self.job_time_limit_min_s + self.job_time_limit_factor * max(audio_duration_s, 0.0)

    def shown(self, name: str) -> str:
        """The value of setting ``name`` as `kafscribe settings` prints it: secrets masked (``shown_value``)."""
        return shown_value(name, getattr(self, name))

    def to_env(self) -> dict[str, str]:
        """These settings as ``KAFSCRIBE_*`` variables (to hand to a child process)."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    def with_(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``KAFSCRIBE_*`` variables; unknown names are refused.

        ``KAFSCRIBE_TEST_*`` variables steer the test session (ports, state directories) and are not settings.
        """
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX) or key.startswith(TEST_ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in known:
                raise SettingsError(f"unknown setting {key}; see `kafscribe settings`")
            values[name] = _parse(known[name], raw, key)
        values.update(overrides)
        return cls(**values)


MASK = "****"
# ``scheme://userinfo@``: the userinfo (``user:password`` or a bare token) of any URL inside a value.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def is_secret(name: str) -> bool:
    """Whether setting ``name`` is declared secret (``_doc(..., secret=True)``): keys, passwords."""
    known = {f.name: f for f in fields(Settings)}
    return name in known and bool(known[name].metadata.get("secret"))


def mask_url_userinfo(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``****`` (``http://u:pw@h/`` -> ``http://****@h/``)."""
    return _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)


def shown_value(name: str, value: Any) -> str:
    """The one masking rule of settings, for every place that shows a value (the CLI, docs/settings.md, logs).

    A declared secret shows as ``****`` (long values: ``****`` + their last 4 characters, to tell keys apart);
    every other value is shown with the userinfo of any URL in it masked, so a password written into
    ``KAFSCRIBE_LLM_BASE_URL`` (``https://user:pw@host/v1``) never shows.
    """
    text = str(value)
    if is_secret(name):
        if not text:
            return text
        return MASK if len(text) < 12 else f"{MASK}{text[-4:]}"
    return mask_url_userinfo(text)


def _parse(f: dataclasses.Field, raw: str, key: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "Path":
            return Path(raw).expanduser()
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is not a valid {kind}") from exc
    return raw


def settings_table(settings: Settings | None = None) -> list[tuple[str, str, str]]:
    """(variable, default-or-current value, description) rows, for docs and the CLI; secrets masked."""
    settings = settings or Settings()
    return [
        (ENV_PREFIX + f.name.upper(), settings.shown(f.name), f.metadata["doc"])
        for f in fields(Settings)
    ]


SETTINGS_PAGE_COMMAND = "make docs"  # = kafscribe settings --markdown > docs/settings.md


def _default_shown(name: str) -> str:
    """A setting's default as the docs show it: the same on every machine (checkout and home as names)."""
    value = shown_value(name, getattr(Settings(), name))
    return value.replace(str(PROJECT_ROOT), "<checkout>").replace(str(Path.home()), "~")


def settings_markdown() -> str:
    """docs/settings.md: every setting, its default and what it does, generated from ``Settings``.

    The descriptions are the fields' docs above; ``kafscribe settings --markdown`` prints this page and
    tests/unit/test_docs.py fails when the committed page differs from it. Defaults go through the same
    masking rule as `kafscribe settings` (no default is a secret, so nothing is hidden today).
    """
    rows = "\n".join(
        f"| `{ENV_PREFIX + f.name.upper()}` | `{_default_shown(f.name)}` | {f.metadata['doc']} |"
        for f in fields(Settings)
    )
    secrets = ", ".join(f"`{f.name.upper()}`" for f in fields(Settings) if is_secret(f.name))
    return f"""# Settings

<!-- Generated from kafscribe/settings.py by `make docs` (`kafscribe settings --markdown > docs/settings.md`).
     Edit the descriptions there, then regenerate; tests/unit/test_docs.py checks this page is current. -->

Every setting is an environment variable, `KAFSCRIBE_` + the name of a field of
`kafscribe.settings.Settings` in upper case. `kafscribe settings` prints the
values the current shell gives, masked: a setting declared secret ({secrets})
shows as `****` + the last 4 characters of long values, and the user and
password of any URL in a value show as `****` (`https://****@host/v1`). An unknown `KAFSCRIBE_*` variable is
refused when a command starts; `KAFSCRIBE_TEST_*` variables steer the test
session ([testing](testing.md)) and are not settings. The defaults run everything on one machine
against the local stack that `make up` starts; `<checkout>` is the directory
of the clone, `~` the user's home.

| variable | default | what it does |
|---|---|---|
{rows}
"""
