"""The `axiom` command: set-up and operator actions. Tables for people, --json for scripts."""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import col, func, select

from config.settings import ConfigError, Settings, load_settings
from sandbox.cli import sandbox_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Axiom Send: an SMTP relay run under a Protocol.",
)
tenant_app = typer.Typer(no_args_is_help=True, help="Customers.")
credential_app = typer.Typer(
    no_args_is_help=True, help="SMTP credentials and bound client networks."
)
domain_app = typer.Typer(no_args_is_help=True, help="Sending domains and their DNS records.")
queue_app = typer.Typer(invoke_without_command=True, help="The spool.")
runbooks_app = typer.Typer(no_args_is_help=True, help="The Protocol's data files.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(credential_app, name="credential")
app.add_typer(domain_app, name="domain")
app.add_typer(queue_app, name="queue")
app.add_typer(runbooks_app, name="runbooks")
pool_app = typer.Typer(no_args_is_help=True, help="IP pools (dedicated or shared).")
ip_app = typer.Typer(no_args_is_help=True, help="Source IP addresses.")
stream_app = typer.Typer(no_args_is_help=True, help="Tenant streams and their pools.")
app.add_typer(pool_app, name="pool")
app.add_typer(ip_app, name="ip")
app.add_typer(stream_app, name="stream")
app.add_typer(sandbox_app, name="sandbox")

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def engine():
    from models.db import make_engine

    return make_engine(settings().db_url)


@contextmanager
def _admin():
    """One admin action in one transaction; ServiceError becomes a one-line CLI error."""
    from models.db import session_scope
    from protocol.errors import ServiceError

    try:
        with session_scope(engine()) as session:
            yield session
            session.commit()
    except ServiceError as exc:
        raise fail(str(exc)) from None


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- init
@app.command()
def init() -> None:
    """Create AXIOM_HOME, the secret key, a sandbox TLS certificate and the database schema."""
    from axiom.setup import initialise

    s = settings()
    try:
        initialise(s, say=lambda line: out.print(line, highlight=False))
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"database ready: {_redact(s.db_url)}")


@app.command()
def keygen() -> None:
    """Print a new AXIOM_SECRET_KEY."""
    from relay.submission.keystore import KeyBox

    sys.stdout.write(KeyBox.generate().decode() + "\n")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------- tenants & credentials
@tenant_app.command("add")
def tenant_add(
    name: str,
    language: Annotated[
        str, typer.Option(help="Language of customer-facing texts: it or en.")
    ] = "it",
) -> None:
    """Add a customer."""
    from protocol.tenants import add_tenant

    with _admin() as session:
        add_tenant(session, name, language)
    out.print(f"tenant [bold]{name}[/bold] added")


@credential_app.command("add")
def credential_add(tenant: str, username: str) -> None:
    """Create an SMTP credential; the password is printed once and stored only as a hash."""
    from protocol.tenants import add_credential

    with _admin() as session:
        password = add_credential(session, tenant, username)
    out.print(f"username: {username}\npassword: {password}", highlight=False)
    err.print("[yellow]The password is shown only once.[/yellow]")


@credential_app.command("add-network")
def credential_add_network(tenant: str, cidr: str) -> None:
    """Let connections from CIDR act as TENANT without AUTH (like Postfix's mynetworks)."""
    from protocol.tenants import add_network

    with _admin() as session:
        bound = add_network(session, tenant, cidr)
    out.print(f"{bound.cidr} now submits as tenant [bold]{tenant}[/bold]")


# ---------------------------------------------------------------- domains
@domain_app.command("add")
def domain_add(tenant: str, domain: str) -> None:
    """Add a sending domain (pending) with RSA-2048 and Ed25519 DKIM keys; print its records."""
    from protocol.domains import add_domain
    from relay.submission.keystore import KeyBox

    s = settings()
    try:
        keybox = KeyBox(s.load_secret_key())
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    with _admin() as session:
        add_domain(session, keybox, tenant, domain)
    out.print(f"domain [bold]{domain.lower()}[/bold] added (pending). Publish these records:")
    domain_records(domain, json_output=False)


@domain_app.command("records")
def domain_records(domain: str, json_output: JsonFlag = False) -> None:
    """The DNS records the customer must publish for DOMAIN."""
    from protocol.domains import domain_records as records_for

    with _admin() as session:
        records = records_for(session, domain, settings().hostname)
    if json_output:
        _print_json([r.__dict__ for r in records])
        return
    # Zone-file lines rather than a table: the values are long and must be copied whole.
    for r in records:
        sys.stdout.write(f'; {r.purpose}\n{r.name}. IN {r.type} "{r.value}"\n')


