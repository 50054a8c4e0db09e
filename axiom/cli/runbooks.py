"""`axiom runbooks validate|list` and `axiom classify`: the Protocol's data files, and using them."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from axiom.cli.app import app, err, fail, out, settings
from runbooks.loader import RUNBOOK_DIR, RunbookError, load_all, shipped
from runbooks.schema_protocol import ProcedureRunbook

UNREACHABLE = "Prefect unreachable"
# One answer or a clear "unreachable" within seconds; no retry storm against a dead server.
PREFECT_TIMEOUT_SECONDS = 5.0

runbooks_app = typer.Typer(no_args_is_help=True, help="The Protocol's data files.")
app.add_typer(runbooks_app, name="runbooks")


@runbooks_app.command("validate")
def runbooks_validate(
    directory: Annotated[str | None, typer.Argument(help="Directory of runbook files.")] = None,
) -> None:
    """Load every runbook file; exit non-zero naming the first error's file, path and reason."""
    try:
        found = load_all(Path(directory) if directory else RUNBOOK_DIR)
    except RunbookError as exc:
        raise fail(str(exc)) from None
    table = Table("id", "kind", "version", "title")
    for rb in found.values():
        table.add_row(rb.id, rb.kind, rb.version, rb.title)
    out.print(table)
    out.print(f"{len(found)} runbook(s) valid")


@runbooks_app.command("list")
def runbooks_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document, for scripts.")
    ] = False,
) -> None:
    """Every runbook: id, version, schedule, and the last and next run of its deployments.

    Runs are read from the Prefect API (AXIOM_PREFECT_API_URL, else PREFECT_API_URL, else
    `axiom up`'s server); when it cannot be reached the run columns say so.
    """
    from flows.registry import procedures

    try:
        runbooks = shipped()
    except RunbookError as exc:
        raise fail(str(exc), 2) from None
    registered = procedures()
    api = settings().prefect_api()
    runs, problem = _deployment_runs(api, [p.deployment_name for p in registered])
    unknown = {"prefect": "unreachable", "last_run": None, "next_run": None}
    rows: list[dict[str, Any]] = [
        _row(p.runbook(), p.deployment_name) | runs.get(p.deployment_name, unknown)
        for p in registered
    ]
    governing = {p.runbook().id for p in registered}
    rows += [  # the rules the relay and the procedures read: no deployment of their own
        _row(rb, None) | {"prefect": None, "last_run": None, "next_run": None}
        for rb in runbooks.values()
        if rb.id not in governing
    ]
    if as_json:
        document = {"prefect_api": api, "prefect_error": problem, "runbooks": rows}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    table = Table("runbook", "version", "deployment", "schedule", "last run", "next run")
    for ids in table.columns[:4]:  # names people copy; the run columns may wrap
        ids.no_wrap = True
    for row in rows:
        table.add_row(
            row["runbook"],
            row["version"],
            row["deployment"] or "—",
            row["schedule"]["text"] if row["schedule"] else "—",
            _run_cell(row, "last_run", problem),
            _run_cell(row, "next_run", problem),
        )
    out.print(table)
    if problem:
        err.print(f"[yellow]{UNREACHABLE}:[/yellow] {escape(problem)}", highlight=False)


def _row(rb, deployment: str | None) -> dict[str, Any]:
    schedule = rb.schedule if isinstance(rb, ProcedureRunbook) else None
    return {
        "runbook": rb.id,
        "version": rb.version,
        "kind": rb.kind,
        "deployment": deployment,
        "schedule": None
        if schedule is None
        else schedule.model_dump() | {"text": schedule.describe()},
    }


def _run_cell(row: dict[str, Any], key: str, problem: str | None) -> str:
    if row["deployment"] is None:
        return "—"
    if problem:
        return UNREACHABLE
    if row["prefect"] == "not registered":
        return "not registered"
    run = row[key]
    if run is None:
        return "none"
    return f"{run['state'].lower()} {run['time'][:16].replace('T', ' ')}Z"


def _deployment_runs(
    api_url: str, names: list[str]
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Per deployment `flow/name`: its last started run and its next scheduled one, from the
    Prefect API; or ({}, why) when the API cannot be reached."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_KEY,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    found: dict[str, dict[str, Any]] = {}
    try:
        with (
            temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}),
            SyncPrefectClient(
                api_url,
                auth_string=PREFECT_API_AUTH_STRING.value(),
                api_key=PREFECT_API_KEY.value(),
                httpx_settings={"timeout": PREFECT_TIMEOUT_SECONDS},
            ) as client,
        ):
            for name in names:
                try:
                    deployment = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    found[name] = {"prefect": "not registered", "last_run": None, "next_run": None}
                    continue
                of_it = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                last = client.read_flow_runs(
                    deployment_filter=of_it,
                    flow_run_filter=FlowRunFilter(
                        start_time=FlowRunFilterStartTime(is_null_=False)
                    ),
                    sort=FlowRunSort.START_TIME_DESC,
                    limit=1,
                )
                upcoming = client.read_flow_runs(
                    deployment_filter=of_it,
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                        )
                    ),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=1,
                )
                found[name] = {
                    "prefect": "registered",
                    "last_run": _run(last[0], last[0].start_time) if last else None,
                    "next_run": _run(upcoming[0], upcoming[0].expected_start_time)
                    if upcoming
                    else None,
                }
    except Exception as exc:  # any failure to talk to the API is "unreachable", not a traceback
        return {}, f"{api_url}: {type(exc).__name__}: {exc}"[:300]
    return found, None


def _run(run, when: datetime | None) -> dict[str, Any]:
    return {
        "id": str(run.id),
        "name": run.name,
        "state": run.state_type.value if run.state_type else "UNKNOWN",
        "time": when.astimezone(UTC).isoformat() if when else None,
    }


@app.command("classify")
def classify_replies(
    replies: Annotated[
        list[str],
        typer.Argument(
            help='SMTP replies, e.g. "550 5.1.1 <x@y>: user unknown"; lines of a multi-line '
            'reply are separated by newlines (or a literal \\n). "-" reads stdin, one reply '
            "line per line; NNN- continuation lines join the reply they continue.",
            show_default=False,
        ),
    ],
    mx: Annotated[
        str | None,
        typer.Option("--mx", help="The MX host that answered; selects its provider's rules."),
    ] = None,
) -> None:
    """Classify SMTP replies: one JSON object per reply, in input order."""
    # The classifier's rules load only for this command (~50 ms every other command would pay).
    from relay.delivery.classify import classify, parse_reply, provider_for_mx, rules, split_replies

    try:
        rules()
    except RunbookError as exc:
        raise fail(str(exc), 2) from None
    provider = provider_for_mx(mx) if mx else None
    inputs: list[tuple[str, str]] = []
    for position, value in enumerate(replies, 1):
        if value == "-":
            inputs += [(f"stdin line {n}", text) for n, text in split_replies(sys.stdin)]
        else:
            inputs.append((f"argument {position}", value.replace("\\n", "\n")))
    failed = False
    for label, text in inputs:
        try:
            reply = parse_reply(text)
        except ValueError as exc:
            failed = True
            err.print(
                f"[red]error:[/red] {label}: {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            continue
        result = classify(reply, provider).as_dict() | {"reply": text}
        sys.stdout.write(json.dumps(result) + "\n")
    if failed:
        raise typer.Exit(1)
