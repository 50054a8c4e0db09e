"""The one answer path of every checkpoint: ordered checks, the first answer wins, all audited.

Slack clicks, the Prefect UI's resume form and `axiom approve` all end in ApprovalDesk.decide.
It checks in StackStorm's order (st2common/services/inquiry.py): the request exists, is still
pending and not expired → the person is a known operator → holding a role this kind allows
(deny by default) → the answer is valid. Each failure is its own Refusal with a reason code,
audited under the identity it claimed and shown to the person. The row is then flipped with a
conditional UPDATE so only the first answer wins, the paused run is resumed (Prefect answers
HTTP 200 even when it refuses, so the body's status is what counts) and the Slack message is
updated. The row, not the resume, is the record: the run re-reads it after waking and acts
only on what it holds, so a lost resume delays a decision but never changes it.

The desk knows its messenger only as a Notifier (post, update, alert); notifications/ provides
the Slack one and builds a wired desk (notifications.desk.approval_desk), so this service layer
never imports the layer above it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol, get_args

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from models import Approval, Operator
from models.audit import as_utc
from models.audit_trail import record
from models.base import utcnow
from models.db import session_scope
from protocol.operators import operator_named, role_set
from runbooks.schema_protocol import Checkpoint, SafeDefault

log = logging.getLogger("axiom.approvals")

PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"
Via = Literal["slack", "cli", "prefect-ui"]
VERDICTS = {"approve": APPROVED, "reject": REJECTED}
MAX_COMMENT = 2000
# What the expiry timer wakes a run with; the run reads the row (no longer pending) and
# ignores this input.
WAKE_INPUT = {"decision": "reject", "operator": "checkpoint-expiry", "comment": ""}


# ---------------------------------------------------------------- refusals
class Refusal(Exception):
    """An answer that was not recorded; `reason` is stable, `message` is for the person."""

    reason: ClassVar[str] = "refused"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ApprovalNotFound(Refusal):
    reason = "not_found"


class AlreadyDecided(Refusal):
    reason = "already_decided"


class ApprovalExpired(Refusal):
    reason = "expired"


class UnknownOperator(Refusal):
    reason = "unknown_operator"


class NotAllowed(Refusal):
    reason = "not_allowed"


class InvalidAnswer(Refusal):
    reason = "invalid_answer"


# ---------------------------------------------------------------- answers and outcomes
@dataclass(frozen=True)
class Answer:
    approval_id: int
    verdict: str  # "approve" | "reject"; anything else is refused as invalid
    via: Via
    operator: str | None = None  # the name typed: `axiom approve --as`, the Prefect UI form
    slack_user_id: str | None = None  # the Slack user who clicked (verified by the signature)
    comment: str = ""

    @property
    def claimed(self) -> str:
        return (self.slack_user_id if self.via == "slack" else self.operator) or "(nobody)"


@dataclass(frozen=True)
class Resumed:
    accepted: bool
    status: str  # Prefect's SetStateStatus (ACCEPT, REJECT, ABORT, WAIT) or "unreachable"
    reason: str = ""


@dataclass(frozen=True)
class Decided:
    approval: Approval
    operator: str
    resumed: Resumed | None  # None: nothing to resume (no run, or the run is the one asking)


Resumer = Callable[[str, dict], Resumed]


# ---------------------------------------------------------------- the notifier it is given
@dataclass(frozen=True)
class Posted:
    """Where a request was posted, so its message can be updated with the outcome."""

    channel: str
    ts: str


class NotifierUnavailable(Exception):
    """A message not delivered; `transient` (network, rate limit) means try again later."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


class Notifier(Protocol):
    """What the desk needs of a messenger (notifications.slack.SlackNotifier is one).

    Each call raises NotifierUnavailable when the message does not get through.
    """

    def post_approval(self, approval: Approval) -> Posted: ...

    def show_outcome(self, approval: Approval) -> None: ...

    def alert(self, template: str, **context: Any) -> Any: ...


