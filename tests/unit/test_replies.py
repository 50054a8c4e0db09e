"""aiosmtpd's reply texts as the client sees them: the indexed translation equals a scan of
every rule, for every reply literal in aiosmtpd's source."""

from __future__ import annotations

import re
from pathlib import Path

import aiosmtpd.smtp

from relay.submission.replies import _TRANSLATIONS, translate


def _scan(reply: str) -> str:
    for pattern, replacement in _TRANSLATIONS:
        if pattern.search(reply):
            return pattern.sub(replacement, reply) if "\\" in replacement else replacement
    return reply


def _aiosmtpd_replies() -> list[str]:
    source = Path(aiosmtpd.smtp.__file__).read_text()
    found = re.findall(r"""["']([2-5]\d\d [^"'\n]*)["']""", source)
    return sorted(set(found))


def test_every_aiosmtpd_reply_translates_as_a_full_scan_would():
    replies = _aiosmtpd_replies()
    assert len(replies) > 40, replies  # the extraction found aiosmtpd's replies
    translated = 0
    for reply in replies:
        assert translate(reply) == _scan(reply), reply
        translated += translate(reply) != reply
    assert translated > 15  # and the rules do apply to many of them


def test_replies_that_already_carry_an_enhanced_code_pass_unchanged():
    for reply in ("250 2.0.0 queued as 01ABC", "354 End data with <CR><LF>.<CR><LF>"):
        assert translate(reply) == reply
    assert translate("250 OK") == "250 2.0.0 OK"
    assert translate("503 Error: need MAIL command").startswith("503 5.5.1")


_ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
# RFC 2034 3: the greeting and the replies to HELO and EHLO carry no enhanced code; 3xx
# replies (354, 334) are intermediate and carry none either.
_EXEMPT = {"220 {} {}", "250 HELP", "250 {}"}


def test_every_reply_carries_an_enhanced_code_as_ehlo_advertises():
    from relay.submission import replies

    ours = [v for k, v in vars(replies).items() if k.isupper() and isinstance(v, str)]
    assert len(ours) > 40
    for reply in ours + _aiosmtpd_replies():
        if reply in _EXEMPT or reply.startswith("3"):
            continue
        # fragments the extraction cut at a quote or an f-string brace still translate whole
        whole = {"500 Error: command ": '500 Error: command "X" not recognized'}.get(reply, reply)
        whole = whole.replace("{helo}", "HELO").replace("{command}", "NOOP")
        assert _ENHANCED.match(translate(whole)), (reply, translate(whole))
