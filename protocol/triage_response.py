"""Acting on what degradation triage found: steps 3 to 5 of runbooks/degradation-triage.yaml.

One incident of the triage runbook (protocol/triage.py `detect` opened it with its cause, its
evidence and the first proposal) is answered by one durable procedure
(flows/degradation_triage.py, action "respond"), which calls these services as its steps:

- `evidence`: the subject's signals now, as the approver reads them (a table and a small
  chart of each clue's rate per window against its levels);
- `apply`: the action, through the operator verbs' services (data-plane state only, audited
  with the approval and the approver): lower_rate throttles the subject's paths to the
  provider (automatic: protective and ending by itself), pause_stream holds the stream,
  move_stream binds it to its overflow pool, pause_tenant pauses the tenant;
- `customer_report`: whom to tell and what, for the customer's report in its language (the customer_report action,
  and after every action that touches the customer's mail);
- `check`: after the cause's interval, the subject's signals since the action against the
  evidence (protocol/triage.py `verify`), and the cause as it stands now for the next rung;
- `resolve` / `escalate`: the incident's state, with a summary on its timeline.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from math import floor
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from models import DeliveryEvent, Domain, EventKind, Incident, IncidentState, Procedure, Tenant
from models.audit import as_utc
from protocol import egress, incidents, suspensions, tenants, triage
from protocol.errors import ServiceError
from protocol.verbs import Act
from runbooks.schema_triage import TriageSpec

RUNG_LIMIT = 6  # a ladder is at most this long (the runbook's longest has 4 rungs)
CHART_WIDTH = 20  # characters of the longest bar
TOUCHES_MAIL = ("pause_stream", "move_stream", "pause_tenant")  # the customer is told


# ---------------------------------------------------------------- what the incident holds
def subject_of(session: Session, label: str) -> triage.Subject:
    """The Subject an incident names (Subject.label's three forms)."""
    kind, _, rest = label.partition(":")
    first, _, second = rest.rpartition("/")
    if not first or not second:
        raise ServiceError(f"{label!r} is not a triage subject (path:, domain:, stream:)")
    if kind == "path":
        return triage.Subject("ip-provider", provider=second, ip=first)
    if kind == "domain":
        return triage.Subject("domain-provider", provider=second, domain=first)
    if kind == "stream":
        return triage.stream_subject(session, first, second)
    raise ServiceError(f"{label!r} is not a triage subject (path:, domain:, stream:)")


def _finding(data: dict) -> triage.Finding:
    return triage.Finding(
        signal=data["signal"],
        level=data["level"],
        window=data["window"],
        start=as_utc(datetime.fromisoformat(data["from"])),
        rate=data["rate"],
        threshold=data["threshold"],
        events=data["events"],
        sends=data["sends"],
        source=data.get("source", ""),
        categories=data.get("categories") or {},
        baseline_rate=data.get("baseline_rate"),
    )


def cause_of(subject: triage.Subject, data: dict) -> triage.Cause:
    """A Cause back from its JSON (Cause.as_json, as detect stores it on the incident)."""
    return triage.Cause(
        name=data["cause"],
        subject=subject,
        severity=data["severity"],
        evidence=tuple(_finding(f) for f in data.get("evidence", [])),
        others=tuple(_finding(f) for f in data.get("others", [])),
    )


def read(session: Session, incident_id: int) -> dict:
    """What the procedure starts from: the incident's subject, cause and evidence."""
    incident = incidents.get(session, incident_id)
    if incident.runbook_id != "degradation-triage":
        raise ServiceError(f"incident #{incident_id} was not opened by degradation-triage")
    if "cause" not in incident.evidence:
        raise ServiceError(f"incident #{incident_id} holds no triage evidence")
    keys = ("cause", "subject", "severity", "behaviour_change", "evidence", "others")
    return {
        "incident_id": incident_id,
        "subject": incident.subject,
        "state": incident.state,
        "cause": {k: incident.evidence.get(k) for k in keys},
    }


def propose_next(
    session: Session, subject_label: str, cause: dict, tried: list[str], rules: TriageSpec
) -> dict:
    """The next rung of the cause's ladder not tried yet, for this cause's severity now."""
    subject = subject_of(session, subject_label)
    action = triage.propose(cause_of(subject, cause), rules, tried)
    return {"action": action.as_json() if action else None}


# ---------------------------------------------------------------- what the approver reads
def _pct(rate: float) -> str:
    return f"{rate * 100:.2f} %"


def evidence(session: Session, subject_label: str, cause: dict, rules: TriageSpec, now) -> dict:
    """The approver's evidence: each finding as a line, and a chart of each clue signal's rate
    per window (15m, 1h, 24h, the 7-day baseline) against its act level."""
    subject = subject_of(session, subject_label)
    rows = {
        f"{f['signal']} {f['window']}": (
            f"{_pct(f['rate'])} ({f['events']} of {f['sends']}; {f['level']} ≥ "
            f"{_pct(f['threshold'])})"
            if not f["signal"].startswith("volume_")
            else f"{f['rate']:.1f}× ({f['events']} vs {f['sends']} a day; {f['level']})"
        )
        for f in cause.get("evidence", [])
    }
    signals = triage.signals_for(session, subject, now)
    clues = [c.signal for c in rules.causes[cause["cause"]].clues]
    chart = render_chart(signals, rules, [s for s in dict.fromkeys(clues) if s in rules.signals])
    return {"findings": rows, "chart": chart}


def render_chart(signals: triage.SubjectSignals, rules: TriageSpec, names: list[str]) -> str:
    """A text chart (monospace) of each signal's rate per window, scaled to its act level."""
    lines: list[str] = []
    for name in names:
        rule = rules.signals[name]
        top = max(rule.short.act, rule.long.act)
        rates = {}
        for window in ("15m", "1h", "24h", triage.BASELINE):
            w = signals.windows[window]
            volume = w.volume(rule.over)
            rates[window] = (sum(w.events(rule).values()) / volume) if volume else None
        scale = max([top, *(r for r in rates.values() if r)]) or 1
        lines.append(
            f"{name} (act {_pct(rule.short.act)} {rule.short.window}, "
            f"{_pct(rule.long.act)} {rule.long.window})"
        )
        for window, rate in rates.items():
            if rate is None:
                lines.append(f"  {window:>3} │{'':<{CHART_WIDTH}}│ no mail")
                continue
            bar = "█" * round(rate / scale * CHART_WIDTH)
            lines.append(f"  {window:>3} │{bar:<{CHART_WIDTH}}│ {_pct(rate)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- acting
def apply(
    session: Session,
    incident_id: int,
    action: dict,
    act: Act,
    runbook: tuple[str, str],
) -> dict:
    """Apply one action of the ladder to the incident's subject and note it on the timeline;
    the incident goes to mitigating. customer_report changes no mail (report_to_customer)."""
    incident = incidents.get(session, incident_id)
    subject = subject_of(session, incident.subject)
    name = action["action"]
    if name == "lower_rate":
        done = lower_rate(session, subject, action, act, incident_id)
    elif name in ("pause_stream", "move_stream"):
        done = _stream_verb(session, subject, name, act, runbook)
    elif name == "pause_tenant":
        done = _pause_tenant(session, subject, act)
    elif name == "customer_report":
        done = {"report": "sent in its own step"}
    else:
        raise ServiceError(f"the triage runbook has no action {name!r}")
    summary = f"{name.replace('_', ' ')}: {_described(name, done)}"
    incidents.add_event(
        session, incident_id, "action", actor=act.actor, summary=summary, now=act.now
    )
    if incident.state in (IncidentState.OPEN, IncidentState.ESCALATED, IncidentState.MONITORING):
        incidents.transition(
            session, incident_id, IncidentState.MITIGATING, actor=act.actor, now=act.now
        )
    return {"action": name, "applied_at": act.now.isoformat(), "done": done}


def _described(name: str, done: dict) -> str:
    if name == "lower_rate":
        return (
            "; ".join(
                f"{p['ip']} → {p['provider']} at most {p['per_minute']}/min until {p['until'][11:16]}Z"
                for p in done["paths"]
            )
            or "no path sent in the last 15 min"
        )
    if name == "pause_stream":
        return f"{done.get('held', '')} held (it left pool {done.get('pool')})"
    if name == "move_stream":
        return f"{done.get('moved', '')} moved from {done.get('pool')} to {done.get('to_pool')}"
    if name == "pause_tenant":
        return f"tenant {done.get('tenant')} paused"
    return "report sent"


def lower_rate(
    session: Session, subject: triage.Subject, action: dict, act: Act, incident_id: int
) -> dict:
    """Throttle the subject's paths to its provider: the IP's, or every IP the domain sent
    from in the last 15 minutes; each to rate_factor × what it sent a minute over those 15
    minutes (at least 1 a minute), for the action's duration. The relay honours the lowest
    active limit of a path, so this never raises a limit the relay's reactions set."""
    if subject.kind not in ("ip-provider", "domain-provider") or subject.provider is None:
        raise ServiceError(f"lower_rate acts on a path or a domain's paths, not {subject.label}")
    since = act.now - timedelta(minutes=15)
    e = DeliveryEvent
    where = [e.provider == subject.provider, e.kind == EventKind.attempt, e.at >= since]
    where.append(e.source_ip == subject.ip if subject.ip else e.from_domain == subject.domain)
    sent = session.exec(select(e.source_ip, func.count()).where(*where).group_by(e.source_ip)).all()
    until = act.now + timedelta(seconds=action.get("duration_seconds") or 3600)
    factor = action.get("rate_factor") or 0.5
    paths = []
    for ip, count in sorted(sent, key=lambda r: r[0] or ""):
        if not ip:
            continue
        per_minute = max(1, floor(count / 15 * factor))
        row = suspensions.throttle_path(
            session, ip, subject.provider, per_minute, until, act, rule_id=f"triage:{incident_id}"
        )
        paths.append(
            {
                "ip": ip,
                "provider": subject.provider,
                "per_minute": per_minute,
                "sent_15m": count,
                "until": until.isoformat(),
                "suspension_id": row.id,
            }
        )
    return {"paths": paths}


def _stream_verb(
    session: Session, subject: triage.Subject, name: str, act: Act, runbook: tuple[str, str]
) -> dict:
    tenant, stream = _tenant_name(session, subject), subject.stream or ""
    if name == "pause_stream":
        try:
            return egress.hold_stream(session, tenant, stream, act, runbook)
        except ServiceError as exc:
            if "already held" not in str(exc):
                raise
            return {"held": f"{tenant}/{stream}", "already": True}
    return egress.move_stream(session, tenant, stream, act)


def _pause_tenant(session: Session, subject: triage.Subject, act: Act) -> dict:
    name = _tenant_name(session, subject)
    if tenants.get_tenant(session, name).paused:
        return {"tenant": name, "already": True}
    tenants.pause_tenant(session, name, act)
    return {"tenant": name}


def _tenant_name(session: Session, subject: triage.Subject) -> str:
    if subject.tenant:
        return subject.tenant
    if subject.tenant_id is not None:
        tenant = session.get(Tenant, subject.tenant_id)
        if tenant is not None:
            return tenant.name
    raise ServiceError(f"{subject.label} names no tenant")


def customer_of(session: Session, subject: triage.Subject) -> str | None:
    """Whose mail the subject is: a stream's tenant, a domain's tenant; a path is shared."""
    if subject.kind == "stream":
        return _tenant_name(session, subject)
    if subject.kind == "domain-provider":
        domain = session.exec(select(Domain).where(Domain.name == subject.domain)).first()
        if domain is not None and domain.tenant_id is not None:
            tenant = session.get(Tenant, domain.tenant_id)
            return tenant.name if tenant else None
    return None


def customer_report(
    session: Session,
    incident_id: int,
    cause: dict,
    *,
    action: str | None,
    done: dict | None,
    now: datetime,
) -> tuple[str | None, dict]:
    """Whom to tell and what (the variables of email_triage_report, rendered in the tenant's
    language by notifications/customer_mail.py): a subject with no customer (a shared path)
    gets no report (None)."""
    subject = subject_of(session, incidents.get(session, incident_id).subject)
    tenant = customer_of(session, subject)
    volume = lambda f: f["signal"].startswith("volume_")  # noqa: E731 — ratios, not rates
    findings: list[dict[str, Any]] = [
        {
            "signal": f["signal"].replace("_", " "),
            "window": f["window"],
            "rate": f"{f['rate']:.1f}×" if volume(f) else _pct(f["rate"]),
            "threshold": f"{f['threshold']:.1f}×" if volume(f) else _pct(f["threshold"]),
            "level": f["level"],
            "events": f["events"],
            "sends": f["sends"],
        }
        for f in cause.get("evidence", [])
    ]
    return tenant, {
        "at": f"{now:%Y-%m-%d %H:%M} UTC",
        "stream": subject.stream,
        "domain": subject.domain,
        "provider": subject.provider,
        "cause": cause["cause"],
        "findings": findings,
        "action": action,
        "pool": (done or {}).get("to_pool"),
        "incident_id": incident_id,
    }


# ---------------------------------------------------------------- verifying
def check(
    session: Session,
    incident_id: int,
    cause: dict,
    rules: TriageSpec,
    *,
    since: datetime,
    now: datetime,
) -> dict:
    """The subject's signals since the action (its windows start again there) against the
    cause it was taken for: improved or not, with the findings, and the cause as it stands
    now (its clues found since the action), from which the next rung is proposed."""
    incident = incidents.get(session, incident_id)
    subject = subject_of(session, incident.subject)
    since, now = as_utc(since), as_utc(now)
    signals = triage.signals_for(session, subject, now, since=since)
    found = triage.assess(signals, rules, now, since=since)
    before = cause_of(subject, cause)
    verdict = triage.verify(before, found, rules)
    clues = {c.signal for c in rules.causes[before.name].clues}
    still = [f for f in found if f.signal in clues]
    worst = max((triage.SEVERITY_RANK[f.severity] for f in still), default=None)
    now_cause = None
    if still and worst is not None:
        severity = next(s for s, r in triage.SEVERITY_RANK.items() if r == worst)
        now_cause = triage.Cause(before.name, subject, severity, tuple(still)).as_json()
    return {
        "verdict": verdict,
        "at": now.isoformat(),
        "since": since.isoformat(),
        "findings": [f.as_json() for f in found],
        "cause": now_cause,
        "sent_since": signals.after.sent if signals.after else None,
    }


def resolve(session: Session, incident_id: int, note: str, *, actor: str, now: datetime) -> dict:
    incident = incidents.transition(
        session, incident_id, IncidentState.RESOLVED, actor=actor, note=note, now=now
    )
    return {"state": incident.state, "note": note}


def escalate(session: Session, incident_id: int, note: str, *, actor: str, now: datetime) -> dict:
    """To people: the incident goes to escalated (or gets the note when it is already)."""
    incident = incidents.get(session, incident_id)
    if incident.state == IncidentState.ESCALATED:
        incidents.add_event(session, incident_id, "note", actor=actor, summary=note, now=now)
    else:
        incidents.transition(
            session, incident_id, IncidentState.ESCALATED, actor=actor, note=note, now=now
        )
    return {"state": IncidentState.ESCALATED, "note": note}


# ---------------------------------------------------------------- the detection's side
def windows_since(session: Session, now: datetime) -> dict[str, datetime]:
    """Per subject label, when the last triage incident on it was resolved within the last
    24 h: its windows start again there (an action's effect is not counted twice, and a
    subject still misbehaving is caught again rather than exempted)."""
    rows = session.exec(
        select(Incident.subject, func.max(Incident.resolved_at))
        .where(
            Incident.runbook_id == "degradation-triage",
            Incident.resolved_at.is_not(None),
            Incident.resolved_at > as_utc(now) - timedelta(days=1),
        )
        .group_by(Incident.subject)
    ).all()
    return {label: as_utc(at) for label, at in rows if at is not None}


def needing_response(session: Session, incident_ids: list[int]) -> list[int]:
    """Of these incidents, the unresolved ones with a proposal and no respond procedure yet."""
    wanted = []
    for incident_id in sorted(set(incident_ids)):
        incident = session.get(Incident, incident_id)
        if incident is None or incident.state not in incidents.UNRESOLVED:
            continue
        if not incident.evidence.get("proposal"):
            continue
        started = session.exec(
            select(Procedure.id).where(
                Procedure.name == "degradation-triage",
                Procedure.subject == f"incident:{incident_id}",
            )
        ).first()
        if started is None:
            wanted.append(incident_id)
    return wanted
