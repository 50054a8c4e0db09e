"""Fast paths of the submission handler, each equal to what it replaces for every input: MAIL
FROM / RCPT TO parsing of plain <local@domain> (the stdlib parser's answer), and the bare CR or
LF check of DATA (the regex's answer)."""

from __future__ import annotations

import re
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.submission.server import _SIMPLE_PATH, parse_path
from tests.examples import examples

_NEVER = re.compile(r"(?!)")


def reference(arg: str, local_part_limit: int = 0):
    """parse_path with the fast path switched off: what the relay answered before it existed."""
    with mock.patch("relay.submission.server._SIMPLE_PATH", _NEVER):
        return parse_path(arg, local_part_limit)


ATOM = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
LABEL = st.text("abcXYZ019-", min_size=1, max_size=6)
NOISE = st.text('aZ9.@<>"()[] \t:\\,;é%!-=', max_size=6)


@st.composite
def paths(draw):
    local = ".".join(draw(st.lists(ATOM, min_size=1, max_size=3)))
    domain = ".".join(draw(st.lists(LABEL, min_size=1, max_size=3)))
    core = f"{draw(NOISE)}{local}{draw(NOISE)}@{draw(NOISE)}{domain}{draw(NOISE)}"
    params = draw(
        st.sampled_from(
            ["", " SIZE=2048", " BODY=8BITMIME SMTPUTF8", "x", " ", " (c) SIZE=1", "\t(", "  \t X"]
        )
    )
    return (
        draw(st.sampled_from(["<", "", " <", "<<"]))
        + core
        + draw(st.sampled_from([">", "", ">>", "> "]))
        + params
    )


@settings(max_examples=examples(3000), deadline=None)
@given(st.one_of(paths(), st.text(max_size=40)), st.sampled_from([0, 3, 64]))
@example("<a.b@c.d> SIZE=10", 0)
@example("<a..b@c.d>", 0)
@example("<.a@c.d>", 0)
@example("<a@-c.d>", 0)
@example("<a@c.d.>", 0)
@example("<abcd@c.d>", 3)
@example("<@relay.example:a@c.d>", 0)
@example("<0@[0>", 0)  # the stdlib parser raises AttributeError here
def test_fast_path_answers_exactly_as_the_stdlib_parser(arg, limit):
    assert parse_path(arg, limit) == reference(arg, limit)


def test_the_common_case_takes_the_fast_path():
    assert _SIMPLE_PATH.match("<order-confirm+1042@shop.example>")
    assert parse_path("<order-confirm+1042@shop.example> SIZE=2048") == (
        "order-confirm+1042@shop.example",
        "SIZE=2048",
    )
    # quoted local parts and address literals are left to the stdlib parser
    assert not _SIMPLE_PATH.match('<"a b"@shop.example>')
    assert parse_path('<"a b"@shop.example>') == ('"a b"@shop.example', "")
    assert not _SIMPLE_PATH.match("<a@[127.0.0.1]>")
    assert parse_path("<@relay.example:a@shop.example>") == (None, None)


@settings(max_examples=examples(3000), deadline=None)
@given(st.binary(max_size=40) | st.text("ab.\r\n", max_size=40).map(str.encode))
@example(b"a\r\nb\r\n")
@example(b"a\rb")
@example(b"a\nb")
@example(b"\r\r\n")
@example(b"\r\n\n")
@example(b"\n\r")
def test_bare_line_end_check_equals_the_regex(raw):
    from relay.submission.server import _BARE_CR_OR_LF, has_bare_cr_or_lf

    assert has_bare_cr_or_lf(raw) == bool(_BARE_CR_OR_LF.search(raw))
