"""The README is the front page and docs/ the manual; both stay true.

Every setting is on docs/settings.md, every HTTP route on docs/api.md, the README's commands exist,
every relative link (and its #anchor) resolves, and every docs page is reachable from the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kafscribe.settings import PROJECT_ROOT, settings_table

README_PATH = PROJECT_ROOT / "README.md"
README = README_PATH.read_text()
DOCS = PROJECT_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 250


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= README_MAX_LINES, "the manual belongs in docs/: keep README.md a front page"


def test_every_setting_is_on_the_settings_page():
    page = (DOCS / "settings.md").read_text()
    missing = [var for var, _, _ in settings_table() if f"`{var}`" not in page]
    assert missing == []


def test_every_route_is_documented_on_the_api_page():
    from kafscribe.settings import Settings
    from producers.ingress import build_app
    from producers.ingress.appkeys import BACKENDS

    page = (DOCS / "api.md").read_text()
    app = build_app(Settings())
    try:
        missing = [r.canonical for r in app.router.resources() if r.canonical not in page]
    finally:
        app[BACKENDS].close()
    assert missing == []


def test_the_readme_shows_setup_and_the_first_job_four_ways():
    for text in (
        "make up", "make test", "make test-fast",
        "kafscribe submit clip.wav --wait",  # the CLI
        "curl -H \"$H\" -F file=@clip.wav localhost:8000/v1/jobs",  # curl
        "from openai import OpenAI", "client.audio.transcriptions.create(",  # the OpenAI SDK
        "from producers.client import submit", "kafscribe.uploads",  # a direct producer
    ):
        assert text in README, text


def test_make_targets_named_in_the_docs_exist():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {t for page in [README_PATH, *PAGES] for t in re.findall(r"`make ([\w-]+)", page.read_text())}
    assert named and named <= targets, named - targets


def test_the_concern_table_names_enough_modules():
    table = README.split("## Where each concern lives", 1)[1].split("\n## ", 1)[0]
    assert len(set(re.findall(r"`((?:kafscribe|producers|consumers|infra|schemas)/[\w./*-]*)`", table))) > 20


def test_every_repository_path_named_in_the_docs_exists():
    named = {p for page in [README_PATH, *PAGES] for p in re.findall(
        r"`((?:kafscribe|producers|consumers|infra|schemas|tests|bench)/[\w./*-]*)", page.read_text())}
    assert len(named) > 50
    missing = sorted(p for p in named
                     if not (any(PROJECT_ROOT.glob(p)) if "*" in p else (PROJECT_ROOT / p).exists()))
    assert missing == []


# --- links -----------------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """A page without its fenced code blocks (a `# comment` in a shell block is not a heading)."""
    return FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", [README_PATH, *PAGES], ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.relative_to(PROJECT_ROOT)}")
    assert broken == []


def test_every_docs_page_and_picture_is_linked():
    readme_targets = {(PROJECT_ROOT / t.partition("#")[0]).resolve() for t in relative_links(README_PATH)}
    assert [p.name for p in PAGES if p.resolve() not in readme_targets] == [], "link every page from the README"
    linked_anywhere = {(page.parent / t.partition("#")[0]).resolve()
                       for page in [README_PATH, *PAGES] for t in relative_links(page)}
    pictures = sorted(DOCS.glob("*.png"))
    assert pictures and [p.name for p in pictures if p.resolve() not in linked_anywhere] == []
