"""Domain health: every active domain's DNS re-checked, and the DMARC reports about our mail.

Run daily by flows/domain_health.py (runbooks/domain-health.yaml). It changes nothing the relay
reads: it opens incidents (one per domain and cause, folded while open) and resolves a
dns-broken incident on the first check that passes again. A dmarc-failing incident is closed by
a person: reports arrive a day late and a quiet window proves little.

Two decisions, pure functions tested with tables (tests/unit/test_domain_health.py):

- dns_verdict: a check row that DNS did not answer (timeout, SERVFAIL; `transient`) is no
  verdict. Only rows that were answered and fail at error level count: none and nothing
  unanswered → passing; some → broken; only unanswered failures → skipped, and the domain's
  incident (or its absence) stands until a day DNS answers.
- dmarc_findings: per published domain and REPORTER (a receiver sees our mail as it is: one
  reporter failing is a real failure even when others pass, so reporters are not pooled), our
  IPs' messages in the window: failing messages >= dmarc_min_messages and their share
  > dmarc_max_fail_rate opens an incident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, func, or_, select
from sqlmodel import Session

from config.settings import Settings
from models import Domain, DomainState, Incident, IncidentState
from models.dmarc import DmarcRecord, DmarcReport
from protocol import dmarc_reports, dns_checks, incidents
from protocol.dns_checks import Check, DomainCheck
from protocol.domains import get_tenant_name
from runbooks.schema_domains import DomainHealthRunbook, DomainHealthSpec

DNS_BROKEN = "dns-broken"
DMARC_FAILING = "dmarc-failing"

# Rows whose failure makes receivers fail our mail's authentication: DKIM (no aligned signature
# verifies), DMARC (no record: Gmail and Yahoo require one of bulk senders) and the return-path
# subdomain (our MAIL FROM: SPF is checked there, bounces come back there). The From domain's own
# SPF record (spf.*) is not where receivers check SPF for our mail, and our IPs' reverse DNS
# (fcrdns:*) is ours to fix, not the domain's: those are warnings.
CRITICAL_ROWS = ("dkim:", "alignment.dkim", "dmarc.record", "dmarc.policy", "return_path.")


# ---------------------------------------------------------------- decisions (pure)
@dataclass(frozen=True)
class DnsVerdict:
    outcome: str  # passing | broken | skipped
    failing: tuple[Check, ...] = ()  # answered, error level: the incident's evidence
    unanswered: tuple[Check, ...] = ()  # failing only because DNS did not answer
    severity: str | None = None  # for broken
    customer_rows: tuple[Check, ...] = ()  # what the customer's notice names (answered rows)


def dns_verdict(check: DomainCheck) -> DnsVerdict:
    unanswered = tuple(c for c in check.checks if not c.ok and c.transient)
    failing = tuple(c for c in check.checks if c.blocking and not c.transient)
    if not failing:
        blocked = any(c.blocking for c in unanswered)
        return DnsVerdict("skipped" if blocked else "passing", unanswered=unanswered)
    critical = any(c.name.startswith(CRITICAL_ROWS) for c in failing)
    customer = tuple(c for c in check.missing("customer") if not c.transient)
    return DnsVerdict(
        "broken",
        failing=failing,
        unanswered=unanswered,
        severity="critical" if critical else "warning",
        # A notice only when something of the customer's is broken; their warnings go along.
        customer_rows=customer if any(c.blocking for c in customer) else (),
    )


@dataclass(frozen=True)
class ReporterResult:
    """Our IPs' mail for one published domain as one reporter saw it in the window."""

    domain: str
    reporter: str
    messages: int
    failed: int
    sources: dict[str, tuple[int, int]]  # source IP -> (messages, failed)

    @property
    def fail_rate(self) -> float:
        return self.failed / self.messages if self.messages else 0.0

    def as_json(self) -> dict:
        return {
            "reporter": self.reporter,
            "messages": self.messages,
            "failed": self.failed,
            "fail_rate": round(self.fail_rate, 4),
            "sources": {ip: {"messages": m, "failed": f} for ip, (m, f) in self.sources.items()},
        }


def dmarc_findings(
    results: list[ReporterResult], spec: DomainHealthSpec
) -> dict[str, list[ReporterResult]]:
    """Per domain, the reporters at which our mail fails beyond the runbook's thresholds."""
    found: dict[str, list[ReporterResult]] = {}
    for r in results:
        if r.failed >= spec.dmarc_min_messages and r.fail_rate > spec.dmarc_max_fail_rate:
            found.setdefault(r.domain, []).append(r)
    return {d: sorted(rs, key=lambda r: (-r.failed, r.reporter)) for d, rs in found.items()}


