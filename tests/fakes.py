"""Stand-ins for things outside kafscribe that cannot run here: an LLM server, a client's webhook, NVML, Kafka.

The first two are real HTTP servers on 127.0.0.1, started by the test, that
record what they receive and answer from a script; ``FakeNVML`` is a
``pynvml`` module answering from a table of GPUs (no GPU is lent here).
``FakeConsumer`` and ``FakeProducer`` are the consume loop's Kafka clients
over an in-memory log (one fake for every loop test): a consumer group of
one whose rebalances, pauses, seeks and committed offsets the test scripts
and reads, and a transactional producer whose calls can fail or never return.
"""

from __future__ import annotations

import json
import threading
import time
import types
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from schemas.events import decode_event


class _Server:
    def __init__(self, handler_cls) -> None:
        self.requests: list[dict] = []
        self.script: deque = deque()
        self.lock = threading.Lock()
        owner = self

        class Handler(handler_cls):
            server_owner = owner

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def next_status(self, default: int = 200) -> int:
        with self.lock:
            return self.script.popleft() if self.script else default

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _LLMHandler(BaseHTTPRequestHandler):
    server_owner: FakeLLM

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server_owner
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status = owner.next_status()
        if status != 200:
            payload = {"error": {"message": f"scripted failure {status}", "type": "test"}}
        else:
            texts = json.loads(body["messages"][-1]["content"])
            target = body["messages"][0]["content"].split("into ")[1].split(".")[0]
            translated = [owner.translate(t, target) for t in texts]
            payload = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                           "content": "```json\n" + json.dumps(translated) + "\n```"}}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeLLM(_Server):
    """An OpenAI-compatible /chat/completions that 'translates' by tagging each segment."""

    def __init__(self) -> None:
        super().__init__(_LLMHandler)

    @staticmethod
    def translate(text: str, target: str) -> str:
        return f"[{target}] {text}"


class _ReceiverHandler(BaseHTTPRequestHandler):
    server_owner: WebhookReceiver

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server_owner
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = owner.next_status()
        owner.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "status": status,
                               "path": self.path, "received_at": time.time()})
        time.sleep(owner.hang.get(self.path, 0.0))  # a receiver that hangs before it answers
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class WebhookReceiver(_Server):
    """A client's webhook endpoint: answers scripted statuses (default 200); ``hang[path]`` seconds late."""

    def __init__(self) -> None:
        super().__init__(_ReceiverHandler)
        self.hang: dict[str, float] = {}

    def for_job(self, job_id: str) -> list[dict]:
        return [r for r in self.requests if json.loads(r["body"])["data"]["job_id"] == job_id]


class FakeNVML(types.ModuleType):
    """A ``pynvml`` module for a GPU-less host: the NVML calls kafscribe makes, answered from a table.

    ``devices`` are dicts with ``uuid``, ``total``, ``free`` and ``procs`` ({pid: bytes}); NVML's
    index is the position. ``driver=False`` makes ``nvmlInit`` fail as it does without a driver.
    Inject it with ``monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(...))``.
    """

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict], driver: bool = True) -> None:
        super().__init__("pynvml")
        self.devices = devices
        self.driver = driver
        self.init_calls = 0

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.init_calls += 1
        if not self.driver:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:  # noqa: N802
        if not 0 <= index < len(self.devices):
            raise self.NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[str, int]:  # noqa: N802
        for i, d in enumerate(self.devices):
            if d["uuid"] == uuid:
                return ("handle", i)
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: tuple[str, int]) -> int:  # noqa: N802
        return handle[1]

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> SimpleNamespace:  # noqa: N802
        d = self.devices[handle[1]]
        return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[str, int]) -> list[SimpleNamespace]:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.devices[handle[1]]["procs"].items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: tuple[str, int]) -> list[SimpleNamespace]:  # noqa: N802
        return []