@domain_app.command("activate")
def domain_activate(
    domain: str,
    operator: Annotated[str, typer.Option("--as", help="The operator taking responsibility.")],
    reason: Annotated[str, typer.Option("--reason", help="Why it is activated by hand.")],
) -> None:
    """Activate DOMAIN by hand (audited). The onboarding runbook is the normal path."""
    from protocol.domains import activate_domain

    with _admin() as session:
        activate_domain(session, domain, operator, reason)
    out.print(f"domain [bold]{domain.lower()}[/bold] is active; its DKIM keys now sign")


# ---------------------------------------------------------------- relay
@app.command()
def relay() -> None:
    """Run the relay: submission listeners, spool writer and the HTTP endpoint."""
    import logging

    s = settings()
    metrics_dir = s.home / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before prometheus_client loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    from relay.submission.keystore import KeyBox

    try:
        KeyBox(s.load_secret_key())  # a bad key is one line here, not a traceback at start
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    from relay.service import run

    try:
        run(s)
    except OSError as exc:
        raise fail(f"cannot listen: {exc}", 2) from None


@app.command()
def deliver() -> None:
    """Run only the delivery engine (no listeners): more delivery processes on one spool."""
    import logging

    s = settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from relay.service import deliver_only, run_event_loop

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
    import asyncio

    from prefect.runner import Runner

    from flows.deployments import deployments

    runner = Runner(pause_on_shutdown=False)
    served = deployments()
    for deployment in served:
        runner.add_deployment(deployment)
    names = ", ".join(d.name for d in served) or "none"
    sys.stdout.write(f"flows ready: {len(served)} deployment(s): {names}\n")
    sys.stdout.flush()
    asyncio.run(runner.start())


# ---------------------------------------------------------------- egress
@pool_app.command("add")
def pool_add(
    name: str,
    kind: Annotated[str, typer.Option("--kind", help="dedicated or shared.")] = "shared",
) -> None:
    """Add an IP pool."""
    from protocol.egress import add_pool

    with _admin() as session:
        add_pool(session, name, kind)
    out.print(f"pool [bold]{name}[/bold] ({kind}) added")


@ip_app.command("add")
def ip_add(
    address: str,
    pool: Annotated[str, typer.Option("--pool", help="The pool it sends for.")],
    ptr: Annotated[str | None, typer.Option("--ptr", help="Its PTR name, said in EHLO.")] = None,
    weight: Annotated[int, typer.Option("--weight", help="Share of the pool's traffic.")] = 100,
) -> None:
    """Add a source IP to a pool (state cold until warmed up)."""
    from protocol.egress import add_ip

    with _admin() as session:
        ip = add_ip(session, address, pool, ptr, weight)
    out.print(f"{ip.address} added to pool [bold]{pool}[/bold] (weight {weight}, cold)")


@stream_app.command("set")
def stream_set(
    tenant: str,
    stream: str,
    pool: Annotated[str, typer.Option("--pool", help="The pool this stream sends from.")],
    fallback: Annotated[str | None, typer.Option("--fallback", help="Overflow pool.")] = None,
) -> None:
    """Bind TENANT's STREAM to a pool (and optionally an overflow pool)."""
    from protocol.egress import set_stream

    with _admin() as session:
        set_stream(session, tenant, stream, pool, fallback)
    extra = f", overflow to [bold]{fallback}[/bold]" if fallback else ""
    out.print(f"{tenant}/{stream} sends from pool [bold]{pool}[/bold]{extra}")


@app.command()
def suspensions(json_output: JsonFlag = False) -> None:
    """Active protective suspensions and throttles of (IP, provider) paths."""
    from config.clock import SystemClock
    from models import Suspension
    from models.db import session_scope

    now = SystemClock().now()
    with session_scope(engine()) as session:
        rows = session.exec(
            select(Suspension)
            .where(Suspension.expires_at > now)
            .order_by(col(Suspension.expires_at))
        ).all()
    if json_output:
        _print_json([r.model_dump() for r in rows])
        return
    table = Table("ip", "provider", "action", "limit/min", "until", "rule", "reason")
    for r in rows:
        table.add_row(
            r.source_ip,
            r.provider,
            r.action,
            str(r.limit_per_minute or ""),
            f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
            r.rule_id or "",
            r.reason[:60],
        )
    out.print(table)
    out.print(f"{len(rows)} active")


