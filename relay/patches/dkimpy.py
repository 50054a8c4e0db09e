"""Our changes to dkimpy's signing path: OpenSSL RSA, remembered keys and canonicalisation.

dkimpy's RSA is pure Python (about 120 signatures/s per core here); `cryptography` calls
OpenSSL and is about 11x faster. RSASSA-PKCS1-v1_5 is deterministic, so the two produce
byte-identical signatures (tests/unit/test_dkim.py proves it). dkimpy keeps everything else —
header selection, canonicalisation, tag folding — because that is where DKIM bugs live; the
helpers below only answer its no-op cases faster, each checked against dkimpy's own by a
hypothesis property in tests/unit/test_dkim.py.

dkimpy looks every name replaced here up in its own module namespace at each signature, so
install() repoints those names, process-wide: verification in the same process would run
through them too. That is why the relay installs them at start (relay.patches.install_all)
and nothing else does: the sandbox's receivers and the tests' verifiers use dkimpy as
published. tests/unit/test_patches.py fails if dkimpy stops looking any of them up.
"""

from __future__ import annotations

import re
import threading
import types
from functools import lru_cache

import dkim
import dkim.canonicalization
import dkim.crypto
import nacl
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.patches.replacements import Replacements

DISTRIBUTION = "dkimpy"
TESTED = ">=1.1.8,<1.2"  # a PEP 440 range, parsed only by the start-up check

_canon = dkim.canonicalization
_pure_parse_pem = dkim.parse_pem_private_key
_pure_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign
_pure_compress_whitespace = _canon.compress_whitespace
_pure_strip_trailing_whitespace = _canon.strip_trailing_whitespace
_pure_unfold_header_value = _canon.unfold_header_value
_pure_rfc822_parse = dkim.rfc822_parse


# --- RSA through OpenSSL ---


def _parse_private_key(key):
    # An OpenSSL key object passes through untouched; PEM bytes still get dkimpy's parser,
    # so dkimpy's own (pure Python) path stays available for comparison.
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    return _pure_parse_pem(key)


def _rsa_sign(digest, key):
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return _pure_rsa_sign(digest, key)


# --- Ed25519 key pair derived once per key ---


@lru_cache(maxsize=1024)
def _ed25519_signing_key(seed: bytes, encoder) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(seed, encoder=encoder)


class _Nacl(types.ModuleType):
    """pynacl as dkimpy sees it, with SigningKey remembered per key: dkimpy builds one from
    the seed for every signature, and deriving the key pair cost as much as signing."""

    signing = types.SimpleNamespace(
        SigningKey=lambda seed, encoder=None: _ed25519_signing_key(seed, encoder),
        VerifyKey=nacl.signing.VerifyKey,
    )

    def __getattr__(self, name):
        return getattr(nacl, name)


# --- canonicalisation remembered between the RSA and the Ed25519 signature ---


class _RememberingPolicy(_canon.CanonicalizationPolicy):
    """dkimpy canonicalises the body and the header fields anew for every signature, so a
    message signed with RSA and Ed25519 paid for both twice (~4 % of a listener's CPU). This
    policy remembers, per thread, its last input and result. The body is bytes: the same object
    means the same input. The header list could change between calls, so it must also still
    equal a copy taken when it was remembered."""

    _last = threading.local()

    def canonicalize_body(self, body):
        last = getattr(self._last, "body", None)
        if last is not None and last[0] is self.body_algorithm and last[1] is body:
            return last[2]
        result = super().canonicalize_body(body)
        self._last.body = (self.body_algorithm, body, result)
        return result

    def canonicalize_headers(self, headers):
        last = getattr(self._last, "headers", None)
        if (
            last is not None
            and last[0] is self.header_algorithm
            and last[1] is headers
            and last[2] == headers
        ):
            return list(last[3])
        result = super().canonicalize_headers(headers)
        self._last.headers = (self.header_algorithm, headers, list(headers), list(result))
        return result


# --- relaxed canonicalisation helpers without the no-op regex work ---
# dkimpy's relaxed canonicalisation runs re.sub through the re module's cache on every header
# value and on the whole body, and a 2 KB body of prose has hundreds of single spaces, each
# one a match that is "replaced" by itself: ~120 µs of a 570 µs signing (RSA is 250 of it).
# These are the same functions with the no-op case answered by a substring test, and the
# unfolding done by two bytes.replace calls (removing "\r\n" pairs, then the remaining "\n",
# is what r"\r?\n" removes: an "\r" right before an "\n" always forms a pair, and pairs
# cannot overlap).
_WSP_RUN = re.compile(b"[\t ]+")
_TRAILING_WSP = re.compile(b"[\t ]+\r\n")


def _compress_whitespace(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content  # every WSP run is one space already
    return _WSP_RUN.sub(b" ", content)


def _strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content  # no line ends in WSP
    return _TRAILING_WSP.sub(b"\r\n", content)


def _unfold_header_value(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


# --- the header split without splitting the body ---
# dkimpy's rfc822_parse splits the whole message into lines to find the header, then joins the
# body's lines again with CRLF. For a body whose line ends are all CRLF already (everything
# the relay accepts: bare CR and LF are refused at DATA) the join gives the body back as it
# was, so only the header is split here. Anything else takes dkimpy's own path.
_BLANK_LINE = re.compile(b"\n\r?\n")  # a line end followed by an empty line


def _rfc822_parse(message: bytes):
    if not message.startswith((b"\n", b"\r\n")):
        found = _BLANK_LINE.search(message)
        if found is not None:
            body = message[found.end() :]
            if body.count(b"\n") == body.count(b"\r\n"):
                headers, _ = _pure_rfc822_parse(message[: found.start() + 1])
                return headers, body
    return _pure_rfc822_parse(message)


# (namespace, name, dkimpy's own, ours): where dkimpy looks each one up when it signs.
REPLACEMENTS = Replacements(
    (dkim, "parse_pem_private_key", _pure_parse_pem, _parse_private_key),
    (dkim, "RSASSA_PKCS1_v1_5_sign", _pure_rsa_sign, _rsa_sign),
    (dkim, "nacl", dkim.nacl, _Nacl("nacl")),
    (dkim, "CanonicalizationPolicy", dkim.CanonicalizationPolicy, _RememberingPolicy),
    (_canon, "compress_whitespace", _pure_compress_whitespace, _compress_whitespace),
    (
        _canon,
        "strip_trailing_whitespace",
        _pure_strip_trailing_whitespace,
        _strip_trailing_whitespace,
    ),
    (_canon, "unfold_header_value", _pure_unfold_header_value, _unfold_header_value),
    (dkim, "rfc822_parse", _pure_rfc822_parse, _rfc822_parse),
)


install = REPLACEMENTS.install
uninstall = REPLACEMENTS.uninstall
installed = REPLACEMENTS.installed


def takes_openssl_keys() -> bool:
    """Whether dkimpy signs with an OpenSSL RSA key object now (without the patch it would
    fail deep inside its PEM parser)."""
    return dkim.parse_pem_private_key is _parse_private_key and (
        dkim.RSASSA_PKCS1_v1_5_sign is _rsa_sign
    )
