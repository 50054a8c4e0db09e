"""What the relay spools verifies in mailauth (Node), a DKIM implementation that is not dkimpy."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session

from models import Message
from models.db import make_engine
from tests.conftest import seed_tenant

pytestmark = pytest.mark.integration

VERIFY_MJS = Path(__file__).resolve().parents[1] / "js" / "verify.mjs"
DOMAIN = "negozio-rossi.example"
# The runbook's order, for the headers this test's message carries once spooled.
SIGNED = [
    "from",
    "subject",
    "date",
    "to",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "message-id",
    "mime-version",
    "content-type",
    "feedback-id",
]


def node_verify(message: bytes, records: dict[str, str], workdir: Path) -> dict:
    node = shutil.which("node")
    assert node, "node is required for the independent DKIM check (see tests/js/package.json)"
    (workdir / "message.eml").write_bytes(message)
    (workdir / "records.json").write_text(json.dumps(records))
    result = subprocess.run(
        [node, str(VERIFY_MJS), str(workdir / "message.eml"), str(workdir / "records.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"verify.mjs failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def outcomes(message: bytes, records: dict[str, str], workdir: Path) -> list[tuple[str, str]]:
    return [
        (s["result"], s["comment"]) for s in node_verify(message, records, workdir)["signatures"]
    ]


def submit(relay, tenant, message: bytes) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test relay's certificate is self-signed
    host, port = relay.submission
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.test")
        client.starttls(context=context)
        client.ehlo("client.test")
        client.login(tenant.username, tenant.password)
        client.mail(f"bounces@{tenant.domain}")
        code, reply = client.rcpt("cliente@destinatario.example")
        assert code == 250, reply
        code, reply = client.data(message)
    assert code == 250, reply
    match = re.search(rb"queued as (\S+)", reply)
    assert match, reply
    return match.group(1).decode()


def spooled_bytes(db_url: str, queue_id: str) -> bytes:
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            row = session.get(Message, queue_id)
            assert row is not None, f"message {queue_id} is not in the spool"
            return bytes(row.data)
    finally:
        engine.dispose()


def dkim_records(home, domain: str) -> dict[str, str]:
    records = json.loads(home.cli("domain", "records", domain, "--json").stdout)
    return {r["name"]: r["value"] for r in records if r["purpose"].startswith("DKIM")}


def test_spooled_message_passes_rsa_and_ed25519_in_mailauth(relay, axiom_home, tmp_path):
    tenant = seed_tenant(axiom_home, "rossi", DOMAIN)
    message = (
        f"From: Negozio Rossi <ordini@{DOMAIN}>\r\n"
        "To: Cliente <cliente@destinatario.example>\r\n"
        "Subject: Conferma d'ordine n. 1042\r\n"
        f"List-Unsubscribe: <https://{DOMAIN}/disiscrivi/1042>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "Feedback-ID: ordine:rossi:transactional:axiom\r\n"
        "X-Axiom-Stream: transactional\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Grazie per il suo ordine.   \r\n"
        "\r\n"
        ".una riga che inizia con un punto\r\n"
    ).encode()

    queue_id = submit(relay, tenant, message)
    spooled = spooled_bytes(axiom_home.db_url, queue_id)
    records = dkim_records(axiom_home, DOMAIN)
    assert len(records) == 2, records

    verdict = node_verify(spooled, records, tmp_path)
    signatures = verdict["signatures"]
    assert verdict["headerFrom"] == [f"ordini@{DOMAIN}"]
    by_algorithm = {s["algorithm"]: s for s in signatures}
    assert sorted(by_algorithm) == ["ed25519-sha256", "rsa-sha256"], signatures
    assert len(signatures) == 2, signatures
    for algorithm, sig in by_algorithm.items():
        assert sig["result"] == "pass", sig
        assert sig["domain"] == DOMAIN
        assert sig["canonicalization"] == "relaxed/relaxed"
        assert f"{sig['selector']}._domainkey.{DOMAIN}" in records
        kind = "rsa" if algorithm == "rsa-sha256" else "ed25519"
        assert f"k={kind};" in records[f"{sig['selector']}._domainkey.{DOMAIN}"]
        # Relay-added Message-ID and Date are covered; the X-Axiom-Stream instruction is gone.
        assert [h.lower() for h in sig["signedHeaders"]] == SIGNED, sig
    assert b"x-axiom-stream" not in spooled.lower()
    # Each signature was checked against its own published key.
    assert {entry["name"] for entry in verdict["lookups"]} == set(records)

    # The same verifier on the same bytes fails once the message is altered in transit.
    tampered = spooled.replace(b"n. 1042", b"n. 9999", 1)
    assert tampered != spooled
    assert outcomes(tampered, records, tmp_path) == [("fail", "bad signature")] * 2
    # A second From above the signed one: mailauth (unlike dkimpy) does not add an extra
    # "from" when verifying, so only the relay's oversigned h= makes this fail.
    spoofed = spooled.replace(
        b"\r\nFrom: Negozio",
        b"\r\nFrom: Ufficio Paghe <paghe@attacker.example>\r\nFrom: Negozio",
        1,
    )
    assert spoofed.count(b"\r\nFrom: ") == 2
    assert outcomes(spoofed, records, tmp_path) == [("fail", "bad signature")] * 2
    body_changed = spooled + b"P.S. aggiunto dopo la firma\r\n"
    assert (
        outcomes(body_changed, records, tmp_path) == [("neutral", "body hash did not verify")] * 2
    )


def test_a_message_over_the_inline_signing_size_verifies_too(relay, axiom_home, tmp_path):
    from relay.submission.server import INLINE_SIGNING_MAX

    tenant = seed_tenant(axiom_home, "rossi", DOMAIN)
    line = b"Riga di un allegato lungo, ripetuta per superare la soglia.  \r\n"
    body = line * (INLINE_SIGNING_MAX // len(line) * 3)
    message = (
        f"From: Negozio Rossi <ordini@{DOMAIN}>\r\n"
        "To: Cliente <cliente@destinatario.example>\r\n"
        "Subject: Catalogo\r\n"
        "\r\n"
    ).encode() + body
    assert len(message) > 2 * INLINE_SIGNING_MAX
    queue_id = submit(relay, tenant, message)
    spooled = spooled_bytes(axiom_home.db_url, queue_id)
    signatures = node_verify(spooled, dkim_records(axiom_home, DOMAIN), tmp_path)["signatures"]
    assert sorted(s["algorithm"] for s in signatures) == ["ed25519-sha256", "rsa-sha256"]
    assert [s["result"] for s in signatures] == ["pass", "pass"], signatures