class PrefectResumer:
    """Resumes a paused run through the Prefect API and reports what Prefect said."""

    def __init__(
        self, api_url: str | Callable[[], str], *, attempts: int = 4, first_delay: float = 0.5
    ):
        self._api_url = api_url  # a callable defers Prefect's import until a resume is due
        self.attempts = attempts
        self.first_delay = first_delay

    @property
    def api_url(self) -> str:
        return self._api_url() if callable(self._api_url) else self._api_url

    def __call__(self, flow_run_id: str, run_input: dict) -> Resumed:
        delay, result = self.first_delay, Resumed(False, "unreachable")
        for attempt in range(1, self.attempts + 1):
            result = self._once(flow_run_id, run_input)
            # ABORT "not paused": the run may be between two pauses (it just refused a bad
            # resume and is about to wait again), so try a few times. REJECT is final:
            # the input was refused or the pause timed out.
            if result.accepted or result.status == "REJECT" or attempt == self.attempts:
                break
            time.sleep(delay)
            delay *= 2
        return result

    def _once(self, flow_run_id: str, run_input: dict) -> Resumed:
        from uuid import UUID

        import httpx
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        try:
            with SyncPrefectClient(
                self.api_url,
                auth_string=PREFECT_API_AUTH_STRING.value(),
                api_key=PREFECT_API_KEY.value(),
            ) as client:
                response = client.resume_flow_run(UUID(flow_run_id), run_input=run_input)
        except (httpx.HTTPError, OSError) as exc:
            return Resumed(False, "unreachable", f"{type(exc).__name__}: {exc}")
        if response.status == SetStateStatus.ACCEPT:
            return Resumed(True, "ACCEPT")
        reason = getattr(response.details, "reason", "") or ""
        if response.state is not None and response.state.type == StateType.FAILED:
            reason = reason or "the pause timed out"
        return Resumed(False, response.status.value, reason)


