"""`axiom control`: the control plane's HTTP process — Slack's interactivity endpoint, health, metrics.

Its own process, not a thread beside the Prefect runner in `axiom flows serve`: a Slack click
is recorded in the database even while the Prefect server or the runner is down (the row is
the record; the run is woken later by the resume retries or the expiry timer), so the endpoint
must not live or die with the runner; its /healthz then means exactly "the endpoint answers
and reaches the database"; it starts in a second without Prefect, so tests drive it alone;
and its memory and worker threads are its own, shared with neither the relay (which no longer
imports the control plane at all) nor Prefect's. The cost is one more small process, which
`axiom up` supervises like the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import Settings, split_host_port
from models.db import make_engine
from notifications.interactivity import SlackInteractivity, routes

log = logging.getLogger("axiom.control")

READY = "axiom control ready"
# Slack sends a click at a time; more open connections than this is a flood, answered 503 by
# uvicorn before any of it reaches the application.
MAX_CONNECTIONS = 100


def build_app(
    settings: Settings, engine: Engine, registry: CollectorRegistry = REGISTRY
) -> tuple[Starlette, SlackInteractivity]:
    """The control process's routes: POST /slack/interactivity, GET /healthz, GET /metrics."""
    slack_routes, interactivity = routes(settings, engine, registry)

    async def healthz(_: Request) -> Response:
        details = {
            "slack_interactivity": "on"
            if interactivity.verifier
            else "off: AXIOM_SLACK_SIGNING_SECRET is not set"
        }
        try:
            await asyncio.to_thread(_ping, engine)
        except Exception as exc:
            return JSONResponse({"ok": False, "database": str(exc).splitlines()[0], **details}, 503)
        return JSONResponse({"ok": True, "database": "ok", **details})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics), *slack_routes])
    return app, interactivity


async def serve(settings: Settings) -> None:
    import uvicorn

    engine = make_engine(settings.db_url)
    app, interactivity = build_app(settings, engine)
    host, port = split_host_port(settings.control_listen)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=5,
        )
    )
    server.install_signal_handlers = lambda: None  # we own the signals
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            raise OSError(f"AXIOM_CONTROL_LISTEN {settings.control_listen}: cannot listen")
        await asyncio.sleep(0.01)
    print(f"{READY} pid={os.getpid()} http://{settings.control_listen}", flush=True)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    server.should_exit = True
    await serving
    await interactivity.drain()  # answers already acknowledged to Slack are finished
    engine.dispose()


def run(settings: Settings) -> None:
    """Entry point of `axiom control`."""
    asyncio.run(serve(settings))


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
