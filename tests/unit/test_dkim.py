"""relay/submission/dkim.py and relay/patches/dkimpy.py: OpenSSL RSA equals dkimpy's pure RSA,
each shortcut equals dkimpy's own, and signatures follow the runbook. Signing runs with the
relay's dkimpy patches installed; every verification with dkimpy as published."""

from __future__ import annotations

import re
from functools import cache
from unittest import mock

import dkim
import dkim.crypto
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.patches import dkimpy as dkimpy_patches
from relay.submission import dkim as relay_dkim
from relay.submission.dkim import SigningKey, load_signing_key, sign, txt_record_value
from runbooks.loader import dkim_signing
from tests.examples import examples
from tests.patching import patched, published_dkimpy

DOMAIN = "example.com"
RSA_SELECTOR = "axrsa202501"
ED_SELECTOR = "axed25519202501"
PINNED_TIME = 1_735_689_600  # 2025-01-01T00:00:00Z

SPEC = dkim_signing().spec


@pytest.fixture(autouse=True, scope="module")
def relay_patches():
    with patched("dkimpy"):
        yield


@cache
def rsa_material(bits: int = 2048):
    return relay_dkim.generate_key("rsa", bits)


@cache
def ed_material():
    return relay_dkim.generate_key("ed25519")


def openssl_rsa_key(bits: int = 2048) -> SigningKey:
    return load_signing_key(DOMAIN, RSA_SELECTOR, "rsa", rsa_material(bits).private_material)


def pure_rsa_key(bits: int = 2048) -> SigningKey:
    # PEM bytes instead of a key object: relay/patches/dkimpy.py hands them to dkimpy's own code.
    return SigningKey(DOMAIN, RSA_SELECTOR, "rsa", rsa_material(bits).private_material)


def ed_key() -> SigningKey:
    return load_signing_key(DOMAIN, ED_SELECTOR, "ed25519", ed_material().private_material)


def dns_records(bits: int = 2048) -> dict[bytes, bytes]:
    return {
        f"{RSA_SELECTOR}._domainkey.{DOMAIN}.".encode(): txt_record_value(
            "rsa", rsa_material(bits).public_value
        ).encode(),
        f"{ED_SELECTOR}._domainkey.{DOMAIN}.".encode(): txt_record_value(
            "ed25519", ed_material().public_value
        ).encode(),
    }


def verify_all(message: bytes, bits: int = 2048) -> list[bool]:
    """dkimpy's verdict for every DKIM-Signature in message, top to bottom."""
    records = dns_records(bits)

    def dnsfunc(name, timeout=5):
        return records.get(name)

    def one(idx: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # e.g. a body hash mismatch is raised, not returned
            return False

    with published_dkimpy():
        count = sum(
            1 for name, _ in dkim.DKIM(message).headers if name.lower() == b"dkim-signature"
        )
        return [one(i) for i in range(count)]


def signature_tags(message: bytes) -> list[dict[bytes, bytes]]:
    parsed = dkim.DKIM(message)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in parsed.headers
        if name.lower() == b"dkim-signature"
    ]


def signed_headers(tags: dict[bytes, bytes]) -> list[str]:
    return [h.decode().lower() for h in re.split(rb"\s*:\s*", tags[b"h"].strip())]