# ---------------------------------------------------------------- the desk
class ApprovalDesk:
    """Opens checkpoints, takes every answer, expires what no one answered."""

    def __init__(
        self,
        engine: Engine,
        *,
        resume: Resumer | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], datetime] = utcnow,
        retry_initial: float = 1.0,
    ):
        """resume: wakes paused runs (PrefectResumer); notifier: posts requests and outcomes
        (None: answers come through the Prefect UI and `axiom approve` only); retry_initial:
        the first back-off, in seconds, while the notifier is unavailable."""
        self.engine = engine
        self.resume = resume
        self.notifier = notifier
        self.clock = clock
        self.retry_initial = retry_initial

    # ------------------------------------------------------------ opening
    def open(
        self,
        *,
        checkpoint: Checkpoint,
        subject: str,
        proposal: dict,
        evidence: dict,
        runbook_id: str,
        runbook_version: str,
        flow_run_id: str | None,
        ttl: timedelta | None = None,
        safe_default: str | None = None,
        within: Callable[[Session, Approval], None] | None = None,
    ) -> Approval:
        """Write the pending row and its audit entry; `within(session, approval)` adds to the
        same transaction (a procedure records the checkpoint as its step there)."""
        if safe_default is not None and safe_default not in get_args(SafeDefault):
            raise ValueError(f"safe default {safe_default!r} is not one of {get_args(SafeDefault)}")
        if ttl is not None and ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, got {ttl}")
        now = self.clock()
        approval = Approval(
            kind=checkpoint.kind,
            subject=subject,
            proposal=proposal,
            evidence=evidence,
            allowed_roles=",".join(checkpoint.roles),
            safe_default=safe_default or checkpoint.safe_default,
            runbook_id=runbook_id,
            runbook_version=runbook_version,
            flow_run_id=flow_run_id,
            created_at=now,
            expires_at=now + (ttl or timedelta(seconds=checkpoint.ttl_seconds)),
        )
        with session_scope(self.engine) as session:
            session.add(approval)
            session.flush()
            record(
                session,
                actor=f"flow:{flow_run_id}" if flow_run_id else "checkpoint",
                action="approval.requested",
                subject=f"approval:{approval.id}",
                evidence={
                    "kind": approval.kind,
                    "subject": subject,
                    "proposal": proposal,
                    "evidence": evidence,
                    "allowed_roles": checkpoint.roles,
                    "expires_at": approval.expires_at,
                    "safe_default": approval.safe_default,
                },
                runbook_id=runbook_id,
                runbook_version=runbook_version,
            )
            if within is not None:
                within(session, approval)
            session.commit()
            session.refresh(approval)
        return approval

    def get(self, approval_id: int) -> Approval | None:
        with session_scope(self.engine) as session:
            return session.get(Approval, approval_id)

    def pending(self) -> list[Approval]:
        with session_scope(self.engine) as session:
            return list(
                session.exec(
                    select(Approval)
                    .where(Approval.state == PENDING)
                    .order_by(col(Approval.expires_at))
                ).all()
            )

    # ------------------------------------------------------------ answering
    def decide(self, answer: Answer, *, resume_flow: bool = True) -> Decided:
        """Record the first valid answer, resume the run, update Slack; or raise a Refusal.

        resume_flow=False when the answer arrived by resuming the run itself (the Prefect UI
        form): the run is already awake and is the one asking.
        """
        try:
            approval, operator = self._record(answer)
        except Refusal as refusal:
            self._audit_refusal(answer, refusal)
            raise
        resumed = None
        if resume_flow and approval.flow_run_id and self.resume is not None:
            run_input = {
                "decision": answer.verdict,
                "operator": operator,
                "comment": answer.comment,
            }
            resumed = self.resume(approval.flow_run_id, run_input)
            if not resumed.accepted:
                log.warning(
                    "approval #%s: decision recorded but run %s not resumed (%s %s); "
                    "it acts on the recorded decision when it reads it, at the latest at expiry",
                    approval.id,
                    approval.flow_run_id,
                    resumed.status,
                    resumed.reason,
                )
                self.audit(
                    actor=f"operator:{operator}",
                    action="approval.resume_failed",
                    approval=approval,
                    evidence={"status": resumed.status, "reason": resumed.reason},
                )
        self._show_outcome(approval)
        return Decided(approval, operator, resumed)

    def _record(self, answer: Answer) -> tuple[Approval, str]:
        now = self.clock()
        with session_scope(self.engine) as session:
            approval = session.get(Approval, answer.approval_id)
            if approval is None:
                raise ApprovalNotFound(f"approval #{answer.approval_id} does not exist")
            _still_open(approval, now)
            operator = _identify(session, answer)
            allowed = role_set(approval.allowed_roles)
            if not allowed & role_set(operator.roles):
                raise NotAllowed(
                    f"operator {operator.name} holds roles [{operator.roles or 'none'}]; "
                    f"{approval.kind} needs one of [{', '.join(sorted(allowed)) or 'none'}]"
                )
            if answer.verdict not in VERDICTS:
                raise InvalidAnswer(f"decision must be approve or reject, not {answer.verdict!r}")
            if len(answer.comment) > MAX_COMMENT:
                raise InvalidAnswer(f"comment is longer than {MAX_COMMENT} characters")
            state = VERDICTS[answer.verdict]
            flipped = session.exec(
                update(Approval)
                .where(col(Approval.id) == approval.id, col(Approval.state) == PENDING)
                .values(
                    state=state,
                    decided_by=operator.name,
                    decided_via=answer.via,
                    comment=answer.comment or None,
                    decided_at=now,
                )
            ).rowcount
            if flipped != 1:  # another answer (or the expiry) committed first
                session.rollback()
                raise AlreadyDecided(_describe(self.get(answer.approval_id) or approval))
            session.refresh(approval)
            record(
                session,
                actor=f"operator:{operator.name}",
                action=f"approval.{state}",
                subject=f"approval:{approval.id}",
                evidence={
                    "kind": approval.kind,
                    "subject": approval.subject,
                    "via": answer.via,
                    "slack_user_id": answer.slack_user_id,
                    "comment": answer.comment,
                    "flow_run_id": approval.flow_run_id,
                },
                runbook_id=approval.runbook_id,
                runbook_version=approval.runbook_version,
                at=now,
            )
            session.commit()
            return approval, operator.name

    def _audit_refusal(self, answer: Answer, refusal: Refusal) -> None:
        approval = (
            self.get(answer.approval_id) if not isinstance(refusal, ApprovalNotFound) else None
        )
        log.info(
            "approval #%s: refused %s answer from %s: %s",
            answer.approval_id,
            answer.via,
            answer.claimed,
            refusal.message,
        )
        self.audit(
            actor=f"{answer.via}:{answer.claimed}",
            action="approval.refused",
            approval=approval,
            subject=f"approval:{answer.approval_id}",
            evidence={
                "reason": refusal.reason,
                "detail": refusal.message,
                "via": answer.via,
                "verdict": answer.verdict,
                "operator": answer.operator,
                "slack_user_id": answer.slack_user_id,
            },
        )

    # ------------------------------------------------------------ expiry
    def overdue(self) -> list[Approval]:
        """Pending approvals past their expiry: the sweep's first question (one indexed query)."""
        with session_scope(self.engine) as session:
            return list(
                session.exec(
                    select(Approval)
                    .where(Approval.state == PENDING, col(Approval.expires_at) <= self.clock())
                    .order_by(col(Approval.id))
                ).all()
            )

    def expire(self, approval_id: int, *, run_gone: str | None = None) -> Approval | None:
        """Past its time to live and still pending → expired, audited, Slack updated, escalated.

        run_gone: the run that asked is gone and nothing can continue it (the reason, e.g.
        "flow run 0f… is Crashed"): the row is expired now, before its time, with that reason.
        Returns the row as it stands; a row already decided (or not yet due) is left alone.
        """
        now = self.clock()
        with session_scope(self.engine) as session:
            approval = session.get(Approval, approval_id)
            if approval is None or approval.state != PENDING:
                return approval
            if run_gone is None and now < as_utc(approval.expires_at):
                return approval
            flipped = session.exec(
                update(Approval)
                .where(col(Approval.id) == approval_id, col(Approval.state) == PENDING)
                .values(state=EXPIRED, decided_via="expiry", decided_at=now)
            ).rowcount
            if flipped != 1:  # an answer landed at the last moment: it stands
                session.rollback()
                return self.get(approval_id)
            session.refresh(approval)
            record(
                session,
                actor="checkpoint:expiry",
                action="approval.expired",
                subject=f"approval:{approval_id}",
                evidence={
                    "kind": approval.kind,
                    "subject": approval.subject,
                    "expires_at": approval.expires_at,
                    "safe_default": approval.safe_default,
                    "flow_run_id": approval.flow_run_id,
                    "reason": run_gone or "its time to live ran out",
                },
                runbook_id=approval.runbook_id,
                runbook_version=approval.runbook_version,
                at=now,
            )
            session.commit()
        log.warning(
            "approval #%s (%s on %s) expired unanswered; safe default: %s",
            approval.id,
            approval.kind,
            approval.subject,
            approval.safe_default,
        )
        self._show_outcome(approval)
        if approval.safe_default == "do_nothing_and_escalate":
            self._escalate(approval)
        return approval

    def expire_and_wake(self, approval_id: int) -> None:
        """The expiry timer's job: expire the row, then wake the run so it reads the row.

        The run is woken even when an answer got there first: if that answer's own resume
        was lost (Prefect unreachable), this is when the run learns of it. A run that is
        already awake just refuses the resume.
        """
        approval = self.expire(approval_id)
        while approval is not None and approval.state == PENDING:  # the timer ran early
            time.sleep(max(0.05, (as_utc(approval.expires_at) - self.clock()).total_seconds()))
            approval = self.expire(approval_id)
        if approval is None or not approval.flow_run_id or self.resume is None:
            return
        woke = self.resume(approval.flow_run_id, WAKE_INPUT)
        if not woke.accepted:
            log.info(
                "approval #%s (%s): run %s not woken (%s %s); it was awake or is gone",
                approval_id,
                approval.state,
                approval.flow_run_id,
                woke.status,
                woke.reason,
            )

    # ------------------------------------------------------------ Slack
    def announce(self, approval_id: int, stop: threading.Event) -> None:
        """Post the request to Slack, retrying with back-off while it is pending.

        Runs in its own thread; a Slack outage only delays the message, the other answer
        paths work all along.
        """
        if self.notifier is None:
            log.info(
                "Slack is not set up: answer approval #%s in the Prefect UI or with "
                "`axiom approve %s --as NAME`",
                approval_id,
                approval_id,
            )
            return
        delay, attempt = self.retry_initial, 0
        while not stop.is_set():
            attempt += 1
            if self._post(approval_id, attempt, retry_in=delay):
                return
            stop.wait(delay)
            delay = min(delay * 2, 60.0)

    def announce_once(self, approval_id: int) -> bool:
        """One try at posting a pending request that has no Slack message yet (a run about to
        suspend; the sweep for those whose post failed). True when nothing is left to do."""
        if self.notifier is None:
            return True
        approval = self.get(approval_id)
        if approval is None or approval.slack_ts:
            return True
        return self._post(approval_id, 1, retry_in=None)

    def unposted(self) -> list[int]:
        """Pending requests without a Slack message (Slack set up, and the post failed)."""
        if self.notifier is None:
            return []
        with session_scope(self.engine) as session:
            return list(
                session.exec(
                    select(Approval.id).where(
                        Approval.state == PENDING, col(Approval.slack_ts).is_(None)
                    )
                ).all()
            )

    def _post(self, approval_id: int, attempt: int, *, retry_in: float | None) -> bool:
        """Post once; True when done (posted, answered meanwhile, or refused for good)."""
        assert self.notifier is not None
        approval = self.get(approval_id)
        if approval is None or approval.state != PENDING:
            return True
        try:
            posted = self.notifier.post_approval(approval)
        except NotifierUnavailable as exc:
            if not exc.transient:
                log.error(
                    "Slack refused approval #%s (%s); not retrying. Answer in the Prefect UI "
                    "or with `axiom approve`",
                    approval_id,
                    exc,
                )
                return True
            log.warning(
                "Slack unavailable for approval #%s (attempt %d: %s); %s; "
                "the Prefect UI and `axiom approve` work meanwhile",
                approval_id,
                attempt,
                exc,
                f"retrying in {retry_in:.1f} s" if retry_in else "the sweep tries again",
            )
            return False
        with session_scope(self.engine) as session:
            session.exec(
                update(Approval)
                .where(col(Approval.id) == approval_id)
                .values(slack_channel=posted.channel, slack_ts=posted.ts)
            )
            session.commit()
        current = self.get(approval_id)
        if current is not None and current.state != PENDING:
            self._show_outcome(current)  # answered elsewhere while the post was in flight
        return True

    def _show_outcome(self, approval: Approval) -> None:
        if self.notifier is None or not approval.slack_ts:
            return
        for delay in (0.5, 1.0, 2.0, None):
            try:
                self.notifier.show_outcome(approval)
                return
            except NotifierUnavailable as exc:
                if not exc.transient or delay is None:
                    log.warning("Slack message of approval #%s not updated: %s", approval.id, exc)
                    return
                time.sleep(delay)

    def _escalate(self, approval: Approval) -> None:
        if self.notifier is None:
            log.warning("approval #%s expired; Slack is not set up to escalate it", approval.id)
            return
        try:
            self.notifier.alert(
                "slack_alert_escalation",
                approval=approval,
                expired_at=as_utc(approval.expires_at).strftime("%Y-%m-%d %H:%M UTC"),
                roles=_roles_list(approval.allowed_roles),
            )
        except NotifierUnavailable as exc:
            log.error("approval #%s expired and the escalation alert failed: %s", approval.id, exc)

    # ------------------------------------------------------------ audit
    def audit(
        self,
        *,
        actor: str,
        action: str,
        evidence: dict,
        approval: Approval | None = None,
        subject: str | None = None,
    ) -> None:
        """One audit entry in its own transaction (refusals change nothing else)."""
        with session_scope(self.engine) as session:
            record(
                session,
                actor=actor,
                action=action,
                subject=subject or f"approval:{approval.id if approval else '?'}",
                evidence=evidence,
                runbook_id=approval.runbook_id if approval else None,
                runbook_version=approval.runbook_version if approval else None,
            )
            session.commit()


