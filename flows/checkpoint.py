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
from flows.resources import engine_for
from models import Approval
from models.audit import as_utc
from notifications.desk import approval_desk
from notifications.slack import compact
from notifications.templates import render
from protocol.approvals import PENDING, Answer, ApprovalDesk, Refusal
from runbooks.loader import checkpoints
from runbooks.schema import RunbookBase

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
) -> Decision:
    """Pause the current flow run until a person allowed for `kind` answers, or it expires.

    ttl and safe_default default to the kind's declaration in runbooks/checkpoints.yaml;
    settings are the run's (flows.resources.settings()), resolved once by the flow.
    runbook is the procedure's own (its id and version go on the Approval row and on every
    audit entry about it); without one, runbooks/checkpoints.yaml's.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("request_approval() runs inside a flow run")
    declared = checkpoints()
    checkpoint = declared.spec.for_kind(kind)
    runbook = runbook or declared
    desk = approval_desk(settings, engine_for(settings))
    stop = threading.Event()
    timer: threading.Timer | None = None
    try:
        approval = desk.open(
            checkpoint=checkpoint,
            subject=subject,
            proposal=proposal,
            evidence=evidence,
            runbook_id=runbook.id,
            runbook_version=runbook.version,
            flow_run_id=str(context.flow_run.id),
            ttl=ttl,
            safe_default=safe_default,
        )
        assert approval.id is not None
        logger = get_run_logger()
        logger.info(
            "approval #%s requested: %s on %s; answer in Slack, in this run's Resume form, "
            "or with `axiom approve %s --as NAME [--reject]`",
            approval.id,
            kind,
            subject,
            approval.id,
        )
        threading.Thread(
            target=desk.announce, args=(approval.id, stop), name="slack-announce", daemon=True
        ).start()
        timer = threading.Timer(
            _seconds_left(desk, approval) + 0.05, desk.expire_and_wake, args=(approval.id,)
        )
        timer.daemon = True
        timer.start()
        form = ApprovalAnswer.with_initial_data(
            description=_form_description(checkpoint.title, approval, settings.slack_language)
        )
        final = _wait_for_decision(desk, approval.id, form, settings.checkpoint_poll_seconds)
        logger.info(
            "approval #%s %s%s",
            final.id,
            final.state,
            f" by {final.decided_by} via {final.decided_via}" if final.decided_by else "",
        )
        return Decision.from_row(final)
    finally:
        stop.set()
        if timer is not None:
            timer.cancel()


def _wait_for_decision(desk: ApprovalDesk, approval_id: int, form, poll_seconds: int) -> Approval:
    logger = get_run_logger()
    pauses = 0
    while True:
        row = _reread(desk, approval_id)
        if row.state != PENDING:
            return row
        left = _seconds_left(desk, row)
        if left <= 0:
            return desk.expire(approval_id) or row
        pauses += 1
        try:
            answer = pause_flow_run(
                wait_for_input=form,
                timeout=math.ceil(left) + PAUSE_GRACE_SECONDS,
                poll_interval=poll_seconds,
                key=f"approval-{approval_id}-{pauses}",
            )
        except FlowPauseTimeout:
            logger.warning("approval #%s: the expiry timer did not wake the run", approval_id)
            continue
        row = _reread(desk, approval_id)
        if row.state != PENDING:
            return row  # recorded by an answer path (Slack, CLI) or the expiry
        # Woken with the row still pending: the Prefect UI form or a hand-made API call.
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
            logger.warning(
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