def crlf(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


MESSAGES = {
    "minimal": crlf("From: a@example.com", "", "Hello"),
    "typical": crlf(
        "From: Shop <news@example.com>",
        "To: Customer <c@example.org>",
        "Subject: Your order",
        "Date: Wed, 01 Jan 2025 00:00:00 +0000",
        "Message-ID: <1@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Thanks for your order.",
        "",
    ),
    "folded-and-whitespace": crlf(
        'From:   "Long  Name"\t<a@example.com>  ',
        "Subject: a subject that is folded",
        "\tover two lines   ",
        "To: x@example.org,",
        "  y@example.org",
        "",
        "trailing spaces   ",
        "\t tabs\tinside \t",
        "",
        "",
        "",
    ),
    "list-mail": crlf(
        "From: list@example.com",
        "To: member@example.org",
        "List-Id: <news.example.com>",
        "List-Unsubscribe: <https://example.com/u/1>, <mailto:u@example.com>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "Feedback-ID: campaign1:customer7:newsletter:axiom",
        "X-Mailer: not signed",
        "",
        "body",
        "",
    ),
    "utf8": "From: Zoë <zoe@example.com>\r\nSubject: caffè ☕\r\n\r\nCiao, città!\r\n".encode(),
    "empty-body": crlf("From: a@example.com", "Subject: nothing", "", ""),
    "duplicate-to": crlf(
        "From: a@example.com", "To: one@example.org", "To: two@example.org", "", "x"
    ),
    "long-body": crlf("From: a@example.com", "", *[f"line {i} " + "x" * 70 for i in range(400)]),
}


# --- OpenSSL RSA == dkimpy's pure RSA ---


def test_pure_path_is_dkimpys_own_code():
    assert dkimpy_patches._pure_rsa_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign
    assert dkimpy_patches._pure_parse_pem is dkim.crypto.parse_pem_private_key
    assert isinstance(openssl_rsa_key().private, relay_dkim.rsa.RSAPrivateKey)
    assert isinstance(pure_rsa_key().private, bytes)


def sign_both_ways(message: bytes, bits: int = 2048, when: int = PINNED_TIME):
    with (
        mock.patch("dkim.time.time", return_value=when),
        mock.patch.object(
            dkimpy_patches, "_pure_rsa_sign", wraps=dkimpy_patches._pure_rsa_sign
        ) as pure,
    ):
        fast = sign(message, [openssl_rsa_key(bits)], SPEC)
        assert pure.call_count == 0, "the key object must not fall back to dkimpy's RSA"
        slow = sign(message, [pure_rsa_key(bits)], SPEC)
        assert pure.call_count == 1, "PEM bytes must go through dkimpy's RSA"
    return fast, slow


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_openssl_signature_is_byte_identical_to_pure_python(name):
    message = MESSAGES[name]
    fast, slow = sign_both_ways(message)
    assert fast == slow
    assert f"t={PINNED_TIME};".encode() in fast
    assert verify_all(fast + message) == [True]


@pytest.mark.parametrize("bits", [3072])
def test_openssl_signature_is_byte_identical_for_larger_keys(bits):
    message = MESSAGES["typical"]
    fast, slow = sign_both_ways(message, bits, when=PINNED_TIME + 12345)
    assert fast == slow
    assert verify_all(fast + message, bits) == [True]


def test_pinned_time_is_what_makes_the_comparison_fair():
    # Without the pin the t= tag moves; with it two signings agree to the byte.
    message = MESSAGES["typical"]
    a, _ = sign_both_ways(message, when=PINNED_TIME)
    b, _ = sign_both_ways(message, when=PINNED_TIME + 1)
    assert a != b
    assert verify_all(b + message) == [True]


HEADER_POOL = [
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
    "MIME-Version",
    "Content-Type",
    "X-Mailer",
    "X-Campaign",
    "Received",
    "Keywords",
]
_text_char = st.characters(
    min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc")
)
header_value = (
    st.text(_text_char, max_size=60)
    .map(str.strip)
    .flatmap(
        lambda v: st.sampled_from([v, v.replace(" ", "\r\n\t", 1)])  # sometimes folded
    )
)
header_block = st.lists(
    st.tuples(st.sampled_from(HEADER_POOL), header_value),
    unique_by=lambda pair: pair[0],
    max_size=10,
)
body_lines = st.lists(st.text(st.one_of(_text_char, st.just("\t")), max_size=80), max_size=15)


def build_message(headers, lines, from_local: str) -> bytes:
    head = [f"From: {from_local}@{DOMAIN}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(lines)).encode()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=header_block,
    lines=body_lines,
    from_local=st.from_regex(r"[a-z][a-z0-9.]{0,15}", fullmatch=True),
    when=st.integers(min_value=1_000_000_000, max_value=PINNED_TIME),  # t= in the past
)
def test_generated_messages_sign_identically_and_per_runbook(headers, lines, from_local, when):
    message = build_message(headers, lines, from_local)
    fast, slow = sign_both_ways(message, when=when)
    assert fast == slow

    with mock.patch("dkim.time.time", return_value=when):
        both = sign(message, [openssl_rsa_key(), ed_key()], SPEC)
    signed = both + message
    assert verify_all(signed) == [True, True]

    present = {name.lower() for name, _ in headers} | {"from"}
    expected = [h.lower() for h in SPEC.headers if h.lower() in present] + ["from"]
    for tags in signature_tags(signed):
        assert signed_headers(tags) == expected


# --- the signatures the runbook asks for ---


def test_runbook_policy_is_what_these_tests_assume():
    assert SPEC.canonicalization == "relaxed/relaxed"
    assert SPEC.sign_ed25519 is True
    assert [h.lower() for h in SPEC.oversign] == ["from"]
    for name in ("From", "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID"):
        assert name in SPEC.headers


def signed_list_mail() -> tuple[bytes, bytes]:
    message = MESSAGES["list-mail"]
    return sign(message, [openssl_rsa_key(), ed_key()], SPEC), message


def test_one_rsa_and_one_ed25519_signature_both_verify():
    signatures, message = signed_list_mail()
    tags = signature_tags(signatures + message)
    assert [t[b"a"] for t in tags] == [b"rsa-sha256", b"ed25519-sha256"]
    assert [t[b"s"] for t in tags] == [RSA_SELECTOR.encode(), ED_SELECTOR.encode()]
    assert all(t[b"d"] == DOMAIN.encode() for t in tags)
    assert all(t[b"c"] == b"relaxed/relaxed" for t in tags)
    assert b"l" not in tags[0] and b"l" not in tags[1]  # whole body, no length limit
    assert signatures.endswith(b"\r\n") and signatures.count(b"DKIM-Signature:") == 2
    assert verify_all(signatures + message) == [True, True]


# dkimpy's verifier appends an extra "from" to h= on its own (its bug#644046), so a From added
# above the signed one fails here even without oversigning; the h= count below is what proves
# the oversign, and tests/integration/test_dkim_independent.py shows it in mailauth.
def test_from_is_oversigned_and_list_headers_are_signed():
    signatures, message = signed_list_mail()
    for tags in signature_tags(signatures + message):
        h = signed_headers(tags)
        assert h.count("from") == 2
        assert h[-1] == "from"
        for name in ("list-unsubscribe", "list-unsubscribe-post", "feedback-id", "list-id", "to"):
            assert name in h
        assert "x-mailer" not in h


def test_absent_headers_are_not_listed():
    message = MESSAGES["minimal"]
    signatures = sign(message, [openssl_rsa_key(), ed_key()], SPEC)
    for tags in signature_tags(signatures + message):
        assert signed_headers(tags) == ["from", "from"]
    assert verify_all(signatures + message) == [True, True]


def test_received_and_unknown_headers_are_never_signed():
    message = crlf(
        "Received: from x by y; Wed, 01 Jan 2025 00:00:00 +0000",
        "From: a@example.com",
        "X-Whatever: 1",
        "Subject: s",
        "",
        "b",
    )
    signatures = sign(message, [openssl_rsa_key()], SPEC)
    (tags,) = signature_tags(signatures + message)
    assert signed_headers(tags) == ["from", "subject", "from"]


# --- what breaks a signature, and what must not ---


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: m + b"P.S. one more line\r\n", id="body-appended"),
        pytest.param(lambda m: replace_once(m, b"\r\nbody", b"\r\nBODY"), id="body-changed"),
        pytest.param(
            lambda m: replace_once(m, b"From: list@example.com", b"From: ceo@example.com"),
            id="from-changed",
        ),
        pytest.param(
            lambda m: replace_once(m, b"From: list@example.com", b"From: List <list@example.com>"),
            id="from-display-name-added",
        ),
        pytest.param(
            lambda m: replace_once(m, b"To: member", b"From: evil@attacker.test\r\nTo: member"),
            id="second-from-below",
        ),
        pytest.param(
            lambda m: replace_once(
                m, b"\r\nFrom: list@", b"\r\nFrom: evil@attacker.test\r\nFrom: list@"
            ),
            id="second-from-above",
        ),
        pytest.param(
            lambda m: replace_once(m, b"<https://example.com/u/1>", b"<https://evil.test/u/1>"),
            id="list-unsubscribe-changed",
        ),
        pytest.param(
            lambda m: replace_once(m, b"One-Click", b"Two-Click"),
            id="list-unsubscribe-post-changed",
        ),
        pytest.param(
            lambda m: replace_once(m, b"customer7", b"customer8"), id="feedback-id-changed"
        ),
    ],
)
def test_tampering_breaks_both_signatures(tamper):
    signatures, message = signed_list_mail()
    signed = signatures + message
    assert verify_all(signed) == [True, True]
    tampered = tamper(signed)
    assert tampered != signed
    assert verify_all(tampered) == [False, False]


