"""Customer notices: an `email_` template in the tenant's language, sent as mail through this
relay's own submission listener, like a customer's mail.

The sender is a system tenant, `axiom-notices`, with one credential and one sending domain (the
domain of AXIOM_NOTICE_SENDER, by default notices@HOSTNAME), whose DKIM keys the relay signs
with like any other. `axiom init` (and so `axiom up` in the sandbox, where the sandbox DNS
publishes the domain's records) provisions it with `ensure_notice_sender`. Its password is
never stored: it is derived from the home's secret key (HMAC-SHA256), and only its argon2 hash
is in the database, like every credential.

`send_notice` never raises: a tenant without a contact address gets no notice, and the caller
is told why (returned and logged) — a notice is a courtesy that must not break a procedure.
Submission is AUTH over STARTTLS, the TLS certificate pinned to the relay's own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr
from typing import Any

from sqlmodel import Session, select

from config.settings import Settings, split_host_port
from models import Credential, Domain, Tenant
from models.audit_trail import record
from notifications.templates import render, render_email
from protocol import domains, tenants
from relay.submission.auth import hash_password, verify_password
from relay.submission.keystore import KeyBox

log = logging.getLogger("axiom.notices")

NOTICE_TENANT = "axiom-notices"
NOTICE_USERNAME = "axiom-notices"
SENDER_NAME = "Axiom Send"
_DERIVATION = b"axiom-send customer notices: SMTP password, version 1"
_QUEUED_AS = re.compile(r"queued as (\S+)")


def notice_password(settings: Settings) -> str:
    """The system sender's SMTP password, derived from the home's secret key (never stored)."""
    digest = hmac.new(settings.load_secret_key(), _DERIVATION, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def ensure_notice_sender(session: Session, settings: Settings) -> list[str]:
    """The system tenant, its credential and its active sending domain; idempotent, audited
    by the services it calls. Returns a line per thing done (nothing when all was there)."""
    done: list[str] = []
    domain_name = settings.notice_mailbox.rpartition("@")[2].lower()
    tenant = session.exec(select(Tenant).where(Tenant.name == NOTICE_TENANT)).first()
    if tenant is None:
        tenant = tenants.add_tenant(session, NOTICE_TENANT, "en")
        done.append(f"tenant {NOTICE_TENANT} created: the sender of customer notices")
    password = notice_password(settings)
    credential = session.exec(
        select(Credential).where(Credential.username == NOTICE_USERNAME)
    ).first()
    if credential is None or not verify_password(credential.password_hash, password):
        # New, or the secret key changed since: the derived password is the one to accept.
        credential = credential or Credential(tenant_id=tenant.id or 0, username=NOTICE_USERNAME)
        credential.password_hash = hash_password(password)
        session.add(credential)
        record(
            session,
            actor="axiom-init",
            action="credential.add",
            subject=f"tenant:{NOTICE_TENANT}",
            evidence={"username": NOTICE_USERNAME, "password": "derived from the secret key"},
        )
        done.append(f"credential {NOTICE_USERNAME} set (password derived from the secret key)")
    domain = session.exec(select(Domain).where(Domain.name == domain_name)).first()
    if domain is not None and domain.tenant_id != tenant.id:
        done.append(
            f"domain {domain_name} belongs to another tenant: customer notices cannot be sent "
            "from it; set AXIOM_NOTICE_SENDER to an address of a domain of its own"
        )
        return done
    if domain is None:
        keybox = KeyBox(settings.load_secret_key())
        domains.add_domain(session, keybox, NOTICE_TENANT, domain_name)
        domains.mark_domain_active(
            session, domain_name, "axiom-init", "the sending domain of customer notices"
        )
        done.append(
            f"domain {domain_name} added and active for customer notices; publish its records "
            f"(axiom domain records {domain_name})"
        )
    return done


def send_notice(
    session: Session,
    settings: Settings,
    tenant_name: str,
    notice: str,
    *,
    actor: str,
    **variables: Any,
) -> dict:
    """Render `notice` (an email_ template) in the tenant's language and submit it to this
    relay for the tenant's contact address. Returns what happened, JSON-able:
    {notice, tenant, to, in_language, sent, queued_as, reason, detail, said}; `reason` is
    no_contact, no_sender or failed when not sent. Sent notices are audited (notice.sent) in
    `session`, which the caller commits.

    Give it a session that has written nothing yet (a procedure step of its own): it commits
    what it read before submitting, so that the relay can spool the notice."""
    outcome: dict[str, Any] = {
        "notice": notice,
        "tenant": tenant_name,
        "to": None,
        "in_language": None,
        "sent": False,
        "queued_as": None,
        "reason": None,
        "detail": None,
    }
    try:
        tenant = tenants.get_tenant(session, tenant_name)
        outcome["to"], outcome["in_language"] = tenant.contact_email, tenant.language
        if not tenant.contact_email:
            outcome["reason"] = "no_contact"
        elif not _sender_ready(session):
            outcome["reason"], outcome["detail"] = "no_sender", f"no credential {NOTICE_USERNAME}"
        else:
            message = compose(settings, tenant, notice, **variables)
            # End the read transaction before the relay must spool the notice: on SQLite every
            # transaction holds the write lock (models/db.py), and the relay would wait on it.
            session.commit()
            outcome["queued_as"] = submit(settings, message)
            outcome["sent"] = True
            record(
                session,
                actor=actor,
                action="notice.sent",
                subject=f"tenant:{tenant_name}",
                evidence={
                    "notice": notice,
                    "to": tenant.contact_email,
                    "language": tenant.language,
                    "queued_as": outcome["queued_as"],
                },
            )
    except Exception as exc:  # a notice must never break the procedure that sends it
        outcome["reason"], outcome["detail"] = "failed", f"{type(exc).__name__}: {exc}"
    outcome["said"] = render("text_notice_outcome", settings.slack_language, **outcome)
    (log.info if outcome["sent"] or outcome["reason"] == "no_contact" else log.warning)(
        "%s", outcome["said"]
    )
    return outcome


def compose(settings: Settings, tenant: Tenant, notice: str, **variables: Any) -> EmailMessage:
    """The notice as a message: plain text in the tenant's language, marked automatic."""
    text = render_email(
        notice, tenant.language, reply_to=settings.notice_reply_to, tenant=tenant.name, **variables
    )
    message = EmailMessage(policy=SMTP)
    message["From"] = formataddr((SENDER_NAME, settings.notice_mailbox))
    message["To"] = tenant.contact_email or ""
    message["Subject"] = text.subject
    if settings.notice_reply_to:
        message["Reply-To"] = settings.notice_reply_to
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
    message.set_content(text.body, charset="utf-8")
    return message


def submit(settings: Settings, message: EmailMessage) -> str:
    """Submit to this relay's STARTTLS listener as the system sender; returns the queue id."""
    host, port = split_host_port(settings.submission_listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    context = ssl.create_default_context(cafile=str(settings.cert_path))
    # Trust exactly the relay's own certificate (self-signed in the sandbox), reached on a
    # local address that is not the name in it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    recipient = str(message["To"])
    with smtplib.SMTP(host, port, local_hostname=settings.hostname, timeout=30) as client:
        client.starttls(context=context)
        client.login(NOTICE_USERNAME, notice_password(settings))
        code, reply = client.mail(settings.notice_mailbox)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, settings.notice_mailbox)
        code, reply = client.rcpt(recipient)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
        code, reply = client.data(message.as_bytes())
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
    found = _QUEUED_AS.search(reply.decode(errors="replace"))
    return found.group(1) if found else reply.decode(errors="replace")


def _sender_ready(session: Session) -> bool:
    credential = session.exec(
        select(Credential).where(Credential.username == NOTICE_USERNAME)
    ).first()
    return credential is not None and not credential.disabled
