"""sandbox/published.py: the world publishes, from the database rows alone, exactly the records
`axiom domain records` tells the customer to publish (protocol.domains.domain_records)."""

from __future__ import annotations

from sqlmodel import select

from models import DkimKey, KeyState
from protocol import domains, tenants
from relay.submission.keystore import KeyBox
from sandbox.published import dkim_txt_value, published_records

HOSTNAME = "relay.axiom.test"


def instructions(session, name: str) -> list[tuple[str, str, str]]:
    return [(r.name, r.type, r.value) for r in domains.domain_records(session, name, HOSTNAME)]


def test_every_domain_publishes_what_its_customer_is_told_to(session):
    keybox = KeyBox(KeyBox.generate())
    tenants.add_tenant(session, "acme")
    domains.add_domain(session, keybox, "acme", "acme.example")
    domains.add_domain(session, keybox, "acme", "news.acme.example")
    session.flush()

    published = published_records(session, HOSTNAME)

    assert sorted(published) == ["acme.example", "news.acme.example"]
    for name, records in published.items():
        assert records == instructions(session, name)
        kinds = [value.split(";")[1].strip() for _, _, value in records if "DKIM1" in value]
        assert kinds == ["k=rsa", "k=ed25519"]  # RSA first, as the instructions list them


def test_a_retired_key_is_withdrawn(session):
    keybox = KeyBox(KeyBox.generate())
    tenants.add_tenant(session, "acme")
    domain = domains.add_domain(session, keybox, "acme", "acme.example")
    session.flush()
    ed = session.exec(
        select(DkimKey).where(DkimKey.domain_id == domain.id, DkimKey.algorithm == "ed25519")
    ).one()
    ed.state = KeyState.retired
    session.add(ed)
    session.flush()

    records = published_records(session, HOSTNAME)["acme.example"]

    assert records == instructions(session, "acme.example")
    assert not any(name.startswith(f"{ed.selector}.") for name, _, _ in records)
    assert len([r for r in records if "DKIM1" in r[2]]) == 1


def test_dkim_value_is_the_relays_format():
    from relay.submission.dkim import txt_record_value

    for algorithm in ("rsa", "ed25519"):
        assert dkim_txt_value(algorithm, "QUJD") == txt_record_value(algorithm, "QUJD")
