"""The README stays true: every setting and every HTTP route is documented."""

from __future__ import annotations

from kafscribe.settings import PROJECT_ROOT, settings_table

README = (PROJECT_ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    missing = [var for var, _, _ in settings_table() if f"`{var}`" not in README]
    assert missing == []


def test_every_route_is_documented():
    from kafscribe.settings import Settings
    from producers.ingress import build_app
    from producers.ingress.appkeys import BACKENDS

    app = build_app(Settings())
    for resource in app.router.resources():
        path = resource.canonical
        assert path in README, path
    app[BACKENDS].close()

