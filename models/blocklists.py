"""What the DNS blocklists say about our sending IPs and domains (protocol/blocklists.py).

One BlocklistListing per (target, list): the last verdict the list gave (listed or clear),
with the codes, their meanings and the TXT reason of a listing, when it was first and last
seen listed and when it cleared. An error answer or a timeout is not a verdict: it sets
last_error / last_error_at and leaves the state as it was, so a resolver that Spamhaus refuses
can neither invent a listing nor clear a real one. The blocklist-scan runbook reads the rows
listed now (hence the index on state); `axiom blocklist status` shows them.
"""

from datetime import datetime

from sqlalchemy import JSON, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field, timestamp_field


class BlocklistListing(SQLModel, table=True):
    __tablename__ = "blocklist_listing"
    __table_args__ = (UniqueConstraint("target", "list_id"),)

    id: int | None = Field(default=None, primary_key=True)
    target: str = Field(max_length=253)  # an IP (as IpAddress.address) or a domain, lower-case
    target_kind: str = Field(max_length=8)  # ip | domain
    list_id: str = Field(max_length=64)  # runbooks/blocklists.yaml
    state: str = Field(max_length=8, index=True)  # listed | clear | unknown (only errors yet)
    codes: list = Field(default_factory=list, sa_type=JSON, nullable=False)  # A records
    meaning: str = Field(default="")  # the codes' meanings, as the list documents them
    reason: str = Field(default="")  # the list's TXT record at the same name
    first_seen: datetime | None = timestamp_field()  # this listing's first answer
    last_seen: datetime | None = timestamp_field()  # its latest answer
    cleared_at: datetime | None = timestamp_field()
    last_error: str | None = Field(default=None)
    last_error_at: datetime | None = timestamp_field()
    created_at: datetime = created_at_field()