# ---------------------------------------------------------------- evidence and actions
@dataclass
class HealthResult:
    checked: list[str] = field(default_factory=list)
    passing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # domain -> why (DNS did not answer)
    incidents: list[int] = field(default_factory=list)  # opened or updated
    resolved: list[int] = field(default_factory=list)
    # {tenant, domain, missing}: a customer is told once per incident, when their rows break
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
        session.execute(
            select(Domain.name).where(Domain.state == DomainState.active).order_by(Domain.name)
        ).scalars()
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
    verdict = dns_verdict(check)
    if verdict.outcome == "skipped":
        names = ", ".join(c.name for c in verdict.unanswered)
        result.skipped[domain] = f"DNS did not answer ({names}); the domain's state stands"
        return
    subject = f"domain:{domain}"
    open_one = session.execute(
        select(Incident).where(Incident.open_key == incidents.dedup_key(DNS_BROKEN, subject))
    ).scalar()
    if verdict.outcome == "passing":
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
    summary = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failing)
    reported = incidents.report(
        session,
        subject=subject,
        cause=DNS_BROKEN,
        severity=verdict.severity or "warning",
        summary=summary[:1000],
        actor=actor,
        now=now,
        evidence={
            "checks": [c.as_json() for c in verdict.failing],
            "unanswered": [c.name for c in verdict.unanswered],
        },
        runbook_id=runbook.id,
        runbook_version=runbook.version,
    )
    incident = reported.incident
    result.incidents.append(incident.id or 0)
    if verdict.customer_rows and "customer_notice" not in incident.evidence:
        # Once per incident: when it opens on the customer's records, or when their records
        # break while it is open for ours (a PTR). Marked now, in the incident's transaction.
        incident.evidence = {**incident.evidence, "customer_notice": now.isoformat()}
        session.add(incident)
        result.notices.append(
            {
                "tenant": get_tenant_name(session, domain),
                "domain": domain,
                "incident": incident.id,
                "missing": [{"name": c.name, "reason": c.reason} for c in verdict.customer_rows],
            }
        )


def reporter_results(session: Session, *, since: datetime, until: datetime) -> list[ReporterResult]:
    """Our IPs' DMARC results per (published domain, reporter) for reports whose period begins
    in [since, until): one grouped query (and one for our addresses)."""
    ours = dmarc_reports.our_addresses(session)
    if not ours:
        return []
    passed = or_(DmarcRecord.dkim == "pass", DmarcRecord.spf == "pass")  # RFC 7489 6.6.2
    query = (
        select(
            DmarcRecord.domain,
            DmarcReport.org_name,
            DmarcRecord.source_ip,
            func.sum(DmarcRecord.count),
            func.sum(case((passed, 0), else_=DmarcRecord.count)),
        )
        .join(DmarcReport, DmarcReport.id == DmarcRecord.report_id)
        .where(
            DmarcRecord.source_ip.in_(sorted(ours)),
            DmarcRecord.begin >= since,
            DmarcRecord.begin < until,
        )
        .group_by(DmarcRecord.domain, DmarcReport.org_name, DmarcRecord.source_ip)
    )
    grouped: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    for domain, reporter, ip, messages, failed in session.execute(query).all():
        grouped.setdefault((domain, reporter), {})[ip] = (int(messages or 0), int(failed or 0))
    return [
        ReporterResult(
            domain=domain,
            reporter=reporter,
            messages=sum(m for m, _ in sources.values()),
            failed=sum(f for _, f in sources.values()),
            sources=dict(sorted(sources.items())),
        )
        for (domain, reporter), sources in sorted(grouped.items())
    ]


def check_dmarc_reports(
    session: Session,
    result: HealthResult,
    *,
    now: datetime,
    actor: str,
    runbook: DomainHealthRunbook,
) -> None:
    """Open (or fold into) a dmarc-failing incident per domain whose mail from our IPs fails
    DMARC at a reporter beyond the runbook's thresholds."""
    since = now - timedelta(days=runbook.spec.dmarc_window_days)
    findings = dmarc_findings(reporter_results(session, since=since, until=now), runbook.spec)
    for domain, failing in sorted(findings.items()):
        said = "; ".join(
            f"{r.reporter}: {r.failed} of {r.messages} ({r.fail_rate:.1%})" for r in failing
        )
        reported = incidents.report(
            session,
            subject=f"domain:{domain}",
            cause=DMARC_FAILING,
            severity="critical",
            summary=(
                f"mail from our IPs fails DMARC for {domain} at {said}, in reports of periods "
                f"beginning since {since:%Y-%m-%d %H:%M} UTC"
            )[:1000],
            actor=actor,
            now=now,
            evidence={
                "since": since.isoformat(),
                "reporters": [r.as_json() for r in failing],
            },
            runbook_id=runbook.id,
            runbook_version=runbook.version,
        )
        result.incidents.append(reported.incident.id or 0)
