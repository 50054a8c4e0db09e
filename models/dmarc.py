"""DMARC aggregate reports receivers sent to the relay's `rua` address, and their records.

One DmarcReport per (reporting organisation, report id): a receiver that sends the same report
twice (a retry after a lost 250, two rua addresses) stores it once. One DmarcRecord per <record>:
mail from one source IP with one set of results, `count` messages of it. The runbooks read
records per published domain and source IP over a time range, and our own source IPs across
every domain, so a record carries a copy of its report's domain and period start (as
DeliveryEvent carries its message's fields) and those reads are one index range each.
"""

from datetime import datetime

from sqlalchemy import JSON, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field


class DmarcReport(SQLModel, table=True):
    __tablename__ = "dmarc_report"
    __table_args__ = (
        UniqueConstraint("org_name", "report_id"),
        Index("ix_dmarc_report_domain_begin", "domain", "begin"),
    )
    id: int | None = Field(default=None, primary_key=True)
    org_name: str = Field(max_length=255)  # report_metadata/org_name (its email's domain if empty)
    email: str = Field(default="", max_length=255)
    report_id: str = Field(max_length=255)
    domain: str = Field(max_length=253)  # policy_published/domain, lower-cased
    begin: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    end: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    # The policy the receiver found published (RFC 7489 6.3); None: the report left it out.
    p: str | None = Field(default=None, max_length=32)
    sp: str | None = Field(default=None, max_length=32)
    adkim: str | None = Field(default=None, max_length=32)
    aspf: str | None = Field(default=None, max_length=32)
    messages: int = 0  # the sum of its records' counts
    received_at: datetime = created_at_field()


class DmarcRecord(SQLModel, table=True):
    __tablename__ = "dmarc_record"
    __table_args__ = (
        Index("ix_dmarc_record_domain_ip_begin", "domain", "source_ip", "begin"),
        Index("ix_dmarc_record_ip_begin", "source_ip", "begin"),
    )
    id: int | None = Field(default=None, primary_key=True)
    report_id: int = Field(foreign_key="dmarc_report.id", index=True)
    # Copied from the report: a window query per domain or source reads one table.
    domain: str = Field(max_length=253)
    begin: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    source_ip: str = Field(max_length=45)
    count: int
    disposition: str = Field(max_length=32)  # none | quarantine | reject (| pass)
    dkim: str = Field(max_length=32)  # policy_evaluated: DKIM passed aligned (pass) or not
    spf: str = Field(max_length=32)  # policy_evaluated: SPF passed aligned (pass) or not
    header_from: str = Field(max_length=253)
    envelope_from: str | None = Field(default=None, max_length=253)
    # auth_results: every DKIM signature checked, [{"domain", "selector", "result"}, …]
    dkim_results: list = Field(default_factory=list, sa_type=JSON, nullable=False)
    spf_domain: str | None = Field(default=None, max_length=253)
    spf_result: str | None = Field(default=None, max_length=32)
    # Why the receiver applied another disposition than the policy's (forwarded, …).
    reasons: list = Field(default_factory=list, sa_type=JSON, nullable=False)