@pytest.mark.parametrize(
    "transit",
    [
        pytest.param(
            lambda m: replace_once(m, b"X-Mailer: not signed", b"X-Mailer: rewritten in transit"),
            id="unsigned-header-changed",
        ),
        pytest.param(
            lambda m: replace_once(m, b"\r\n\r\n", b"\r\nX-Spam-Score: 0\r\n\r\n"),
            id="header-added-by-receiver",
        ),
        pytest.param(
            lambda m: replace_once(m, b"To: member@", b"to:   \r\n\tmember@"),
            id="header-refolded",
        ),
        pytest.param(lambda m: replace_once(m, b"\r\nbody", b"\r\nbody   "), id="trailing-space"),
        pytest.param(lambda m: m + b"\r\n\r\n", id="trailing-blank-lines"),
    ],
)
def test_relaxed_canonicalisation_survives_transit_changes(transit):
    signatures, message = signed_list_mail()
    changed = transit(signatures + message)
    assert changed != signatures + message
    assert verify_all(changed) == [True, True]


def test_ed25519_key_is_derived_once_and_signs_like_dkimpy_alone():
    # dkimpy builds a nacl SigningKey from the seed for every signature; the patch hands
    # it a remembered one. Ed25519 is deterministic: the signature must not change.
    import nacl

    message = MESSAGES["typical"]
    dkimpy_patches._ed25519_signing_key.cache_clear()
    with mock.patch("dkim.time.time", return_value=PINNED_TIME):
        cached = [sign(message, [ed_key()], SPEC) for _ in range(3)]
        with mock.patch.object(dkim, "nacl", nacl):  # dkimpy as shipped
            plain = sign(message, [ed_key()], SPEC)
    assert cached[0] == cached[1] == cached[2] == plain
    info = dkimpy_patches._ed25519_signing_key.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert verify_all(plain + message) == [True]