# ---------------------------------------------------------------- queue
@queue_app.callback()
def queue(ctx: typer.Context, json_output: JsonFlag = False, limit: int = 100) -> None:
    """List spooled recipients with their state (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    from models import Message, Recipient
    from models.db import session_scope

    with session_scope(engine()) as session:
        rows = session.exec(
            select(Message.id, Message.mail_from, Message.size, Message.created_at, Recipient)
            .join(Recipient, col(Recipient.message_id) == Message.id)
            .order_by(col(Message.created_at).desc(), col(Recipient.id))
            .limit(limit)
        ).all()
    items = [
        {
            "queue_id": mid,
            "from": sender,
            "to": r.address,
            "size": size,
            "state": str(r.state),
            "attempts": r.attempts,
            "next_attempt_at": r.next_attempt_at,
            "last_reply": r.last_reply,
            "created_at": created,
        }
        for mid, sender, size, created, r in rows
    ]
    if json_output:
        _print_json(items)
        return
    table = Table(
        "queue id", "from", "to", "size", "state", "attempts", "next attempt", "last reply"
    )
    for i in items:
        table.add_row(
            i["queue_id"],
            i["from"],
            i["to"],
            str(i["size"]),
            i["state"],
            str(i["attempts"]),
            str(i["next_attempt_at"] or ""),
            i["last_reply"] or "",
        )
    out.print(table)


@queue_app.command("show")
def queue_show(queue_id: str, json_output: JsonFlag = False) -> None:
    """Show one spooled message exactly as it will be sent (like postcat)."""
    from models import Message, Recipient
    from models.db import session_scope

    with session_scope(engine()) as session:
        message = session.get(Message, queue_id)
        if message is None:
            raise fail(f"queue id {queue_id!r} not found")
        recipients = session.exec(select(Recipient).where(Recipient.message_id == queue_id)).all()
    if json_output:
        _print_json(
            {
                "queue_id": message.id,
                "mail_from": message.mail_from,
                "recipients": [{"address": r.address, "state": str(r.state)} for r in recipients],
                "stream": message.stream,
                "size": message.size,
                "data": message.data.decode("utf-8", "replace"),
            }
        )
        return
    sys.stdout.write(f"*** ENVELOPE RECORDS {message.id} ***\n")
    sys.stdout.write(f"message_size: {message.size}\ncreate_time: {message.created_at}\n")
    sys.stdout.write(f"sender: {message.mail_from}\nstream: {message.stream}\n")
    for r in recipients:
        sys.stdout.write(f"recipient: {r.address} ({r.state})\n")
    sys.stdout.write("*** MESSAGE CONTENTS ***\n")
    sys.stdout.write(message.data.decode("utf-8", "replace").replace("\r\n", "\n"))
    sys.stdout.write("*** END OF MESSAGE ***\n")


# ---------------------------------------------------------------- audit
@app.command()
def audit(
    json_output: JsonFlag = False,
    verify: Annotated[bool, typer.Option("--verify", help="Recompute the hash chain.")] = False,
    limit: int = 50,
) -> None:
    """List the audit trail, or verify its hash chain."""
    from models import AuditEntry
    from models.audit_trail import verify as verify_chain
    from models.db import session_scope

    with session_scope(engine()) as session:
        if verify:
            count, broken = verify_chain(session)
            if broken is not None:
                raise fail(f"audit chain broken at entry {broken.entry_id}: {broken.reason}")
            if json_output:
                _print_json({"ok": True, "entries": count})
            else:
                out.print(f"audit chain intact: {count} entries verified")
            return
        total = session.exec(select(func.count()).select_from(AuditEntry)).one()
        entries = session.exec(
            select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
        ).all()
    if json_output:
        _print_json([e.model_dump() for e in reversed(entries)])
        return
    table = Table(
        "id",
        "at",
        "actor",
        "action",
        "subject",
        "runbook",
        "evidence",
        title=f"audit ({total} entries)",
    )
    for e in reversed(entries):
        runbook = f"{e.runbook_id}@{e.runbook_version}" if e.runbook_id else ""
        table.add_row(
            str(e.id),
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.actor,
            e.action,
            e.subject,
            runbook,
            json.dumps(e.evidence, default=str)[:80],
        )
    out.print(table)


@app.command()
def complaints(json_output: JsonFlag = False, limit: int = 50) -> None:
    """Complaint reports (ARF) the inbound listener recorded, newest last."""
    from models import AuditEntry
    from models.db import session_scope

    actions = ("complaint.received", "feedback.received")
    with session_scope(engine()) as session:
        entries = session.exec(
            select(AuditEntry)
            .where(col(AuditEntry.action).in_(actions))
            .order_by(col(AuditEntry.id).desc())
            .limit(limit)
        ).all()
    items = [
        {
            "at": e.at,
            "provider": e.evidence.get("provider"),
            "feedback_type": e.evidence.get("feedback_type"),
            "recipients": e.evidence.get("recipients", []),
            "suppressed": e.evidence.get("suppressed", []),
            "queue_id": e.evidence.get("queue_id"),
            "tenant_id": e.evidence.get("tenant_id"),
            "user_agent": e.evidence.get("user_agent"),
        }
        for e in reversed(entries)
    ]
    if json_output:
        _print_json(items)
        return
    table = Table("at", "provider", "type", "recipient", "queue id", "suppressed", "user agent")
    for i in items:
        table.add_row(
            f"{i['at']:%Y-%m-%d %H:%M:%S}",
            i["provider"] or "",
            i["feedback_type"] or "",
            ", ".join(i["recipients"]),
            i["queue_id"] or "(no message of ours)",
            "yes" if i["suppressed"] else "no",
            (i["user_agent"] or "")[:40],
        )
    out.print(table)
    out.print(f"{len(items)} shown")


# ---------------------------------------------------------------- runbooks
@runbooks_app.command("validate")
def runbooks_validate(
    directory: Annotated[str | None, typer.Argument(help="Directory of runbook files.")] = None,
) -> None:
    """Load every runbook file; exit non-zero naming the first error's file, path and reason."""
    from pathlib import Path

    from runbooks.loader import RUNBOOK_DIR, RunbookError, load_all

    try:
        found = load_all(Path(directory) if directory else RUNBOOK_DIR)
    except RunbookError as exc:
        raise fail(str(exc)) from None
    table = Table("id", "kind", "version", "title")
    for rb in found.values():
        table.add_row(rb.id, rb.kind, rb.version, rb.title)
    out.print(table)
    out.print(f"{len(found)} runbook(s) valid")


