"""Stand-ins for things outside kafscribe that cannot run here: an LLM server, a client's webhook, NVML.

The first two are real HTTP servers on 127.0.0.1, started by the test, that
record what they receive and answer from a script; ``FakeNVML`` is a
``pynvml`` module answering from a table of GPUs (no GPU is lent here).
"""

from __future__ import annotations

import json
import threading
import time
import types
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace


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
