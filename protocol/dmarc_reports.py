"""What the DMARC aggregate reports say, per published domain and sending source (read only).

Receivers report, per domain whose DMARC record names our `rua` address, how much mail each
source IP sent in the report's period and whether it passed DMARC: DKIM or SPF passing aligned
with the header From domain (RFC 7489 6.6.2; policy_evaluated's dkim and spf say "pass" only
when aligned). The relay stores the reports (relay/inbound/dmarc_store.py); here they are read
for `axiom dmarc reports` and for the domain-health runbook:

- summary: per domain and source IP over a time range, messages, DMARC passes and failures,
  and whether the source is one of our sending IPs (an IpAddress row, any state). Sources that
  are not ours are the customer's other senders, forwarders or someone spoofing the domain:
  the customer's business, not an incident of ours.
- our_failures: the rows where OUR IPs fail DMARC for a domain at least min_messages times: the
  signal that something of ours broke (a DKIM key, the return path's SPF) and an incident is due.

A record belongs to the time range when its report's period begins in [since, until).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import case, func, or_, select
from sqlmodel import Session

from models import IpAddress
from models.audit import as_utc
from models.dmarc import DmarcRecord, DmarcReport

_PASSED = or_(DmarcRecord.dkim == "pass", DmarcRecord.spf == "pass")


@dataclass(frozen=True)
class SourceSummary:
    domain: str  # the domain the policy was published for
    source_ip: str
    ours: bool  # one of our sending IPs
    messages: int
    dmarc_pass: int  # messages with DKIM or SPF passing aligned
    dmarc_fail: int
    dkim_pass: int  # of which DKIM passed aligned
    spf_pass: int  # of which SPF passed aligned
    reporters: tuple[str, ...]  # the organisations that reported it
    first_begin: datetime  # the earliest and latest report period starts in the range
    last_begin: datetime

    @property
    def fail_rate(self) -> float:
        return self.dmarc_fail / self.messages if self.messages else 0.0

    def as_json(self) -> dict:
        data = asdict(self)
        data["reporters"] = list(self.reporters)
        data["fail_rate"] = round(self.fail_rate, 4)
        return data


def our_addresses(session: Session) -> set[str]:
    """Every IpAddress of ours, normalised as the relay stores report sources."""
    return {_normalised(a) for a in session.execute(select(IpAddress.address)).scalars()}


def summary(
    session: Session, *, domain: str | None, since: datetime, until: datetime
) -> list[SourceSummary]:
    """Per (domain, source IP), most messages first. domain: that published domain only."""
    where = [DmarcRecord.begin >= since, DmarcRecord.begin < until]
    if domain is not None:
        where.append(DmarcRecord.domain == domain.lower().rstrip("."))
    return _summaries(session, where, our_addresses(session))


def our_failures(
    session: Session, *, since: datetime, until: datetime | None = None, min_messages: int = 1
) -> list[SourceSummary]:
    """Per (domain, our source IP): where our IPs failed DMARC at least min_messages times
    since `since` (until `until`, default no end), most failures first."""
    ours = our_addresses(session)
    if not ours:
        return []
    where = [DmarcRecord.source_ip.in_(sorted(ours)), DmarcRecord.begin >= since]
    if until is not None:
        where.append(DmarcRecord.begin < until)
    rows = _summaries(session, where, ours)
    failing = [r for r in rows if r.dmarc_fail >= max(min_messages, 1)]
    return sorted(failing, key=lambda r: (-r.dmarc_fail, r.domain, r.source_ip))


def _summaries(session: Session, where: list, ours: set[str]) -> list[SourceSummary]:
    passed = func.sum(case((_PASSED, DmarcRecord.count), else_=0))
    query = (
        select(
            DmarcRecord.domain,
            DmarcRecord.source_ip,
            func.sum(DmarcRecord.count),
            passed,
            func.sum(case((DmarcRecord.dkim == "pass", DmarcRecord.count), else_=0)),
            func.sum(case((DmarcRecord.spf == "pass", DmarcRecord.count), else_=0)),
            func.min(DmarcRecord.begin),
            func.max(DmarcRecord.begin),
        )
        .where(*where)
        .group_by(DmarcRecord.domain, DmarcRecord.source_ip)
    )
    totals = session.execute(query).all()
    reporters = _reporters(session, where)
    rows = [
        SourceSummary(
            domain=d,
            source_ip=ip,
            ours=ip in ours,
            messages=int(messages or 0),
            dmarc_pass=int(ok or 0),
            dmarc_fail=int(messages or 0) - int(ok or 0),
            dkim_pass=int(dkim or 0),
            spf_pass=int(spf or 0),
            reporters=tuple(sorted(reporters.get((d, ip), ()))),
            first_begin=as_utc(first),
            last_begin=as_utc(last),
        )
        for d, ip, messages, ok, dkim, spf, first, last in totals
    ]
    return sorted(rows, key=lambda r: (-r.messages, r.domain, r.source_ip))


def _reporters(session: Session, where: list) -> dict[tuple[str, str], set[str]]:
    query = (
        select(DmarcRecord.domain, DmarcRecord.source_ip, DmarcReport.org_name)
        .join(DmarcReport, DmarcReport.id == DmarcRecord.report_id)
        .where(*where)
        .distinct()
    )
    found: dict[tuple[str, str], set[str]] = {}
    for d, ip, org in session.execute(query).all():
        found.setdefault((d, ip), set()).add(org)
    return found


def _normalised(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
