"""`axiom warmup`: the warm-up runbook's mirror (runbooks/ip-warmup.yaml).

`status` shows per warming IP or domain and provider what the daily run reads: the stage,
today's cap, sent today, yesterday's signals and what the next run would decide. `start`,
`review` and `complete` start a run of ip-warmup/on-demand, which asks its checkpoint (answer
it with `axiom approve`, in Slack or in the Prefect UI): structural changes go through a
person, never straight from the CLI. `evaluate` runs the daily judgement now.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, app, clock_now, engine, err, fail, out, print_json, settings
from models.db import session_scope
from protocol import warmup
from protocol.errors import ServiceError
from runbooks.loader import ip_warmup

warmup_app = typer.Typer(
    no_args_is_help=True,
    help="IP and domain warm-up: status, and start/review/complete through a checkpoint.",
)
app.add_typer(warmup_app, name="warmup")

ON_DEMAND = "ip-warmup/on-demand"


@warmup_app.command("status")
def status(
    json_output: JsonFlag = False,
    everything: Annotated[
        bool, typer.Option("--all", help="Every provider, also those with nothing sent")
    ] = False,
) -> None:
    """Per warming IP or domain and provider: stage, today's cap, sent today, yesterday's
    signals and the next decision."""
    rules = ip_warmup()
    with session_scope(engine(settings())) as session:
        rows = warmup.status(session, rules, now=clock_now())
    if json_output:
        print_json([r.as_json() for r in rows])
        return
    if not rows:
        out.print("no IP or domain is warming")
        return
    shown = [r for r in rows if everything or r.sent or r.signals or r.provider == "*"]
    table = Table("subject", "plan", "state", "provider", "stage", "cap today", "sent today")
    table.add_column("signals", overflow="fold")
    table.add_column("next", overflow="fold")
    for r in shown:
        table.add_row(
            r.subject,
            f"{r.plan} #{r.plan_id}",
            r.state,
            r.provider,
            f"{r.stage}/{r.stages}",
            str(r.cap),
            str(r.sent),
            r.signals,
            r.next,
        )
    out.print(table)
    hidden = len(rows) - len(shown)
    if hidden:
        out.print(f"{hidden} provider row(s) with nothing sent today hidden (--all shows them)")


@warmup_app.command("start")
def start(
    ip: str,
    plan: Annotated[str | None, typer.Option(help="A plan of runbooks/ip-warmup.yaml")] = None,
    reason: Annotated[str, typer.Option(help="new, idle or delisted")] = "new",
    candidates: Annotated[str, typer.Option(help="all, or marked (X-Axiom-Warmup only)")] = "all",
    json_output: JsonFlag = False,
) -> None:
    """Ask to warm IP on a plan: starts ip-warmup/on-demand, which asks warmup.start."""
    rules = ip_warmup()
    if plan is not None and plan not in rules.spec.plans:
        raise fail(
            f"plan {plan!r} is not in runbooks/ip-warmup.yaml ({', '.join(rules.spec.plans)})"
        )
    if reason not in ("new", "idle", "delisted"):
        raise fail(f"reason {reason!r} must be new, idle or delisted")
    if candidates not in ("all", "marked"):
        raise fail(f"candidates {candidates!r} must be all or marked")
    with session_scope(engine(settings())) as session:
        try:
            warmup.get_ip(session, ip)
        except ServiceError as exc:
            raise fail(str(exc)) from None
    parameters = {"action": "start", "ip": ip, "reason": reason, "candidates": candidates}
    if plan:
        parameters["plan"] = plan
    _run(parameters, json_output)


@warmup_app.command("review")
def review(plan_id: int, json_output: JsonFlag = False) -> None:
    """Ask what to do with warm-up PLAN_ID (step back, pause, continue): warmup.review."""
    _known_plan(plan_id)
    _run({"action": "review", "plan_id": plan_id}, json_output)


@warmup_app.command("complete")
def complete(ip: str, json_output: JsonFlag = False) -> None:
    """Ask to declare IP warm (full traffic, no caps): warmup.complete."""
    with session_scope(engine(settings())) as session:
        try:
            warmup.get_ip(session, ip)
        except ServiceError as exc:
            raise fail(str(exc)) from None
    _run({"action": "complete", "ip": ip}, json_output)


@warmup_app.command("evaluate")
def evaluate(json_output: JsonFlag = False) -> None:
    """Run the daily judgement now (what ip-warmup/scheduled does after midnight UTC); the
    decisions that need a person are listed, to be started with `review`/`complete`/`start`."""
    rules = ip_warmup()
    with session_scope(engine(settings())) as session:
        report = warmup.daily(session, rules, now=clock_now(), actor="cli")
        session.commit()
    if json_output:
        print_json(report.as_json())
        return
    table = Table("subject", "day", "verdict", "stages", "why")
    for j in report.judged:
        why = "; ".join(j["reasons"]) or "; ".join(f"{k}: {v}" for k, v in j["held"].items())
        stages = ", ".join(f"{k} {v}" for k, v in j["stages"].items())
        table.add_row(j["subject"], j["day"], j["verdict"], stages, why)
    out.print(table if report.judged else "nothing to judge")
    for f in report.follow_ups:
        out.print(f"needs a person: {f.action} {f.subject} ({f.reason or 'checkpoint'})")


def _known_plan(plan_id: int) -> None:
    from models import WarmupPlan

    with session_scope(engine(settings())) as session:
        if session.get(WarmupPlan, plan_id) is None:
            raise fail(f"no warm-up plan {plan_id} (`axiom warmup status` lists them)")


def _run(parameters: dict, json_output: bool) -> None:
    s = settings()
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: s.prefect_api()}):
            run = run_deployment(ON_DEMAND, parameters=parameters, timeout=0)
    except Exception as exc:
        raise fail(f"could not start {ON_DEMAND} at {s.prefect_api()}: {exc}") from None
    if json_output:
        print_json({"deployment": ON_DEMAND, "flow_run_id": str(run.id), **parameters})
        return
    out.print(f"started {ON_DEMAND} run {run.id}: it asks its checkpoint (`axiom approvals`)")
    err.print(f"follow it in the Prefect UI: {s.prefect_ui()}/runs/flow-run/{run.id}")