# ---------------------------------------------------------------- classification
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
    from rich.markup import escape

    from relay.delivery.classify import classify, parse_reply, provider_for_mx, rules, split_replies
    from runbooks.loader import RunbookError

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


# ---------------------------------------------------------------- checkpoints
operator_app = typer.Typer(no_args_is_help=True, help="Operators who answer checkpoints.")
app.add_typer(operator_app, name="operator")


@operator_app.command("add")
def operator_add(
    name: str,
    role: Annotated[
        list[str], typer.Option("--role", help="A role from runbooks/checkpoints.yaml; repeat.")
    ],
    slack_id: Annotated[
        str | None, typer.Option("--slack-id", help="Their Slack user id (U…).")
    ] = None,
) -> None:
    """Register an operator; they may answer the checkpoints their roles allow, nothing else."""
    from protocol.operators import add_operator

    with _admin() as session:
        add_operator(session, name, role, slack_id)
    out.print(f"operator [bold]{name}[/bold] added with roles {', '.join(sorted(set(role)))}")


@operator_app.command("list")
def operator_list(json_output: JsonFlag = False) -> None:
    """Registered operators, their roles and Slack ids."""
    from models import Operator
    from models.db import session_scope

    with session_scope(engine()) as session:
        rows = session.exec(select(Operator).order_by(col(Operator.name))).all()
    if json_output:
        _print_json([r.model_dump() for r in rows])
        return
    table = Table("name", "roles", "slack id")
    for r in rows:
        table.add_row(r.name, r.roles, r.slack_user_id or "")
    out.print(table)


@app.command()
def approvals(json_output: JsonFlag = False) -> None:
    """Pending checkpoint approvals, soonest to expire first."""
    from protocol.approvals import ApprovalDesk

    s = settings()
    desk = ApprovalDesk(engine())  # reads only: no Slack, no Prefect
    rows = desk.pending()
    if json_output:
        _print_json([r.model_dump() for r in rows])
        return
    table = Table("id", "kind", "subject", "proposal", "may answer", "expires", "run")
    for r in rows:
        table.add_row(
            str(r.id),
            r.kind,
            r.subject,
            json.dumps(r.proposal, default=str)[:60],
            r.allowed_roles,
            f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
            r.flow_run_id or "",
        )
    out.print(table)
    from notifications.slack import approval_channels

    out.print(f"{len(rows)} pending; {approval_channels(s)}", highlight=False)


@app.command()
def approve(
    approval_id: int,
    operator: Annotated[str, typer.Option("--as", help="Your operator name.")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve.")] = False,
    comment: Annotated[str, typer.Option("--comment", help="Kept in the audit trail.")] = "",
) -> None:
    """Answer a checkpoint: same checks as Slack and the Prefect UI; the first answer wins."""
    from protocol.approvals import Answer, ApprovalDesk, Refusal

    s = settings()
    desk = ApprovalDesk.from_settings(s, engine())
    answer = Answer(
        approval_id=approval_id,
        verdict="reject" if reject else "approve",
        via="cli",
        operator=operator,
        comment=comment,
    )
    try:
        decided = desk.decide(answer)
    except Refusal as refusal:
        raise fail(f"refused ({refusal.reason}): {refusal.message}", 3) from None
    verb = "rejected" if reject else "approved"
    out.print(f"approval #{approval_id} {verb} by {decided.operator}", highlight=False)
    if decided.resumed is not None and not decided.resumed.accepted:
        err.print(
            f"[yellow]the run was not resumed ({decided.resumed.status} "
            f"{decided.resumed.reason}); it acts on this decision when it next reads it, "
            "at the latest at expiry[/yellow]",
            highlight=False,
        )


def main() -> None:
    app()
