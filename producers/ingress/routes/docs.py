"""GET /openapi.json (OpenAPI 3 of every route) and GET /docs (Swagger UI, served offline).

Each route module describes its own routes in ``OPENAPI_PATHS`` (an OpenAPI
``paths`` fragment); ``setup`` assembles the fragments of the modules the app
registers. Swagger UI's assets come from the ``swagger-ui-bundle`` package and
are served here (``/docs/assets/{name}``): no CDN, so ``/docs`` works on a
machine without internet. ``/docs`` and ``/openapi.json`` need no key;
Swagger UI's "Authorize" takes the API key for "Try it out".
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from kafscribe.statuses import STATUSES

from ..responses import json_response

SPEC = web.AppKey("openapi", dict)
ASSETS = {  # name -> content type: the only files served from the package
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui-standalone-preset.js": "application/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>kafscribe API</title>
  <link rel="stylesheet" type="text/css" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png" sizes="32x32">
  <style>body { margin: 0 } .topbar { display: none }</style>
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="/docs/assets/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout", validatorUrl: null,
    });
  </script>
</body>
</html>
"""

ERROR = {"$ref": "#/components/responses/Error"}
OPEN = []  # `security: OPEN` marks a route that needs no key

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "An API key (`kafscribe keys create`), sent as `Authorization: Bearer KEY`."},
    },
    "responses": {
        "Error": {"description": "Refused: `{\"error\": reason, \"status\": code}`",
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        "OpenAIError": {
            "description": "Refused, in OpenAI's error shape (504: the job goes on; `job_id` and `links` say where)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
        },
    },
    "parameters": {
        "JobId": {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": "The id `POST /v1/jobs` answered with"},
    },
    "schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
        "OpenAIError": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
            "code": {"type": "string", "nullable": True}, "job_id": {"type": "string"},
            "links": {"$ref": "#/components/schemas/Links"}}}}},
        "Links": {"type": "object", "properties": {"self": {"type": "string"}, "transcript": {"type": "string"}}},
        "Segment": {"type": "object", "properties": {
            "id": {"type": "integer"}, "start": {"type": "number"}, "end": {"type": "number"},
            "text": {"type": "string"}, "avg_logprob": {"type": "number"}, "no_speech_prob": {"type": "number"}}},
        "Job": {"type": "object", "properties": {
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "tenant": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"}, "attempts": {"type": "integer"},
            "worker_id": {"type": "string", "nullable": True}, "error": {"type": "string", "nullable": True},
            "options": {"type": "object"}, "audio": {"type": "object"},
            "result": {"type": "object", "description": "when completed", "properties": {
                "language": {"type": "string"}, "language_probability": {"type": "number"},
                "duration": {"type": "number"}, "text": {"type": "string"},
                "segments": {"type": "array", "items": {"$ref": "#/components/schemas/Segment"}},
                "engine": {"type": "string"}, "model": {"type": "string"}, "translation": {"type": "object"}}},
            "links": {"$ref": "#/components/schemas/Links"}}},
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    "/openapi.json": {"get": {"tags": ["docs"], "summary": "This OpenAPI description", "security": OPEN,
                              "responses": {"200": {"description": "OpenAPI 3 JSON"}}}},
    "/docs": {"get": {"tags": ["docs"], "summary": "Swagger UI (served offline)", "security": OPEN,
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
    "/docs/assets/{name}": {"get": {
        "tags": ["docs"], "summary": "Swagger UI's files (from the swagger-ui-bundle package)", "security": OPEN,
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": sorted(ASSETS)}}],
        "responses": {"200": {"description": "the file"}, "404": {"description": "not one of Swagger UI's files"}},
    }},
}


def build_spec(modules: list[ModuleType], app: web.Application | None = None) -> dict[str, Any]:
    """The OpenAPI document: every module's ``OPENAPI_PATHS`` merged (a path may have methods in several)."""
    paths: dict[str, dict[str, Any]] = {}
    for module in modules:
        for path, ops in getattr(module, "OPENAPI_PATHS", {}).items():
            for method, op in ops.items():
                if method in paths.get(path, {}):
                    raise ValueError(f"{method.upper()} {path} is described twice ({module.__name__})")
                paths.setdefault(path, {})[method] = copy.deepcopy(op)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kafscribe",
            "version": "1",
            "description": "Speech to text and translation on a Kafka pipeline. Every `/v1/*` route needs "
                           "`Authorization: Bearer KEY`; another tenant's job answers 404. The OpenAI-compatible "
                           "`/v1/audio/*` routes answer in OpenAI's shapes.",
        },
        "security": [{"bearer": []}],
        "tags": [{"name": "jobs"}, {"name": "openai"}, {"name": "callbacks"}, {"name": "operations"},
                 {"name": "docs"}],
        "paths": dict(sorted(paths.items())),
        "components": COMPONENTS,
    }


def setup(app: web.Application, modules: list[ModuleType]) -> None:
    """Register /openapi.json, /docs and its assets, describing the routes of ``modules``."""
    app[SPEC] = build_spec(modules)
    app.router.add_route("GET", "/openapi.json", openapi_json)
    app.router.add_route("GET", "/docs", docs_page)
    app.router.add_route("GET", "/docs/assets/{name}", asset)


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[SPEC])


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8")


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound(text='{"error": "no such file", "status": 404}', content_type="application/json")
    return web.FileResponse(Path(str(swagger_ui_path)) / name, headers={
        "Content-Type": ASSETS[name], "Cache-Control": "public, max-age=86400"})
