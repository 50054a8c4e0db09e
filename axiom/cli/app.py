"""The `axiom` application and what every command shares: settings, the home, errors, output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlmodel import Session

from axiom.cli.home import HomeMissing, require_home
from config.settings import ConfigError, Settings, load_settings
from models.db import make_engine, session_scope
from models.sandbox_clock import clock_for
from protocol.errors import ServiceError
from protocol.listing import Page

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Axiom Send: an SMTP relay run under a Protocol.",
)

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many rows.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def engine(s: Settings | None = None) -> Engine:
    """The database of an initialised home; refuses (exit 2) rather than create one by reading."""
    s = s or settings()
    try:
        require_home(s)
    except HomeMissing as exc:
        raise fail(str(exc), 2) from None
    return make_engine(s.db_url)


@contextmanager
def admin() -> Iterator[Session]:
    """One operator action in one transaction; a ServiceError becomes a one-line error."""
    try:
        with session_scope(engine()) as session:
            yield session
            session.commit()
    except ServiceError as exc:
        raise fail(str(exc)) from None


@contextmanager
def reading() -> Iterator[Session]:
    """A read-only look at the database; a ServiceError becomes a one-line error."""
    try:
        with session_scope(engine()) as session:
            yield session
    except ServiceError as exc:
        raise fail(str(exc)) from None


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def say_if_cut(page: Page, noun: str, json_output: bool) -> None:
    """A cut listing says so: on stdout under a table, on stderr beside JSON (whose shape, a
    list, scripts already read)."""
    if not page.truncated:
        return
    line = f"showing {len(page.items):,} of {page.total:,} {noun}; --limit N for more"
    (err if json_output else out).print(line, highlight=False, soft_wrap=True)


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def clock_now() -> datetime:
    """The Protocol's time: the sandbox clock (with its offset) in sandbox, else the system's."""
    s = settings()
    return clock_for(s.environment, engine(s)).now()
