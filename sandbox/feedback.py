"""Complaint reports: ARF (RFC 5965) built like the providers' feedback loops, sent by SMTP.

A report is a multipart/report; report-type=feedback-report with three parts: a human-readable
text/plain, the machine-readable message/feedback-report (Feedback-Type: abuse, User-Agent,
Version: 1 and the optional fields), and the original message (message/rfc822) or only its
headers (text/rfc822-headers), as the provider's loop does. Every report is also kept under
AXIOM_HOME/sandbox/feedback/<provider>/ and its fate (sent, refused with the reply, error)
recorded in the state file, so a relay that refuses reports is visible, not silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import aiosmtplib

from sandbox.behaviour import Feedback
from sandbox.state import StateStore

log = logging.getLogger("axiom.sandbox.feedback")
MAX_PENDING = 1000
SEND_TIMEOUT = 10.0


@dataclass(frozen=True)
class Complaint:
    provider: str
    mx_host: str
    mx_address: str
    source_ip: str
    mail_from: str
    recipient: str
    message_id: str
    original: bytes
    authentication: str  # the Authentication-Results value the receiver computed
    arrival: datetime


def build_arf(complaint: Complaint, loop: Feedback, to: str, now: datetime | None = None) -> bytes:
    # By hand, as relay/dsn.py builds DSNs: the email package does not serialise
    # message/feedback-report parts it did not parse itself.
    now = now or datetime.now(UTC)
    boundary = f"=_sandbox_arf_{secrets.token_hex(8)}"
    domain = complaint.mail_from.rpartition("@")[2] or complaint.mx_host
    report = [
        "Feedback-Type: abuse",
        f"User-Agent: {loop.user_agent}",
        "Version: 1",
        f"Original-Mail-From: <{complaint.mail_from}>",
        f"Original-Rcpt-To: <{complaint.recipient}>",
        f"Arrival-Date: {format_datetime(complaint.arrival)}",
        f"Reporting-MTA: dns; {complaint.mx_host}",
        f"Source-IP: {complaint.source_ip}",
        f"Reported-Domain: {domain}",
    ]
    if complaint.authentication:
        report.append(f"Authentication-Results: {complaint.authentication}")
    if loop.include == "message":
        third = "Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        original = complaint.original
    else:
        third = "Content-Type: text/rfc822-headers\r\n\r\n"
        original = complaint.original.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    head = (
        f"From: {loop.header_from}\r\n"
        f"To: <{to}>\r\n"
        f"Subject: Complaint about message from {complaint.source_ip}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{secrets.token_hex(12)}@{complaint.mx_host}>\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        f"\r\n--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"This is an email abuse report for an email message received from IP "
        f"{complaint.source_ip} on {format_datetime(complaint.arrival)}.\r\n"
        f"A user of {complaint.provider} marked it as spam.\r\n"
        f"\r\n--{boundary}\r\n"
        "Content-Type: message/feedback-report\r\n\r\n"
        + "\r\n".join(report)
        + f"\r\n\r\n--{boundary}\r\n"
        + third
    )
    return head.encode() + original + f"\r\n--{boundary}--\r\n".encode()


class FeedbackSender:
    """Sends each report after the loop's delay from the provider's own address; bounded."""

    def __init__(self, state: StateStore, folder: Path, target: tuple[str, int], to: str):
        self.state = state
        self.folder = folder
        self.target = target
        self.to = to
        self._tasks: set[asyncio.Task] = set()

    def report(self, complaint: Complaint, loop: Feedback) -> None:
        if len(self._tasks) >= MAX_PENDING:
            log.warning("feedback backlog full; report for %s dropped", complaint.recipient)
            return
        task = asyncio.create_task(self._deliver(complaint, loop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _deliver(self, complaint: Complaint, loop: Feedback) -> None:
        data = build_arf(complaint, loop, self.to)
        path = self.folder / complaint.provider / f"{secrets.token_hex(8)}.eml"
        complaint_id = await asyncio.to_thread(self._keep, complaint, path, data)
        await asyncio.sleep(loop.delay_seconds)
        status, reply = await self._send(complaint, loop, data)
        await asyncio.to_thread(self.state.settle_complaint, complaint_id, status, reply)

    def _keep(self, complaint: Complaint, path: Path, data: bytes) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.state.add_complaint(
            complaint.provider,
            complaint.source_ip,
            complaint.recipient,
            complaint.message_id,
            str(path),
        )

    async def _send(self, complaint: Complaint, loop: Feedback, data: bytes) -> tuple[str, str]:
        host, port = self.target
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                client = aiosmtplib.SMTP(
                    hostname=host,
                    port=port,
                    source_address=(complaint.mx_address, 0),
                    local_hostname=complaint.mx_host,
                    validate_certs=False,
                    timeout=SEND_TIMEOUT,
                )
                async with client:
                    _, reply = await client.sendmail(loop.envelope_from, [self.to], data)
                return "sent", reply
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return "refused", f"{first.code} {first.message}"
        except aiosmtplib.SMTPResponseException as exc:
            return "refused", f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return "error", f"{type(exc).__name__}: {exc}"

    async def stop(self, grace: float = 2.0) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*pending, return_exceptions=True)
