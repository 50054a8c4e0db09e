"""The DNS records a customer publishes for each onboarded domain, read from the database.

The sandbox is the outside world: what it serves is what a customer would have put in their
zone after following `axiom domain records` — the DKIM keys' TXT records, SPF and DMARC. It
builds them from the Domain and DkimKey rows itself, with no import of the relay or of the
control plane, so that nothing the relay patches (relay/patches) reaches the receivers that
judge the relay's mail. tests/unit/test_sandbox_published.py checks that the records agree
with protocol.domains.domain_records, the instructions the customer is given.
"""

from __future__ import annotations

from collections import defaultdict

from sqlmodel import Session, select

from models import DkimKey, Domain, KeyState

Record = tuple[str, str, str]  # (name, type, value)


def dkim_txt_value(algorithm: str, public_key: str) -> str:
    """A DKIM key record's TXT value (RFC 6376 3.6.1): k= is "rsa" or "ed25519" (RFC 8463)."""
    return f"v=DKIM1; k={algorithm}; p={public_key}"


def published_records(session: Session, relay_hostname: str) -> dict[str, list[Record]]:
    """domain -> its records, for every domain in the database; retired keys are withdrawn."""
    keys: dict[int, list[DkimKey]] = defaultdict(list)
    for key in session.exec(select(DkimKey).where(DkimKey.state != KeyState.retired)).all():
        keys[key.domain_id].append(key)
    out: dict[str, list[Record]] = {}
    for domain in session.exec(select(Domain)).all():
        name = domain.name
        records = [
            (
                f"{k.selector}._domainkey.{name}",
                "TXT",
                dkim_txt_value(k.algorithm, k.public_key),
            )
            for k in sorted(keys[domain.id], key=lambda k: k.algorithm != "rsa")
        ]
        records.append((name, "TXT", f"v=spf1 include:_spf.{relay_hostname} ~all"))
        records.append(
            (
                f"_dmarc.{name}",
                "TXT",
                f"v=DMARC1; p=none; rua=mailto:dmarc@{relay_hostname}; adkim=r; aspf=r",
            )
        )
        out[name] = records
    return out
