"""The ingress app's shared state, under typed keys.

aiohttp warns about string keys (``NotAppKeyWarning``: two modules may pick
the same string, and the value's type is lost); a ``web.AppKey`` is unique
and typed. Every route module reads the settings and the backends through
these. State private to one module keeps its key there (``auth.GATE``,
``routes.docs.SPEC``).
"""

from __future__ import annotations

from aiohttp import web

from kafscribe.settings import Settings

from .backends import Backends

SETTINGS = web.AppKey("settings", Settings)
BACKENDS = web.AppKey("backends", Backends)
