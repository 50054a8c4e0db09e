"""The long-running processes and set-up: init, keygen, relay, deliver, up, flows serve.

The relay, Prefect and the flows are imported inside their commands on purpose: Prefect takes
over a second to import, and prometheus_client must not load before the relay has set
PROMETHEUS_MULTIPROC_DIR; neither cost belongs to `axiom queue`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import typer

from axiom.cli.app import app, engine, fail, out, redact, settings
from axiom.setup import initialise
from config.settings import ConfigError, Settings
from relay.submission.keystore import KeyBox

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


@app.command()
def init() -> None:
    """Create AXIOM_HOME, the secret key, a sandbox TLS certificate and the database schema."""
    s = settings()
    try:
        initialise(s, say=lambda line: out.print(line, highlight=False))
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"database ready: {redact(s.db_url)}")


@app.command()
def keygen() -> None:
    """Print a new AXIOM_SECRET_KEY."""
    sys.stdout.write(KeyBox.generate().decode() + "\n")


@app.command()
def relay() -> None:
    """Run the relay: submission listeners, spool writer and the HTTP endpoint."""
    s = settings()
    if s.secret_key:  # a bad AXIOM_SECRET_KEY is named first, even before a missing home
        _check_secret_key(s)
    engine(s).dispose()  # an uninitialised home is one line here, not a traceback at start
    _check_secret_key(s)  # the key file `axiom init` wrote, now that the home exists
    metrics_dir = s.home / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before prometheus_client loads
    from relay.service import configure_logging, run

    configure_logging()

    try:
        run(s)
    except OSError as exc:
        raise fail(f"cannot listen: {exc}", 2) from None


@app.command()
def control() -> None:
    """Run the control plane's HTTP endpoint: Slack interactivity, /healthz, /metrics."""
    s = settings()
    engine(s).dispose()  # an uninitialised home is one line here, not a traceback at start
    # Its counters are its own, never files in the relay's multiprocess metrics directory.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from axiom.control import run

    try:
        run(s)
    except OSError as exc:
        raise fail(f"cannot listen: {exc}", 2) from None


@app.command()
def deliver() -> None:
    """Run only the delivery engine (no listeners): more delivery processes on one spool."""
    s = settings()
    engine(s).dispose()
    from relay.service import configure_logging, deliver_only, run_event_loop

    configure_logging()

    run_event_loop(s, deliver_only(s))


@app.command()
def up() -> None:
    """Run the whole product: Prefect server + UI, sandbox world, relay, served flows."""
    from axiom.up import StartupError, run

    s = settings()
    try:
        code = run(s, out)
    except StartupError as exc:
        raise fail(str(exc), 1) from None
    raise typer.Exit(code)


flows_app = typer.Typer(no_args_is_help=True, help="The Protocol's Prefect flows.")
app.add_typer(flows_app, name="flows")


@flows_app.command("serve")
def flows_serve() -> None:
    """Register every runbook's deployment with Prefect and run them (what `axiom up` starts)."""
    serve_flows()


def serve_flows(extra: Sequence[tuple[Any, str]] = ()) -> None:
    """Serve every runbook's procedure, and `extra` (flow, deployment name) pairs beside them
    (tests/integration/turn_flows.py adds its own), until the process is stopped."""
    import asyncio

    from prefect.runner import Runner

    from axiom import flow_runs
    from flows.registry import procedures

    served = procedures()
    # each run forked from a server that has imported these flows (axiom/flow_runs.py)
    flow_runs.install_or_exit([*(p.flow for p in served), *(flow for flow, _ in extra)])
    runner = Runner(pause_on_shutdown=False)
    for procedure in served:
        # add_flow, not add_deployment: the same deployment (flows/deployments.py), and the
        # runner keeps the flow in memory, so a run starts from it (run_flow_in_subprocess)
        # instead of `python -m prefect.engine` importing everything again.
        runner.add_flow(procedure.flow, **procedure.options())
    for flow, name in extra:
        runner.add_flow(flow, name=name)
    names = ", ".join([p.name for p in served] + [name for _, name in extra]) or "none"
    sys.stdout.write(f"flows ready: {len(served) + len(extra)} deployment(s): {names}\n")
    sys.stdout.flush()
    asyncio.run(runner.start())


def _check_secret_key(s: Settings) -> None:
    """A bad secret key is one line and exit 2 here, not a traceback once the relay starts."""
    try:
        KeyBox(s.load_secret_key())
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), 2) from None
