"""relay/maillog.py: one line per event, key=value, quoted so that client text can neither
break the line nor forge a field; nothing formatted when the logger is off."""

from __future__ import annotations

import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import maillog


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="axiom.maillog")
    return caplog


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "axiom.maillog"]


def test_plain_values_are_written_as_they_are(records):
    maillog.queued(
        "127.0.0.1",
        "01J0000000000000000000000A",
        "shop@acme.example",
        ["a@x.org", "b@y.org"],
        tenant="acme",
        user="acme-1",
    )
    assert _messages(records) == [
        "queued client=127.0.0.1 tenant=acme user=acme-1 id=01J0000000000000000000000A "
        "from=shop@acme.example to=a@x.org,b@y.org"
    ]


def test_a_refused_recipient(records):
    maillog.rejected(
        "127.0.0.1",
        "550 5.7.1 Recipient bob@example.org is on your suppression list: bounced",
        tenant="acme",
        user="acme-1",
        command="RCPT",
        sender="shop@acme.example",
        recipients=["bob@example.org"],
    )
    assert _messages(records) == [
        "rejected client=127.0.0.1 tenant=acme user=acme-1 command=RCPT from=shop@acme.example "
        'to=bob@example.org reply="550 5.7.1 Recipient bob@example.org is on your suppression '
        'list: bounced"'
    ]


def test_none_fields_are_left_out_and_empty_ones_quoted(records):
    maillog.send_attempt(
        "01J0000000000000000000000A",
        "",
        "bob@example.org",
        attempt=1,
        source_ip=None,
        mx=None,
        outcome="deferred",
        reply="4.4.3 example.org: no answer",
    )
    assert _messages(records) == [
        'send_attempt id=01J0000000000000000000000A from="" to=bob@example.org attempt=1 '
        'outcome=deferred reply="4.4.3 example.org: no answer"'
    ]


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


def _fields(text: str) -> tuple[str, list[tuple[str, str]]]:
    """A logfmt reader: the event, then each key and its value, unquoted."""
    event, _, rest = text.partition(" ")
    found, at = [], 0
    while at < len(rest):
        match = _FIELD.match(rest, at)
        assert match, rest[at:]
        value = match.group(2)
        found.append((match.group(1), json.loads(value) if value.startswith('"') else value))
        at = match.end()
    return event, found


def test_client_text_cannot_forge_a_field_or_a_line(records):
    hostile = 'x@y.org reply="250 ok"\r\nqueued client=1.2.3.4 id=FAKE\x00\x85\u2028\udcff'
    maillog.rejected("127.0.0.1", "501 5.1.3 Bad recipient address syntax", recipients=[hostile])
    (text,) = _messages(records)
    assert text.splitlines() == [text]  # no line break of any kind str knows
    text.encode("utf-8")  # a lone surrogate would make the log stream fail
    assert _fields(text) == (
        "rejected",
        [
            ("client", "127.0.0.1"),
            ("to", hostile.replace("\udcff", "\\udcff")),
            ("reply", "501 5.1.3 Bad recipient address syntax"),
        ],
    )


@given(st.text(), st.text())
def test_any_values_read_back_as_the_fields_they_were(first, second):
    text = maillog.line("event", ("from", first), ("to", second))
    assert text.splitlines() == [text]

    def readable(value: str) -> str:
        return value.encode("utf-8", "backslashreplace").decode()

    assert _fields(text) == ("event", [("from", readable(first)), ("to", readable(second))])


def test_nothing_is_formatted_when_the_logger_is_off(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="axiom.maillog")

    def formatted(*args, **kwargs):
        raise AssertionError("formatted while disabled")

    monkeypatch.setattr(maillog, "line", formatted)
    maillog.queued("127.0.0.1", "Q", "a@b.c", ["d@e.f"])
    maillog.rejected("127.0.0.1", "550 5.7.1 no")
    maillog.send_attempt(
        "Q", "a@b.c", "d@e.f", attempt=1, source_ip=None, mx=None, outcome="x", reply="y"
    )
    maillog.auth("127.0.0.1", "u", False)
    assert not maillog.enabled()
    assert _messages(caplog) == []
