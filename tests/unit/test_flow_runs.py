"""axiom/flow_runs.py: Prefect's flow runs forked from a preloaded server instead of spawned.

The run test drives Prefect's own run_flow_in_subprocess (what its runner calls for a served
deployment) against a private Prefect server, so a Prefect release that stops asking
multiprocessing for a context by name, or asks for another one, fails here instead of quietly
going back to a fresh interpreter per run.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import sys
from importlib import metadata
from pathlib import Path
from unittest import mock

import cloudpickle
import pytest
from packaging.specifiers import SpecifierSet
from prefect import flow, flow_engine
from prefect.runner import _starter_direct

from axiom import flow_runs
from flows import operator_verbs
from flows.operator_verbs import lift_suspension


@pytest.fixture
def installed():
    flow_runs.install([_where_am_i, lift_suspension])
    try:
        yield
    finally:
        flow_runs.uninstall()


def test_the_installed_prefect_is_a_tested_version():
    flow_runs.check_version()  # what `axiom flows serve` does first
    assert metadata.version("prefect") in SpecifierSet(flow_runs.TESTED)


def test_an_untested_prefect_stops_flows_serve_with_one_line():
    real = metadata.version

    def version(name):
        return "3.10.0" if name == "prefect" else real(name)

    with mock.patch.object(metadata, "version", version), pytest.raises(SystemExit) as exc:
        flow_runs.install_or_exit()
    assert str(exc.value) == (
        "error: prefect 3.10.0 is not a version axiom/flow_runs.py was tested with "
        f"({flow_runs.TESTED})"
    )
    assert not flow_runs.installed()


def test_install_and_uninstall_swap_only_the_context_prefect_asks_for(installed):
    assert flow_runs.installed()
    flow_runs.install()  # idempotent
    seen = flow_engine.multiprocessing
    assert seen.get_context("spawn").get_start_method() == "forkserver"
    assert seen.get_context("fork").get_start_method() == "fork"
    assert seen.current_process is multiprocessing.current_process
    flow_runs.uninstall()
    assert not flow_runs.installed()
    assert flow_engine.multiprocessing is multiprocessing


def test_a_module_flow_pickles_as_its_name_once_installed(installed):
    """What the run receives: the flow itself, found in the preloaded module, not a copy of
    its function without the module's names (its annotations could not be resolved)."""
    assert cloudpickle.loads(cloudpickle.dumps(lift_suspension)) is lift_suspension
    flow_runs.uninstall()
    copy = cloudpickle.loads(cloudpickle.dumps(lift_suspension))
    assert copy is not lift_suspension
    assert copy.fn.__globals__ is not vars(operator_verbs)  # the copy Prefect could not validate


@flow
def _where_am_i(out: str) -> None:
    """Leaves its parent's pid and whether the preload was there before the run."""
    Path(out).write_text(f"{os.getppid()} {'flows.operator_verbs' in sys.modules}")


@pytest.mark.integration  # a Prefect server and a run: `make test`, not test-fast
def test_a_run_prefect_starts_is_forked_from_the_preloaded_server(prefect, installed, tmp_path):
    from multiprocessing import forkserver

    out = tmp_path / "where"
    # The name the runner's starter calls (prefect/runner/_starter_direct.py).
    process = _starter_direct.run_flow_in_subprocess(_where_am_i, parameters={"out": str(out)})
    assert isinstance(process, multiprocessing.context.ForkServerProcess)
    process.join(60)
    assert process.exitcode == 0
    parent, preloaded = out.read_text().split()
    assert int(parent) == forkserver._forkserver._forkserver_pid != os.getpid()
    assert preloaded == "True"
