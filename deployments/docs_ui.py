"""The API's interactive docs, loading nothing from outside: Swagger UI at `/docs` and ReDoc at `/redoc`, their
script, style sheet and icon served at `/docs/assets/` from the fastapi-offline wheel. FastAPI's own pages fetch them
from a CDN, which an offline cluster cannot reach; Swagger UI 5 is needed for FastAPI's OpenAPI 3.1 (4.x refuses to
render it). The pages' URLs carry the Serve route prefix (the request's `root_path`), as `/openapi.json`'s `servers`
does, so "Try it out" calls the app where it is deployed.

The pages, their files and the schema hold no data: they load without an API key (`PUBLIC_PATHS`). The schema
declares the key as a bearer scheme, optional because only a server with keys configured asks for one, so Swagger UI
offers "Authorize" and sends the key with each request it makes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

ASSETS_URL = "/docs/assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "redoc.standalone.js")  # what the two pages load
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          *(f"{ASSETS_URL}/{name}" for name in ASSETS)})
BEARER = "bearerAuth"
BEARER_SCHEME = {"type": "http", "scheme": "bearer", "description": (
    "An API key of this server, as `Authorization: Bearer <key>`. Only a server with API keys configured asks for one "
    "(401 without it); the probes (/health, /readyz) never do.")}


def docs_app(**kwargs: Any) -> FastAPI:
    """A FastAPI app with the offline `/docs` and `/redoc`, and the bearer scheme in its schema."""
    app = FastAPIOffline(static_url=ASSETS_URL, **kwargs)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # cached in app.openapi_schema: completed once, here
            schema.setdefault("components", {})["securitySchemes"] = {BEARER: BEARER_SCHEME}
            schema["security"] = [{BEARER: []}, {}]  # the key, or none where the server has no keys
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's way to extend its schema: the app's `openapi` method, replaced
    return app
