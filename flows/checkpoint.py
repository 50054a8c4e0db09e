"""The human checkpoint every runbook shares: record → notify → pause → decide → act on the row.

request_approval() writes a pending Approval row (who may answer, expiry, the proposal and its
evidence, the runbook), posts it to Slack in the background, and pauses the flow run waiting
for an ApprovalAnswer — the Prefect UI's resume form. Answers from Slack and `axiom approve`
are recorded by the approval desk (protocol/approvals.py) first and then resume the run; an answer typed in the UI
form (or sent by hand to the API) wakes the run with the row still pending, and the run puts
it through the very same checks, so an invented approver is refused, audited, and the run
waits again. Either way the run returns only what the row holds. At expiry a timer in this
process expires the row (safe default, audited, Slack updated) and wakes the run.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from config.settings import Settings
from flows.procedure import ProcedureRun
from flows.resources import engine_for
from models import Approval
from models.audit import as_utc
from notifications.desk import approval_desk
from notifications.slack import compact
from notifications.templates import render
from protocol import procedures
from protocol.approvals import PENDING, Answer, ApprovalDesk, Refusal
from runbooks.loader import checkpoints
from runbooks.schema import RunbookBase
from runbooks.schema_protocol import Checkpoint

# Prefect's own pause deadline is only a backstop behind our expiry timer: should the timer
# fail to wake the run (API unreachable at that moment), the run still wakes and expires.
PAUSE_GRACE_SECONDS = 120


class ApprovalAnswer(RunInput):
    """The Prefect UI's resume form; Slack and the CLI resume with the same fields."""

    decision: Literal["approve", "reject"] = Field(description="Approve or reject the proposal")
    operator: str = Field(
        min_length=1,
        max_length=64,
        description="Your operator name, as registered with `axiom operator add`",
    )
    comment: str = Field(default="", max_length=2000, description="Optional, kept in the audit")


@dataclass(frozen=True)
class Decision:
    """What the runbook may act on: always read back from the Approval row."""

    approval_id: int
    outcome: Literal["approved", "rejected", "expired"]
    decided_by: str | None
    via: str | None
    comment: str | None
    safe_default: str

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"

    @classmethod
    def from_row(cls, approval: Approval) -> Decision:
        return cls(
            approval_id=approval.id or 0,
            outcome=approval.state,  # type: ignore[arg-type]
            decided_by=approval.decided_by,
            via=approval.decided_via,
            comment=approval.comment,
            safe_default=approval.safe_default,
        )


