"""The DNS records a customer publishes for each onboarded domain, read from the database.

The sandbox is the outside world: what it serves is what a customer would have put in their
zone after following `axiom domain records` — the DKIM keys' TXT records, SPF and DMARC. It
builds them from the Domain and DkimKey rows itself, with no import of the relay or of the
control plane, so that nothing the relay patches (relay/patches) reaches the receivers that
judge the relay's mail. Both render runbooks/dns-records.yaml (runbooks/records.py), and
tests/unit/test_sandbox_published.py checks that they agree with protocol.domains.domain_records,
the instructions the customer is given.
"""

from __future__ import annotations

from collections import defaultdict

from sqlmodel import Session, select

from models import DkimKey, Domain, KeyState
from runbooks.loader import dns_records, domain_onboarding
from runbooks.records import PublishedKey, render_records

Record = tuple[str, str, str]  # (name, type, value)


def dkim_txt_value(algorithm: str, public_key: str) -> str:
    """A DKIM key record's TXT value (RFC 6376 3.6.1): k= is "rsa" or "ed25519" (RFC 8463)."""
    return f"v=DKIM1; k={algorithm}; p={public_key}"


def published_records(session: Session, relay_hostname: str) -> dict[str, list[Record]]:
    """domain -> its records, for every domain in the database, as runbooks/dns-records.yaml
    renders them for the customer; retired keys are withdrawn. The sandbox's customers publish
    at once; a test that wants one late or wrong overrides the record (`axiom sandbox dns`)."""
    keys: dict[int, list[PublishedKey]] = defaultdict(list)
    for key in session.exec(select(DkimKey).where(DkimKey.state != KeyState.retired)).all():
        keys[key.domain_id].append(PublishedKey(key.selector, key.algorithm, key.public_key))
    spec = dns_records().spec
    label = domain_onboarding().spec.return_path_label
    out: dict[str, list[Record]] = {}
    for domain in session.exec(select(Domain)).all():
        rendered = render_records(
            spec,
            domain=domain.name,
            keys=keys[domain.id or 0],
            relay_hostname=relay_hostname,
            dmarc_address=f"dmarc@{relay_hostname}",
            return_path=domain.return_path_domain or f"{label}.{domain.name}",
        )
        out[domain.name] = [(r.name, r.type, r.value) for r in rendered]
    return out
