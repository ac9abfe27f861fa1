"""The manual in docs/ stays true: the settings page is generated, the API page matches /openapi.json,
and no ticket numbers stand in for explanations anywhere in the repository."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kafscribe.settings import PROJECT_ROOT, SETTINGS_PAGE_COMMAND, Settings, settings_markdown

DOCS = PROJECT_ROOT / "docs"
API_PAGE = DOCS / "api.md"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_settings_page_is_what_the_generator_writes():
    committed = (DOCS / "settings.md").read_text()
    assert committed == settings_markdown(), (
        f"docs/settings.md is out of date with kafscribe/settings.py: regenerate it with `{SETTINGS_PAGE_COMMAND}`"
        " (or `.venv/bin/kafscribe settings --markdown > docs/settings.md`) and commit the result"
    )


def test_settings_page_shows_every_setting_and_no_machine_paths():
    page = settings_markdown()
    rows = re.findall(r"^\| `(KAFSCRIBE_\w+)` \| `([^`]*)` \|", page, re.M)
    assert [var for var, _ in rows] == ["KAFSCRIBE_" + name.upper() for name in Settings.__dataclass_fields__]
    assert str(PROJECT_ROOT) not in page and str(Path.home()) not in page
    assert dict(rows)["KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S"] == "86400.0"  # defaults are never masked


# --- docs/api.md against the OpenAPI document ---------------------------------------------------------


@pytest.fixture(scope="module")
def openapi() -> Iterator[dict]:
    """The ingress app's /openapi.json, built as the ingress builds it (no server is contacted)."""
    from producers.ingress import build_app
    from producers.ingress.appkeys import BACKENDS
    from producers.ingress.routes.docs import SPEC

    app = build_app(Settings())
    try:
        yield app[SPEC]
    finally:
        app[BACKENDS].close()


def spec_operations(spec: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops if m.upper() in METHODS}


def api_table(page: str) -> set[tuple[str, str]]:
    """The endpoints of the reference table: rows that start with `METHOD /path`."""
    return set(re.findall(rf"^\| `({'|'.join(METHODS)}) (/[^` ?]*)[^`]*` \|", page, re.M))


def shape(path: str) -> str:
    """A path with its parameters unnamed (`/v1/jobs/{id}` and `/v1/jobs/{job_id}` are one endpoint)."""
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/.,:;)"))


def test_every_openapi_operation_is_in_the_api_page_and_every_row_is_an_operation(openapi):
    documented = api_table(API_PAGE.read_text())
    described = spec_operations(openapi)
    assert described - documented == set(), "in /openapi.json but not in docs/api.md's table"
    assert documented - described == set(), "in docs/api.md's table but not an endpoint of /openapi.json"


def test_every_endpoint_named_in_the_docs_exists(openapi):
    """Prose too: `GET /v1/jobs/{id}` anywhere in README.md or docs/*.md names a real operation."""
    known = {(method, shape(path)) for method, path in spec_operations(openapi)}
    wrong = []
    for page in [PROJECT_ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for method, path in re.findall(rf"`({'|'.join(METHODS)}) (/[^\s`?]*)", page.read_text()):
            if path.endswith("/*"):  # `POST /v1/audio/*`: some operation under that prefix
                if not any(m == method and p.startswith(shape(path[:-1])) for m, p in known):
                    wrong.append(f"{page.relative_to(PROJECT_ROOT)}: {method} {path}")
            elif (method, shape(path)) not in known:
                wrong.append(f"{page.relative_to(PROJECT_ROOT)}: {method} {path}")
    assert wrong == []


# --- no ticket numbers ------------------------------------------------------------------------------

ISSUE = re.compile(r"issue #?\d+", re.I)
CHECKED_SUFFIXES = {".py", ".toml", ".yml", ".yaml", ".cql", ".avsc", ".md"}
SKIPPED_DIRS = {".venv", ".git", ".kafscribe", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}


def checked_files() -> Iterator[Path]:
    for root, dirs, files in os.walk(PROJECT_ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if Path(name).suffix in CHECKED_SUFFIXES:
                yield Path(root) / name


def test_no_issue_numbers_in_docs_code_or_schemas():
    """Say what and why, not which ticket: a reader of the repository cannot follow a ticket number."""
    files = list(checked_files())
    assert PROJECT_ROOT / "README.md" in files and DOCS / "api.md" in files
    hits = [
        f"{path.relative_to(PROJECT_ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert hits == []
