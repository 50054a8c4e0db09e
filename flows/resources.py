"""What a flow run's process shares: its settings and one database engine, built once.

`axiom flows serve` (a Prefect Runner) starts every flow run in its own subprocess, so "once
per process" is once per run: the flow resolves settings() at its top and hands them down,
and its tasks, the checkpoint and the checkpoint's background threads (Slack announcer,
expiry timer) all share engine_for(settings) — one connection pool, not one per task. Tests
run flows in threads of one process, each on its own database: forget() between them.
"""

from __future__ import annotations

import functools
import threading

from sqlalchemy import Engine

from config.settings import Settings, load_settings
from models.db import make_engine

_lock = threading.Lock()
_engines: dict[str, Engine] = {}  # by database URL: a process may serve more than one home


@functools.cache
def settings() -> Settings:
    """This process's settings, read from the environment and axiom.toml once."""
    return load_settings()


def engine_for(settings: Settings) -> Engine:
    """The process's engine for these settings' database, made on first use."""
    with _lock:
        engine = _engines.get(settings.db_url)
        if engine is None:
            engine = _engines[settings.db_url] = make_engine(settings.db_url)
        return engine


def forget() -> None:
    """Drop the cached settings and dispose of every engine (tests; a process shutting down)."""
    settings.cache_clear()
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()
