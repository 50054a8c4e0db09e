"""Stores a DMARC aggregate report (relay/inbound/dmarc.py reads it) in one transaction.

Only reports about our customers' domains are kept: the published domain's organisational
domain (the public suffix list's, as DMARC finds it) is one of ours or a parent of one of ours
(a customer sending from news.shop.example publishes DMARC at shop.example or at news.). Anyone can
mail the rua address; a report about somebody else's domain is refused, not stored, so the
tables hold what the Protocol reads and no one can fill them with strangers' data.

A report already stored (same org_name and report_id) is not stored again and is still
acknowledged: a receiver that lost our 250 sends it again, and must not be told to keep trying.
The unique constraint decides when two copies race; the loser's transaction is rolled back and
reported as the duplicate it is. No audit entry: receiving a report decides nothing; the rows
are the record, and what is done about them (domain-health's incidents) is audited there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache

from sqlalchemy import Engine, insert, or_, select
from sqlalchemy.exc import IntegrityError

from models import Domain
from models.db import session_scope
from models.dmarc import DmarcRecord, DmarcReport
from relay.inbound.dmarc import AggregateReport

BATCH = 1000  # records per INSERT


class ForeignDomain(Exception):
    """The report is about a domain that does not send through us."""


@dataclass(frozen=True)
class Stored:
    report_row_id: int  # DmarcReport.id (the first copy's for a duplicate)
    records: int
    duplicate: bool


def store_report(engine: Engine, report: AggregateReport, now: datetime) -> Stored:
    """Store report; committed when this returns. Raises ForeignDomain for a domain not ours,
    SQLAlchemyError when the database fails (the caller answers 4xx)."""
    try:
        return _store(engine, report, now)
    except IntegrityError:
        # A concurrent copy won the unique (org_name, report_id): this one is the duplicate.
        existing = _existing(engine, report)
        if existing is None:
            raise
        return Stored(existing, len(report.records), duplicate=True)


def _store(engine: Engine, report: AggregateReport, now: datetime) -> Stored:
    with session_scope(engine) as session:
        if not _ours(session, report.domain):
            raise ForeignDomain(report.domain)
        existing = session.execute(_same(report)).scalar()
        if existing is not None:
            return Stored(existing, len(report.records), duplicate=True)
        row = DmarcReport(
            org_name=report.org_name,
            email=report.email,
            report_id=report.report_id,
            domain=report.domain,
            begin=report.begin,
            end=report.end,
            p=report.policy.p,
            sp=report.policy.sp,
            adkim=report.policy.adkim,
            aspf=report.policy.aspf,
            messages=report.messages,
            received_at=now,
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        rows = [_record_row(row.id, report, r) for r in report.records]
        for start in range(0, len(rows), BATCH):
            session.execute(insert(DmarcRecord), rows[start : start + BATCH])
        session.commit()
        return Stored(row.id, len(rows), duplicate=False)


def _record_row(report_row_id: int, report: AggregateReport, record) -> dict:
    return {
        "report_id": report_row_id,
        "domain": report.domain,
        "begin": report.begin,
        "source_ip": record.source_ip,
        "count": record.count,
        "disposition": record.disposition,
        "dkim": record.dkim,
        "spf": record.spf,
        "header_from": record.header_from,
        "envelope_from": record.envelope_from,
        "dkim_results": [
            {"domain": d.domain, "selector": d.selector, "result": d.result}
            for d in record.dkim_results
        ],
        "spf_domain": record.spf_domain,
        "spf_result": record.spf_result,
        "reasons": list(record.reasons),
    }


def _same(report: AggregateReport):
    return select(DmarcReport.id).where(
        DmarcReport.org_name == report.org_name, DmarcReport.report_id == report.report_id
    )


def _existing(engine: Engine, report: AggregateReport) -> int | None:
    with session_scope(engine) as session:
        return session.execute(_same(report)).scalar()


def _ours(session, domain: str) -> bool:
    """A Domain of ours is domain's organisational domain or under it."""
    organisational = _suffixes().privatesuffix(domain)
    if organisational is None:  # a public suffix itself (com, co.uk): no one's domain
        return False
    query = select(Domain.id).where(
        or_(
            Domain.name == organisational,
            Domain.name.like(f"%.{_escaped(organisational)}", escape="\\"),
        )
    )
    return session.execute(query.limit(1)).scalar() is not None


@cache
def _suffixes():
    from publicsuffixlist import PublicSuffixList  # the bundled list: offline, read once

    return PublicSuffixList()


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