def test_a_header_line_that_is_no_field_is_a_malformed_message():
    # Found by the SMTP fuzzer: dkimpy raised MessageFormatError, which became a 451.
    message = b"RCPT TO: <r0@dest.example>\r\nFrom: <a@example.com>\r\n\r\nbody\r\n"
    with pytest.raises(relay_dkim.MalformedMessage, match="Unexpected characters"):
        sign(message, [openssl_rsa_key(), ed_key()], SPEC)


# --- dkimpy's canonicalisation helpers with their no-op shortcut == dkimpy's own ---

_wire_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from([b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"\xff", b"."]), max_size=60
).map(b"".join)


@settings(max_examples=examples(3000), deadline=None)
@given(content=_wire_bytes)
def test_canonicalisation_shortcuts_equal_dkimpys_regexes(content):
    assert dkimpy_patches._compress_whitespace(content) == dkimpy_patches._pure_compress_whitespace(
        content
    )
    assert dkimpy_patches._strip_trailing_whitespace(
        content
    ) == dkimpy_patches._pure_strip_trailing_whitespace(content)
    assert dkimpy_patches._unfold_header_value(content) == dkimpy_patches._pure_unfold_header_value(
        content
    )


def test_dkimpy_canonicalises_through_the_shortcuts():
    import dkim.canonicalization as canon

    assert canon.compress_whitespace is dkimpy_patches._compress_whitespace
    assert canon.strip_trailing_whitespace is dkimpy_patches._strip_trailing_whitespace
    assert canon.unfold_header_value is dkimpy_patches._unfold_header_value
    # the originals are dkimpy's regex versions (what the property above compares against)
    assert dkimpy_patches._pure_unfold_header_value(b"a\r\r\n\nb") == b"a\rb"
    assert canon.Relaxed.canonicalize_body(b"a  b \t\r\nc\t\r\n\r\n") == b"a b\r\nc\r\n"
    assert canon.Relaxed.canonicalize_headers([(b"Subject ", b" x \r\n\t y\r\n")]) == [
        (b"subject", b"x y\r\n")
    ]


_message_bytes = st.lists(
    st.sampled_from(
        [
            *(b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"\t", b":"),
            *(b"From: a@b", b"Subject: x", b" folded", b"From x", b"body", b"no colon"),
        ]
    ),
    max_size=30,
).map(b"".join)


def _parsed(parse, message: bytes):
    try:
        return parse(message)
    except Exception as exc:  # dkimpy raises IndexError for a leading continuation line
        return ("error", type(exc).__name__, str(exc))


@settings(max_examples=examples(3000), deadline=None)
@given(message=_message_bytes)
def test_header_split_shortcut_equals_dkimpys_rfc822_parse(message):
    assert _parsed(dkimpy_patches._rfc822_parse, message) == _parsed(
        dkimpy_patches._pure_rfc822_parse, message
    )


def test_dkimpy_parses_messages_through_the_shortcut():
    assert dkim.rfc822_parse is dkimpy_patches._rfc822_parse
    message = b"Subject: a\r\n b\r\nFrom: x@y\r\n\r\nline one\r\n\r\nline two\r\n"
    headers, body = dkimpy_patches._rfc822_parse(message)
    assert headers == [[b"Subject", b" a\r\n b\r\n"], [b"From", b" x@y\r\n"]]
    assert body == b"line one\r\n\r\nline two\r\n"
    # a bare LF in the body: dkimpy's own path, which rewrites it to CRLF
    assert dkimpy_patches._rfc822_parse(b"A: b\r\n\r\nx\ny")[1] == b"x\r\ny"
