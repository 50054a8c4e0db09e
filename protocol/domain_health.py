"""Domain health: every active domain's DNS re-checked, and the DMARC reports about our mail.

Run daily by flows/domain_health.py (runbooks/domain-health.yaml). It changes nothing the relay
reads: it opens incidents (one per domain and cause, folded while open) and resolves a
dns-broken incident on the first check that passes again. A check that DNS did not answer
(timeout, SERVFAIL) is not a verdict: the domain is skipped that day and its state stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session, select

from config.settings import Settings
from models import Domain, DomainState, Incident, IncidentState
from protocol import dmarc_reports, dns_checks, incidents
from protocol.domains import get_tenant_name
from runbooks.schema_domains import DomainHealthRunbook

DNS_BROKEN = "dns-broken"
DMARC_FAILING = "dmarc-failing"


@dataclass
class HealthResult:
    checked: list[str] = field(default_factory=list)
    passing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # domain -> why (DNS did not answer)
    incidents: list[int] = field(default_factory=list)  # opened or updated
    resolved: list[int] = field(default_factory=list)
    # (tenant, domain, missing rows) for incidents opened now: the customer is told once
    notices: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "checked": self.checked,
            "passing": self.passing,
            "skipped": self.skipped,
            "incidents": self.incidents,
            "resolved": self.resolved,
            "notices": [{k: v for k, v in n.items() if k != "missing"} for n in self.notices],
        }


def active_domains(session: Session) -> list[str]:
    """One query: what a run has to look at."""
    return list(
        session.exec(
            select(Domain.name).where(Domain.state == DomainState.active).order_by(Domain.name)
        ).all()
    )


def check_dns(
    session: Session,
    settings: Settings,
    domain: str,
    result: HealthResult,
    *,
    now: datetime,
    actor: str,
    runbook: DomainHealthRunbook,
) -> None:
    """One domain: record its check; open (or fold into) a dns-broken incident, or resolve it."""
    check = dns_checks.check_and_record(session, domain, settings, now=now)
    result.checked.append(domain)
    if check.transient and not check.passed:
        result.skipped[domain] = "DNS did not answer; the domain's state stands"
        return
    subject = f"domain:{domain}"
    open_one = session.exec(
        select(Incident).where(Incident.open_key == incidents.dedup_key(DNS_BROKEN, subject))
    ).first()
    if check.passed:
        result.passing.append(domain)
        if open_one is not None:
            incidents.transition(
                session,
                open_one.id or 0,
                IncidentState.RESOLVED,
                actor=actor,
                note="every DNS check passes again",
                now=now,
            )
            result.resolved.append(open_one.id or 0)
        return
    failing = [c for c in check.checks if c.blocking]
    critical = any(c.name.startswith(("dkim:", "spf.", "dmarc.record")) for c in failing)
    reported = incidents.report(
        session,
        subject=subject,
        cause=DNS_BROKEN,
        severity="critical" if critical else "warning",
        summary="; ".join(f"{c.name}: {c.reason}" for c in failing)[:1000],
        actor=actor,
        now=now,
        evidence={"checks": [c.as_json() for c in failing]},
        runbook_id=runbook.id,
        runbook_version=runbook.version,
    )
    result.incidents.append(reported.incident.id or 0)
    if reported.opened:
        result.notices.append(
            {
                "tenant": get_tenant_name(session, domain),
                "domain": domain,
                "missing": [
                    {"name": c.name, "reason": c.reason} for c in check.missing("customer")
                ],
            }
        )


def check_dmarc_reports(
    session: Session,
    result: HealthResult,
    *,
    now: datetime,
    actor: str,
    runbook: DomainHealthRunbook,
) -> None:
    """Open (or fold into) a dmarc-failing incident per domain whose mail from our IPs fails
    DMARC at reporters beyond the runbook's rate, on at least its minimum of messages."""
    spec = runbook.spec
    since = now - timedelta(days=spec.dmarc_window_days)
    per_domain: dict[str, list[dmarc_reports.SourceSummary]] = {}
    for row in dmarc_reports.summary(session, domain=None, since=since, until=now):
        if row.ours:
            per_domain.setdefault(row.domain, []).append(row)
    for domain, rows in sorted(per_domain.items()):
        messages = sum(r.messages for r in rows)
        failed = sum(r.dmarc_fail for r in rows)
        if failed < spec.dmarc_min_messages or failed / messages <= spec.dmarc_max_fail_rate:
            continue
        reporters = sorted({name for r in rows for name in r.reporters})
        reported = incidents.report(
            session,
            subject=f"domain:{domain}",
            cause=DMARC_FAILING,
            severity="critical",
            summary=(
                f"{failed} of {messages} messages from our IPs failed DMARC in the reports of "
                f"{', '.join(reporters)} since {since:%Y-%m-%d %H:%M} UTC"
            ),
            actor=actor,
            now=now,
            evidence={"sources": [r.as_json() for r in rows if r.dmarc_fail]},
            runbook_id=runbook.id,
            runbook_version=runbook.version,
        )
        result.incidents.append(reported.incident.id or 0)
