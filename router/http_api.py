"""The router's HTTP API (aiohttp): health and metrics; OpenAI-compatible routes are added here."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from router.frontend import Frontend


def build_http_app(frontend: Frontend, model_dir: Path | None, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)

    async def health(request: web.Request) -> web.Response:
        models = frontend.model_names()
        return web.json_response({"status": "ok" if models else "no_workers", "models": models},
                                 status=200 if models else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=frontend.router.metrics.render(), content_type="text/plain")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
