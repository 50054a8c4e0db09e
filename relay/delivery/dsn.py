"""RFC 3464 delivery status notifications for recipients that failed for good or expired, at
delivery time (relay/delivery/engine.py) or in a bounce that came back later
(relay/inbound/feedback.py): the customer gets the same notice either way."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from relay.spool.writer import SpoolEntry, new_queue_id


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # RFC 3463 code, e.g. 5.1.1 (4.4.7 for an expired message)
    diagnostic: str  # the remote reply, or our own reason
    remote_mta: str | None
    expired: bool = False
    returned: bool = False  # accepted by the receiver, then bounced (an asynchronous bounce)


def build_dsn(
    *,
    reporting_mta: str,
    from_local_part: str,
    original_sender: str,
    original: bytes,
    arrival: datetime,
    failures: list[FailedRecipient],
    now: datetime,
) -> bytes:
    # Built by hand: the email package cannot serialise message/delivery-status parts it did
    # not parse itself, and a DSN's layout is fixed (RFC 3462 multipart/report).
    boundary = f"=_axiom_{new_queue_id()}"
    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to the following recipient(s):",
        "",
    ]
    for f in failures:
        why = (
            "it could not be delivered before it expired"
            if f.expired
            else "it was accepted, then returned by the receiving system"
            if f.returned
            else "it was refused"
        )
        human.append(f"  <{f.address}>: {why}: {_one_line(f.diagnostic)}")
    blocks = [
        f"Reporting-MTA: dns; {reporting_mta}\r\nArrival-Date: {format_datetime(arrival)}\r\n"
    ]
    for f in failures:
        block = f"Final-Recipient: rfc822; {f.address}\r\nAction: failed\r\nStatus: {f.status}\r\n"
        if f.remote_mta:
            block += f"Remote-MTA: dns; {f.remote_mta}\r\n"
        block += f"Diagnostic-Code: smtp; {_one_line(f.diagnostic)}\r\n"
        blocks.append(block)
    original_headers = original.split(b"\r\n\r\n", 1)[0]
    head = (
        f"From: Mail Delivery System <{from_local_part}@{reporting_mta}>\r\n"
        f"To: <{original_sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{new_queue_id()}.dsn@{reporting_mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"  # RFC 3834: never answer this automatically
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated delivery status notification.\r\n"
        f"\r\n--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + "\r\n".join(human)
        + f"\r\n\r\n--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        + "\r\n".join(blocks)
        + f"\r\n--{boundary}\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
    )
    return head.encode() + original_headers + f"\r\n\r\n--{boundary}--\r\n".encode()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:900]


def dsn_entry(
    tenant_id: int, recipient: str, data: bytes, now: datetime, hostname: str
) -> SpoolEntry:
    """A DSN goes into the spool like any message, from the null sender (RFC 5321 4.5.5)."""
    return SpoolEntry(
        queue_id=new_queue_id(),
        tenant_id=tenant_id,
        stream="dsn",
        mail_from="",
        recipients=[recipient],
        header_from_domain=hostname,
        message_id_header="",
        data=data,
        client_address="",
        auth_user=None,
        created_at=now,
    )
