"""Flow runs forked from a preloaded server, not spawned afresh: our one change to Prefect.

Prefect's runner starts each run of a served deployment with
prefect.flow_engine.run_flow_in_subprocess, which asks multiprocessing for its "spawn" context:
every run is a new interpreter that imports Prefect, SQLAlchemy, the models and our flows
before it reads its flow run. That was about 3 s of CPU and 4 s of wall time a run on the
2-core machine (process accounting of the triage test: 10 runs, 32 of its 95 CPU seconds),
and the Protocol runs its procedures every few minutes.

install() hands that function multiprocessing's "forkserver" context instead, with those
imports preloaded: the server (one process, started from this one's executable) imports
Prefect's engine and the served flows' modules once, before any run exists and before any thread
does, and each run is a fork of it. What each run receives does not change: Prefect sends
the whole environment, its settings and the pickled flow call with the process (it rebuilds
its settings from them in the child, as after a spawn), the run's process id is its own, so
the runner's cancellation (SIGTERM, then SIGKILL to that id) and its wait for the exit code
work as before, and the server leaves with the process that started it.

A run receives its flow pickled, and cloudpickle sends a flow's function by value when the
module's attribute of that name is the Flow rather than the function, as it is for every
@flow: the function's copy then has none of its module's names, and Prefect, resolving the
parameters' string annotations (`from __future__ import annotations`) to validate them,
fails with "`…FlowModel` is not fully defined; you should define `Literal`". So install()
also makes a flow that is a module's attribute pickle as that name: the run finds it in the
module the server preloaded, with its whole module around it.

Installed only by `axiom flows serve` (axiom/cli/processes.py), after a check that the
installed Prefect is a version this was tested with. tests/unit/test_flow_runs.py checks that
Prefect still asks for the context by that name, and that a served run is a forked one.
"""

from __future__ import annotations

import copyreg
import importlib
import multiprocessing
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

DISTRIBUTION = "prefect"
TESTED = ">=3.9.1,<3.10"  # flow_engine.run_flow_in_subprocess: get_context("spawn")
# What the server imports before it forks a run, besides the served flows' own modules (and,
# through them, every service, model and runbook a run uses): the engine that runs it.
ENGINE = ["prefect.flow_engine"]


class FlowRunsVersionError(RuntimeError):
    """The installed Prefect is not a version this module was tested with."""


class _Multiprocessing:
    """multiprocessing as prefect.flow_engine sees it once installed: every name is the
    module's own, except that the "spawn" context it asks for is the forkserver."""

    def __init__(self, context: multiprocessing.context.BaseContext):
        self._context = context

    def get_context(self, method: str | None = None) -> Any:
        if method == "spawn":
            return self._context
        return multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def flow_by_name(module: str, name: str) -> Any:
    """A module's flow, as the run's process unpickles it (the server preloaded the module)."""
    return getattr(importlib.import_module(module), name)


def _reduce_flow(flow: Any) -> tuple:
    fn = flow.fn
    if getattr(sys.modules.get(fn.__module__), fn.__name__, None) is flow:
        return flow_by_name, (fn.__module__, fn.__name__)
    return object.__reduce_ex__(flow, 2)  # a flow made elsewhere: pickled as Prefect would


def _flow_class() -> type:
    from prefect import Flow

    return Flow


def _engine():
    import prefect.flow_engine

    return prefect.flow_engine


def check_version() -> None:
    from packaging.specifiers import SpecifierSet

    version = metadata.version(DISTRIBUTION)
    if not SpecifierSet(TESTED).contains(version, prereleases=True):
        raise FlowRunsVersionError(
            f"prefect {version} is not a version axiom/flow_runs.py was tested with ({TESTED})"
        )


def install(flows: Iterable[Any] = ()) -> None:
    """Check Prefect's version, then point its flow runs at a forkserver that has imported
    the modules of `flows` (the served ones) and Prefect's engine, started now so that the
    first run is as quick as the others. Idempotent."""
    check_version()
    engine = _engine()
    if installed():
        return
    context = multiprocessing.get_context("forkserver")
    modules = sorted({f.fn.__module__ for f in flows})
    context.set_forkserver_preload([*ENGINE, *modules])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    copyreg.pickle(_flow_class(), _reduce_flow)
    engine.multiprocessing = _Multiprocessing(context)


def uninstall() -> None:
    """Prefect as published again (tests that installed in their own process)."""
    _engine().multiprocessing = multiprocessing
    copyreg.dispatch_table.pop(_flow_class(), None)


def installed() -> bool:
    return (
        isinstance(_engine().multiprocessing, _Multiprocessing)
        and copyreg.dispatch_table.get(_flow_class()) is _reduce_flow
    )


def install_or_exit(flows: Iterable[Any] = ()) -> None:
    """install() for the process's entry point: a version mismatch is one line on stderr and
    exit status 1, not a traceback."""
    try:
        install(flows)
    except FlowRunsVersionError as exc:
        raise SystemExit(f"error: {exc}") from None
