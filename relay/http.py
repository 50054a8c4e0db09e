"""The relay's HTTP endpoint: liveness and Prometheus metrics, nothing else.

The Slack interactivity endpoint is the control plane's (axiom/control.py): the data plane
answers no Slack click and resumes no Prefect run.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def build_app(health) -> Starlette:
    """health: a callable returning (ok, details) — e.g. can the spool database be reached."""

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

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics)])