def request_approval(
    kind: str,
    subject: str,
    proposal: dict,
    evidence: dict,
    ttl: timedelta | None = None,
    safe_default: str | None = None,
    *,
    settings: Settings,
    runbook: RunbookBase | None = None,
    procedure: ProcedureRun | None = None,
    ask: str | None = None,
) -> Decision:
    """Pause the current flow run until a person allowed for `kind` answers, or it expires.

    ttl and safe_default default to the kind's declaration in runbooks/checkpoints.yaml;
    settings are the run's (flows.resources.settings()), resolved once by the flow.
    runbook is the procedure's own (its id and version go on the Approval row and on every
    audit entry about it); without one, runbooks/checkpoints.yaml's.
    procedure: the durable procedure asking (flows/procedure.py). The request is then one of
    its steps (asked once, however often the run starts again), and in a run of a deployment
    the wait suspends the run: no process waits, and the sweep takes the expiry.
    ask: what tells this request apart from the procedure's other requests of the same kind
    on the same subject (a ladder asks triage.act once per rung); without it, one per kind
    and subject.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("request_approval() runs inside a flow run")
    declared = checkpoints()
    checkpoint = declared.spec.for_kind(kind)
    runbook = runbook or declared
    desk = approval_desk(settings, engine_for(settings))
    request = _Request(checkpoint, runbook, subject, proposal, evidence, ttl, safe_default)
    if procedure is not None:
        return _durable_checkpoint(desk, procedure, request, ask)
    stop = threading.Event()
    timer: threading.Timer | None = None
    try:
        approval = request.open(desk, str(context.flow_run.id))
        assert approval.id is not None
        _log_requested(approval)
        threading.Thread(
            target=desk.announce, args=(approval.id, stop), name="slack-announce", daemon=True
        ).start()
        timer = _expiry_timer(desk, approval)
        form = _form(checkpoint.title, approval, settings.slack_language)
        final = _wait_for_decision(desk, approval.id, form, settings.checkpoint_poll_seconds)
        return _decided(final)
    finally:
        stop.set()
        if timer is not None:
            timer.cancel()


@dataclass(frozen=True)
class _Request:
    """What a checkpoint asks, before it is an Approval row."""

    checkpoint: Checkpoint
    runbook: RunbookBase
    subject: str
    proposal: dict
    evidence: dict
    ttl: timedelta | None
    safe_default: str | None

    def open(self, desk: ApprovalDesk, flow_run_id: str, within=None) -> Approval:
        return desk.open(
            checkpoint=self.checkpoint,
            subject=self.subject,
            proposal=self.proposal,
            evidence=self.evidence,
            runbook_id=self.runbook.id,
            runbook_version=self.runbook.version,
            flow_run_id=flow_run_id,
            ttl=self.ttl,
            safe_default=self.safe_default,
            within=within,
        )


def _durable_checkpoint(
    desk: ApprovalDesk, procedure: ProcedureRun, request: _Request, ask: str | None = None
) -> Decision:
    """The checkpoint as a step of a durable procedure: asked once, waited for without a
    process (in a deployment's run), answered through the same desk."""
    checkpoint = request.checkpoint
    step = f"checkpoint:{checkpoint.kind}:{request.subject}" + (f":{ask}" if ask else "")
    asked = procedure.done(step)
    if asked is None:
        try:
            approval = request.open(
                desk,
                procedure.flow_run_id,
                within=lambda session, row: procedures.record_step(
                    session,
                    procedure.id,
                    step,
                    {"approval_id": row.id},
                    flow_run_id=procedure.flow_run_id,
                    now=procedure.now(),
                ),
            )
        except procedures.StepAlreadyDone as first:  # another run of it asked first
            approval = _reread(desk, first.result["approval_id"])
        else:
            _log_requested(approval)
            _announce_now(desk, approval, procedure)
    else:
        approval = _reread(desk, asked["approval_id"])
    assert approval.id is not None
    timer = None if procedure.durable else _expiry_timer(desk, approval)
    stop = threading.Event()
    if not procedure.durable and approval.state == PENDING:
        threading.Thread(
            target=desk.announce, args=(approval.id, stop), name="slack-announce", daemon=True
        ).start()
    try:
        form = _form(checkpoint.title, approval, procedure.settings.slack_language)
        pauses = 0
        while True:
            row = _reread(desk, approval.id)
            if row.state != PENDING:
                return _decided(row)
            left = _seconds_left(desk, row)
            if left <= 0:
                return _decided(desk.expire(approval.id) or row)
            pauses += 1
            key = f"approval-{approval.id}-{pauses}"
            waiting_for = f"approval #{approval.id} ({checkpoint.kind})"
            until = as_utc(row.expires_at)
            if procedure.durable:
                answer = procedure.wait(
                    key,
                    waiting_for=waiting_for,
                    until=until,
                    approval_id=approval.id,
                    wait_for_input=form,
                )
            else:
                procedure.wait(key, waiting_for=waiting_for, until=until, approval_id=approval.id)
                answer = _pause(approval.id, form, left, pauses, procedure.settings)
            if answer is None or _reread(desk, approval.id).state != PENDING:
                continue
            if procedure.done(f"answered:{key}") is None:  # not yet put through the desk
                _take_form_answer(desk, approval.id, answer)
                handled = {"operator": answer.operator}
                procedure.step(f"answered:{key}", lambda _session, done=handled: done)
    finally:
        stop.set()
        if timer is not None:
            timer.cancel()


def _announce_now(desk: ApprovalDesk, approval: Approval, procedure: ProcedureRun) -> None:
    """Post the request before the run suspends (its process is about to end); should Slack
    be unavailable, the sweep posts it later. A run without a deployment keeps retrying in
    its background thread instead."""
    if procedure.durable and approval.id is not None:
        desk.announce_once(approval.id)


def _log_requested(approval: Approval) -> None:
    get_run_logger().info(
        "approval #%s requested: %s on %s; answer in Slack, in this run's Resume form, "
        "or with `axiom approve %s --as NAME [--reject]`",
        approval.id,
        approval.kind,
        approval.subject,
        approval.id,
    )


def _decided(final: Approval) -> Decision:
    get_run_logger().info(
        "approval #%s %s%s",
        final.id,
        final.state,
        f" by {final.decided_by} via {final.decided_via}" if final.decided_by else "",
    )
    return Decision.from_row(final)


def _expiry_timer(desk: ApprovalDesk, approval: Approval) -> threading.Timer:
    assert approval.id is not None
    timer = threading.Timer(
        _seconds_left(desk, approval) + 0.05, desk.expire_and_wake, args=(approval.id,)
    )
    timer.daemon = True
    timer.start()
    return timer


def _form(title: str, approval: Approval, language: str):
    return ApprovalAnswer.with_initial_data(
        description=_form_description(title, approval, language)
    )


def _wait_for_decision(desk: ApprovalDesk, approval_id: int, form, poll_seconds: int) -> Approval:
    """In-process: pause (the process waits) until the row is decided or expires."""
    pauses = 0
    while True:
        row = _reread(desk, approval_id)
        if row.state != PENDING:
            return row
        left = _seconds_left(desk, row)
        if left <= 0:
            return desk.expire(approval_id) or row
        pauses += 1
        answer = _pause(approval_id, form, left, pauses, None, poll_seconds)
        if answer is None:
            continue
        if _reread(desk, approval_id).state != PENDING:
            continue  # recorded by an answer path (Slack, CLI) or the expiry
        _take_form_answer(desk, approval_id, answer)


def _pause(
    approval_id: int,
    form,
    left: float,
    pauses: int,
    settings: Settings | None,
    poll_seconds: int | None = None,
):
    """Pause this run (its process waits); None when Prefect's backstop deadline woke it."""
    poll = poll_seconds if poll_seconds is not None else settings.checkpoint_poll_seconds  # type: ignore[union-attr]
    try:
        return pause_flow_run(
            wait_for_input=form,
            timeout=math.ceil(left) + PAUSE_GRACE_SECONDS,
            poll_interval=poll,
            key=f"approval-{approval_id}-{pauses}",
        )
    except FlowPauseTimeout:
        get_run_logger().warning("approval #%s: the expiry timer did not wake the run", approval_id)
        return None


def _take_form_answer(desk: ApprovalDesk, approval_id: int, answer: ApprovalAnswer) -> None:
    """Woken with the row still pending: the Prefect UI form or a hand-made API call. The
    answer goes through the desk's checks like any other; a refusal means waiting again."""
    try:
        desk.decide(
            Answer(
                approval_id=approval_id,
                verdict=answer.decision,
                via="prefect-ui",
                operator=answer.operator,
                comment=answer.comment,
            ),
            resume_flow=False,
        )
    except Refusal as refusal:
        get_run_logger().warning(
            "approval #%s: resume by %r refused (%s: %s); waiting again",
            approval_id,
            answer.operator,
            refusal.reason,
            refusal.message,
        )


def _reread(desk: ApprovalDesk, approval_id: int) -> Approval:
    row = desk.get(approval_id)
    if row is None:
        raise RuntimeError(f"approval #{approval_id} vanished from the database")
    return row


def _seconds_left(desk: ApprovalDesk, approval: Approval) -> float:
    return (as_utc(approval.expires_at) - desk.clock()).total_seconds()


def _form_description(title: str, approval: Approval, language: str) -> str:
    return render(
        "prefect_approval_form",
        language,
        title=title,
        approval=approval,
        proposal=compact(approval.proposal),
        evidence=compact(approval.evidence),
        roles=approval.allowed_roles.split(","),
        expires_at=f"{as_utc(approval.expires_at):%Y-%m-%d %H:%M} UTC",
    )
