"""DKIM keys and signatures: dkimpy builds and canonicalises, OpenSSL does the RSA math.

dkimpy's RSA is pure Python (about 120 signatures/s per core here); `cryptography` calls
OpenSSL and is about 11x faster. RSASSA-PKCS1-v1_5 is deterministic, so the two produce
byte-identical signatures (tests/unit/test_dkim.py proves it). We keep dkimpy for everything
else — header selection, canonicalisation, tag folding — because that is where DKIM bugs live.
"""

from __future__ import annotations

import base64
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal

import dkim
import dkim.canonicalization
import dkim.crypto
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from runbooks.schema import DkimSigningSpec

Algorithm = Literal["rsa", "ed25519"]

_pure_parse_pem = dkim.parse_pem_private_key
_pure_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign


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


# dkimpy looks both names up in its module namespace when signing.
dkim.parse_pem_private_key = _parse_private_key
dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


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


dkim.nacl = _Nacl("nacl")


class _RememberingPolicy(dkim.canonicalization.CanonicalizationPolicy):
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


# dkimpy looks the name up in its module namespace for signing and verifying alike.
dkim.CanonicalizationPolicy = _RememberingPolicy


@dataclass(frozen=True)
class GeneratedKey:
    algorithm: Algorithm
    private_material: bytes  # PEM for RSA, base64 seed for Ed25519 (what dkimpy expects)
    public_value: str  # the p= tag


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: Algorithm
    private: rsa.RSAPrivateKey | bytes  # OpenSSL RSA key, or the base64 Ed25519 seed


def generate_key(algorithm: Algorithm, rsa_bits: int = 2048) -> GeneratedKey:
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return GeneratedKey("rsa", pem, base64.b64encode(der).decode())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    seed = ed_key.private_bytes_raw()
    public = ed_key.public_key().public_bytes_raw()
    return GeneratedKey("ed25519", base64.b64encode(seed), base64.b64encode(public).decode())


def load_signing_key(domain: str, selector: str, algorithm: str, material: bytes) -> SigningKey:
    if algorithm == "rsa":
        private = serialization.load_pem_private_key(material, password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        return SigningKey(domain, selector, "rsa", private)
    return SigningKey(domain, selector, "ed25519", material)


def txt_record_value(algorithm: str, public_value: str) -> str:
    return f"v=DKIM1; k={algorithm}; p={public_value}"


def selector_for(spec: DkimSigningSpec, algorithm: Algorithm, when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime(spec.selector_format.format(algorithm=algorithm))


def headers_to_sign(message_headers: Sequence[bytes], spec: DkimSigningSpec) -> list[bytes]:
    present = {name.lower() for name in message_headers}
    chosen = [h.lower().encode() for h in spec.headers if h.lower().encode() in present]
    return chosen + [h.lower().encode() for h in spec.oversign]


class MalformedMessage(ValueError):
    """The message's header cannot be parsed (e.g. a header line that is no field)."""


def sign(data: bytes, keys: Sequence[SigningKey], spec: DkimSigningSpec) -> bytes:
    """The DKIM-Signature header fields (CRLF-terminated) to prepend to data, one per key.
    Raises MalformedMessage when dkimpy cannot parse the header."""
    try:
        signer = dkim.DKIM(data, linesep=b"\r\n")
    except dkim.MessageFormatError as exc:
        raise MalformedMessage(str(exc)) from None
    include = headers_to_sign([name for name, _ in signer.headers], spec)
    header_canon, body_canon = (c.encode() for c in spec.canonicalization.split("/"))
    out = []
    for key in keys:
        algorithm = b"rsa-sha256" if key.algorithm == "rsa" else b"ed25519-sha256"
        out.append(
            signer.sign(
                key.selector.encode(),
                key.domain.encode(),
                key.private,
                signature_algorithm=algorithm,
                canonicalize=(header_canon, body_canon),
                include_headers=include,
            )
        )
    return b"".join(out)
