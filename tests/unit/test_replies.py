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
