"""sandbox/mailbox.py: which mailboxes exist (deterministically) and where delivered mail lands."""

from __future__ import annotations

import re

from sandbox.mailbox import Mailboxes, mailbox_exists, share_of, trace_headers


def test_unknown_mailboxes_are_a_stable_share_of_addresses():
    addresses = [f"user{i}@gmail.com" for i in range(20000)]
    unknown = [a for a in addresses if not mailbox_exists(a, 0.02)]
    assert 0.015 < len(unknown) / len(addresses) < 0.025
    # the same addresses every time, whatever the case
    assert unknown == [a for a in addresses if not mailbox_exists(a.upper(), 0.02)]
    assert all(mailbox_exists(a, 0.0) for a in addresses[:100])
    assert not any(mailbox_exists(a, 1.0) for a in addresses[:100])


def test_unknown_prefix_never_exists():
    assert not mailbox_exists("unknown-7@gmail.com", 0.0)
    assert mailbox_exists("known-7@gmail.com", 0.0)


def test_shares_differ_by_purpose():
    assert share_of("a@b.example", "complaint") != share_of("a@b.example", "other")
    assert 0 <= share_of("a@b.example", "complaint") < 1


def test_stored_mail_keeps_the_trace_and_the_bytes(tmp_path):
    boxes = Mailboxes(tmp_path)
    trace = trace_headers(
        mail_from="shop@acme.example",
        recipient="ann@gmail.com",
        mx_host="gmail-smtp-in.l.google.com",
        helo="mta10.axiom.test",
        ip="127.0.0.10",
        tls=True,
        reference="r1",
        authentication="Authentication-Results: mx; dkim=pass",
    )
    path = boxes.store("google", "ann@gmail.com", trace, b"Subject: hi\r\n\r\nbody\r\n")
    assert path.parent == tmp_path / "google"
    [stored] = boxes.messages("google")
    assert stored.recipient == "ann@gmail.com"
    assert stored.headers["Return-Path"] == "<shop@acme.example>"
    assert "with ESMTPS" in stored.headers["Received"]
    assert stored.data.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert boxes.counts() == {"google": 1}


def test_scenario_recipients_exist_at_every_provider():
    """A scenario measures the signal it steers, never the world's 2 % of unknown mailboxes."""
    from sandbox.behaviour import behaviour
    from sandbox.scenarios import _existing_recipient

    providers = behaviour().providers
    picked = [_existing_recipient("abc123", n, "gmail.com") for n in range(2000)]
    assert len(set(picked)) == 2000
    for rcpt in picked:
        assert all(mailbox_exists(rcpt, p.unknown_mailbox_share) for p in providers), rcpt
    # the plain s<run>-<n> address of about the highest share of messages is unknown somewhere:
    # those took a suffix
    share = max(p.unknown_mailbox_share for p in providers)
    moved = [r for n, r in enumerate(picked) if r != f"sabc123-{n}@gmail.com"]
    assert 0.5 * share * 2000 <= len(moved) <= 2 * share * 2000
    assert all(re.fullmatch(r"sabc123-\d+\.[1-3]@gmail\.com", r) for r in moved), moved