# --- Kafka: the consume loop's clients -------------------------------------------------------------
class FakeMessage:
    """A consumed message (what ``Consumer.poll`` returns)."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes, key: bytes = b"k",
                 error: KafkaError | None = None) -> None:
        self._t, self._p, self._o, self._v, self._k, self._e = topic, partition, offset, value, key, error

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes:
        return self._k

    def error(self) -> KafkaError | None:
        return self._e

    def timestamp(self) -> tuple[int, int]:
        return (1, int(time.time() * 1000))


class FakeConsumer:
    """A consumer group of one over an in-memory log, recording what the loop asks of it.

    ``log`` holds each partition's messages; ``offsets`` the group's committed offsets (a
    ``FakeProducer`` commits there). The test revokes and assigns partitions through
    ``to_revoke`` / ``to_assign`` (served inside the next ``poll``, as librdkafka does), or
    hands out scripted messages first (``queue``). ``paused``, ``positions`` and ``calls``
    show what the loop did.
    """

    def __init__(self, topic: str, partitions: int = 2, assigned: tuple[int, ...] = ()) -> None:
        self.topic = topic
        self.log: dict[tuple[str, int], list[bytes]] = {(topic, p): [] for p in range(partitions)}
        self.offsets: dict[tuple[str, int], int] = {}
        self.assigned: set[tuple[str, int]] = {(topic, p) for p in assigned}
        self.paused: set[tuple[str, int]] = set()
        self.positions: dict[tuple[str, int], int] = {}
        self.high: dict[tuple[str, int], int] = {}  # high watermarks, where not the log's length
        self.queue: list[FakeMessage] = []
        self.calls: list[tuple] = []
        self.subscribed = False
        self.lock = threading.Lock()
        self.to_revoke: list[tuple[str, int]] = []
        self.to_assign: list[tuple[str, int]] = []
        self.callbacks = None

    def append(self, partition: int, value: bytes) -> None:
        with self.lock:
            self.log[(self.topic, partition)].append(value)

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None) -> None:
        self.subscribed = True
        self.calls.append(("subscribe",))
        self.callbacks = (on_assign, on_revoke, on_lost)
        self.to_assign = list(self.log)

    def unsubscribe(self) -> None:
        self.subscribed = False
        self.calls.append(("unsubscribe",))
        self.to_revoke = sorted(self.assigned)

    def incremental_assign(self, tps) -> None:
        for tp in tps:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.positions[key] = self.offsets.get(key, 0)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(*k) for k in sorted(self.assigned)]

    def pause(self, tps) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}
        self.calls.append(("pause", sorted(tp.partition for tp in tps)))

    def resume(self, tps) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}
        self.calls.append(("resume", sorted(tp.partition for tp in tps)))

    def seek(self, tp) -> None:
        self.calls.append(("seek", tp.partition, tp.offset))
        self.positions[(tp.topic, tp.partition)] = max(0, tp.offset)  # OFFSET_BEGINNING (-2): the start

    def seeks(self) -> list[tuple]:
        return [c for c in self.calls if c[0] == "seek"]

    def committed(self, tps, timeout=None) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.offsets.get((tp.topic, tp.partition), -1001))
                for tp in tps]

    def position(self, tps) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
                for tp in tps]

    def get_watermark_offsets(self, tp, timeout=None, cached=False) -> tuple[int, int]:
        key = (tp.topic, tp.partition)
        return 0, self.high.get(key, len(self.log.get(key, ())))

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def poll(self, timeout: float):
        if self.to_revoke:
            keys, self.to_revoke = self.to_revoke, []
            if self.callbacks is not None:
                self.callbacks[1](self, [TopicPartition(*k) for k in keys])
            self.assigned -= set(keys)
            self.paused -= set(keys)
        if self.to_assign:
            keys, self.to_assign = self.to_assign, []
            tps = [TopicPartition(*k) for k in keys]
            self.callbacks[0](self, tps)
            if not set(keys) <= self.assigned:  # the callback did not assign: the client does (confluent-kafka)
                self.incremental_assign(tps)
        if self.queue:
            return self.queue.pop(0)
        with self.lock:
            for key in sorted(self.assigned - self.paused):
                pos = self.positions.get(key, 0)
                if pos < len(self.log.get(key, ())):
                    self.positions[key] = pos + 1
                    return FakeMessage(key[0], key[1], pos, self.log[key][pos])
        time.sleep(min(timeout, 0.005))
        return None

    def close(self) -> None:
        self.calls.append(("close",))


class FakeProducer:
    """A transactional producer: committed transactions land in ``transactions`` (and the consumer's
    ``offsets``); a call named in ``fail`` raises, one named in ``block`` never returns (until
    ``released``), and ``fail_next_commit`` fails the next commit once."""

    def __init__(self, consumer: FakeConsumer | None = None, fail: dict[str, KafkaException] | None = None,
                 block: set[str] | None = None) -> None:
        self.consumer = consumer
        self.fail = fail or {}
        self.block = block or set()
        self.calls: list[tuple] = []
        self.released = threading.Event()
        self.transactions: list[tuple[list[tuple[str, bytes]], dict]] = []
        self.fail_next_commit = False
        self._open: list | None = None
        self._offsets: dict = {}

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name in self.block:
            self.released.wait(30)  # a librdkafka call that ignores its timeout
        if name in self.fail:
            raise self.fail[name]

    def init_transactions(self, timeout=None) -> None:
        self._call("init_transactions")

    def begin_transaction(self) -> None:
        self._call("begin_transaction")
        self._open, self._offsets = [], {}

    def produce(self, topic, key=None, value=None, **kwargs) -> None:
        self.calls.append(("produce", topic))
        self._open.append((topic, value))

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None) -> None:
        self._call("send_offsets_to_transaction", [(tp.partition, tp.offset) for tp in offsets])
        self._offsets = {(tp.topic, tp.partition): tp.offset for tp in offsets}

    def commit_transaction(self, timeout=None) -> None:
        self._call("commit_transaction")
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "scripted commit failure"))
        self.transactions.append((self._open, self._offsets))
        if self.consumer is not None:
            self.consumer.offsets.update(self._offsets)
        self._open = None

    def abort_transaction(self, timeout=None) -> None:
        self._call("abort_transaction")
        self._open = None

    def purge(self) -> None:
        self.calls.append(("purge",))

    def flush(self, timeout=None) -> int:
        return 0

    def poll(self, timeout=None) -> int:
        return 0

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def outputs(self) -> list[str]:
        """Job ids of every committed output, in commit order."""
        return [decode_event(v).job_id for txn, _ in self.transactions for _, v in txn]


def kafka_error(code: int, *, fatal: bool = False, abortable: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, "test", fatal=fatal, txn_requires_abort=abortable))
