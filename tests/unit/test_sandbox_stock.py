"""The sandbox world runs on the libraries as published: its process imports no relay or
control-plane code, so the relay's library patches (relay/patches) cannot reach the receivers
that judge the relay's mail, and they still verify what the patched signer signed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from relay.submission.dkim import generate_key, load_signing_key, sign, txt_record_value
from runbooks.loader import dkim_signing
from tests.patching import patched

ROOT = Path(__file__).resolve().parents[2]

# What `python -m sandbox run` (axiom up's world process) imports, then the DKIM check of the
# world's receivers, then where each library function the relay patches comes from.
WORLD_PROCESS = r"""
import asyncio, json, runpy, sys

sys.argv = ["sandbox", "--help"]
try:
    runpy.run_module("sandbox", run_name="__main__")  # sandbox/__main__.py, as axiom up runs it
except SystemExit:
    pass
import sandbox.world, sandbox.scenarios, sandbox.published
from sandbox.authn import check_dkim
from sandbox.lookup import Found

request = json.load(sys.stdin)

class Lookup:
    async def txt(self, name):
        value = request["records"].get(name.rstrip("."))
        return Found("answer", (value,)) if value else Found("nxdomain")

results = asyncio.run(check_dkim(request["message"].encode("latin-1"), Lookup()))

import aiosmtpd.smtp, aiosmtplib.protocol, aiosmtplib.smtp, dkim, dkim.canonicalization, nacl
print(json.dumps({
    "imported": sorted(
        m for m in sys.modules
        if m.split(".")[0] in ("relay", "protocol", "flows", "notifications", "axiom")
    ),
    "dkim": [r.result for r in results],
    "origins": {
        "dkim.rfc822_parse": dkim.rfc822_parse.__module__,
        "dkim.RSASSA_PKCS1_v1_5_sign": dkim.RSASSA_PKCS1_v1_5_sign.__module__,
        "dkim.parse_pem_private_key": dkim.parse_pem_private_key.__module__,
        "dkim.CanonicalizationPolicy": dkim.CanonicalizationPolicy.__module__,
        "compress_whitespace": dkim.canonicalization.compress_whitespace.__module__,
        "strip_trailing_whitespace": dkim.canonicalization.strip_trailing_whitespace.__module__,
        "unfold_header_value": dkim.canonicalization.unfold_header_value.__module__,
        "dkim.nacl is nacl": dkim.nacl is nacl,
        "aiosmtpd inspect": aiosmtpd.smtp.inspect.__name__ + ":" + type(aiosmtpd.smtp.inspect).__name__,
        "aiosmtpd dir": "dir" in vars(aiosmtpd.smtp),
        "aiosmtpd sanitized_log": aiosmtpd.smtp.sanitized_log.__module__,
        "aiosmtplib SMTPProtocol": aiosmtplib.smtp.SMTPProtocol.__module__,
        "aiosmtplib quote_address": aiosmtplib.smtp.quote_address.__module__,
        "aiosmtplib normalize": aiosmtplib.protocol.normalize_message_line_endings.__module__,
    },
}))
"""

STOCK = {
    "dkim.rfc822_parse": "dkim",
    "dkim.RSASSA_PKCS1_v1_5_sign": "dkim.crypto",
    "dkim.parse_pem_private_key": "dkim.crypto",
    "dkim.CanonicalizationPolicy": "dkim.canonicalization",
    "compress_whitespace": "dkim.canonicalization",
    "strip_trailing_whitespace": "dkim.canonicalization",
    "unfold_header_value": "dkim.canonicalization",
    "dkim.nacl is nacl": True,
    "aiosmtpd inspect": "inspect:module",
    "aiosmtpd dir": False,
    "aiosmtpd sanitized_log": "aiosmtpd.smtp",
    "aiosmtplib SMTPProtocol": "aiosmtplib.protocol",
    "aiosmtplib quote_address": "aiosmtplib.email",
    "aiosmtplib normalize": "aiosmtplib.protocol",
}


def signed_by_the_relay() -> tuple[bytes, dict[str, str]]:
    rsa, ed = generate_key("rsa", 2048), generate_key("ed25519")
    keys = [
        load_signing_key("acme.example", "axrsa", "rsa", rsa.private_material),
        load_signing_key("acme.example", "axed", "ed25519", ed.private_material),
    ]
    message = (
        b"From: Shop <shop@acme.example>\r\nTo: ann@gmail.com\r\nSubject: Your  order\r\n"
        b"\r\nShipped,   with\ttabs  \r\n\r\n"
    )
    with patched():  # everything `axiom relay` installs
        signed = sign(message, keys, dkim_signing().spec) + message
    records = {
        "axrsa._domainkey.acme.example": txt_record_value("rsa", rsa.public_value),
        "axed._domainkey.acme.example": txt_record_value("ed25519", ed.public_value),
    }
    return signed, records


def test_the_world_process_imports_no_relay_code_and_verifies_with_stock_libraries():
    signed, records = signed_by_the_relay()
    done = subprocess.run(
        [sys.executable, "-c", WORLD_PROCESS],
        input=json.dumps({"message": signed.decode("latin-1"), "records": records}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["imported"] == []
    assert report["origins"] == STOCK
    assert report["dkim"] == ["pass", "pass"]