# ---------------------------------------------------------------- checks
def _still_open(approval: Approval, now: datetime) -> None:
    if approval.state == EXPIRED or (
        approval.state == PENDING and now >= as_utc(approval.expires_at)
    ):
        raise ApprovalExpired(
            f"it expired at {as_utc(approval.expires_at):%Y-%m-%d %H:%M:%S} UTC "
            f"and the safe default ({approval.safe_default}) applies"
        )
    if approval.state != PENDING:
        raise AlreadyDecided(_describe(approval))


def _identify(session: Session, answer: Answer) -> Operator:
    if answer.via == "slack":
        operator = (
            session.exec(
                select(Operator).where(Operator.slack_user_id == answer.slack_user_id)
            ).first()
            if answer.slack_user_id
            else None
        )
        if operator is None:
            raise UnknownOperator(f"Slack user {answer.claimed} is not a registered operator")
        return operator
    operator = operator_named(session, answer.operator or "")
    if operator is None:
        name = (answer.operator or "").strip()
        raise UnknownOperator(f"{name or '(no name)'} is not a registered operator")
    return operator


def _describe(approval: Approval) -> str:
    if approval.state == EXPIRED:
        return "it expired"
    when = f" at {as_utc(approval.decided_at):%Y-%m-%d %H:%M:%S} UTC" if approval.decided_at else ""
    return f"{approval.state} by {approval.decided_by} via {approval.decided_via}{when}"


def _roles_list(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]
