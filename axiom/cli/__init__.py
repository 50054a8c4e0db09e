"""The `axiom` command, one module per noun; each module registers its commands on `app`.

The commands parse, call a service in protocol/ (or start a process), and render: tables for
people, --json for scripts.
"""

from __future__ import annotations

from axiom.cli import (  # noqa: F401  (imported for the commands they register)
    approvals,
    audit,
    blocklist,
    dmarc,
    domain_check,
    domains,
    egress,
    incidents,
    procedures,
    processes,
    queue,
    runbooks,
    signals,
    tenants,
    warmup,
)
from axiom.cli.app import app
from sandbox.cli import sandbox_app

app.add_typer(sandbox_app, name="sandbox")

__all__ = ["app", "main"]


def main() -> None:
    app()
