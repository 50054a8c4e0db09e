"""The relay's HTTP endpoint: liveness, Prometheus metrics, and routes others plug in.

The relay knows nothing of what is plugged in (Slack interactivity: notifications/); it
serves whatever `routes` the composition root hands it, next to its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route


def build_app(health, routes: Sequence[BaseRoute] = ()) -> Starlette:
    """health: a callable returning (ok, details) — e.g. can the spool database be reached.

    routes: extra endpoints, e.g. notifications.interactivity.routes() for POST
    /slack/interactivity; they run on the relay's event loop and must not block it.
    """

    async def healthz(_: Request) -> Response:
        ok, details = await health()
        return JSONResponse({"ok": ok, **details}, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            body = generate_latest(registry)
        else:
            from prometheus_client import REGISTRY

            body = generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics), *routes])
