"""`axiom runbooks validate|list` and `axiom classify`: the Protocol's data files, and using them."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from axiom.cli.app import JsonFlag, app, err, fail, out, print_json, settings
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
        list[str] | None,
        typer.Argument(
            help='SMTP replies, e.g. "550 5.1.1 <x@y>: user unknown", as a bounce or a log '
            "quotes them: with or without the reply code, after a DSN's Diagnostic-Code: smtp; "
            "or inside an MTA's wrapper. Lines of a multi-line reply are separated by newlines "
            '(or a literal \\n). "-" reads stdin, one reply per line; NNN- continuation lines '
            "join the reply they continue.",
            show_default=False,
        ),
    ] = None,
    mx: Annotated[
        str | None,
        typer.Option("--mx", help="The MX host that answered; selects its provider's rules."),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            "--corpus",
            help="Instead of replies: a corpus file of labelled replies (tests/corpus/"
            "replies.yaml); reports agreement on its tune and holdout parts and the "
            "confusion table.",
        ),
    ] = None,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            help="With --corpus: show the confusions and disagreements of this part only "
            "(tune or holdout); agreement is still given for both. Rules are tuned with "
            "--part tune, so the held-back entries are never read.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Classify SMTP replies: one JSON object per reply, in input order; every input gets one
    (category unknown when no rule matches). With --corpus, measure the rules instead."""
    # The classifier's rules load only for this command (~50 ms every other command would pay).
    from relay.delivery.classify import classify, provider_for_mx, read_reply, rules, split_replies

    try:
        rules()
    except RunbookError as exc:
        raise fail(str(exc), 2) from None
    if corpus is not None:
        if replies:
            raise fail("give replies or --corpus FILE, not both", 2)
        if mx:
            raise fail("--mx does not apply to --corpus: its entries name their own MX", 2)
        if part not in (None, "tune", "holdout"):
            raise fail(f"--part is tune or holdout, not {part!r}", 2)
        _classify_corpus(corpus, as_json, part)
        return
    if part is not None:
        raise fail("--part applies to --corpus only", 2)
    if not replies:
        raise fail('nothing to classify: give replies, "-" for stdin, or --corpus FILE', 2)
    provider = provider_for_mx(mx) if mx else None
    for value in replies:
        texts = [text for _, text in split_replies(sys.stdin)] if value == "-" else [value]
        for text in texts:
            text = text if value == "-" else text.replace("\\n", "\n")
            result = classify(read_reply(text), provider).as_dict() | {"reply": text}
            sys.stdout.write(json.dumps(result) + "\n")


def _classify_corpus(path: Path, as_json: bool, only: str | None = None) -> None:
    """only: the part whose confusions and disagreements are shown (None: both)."""
    from relay.delivery.classify import CATEGORIES
    from relay.delivery.classify_corpus import (
        PARTS,
        CorpusError,
        evaluate,
        expected_name,
        load_corpus,
    )

    try:
        report = evaluate(load_corpus(path))
    except CorpusError as exc:
        raise fail(str(exc), 2) from None
    parts = [*PARTS, None]
    agreement = {part or "all": report.agreement(part) for part in parts}
    shown = [p for p in PARTS if only in (None, p)]
    by_part = {part: report.confusion(part) for part in shown}
    confusion = report.confusion(only)  # type: ignore[arg-type]

    def accepts(expected: str, got: str) -> bool:  # expected as expected_name writes it
        return got in expected.split("|")

    def row_order(expected: str) -> tuple[int, int, str]:  # by principal category, then name
        return CATEGORIES.index(expected.split("|")[0]), expected.count("|"), expected

    pairs = sorted(confusion, key=lambda pair: (-confusion[pair], row_order(pair[0])))
    if as_json:
        by_label = {part or "all": report.by_label(part) for part in (shown if only else parts)}
        labels = {o.entry.label: o.entry.expected for o in report.outcomes}
        print_json(
            {
                "corpus": str(path),
                "part": only,
                "agreement": {
                    name: {"agree": agree, "total": total, "percent": _percent(agree, total)}
                    for name, (agree, total) in agreement.items()
                },
                "confusion": [
                    {"expected": e, "got": g, "agrees": accepts(e, g)}
                    | {part: by_part[part][e, g] for part in shown}
                    for e, g in pairs
                ],
                "labels": [
                    {"label": label, "expected": expected_name(labels[label])}
                    | {
                        name: dict(zip(("agree", "total"), counts[label], strict=True))
                        for name, counts in by_label.items()
                        if label in counts
                    }
                    for label in by_label[only or "all"]
                ],
                "disagreements": [
                    {
                        "text": o.entry.text,
                        "expected": expected_name(o.entry.expected),
                        "got": o.got.category,
                        "rule_id": o.got.rule_id,
                        "label": o.entry.label,
                        "split": o.entry.split,
                        "source": o.entry.source,
                    }
                    for o in report.outcomes
                    if not o.agrees and only in (None, o.entry.split)
                ],
            }
        )
        return
    table = Table("part", "agree", "entries", "agreement", title=f"Classifier vs {path}")
    for name, (agree, total) in agreement.items():
        table.add_row(name, str(agree), str(total), f"{_percent(agree, total)} %")
    out.print(table)
    matrix = Table(
        Column("expected", overflow="fold"),
        "entries",
        "agree",
        "got instead",
        title="Confusion (expected x got; a label's list of categories: any one agrees)",
    )
    for expected in sorted({e for e, _ in confusion}, key=row_order):
        row = {got: n for (e, got), n in confusion.items() if e == expected}
        instead = sorted(((n, g) for g, n in row.items() if not accepts(expected, g)), reverse=True)
        matrix.add_row(
            _wrappable(expected),
            str(sum(row.values())),
            str(sum(n for g, n in row.items() if accepts(expected, g))),
            ", ".join(f"{g} {n}" for n, g in instead) or "—",
        )
    out.print(matrix)
    worst = Table(Column("expected", overflow="fold"), "got", *shown, title="Largest confusions")
    for e, g in [pair for pair in pairs if not accepts(*pair)][:10]:
        worst.add_row(_wrappable(e), g, *(str(by_part[part][e, g]) for part in shown))
    out.print(worst)


def _wrappable(expected: str) -> str:
    """'blocklisted|reputation|rdns' with room to wrap at the bars."""
    return expected.replace("|", " | ")


def _percent(agree: int, total: int) -> float:
    return round(100 * agree / total, 1) if total else 0.0
