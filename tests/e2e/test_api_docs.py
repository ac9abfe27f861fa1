"""OpenAPI at /openapi.json, Swagger UI at /docs (offline, rendered by a real headless Chromium), docs/api.md's table."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench.harness import free_port
from kafscribe.settings import PROJECT_ROOT
from producers.ingress import build_app
from producers.ingress.appkeys import BACKENDS
from producers.ingress.routes.docs import SPEC, build_spec
from tests.conftest import base_test_settings

METHODS = {"get", "post", "put", "patch", "delete"}


def spec_operations(spec: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops if m in METHODS}


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


@pytest.fixture(scope="module")
def app() -> Iterator[web.Application]:
    application = build_app(base_test_settings())
    yield application
    application[BACKENDS].close()


def test_every_route_is_described_and_every_description_is_a_route(app):
    spec = app[SPEC]
    assert app_routes(app) == spec_operations(spec)
    assert spec["openapi"].startswith("3.")
    for path, ops in spec["paths"].items():
        declared = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            assert op.get("responses"), (method, path)
            names = {p.get("name") or p["$ref"].rsplit("/", 1)[-1] for p in op.get("parameters", [])
                     if p.get("in", "path") == "path" or "$ref" in p}
            names = {"job_id" if n == "JobId" else n for n in names}
            assert declared <= names, (method, path, declared, names)


def test_refs_resolve(app):
    spec = app[SPEC]
    refs = set(re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(spec)))
    for ref in refs:
        node = spec
        for part in ref.split("/"):
            node = node[part]  # KeyError: a dangling $ref


def test_a_path_described_twice_is_refused():
    class A:
        OPENAPI_PATHS = {"/x": {"get": {"responses": {}}}}

    with pytest.raises(ValueError, match="described twice"):
        build_spec([A, A])


def api_page_table() -> set[tuple[str, str]]:
    page = (PROJECT_ROOT / "docs" / "api.md").read_text()
    section = page.split("## Endpoints", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^` ?]*)[^`]*` \|", section, re.M)
    return set(rows)


def test_api_page_table_matches_openapi(app):
    assert api_page_table() == spec_operations(app[SPEC])


@pytest.fixture(scope="module")
def served(app) -> Iterator[str]:
    """The app on a real port, in a thread (no Kafka/Cassandra needed for the docs)."""
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_docs_assets_are_served_locally_and_nothing_else(served):
    page = urllib.request.urlopen(f"{served}/docs", timeout=10).read().decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("/docs/assets/") for s in sources), sources  # no CDN
    for source in sources:
        assert urllib.request.urlopen(served + source, timeout=10).status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{served}/docs/assets/..%2Fsettings.py", timeout=10)
    assert err.value.code == 404
    spec = json.loads(urllib.request.urlopen(f"{served}/openapi.json", timeout=10).read())
    assert "/v1/audio/transcriptions" in spec["paths"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_docs_render_every_operation_in_headless_chromium(served, app, tmp_path):
    assert CHROMIUM, "the Debian package chromium is needed (make system-deps installs it)"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", f"{served}/docs"],
        capture_output=True, text=True, timeout=120,
    ).stdout
    rendered = set(re.findall(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom))
    assert rendered == spec_operations(app[SPEC]), dom[-2000:]
    assert "kafscribe" in dom  # the title block rendered from info
