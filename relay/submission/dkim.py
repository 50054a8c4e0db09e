"""DKIM keys and signatures: dkimpy builds and canonicalises, OpenSSL does the RSA math.

RSA keys are handed to dkimpy as OpenSSL key objects; relay/patches/dkimpy.py (installed by
relay.patches.install_all at start) teaches dkimpy to sign with them and holds every other
change to dkimpy's signing path. Without it, sign() refuses to run rather than fail inside
dkimpy's pure-Python key parser.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.patches import dkimpy as dkimpy_patches
from runbooks.schema import DkimSigningSpec

Algorithm = Literal["rsa", "ed25519"]


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


def selector_for(
    spec: DkimSigningSpec, algorithm: Algorithm, when: datetime | None = None, counter: int = 1
) -> str:
    """A selector names one key for ever (a receiver may cache its record): the format holds a
    date and a counter, and the database keeps (domain, selector) unique."""
    pattern = spec.selector_format.format(algorithm=algorithm, counter=counter)
    return (when or datetime.now(UTC)).strftime(pattern)


def headers_to_sign(message_headers: Sequence[bytes], spec: DkimSigningSpec) -> list[bytes]:
    present = {name.lower() for name in message_headers}
    chosen = [h.lower().encode() for h in spec.headers if h.lower().encode() in present]
    return chosen + [h.lower().encode() for h in spec.oversign]


class MalformedMessage(ValueError):
    """The message's header cannot be parsed (e.g. a header line that is no field)."""


def sign(data: bytes, keys: Sequence[SigningKey], spec: DkimSigningSpec) -> bytes:
    """The DKIM-Signature header fields (CRLF-terminated) to prepend to data, one per key.
    Raises MalformedMessage when dkimpy cannot parse the header."""
    if not dkimpy_patches.takes_openssl_keys():
        raise RuntimeError("dkimpy is not patched: call relay.patches.install_all() at start")
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
