"""ARF reports (RFC 5965) as the simulated feedback loops build them, parsed back by the stdlib."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy

import pytest

from sandbox.behaviour import behaviour
from sandbox.feedback import Complaint, build_arf

ORIGINAL = (
    b"From: Shop <shop@acme.example>\r\nTo: ann@yahoo.com\r\nSubject: Offer\r\n"
    b"Message-ID: <42@acme.example>\r\n\r\nBuy now.\r\n"
)


def complaint(provider: str) -> Complaint:
    return Complaint(
        provider=provider,
        mx_host="mta5.am0.yahoodns.net",
        mx_address="127.0.25.3",
        source_ip="127.0.0.10",
        mail_from="bounces@acme.example",
        recipient="ann@yahoo.com",
        message_id="<42@acme.example>",
        original=ORIGINAL,
        authentication="mta5.am0.yahoodns.net; dkim=pass header.d=acme.example",
        arrival=datetime(2026, 11, 26, 9, 0, tzinfo=UTC),
    )


@pytest.mark.parametrize("provider", ["yahoo", "microsoft", "generic"])
def test_report_is_a_three_part_feedback_report(provider):
    loop = behaviour().provider(provider).feedback
    assert loop is not None
    data = build_arf(complaint(provider), loop, "fbl@relay.axiom.test")
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only
    report = message_from_bytes(data, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "feedback-report"
    assert report["To"].addresses[0].addr_spec == "fbl@relay.axiom.test"
    assert report["From"].addresses[0].addr_spec == loop.envelope_from
    human, machine, original = report.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "127.0.0.10" in human.get_content()
    assert machine.get_content_type() == "message/feedback-report"
    fields = _fields(machine)
    assert fields["Feedback-Type"] == "abuse"
    assert fields["User-Agent"] == loop.user_agent
    assert fields["Version"] == "1"
    assert fields["Original-Mail-From"] == "<bounces@acme.example>"
    assert fields["Original-Rcpt-To"] == "<ann@yahoo.com>"
    assert fields["Source-IP"] == "127.0.0.10"
    assert fields["Reported-Domain"] == "acme.example"
    assert fields["Arrival-Date"].startswith("Thu, 26 Nov 2026 09:00:00")
    if loop.include == "message":
        assert original.get_content_type() == "message/rfc822"
        inner = original.get_payload()[0]
        assert inner["Message-ID"] == "<42@acme.example>"
        assert inner.get_content().strip() == "Buy now."
    else:  # Yahoo's CFL sends the original headers only
        assert original.get_content_type() == "text/rfc822-headers"
        assert b"Message-ID: <42@acme.example>" in data
        assert b"Buy now." not in data


def _fields(part) -> dict[str, str]:
    """The message/feedback-report block's fields, each required one present exactly once."""
    payload = part.get_payload()
    block = payload[0] if isinstance(payload, list) else message_from_bytes(payload.encode())
    names = [name for name, _ in block.items()]
    for required in ("Feedback-Type", "User-Agent", "Version"):
        assert names.count(required) == 1, names
    return {name: str(value) for name, value in block.items()}


def test_providers_without_a_per_message_loop_send_no_reports():
    assert behaviour().provider("google").feedback is None
    assert behaviour().provider("apple").feedback is None
