"""A tenant's contact address and language: checked with errors naming the bad value, audited,
shown by `axiom tenant list`; and customer notices that cannot be sent say why, never raise."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from config.settings import load_settings
from models import AuditEntry, Credential, Domain, DomainState, Tenant
from notifications import customer_mail
from protocol import tenants
from protocol.errors import ServiceError
from relay.submission.auth import verify_password
from testbed.axiom import make_home


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ops@acme.example", "ops@acme.example"),
        (" Ops.Team+it@ACME.Example. ", "Ops.Team+it@acme.example"),
        ("ufficio@città.it", "ufficio@xn--citt-3na.it"),
        ("o'brien_1@mail.acme.example", "o'brien_1@mail.acme.example"),
    ],
)
def test_a_contact_is_one_bare_address(address, expected):
    assert tenants.check_contact(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("", "it is empty"),
        ("ops", "it needs a local part, '@' and a domain"),
        ("@acme.example", "it needs a local part, '@' and a domain"),
        ("ops@", "it needs a local part, '@' and a domain"),
        ("a@b@acme.example", "it has more than one '@'"),
        ("Ops <ops@acme.example>", "give one bare address like name@example.com"),
        ("ops@acme.example, x@y.example", "give one bare address like name@example.com"),
        ('"o p"@acme.example', "give one bare address like name@example.com"),
        ("ops\n@acme.example", "give one bare address like name@example.com"),
        ("o..ps@acme.example", "the part before '@' ('o..ps') is not a valid mailbox name"),
        (".ops@acme.example", "the part before '@' ('.ops') is not a valid mailbox name"),
        ("x" * 65 + "@acme.example", "is not a valid mailbox name"),
        ("ops@localhost", "the domain 'localhost' is not a valid host name"),
        ("ops@acme_corp.example", "the domain 'acme_corp.example' is not a valid host name"),
        ("ops@-acme.example", "the domain '-acme.example' is not a valid host name"),
        ("ops@127.0.0.1", "the domain '127.0.0.1' is not a valid host name"),
        ("ops@" + "a" * 64 + ".example", "is not a valid host name"),
    ],
)
def test_a_bad_contact_is_refused_naming_it(address, why):
    with pytest.raises(ServiceError) as refused:
        tenants.check_contact(address)
    assert str(refused.value).startswith(f"contact address {address!r} is not valid: ")
    assert why in str(refused.value)


def test_a_language_must_have_templates():
    assert tenants.template_languages() == ("en", "it")
    with pytest.raises(ServiceError, match="language 'de' has no templates; choose one of en, it"):
        tenants.check_language("de")


def test_contact_and_language_are_set_and_audited_with_old_and_new(session):
    tenants.add_tenant(session, "acme", "it", "ops@acme.example")
    tenants.set_tenant(session, "acme", contact="billing@acme.example", language="en")
    tenants.set_tenant(session, "acme", clear_contact=True)
    row = session.exec(select(Tenant).where(Tenant.name == "acme")).one()
    assert (row.language, row.contact_email) == ("en", None)
    entries = session.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.evidence) for e in entries] == [
        ("tenant.add", {"language": "it", "contact": "ops@acme.example"}),
        (
            "tenant.set",
            {"contact": ["ops@acme.example", "billing@acme.example"], "language": ["it", "en"]},
        ),
        ("tenant.set", {"contact": ["billing@acme.example", None]}),
    ]
    with pytest.raises(ServiceError, match="tenant 'acme': nothing to change"):
        tenants.set_tenant(session, "acme", language="en")
    with pytest.raises(ServiceError, match="give a contact address or clear it, not both"):
        tenants.set_tenant(session, "acme", contact="a@acme.example", clear_contact=True)
    with pytest.raises(ServiceError, match="tenant 'nobody' does not exist"):
        tenants.set_tenant(session, "nobody", language="it")


def test_the_cli_adds_sets_and_lists_contacts(cli):
    added = cli("tenant", "add", "rossi", "--contact", "ufficio@rossi.example")
    assert added.exit_code == 0, added.output
    assert "notices in it to ufficio@rossi.example" in added.output
    assert cli("tenant", "add", "acme", "--language", "en").exit_code == 0
    changed = cli("tenant", "set", "acme", "--contact", "ops@acme.example", "--language", "it")
    assert changed.exit_code == 0 and "notices in it to ops@acme.example" in changed.output
    listed = json.loads(cli("tenant", "list", "--json").stdout)
    assert [(r["name"], r["language"], r["contact"], r["paused"]) for r in listed] == [
        ("acme", "it", "ops@acme.example", False),
        ("rossi", "it", "ufficio@rossi.example", False),
    ]
    table = cli("tenant", "list").stdout
    assert "ufficio@rossi.example" in table and "language" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("tenant", "add", "acme", "--contact", "ops@acme"),
            "contact address 'ops@acme' is not valid: the domain 'acme' is not a valid host name",
        ),
        (
            ("tenant", "add", "acme", "--language", "fr"),
            "language 'fr' has no templates; choose one of en, it",
        ),
        (
            ("tenant", "set", "nobody", "--language", "en"),
            "tenant 'nobody' does not exist",
        ),
    ],
)
def test_the_cli_names_the_bad_value(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 1
    assert " ".join(result.stderr.split()) == f"error: {message}"


def test_the_notice_sender_is_provisioned_once_without_storing_its_password(session, tmp_path):
    home = make_home(tmp_path / "home", "sqlite://", database=False)
    settings = load_settings(home=home.path, secret_key=None)
    said = customer_mail.ensure_notice_sender(session, settings)
    assert [line.split()[0] for line in said] == ["tenant", "credential", "domain"]
    assert customer_mail.ensure_notice_sender(session, settings) == []
    credential = session.exec(
        select(Credential).where(Credential.username == customer_mail.NOTICE_USERNAME)
    ).one()
    password = customer_mail.notice_password(settings)
    assert password not in credential.password_hash
    assert verify_password(credential.password_hash, password)
    domain = session.exec(select(Domain).where(Domain.name == "relay.axiom.test")).one()
    assert domain.state == DomainState.active
    # Another secret key derives another password: the hash is replaced, nothing else.
    other = load_settings(home=home.path, secret_key="another-sandbox-key-of-enough-length-x")
    assert [line.split()[0] for line in customer_mail.ensure_notice_sender(session, other)] == [
        "credential"
    ]


def test_a_notice_without_a_contact_or_a_relay_says_why_and_does_not_raise(session, tmp_path):
    home = make_home(tmp_path / "home", "sqlite://", database=False)
    settings = load_settings(
        home=home.path, secret_key=None, submission_listen="127.0.0.1:9", slack_language="en"
    )
    tenants.add_tenant(session, "acme", "it")
    quiet = customer_mail.send_notice(
        session,
        settings,
        "acme",
        "email_tenant_paused",
        actor="test",
        at="now",
        queued_recipients=1,
    )
    assert (quiet["sent"], quiet["reason"]) == (False, "no_contact")
    assert quiet["said"] == (
        "notice email_tenant_paused not sent: tenant acme has no contact address "
        "(axiom tenant set acme --contact EMAIL)"
    )
    tenants.set_tenant(session, "acme", contact="ops@acme.example")
    no_sender = customer_mail.send_notice(
        session,
        settings,
        "acme",
        "email_tenant_paused",
        actor="test",
        at="now",
        queued_recipients=1,
    )
    assert no_sender["reason"] == "no_sender" and "run axiom init" in no_sender["said"]
    customer_mail.ensure_notice_sender(session, settings)
    unreachable = customer_mail.send_notice(
        session,
        settings,
        "acme",
        "email_tenant_paused",
        actor="test",
        at="now",
        queued_recipients=1,
    )
    assert (unreachable["sent"], unreachable["reason"]) == (False, "failed")
    assert "ConnectionRefusedError" in unreachable["detail"]
    json.dumps(unreachable)  # a procedure step's result
    assert not session.exec(select(AuditEntry).where(AuditEntry.action == "notice.sent")).all()
