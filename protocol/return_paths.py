"""A sending domain's return-path subdomain (relay/delivery/return_path.py): named, and marked
published once its MX (the relay's inbound listener) and SPF (the relay's IPs) are in DNS.

The relay puts it in MAIL FROM only while it is marked published, so that DMARC finds SPF
aligned with the From domain; otherwise the relay's own bounce domain is used and DMARC passes
through DKIM alone. The onboarding runbook will check the records itself; until then an
operator marks it (`axiom domain return-path`), and every change is audited.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session

from models import Domain
from models.audit_trail import record
from protocol.domains import get_domain
from protocol.errors import DOMAIN_NAME, ServiceError

DEFAULT_LABEL = "bounces"  # bounces.<domain> unless the operator names another


def set_return_path(
    session: Session,
    domain_name: str,
    *,
    name: str | None = None,
    published: bool | None = None,
    actor: str = "cli",
    now: datetime | None = None,
) -> Domain:
    """Name DOMAIN's return-path subdomain (default bounces.DOMAIN, kept if already named) and
    mark it published or not (None: unchanged)."""
    domain = get_domain(session, domain_name)
    before = {
        "return_path_domain": domain.return_path_domain,
        "published": domain.return_path_published_at is not None,
    }
    if name is not None or domain.return_path_domain is None:
        chosen = (name or f"{DEFAULT_LABEL}.{domain.name}").lower().rstrip(".")
        if not chosen.endswith(f".{domain.name}") or not DOMAIN_NAME.match(chosen):
            raise ServiceError(
                f"{chosen!r} is not a subdomain of {domain.name}: SPF would not align with it"
            )
        if chosen != domain.return_path_domain:
            domain.return_path_published_at = None  # a new name is not published yet
        domain.return_path_domain = chosen
    if published is not None:
        domain.return_path_published_at = (now or datetime.now(UTC)) if published else None
    session.add(domain)
    after = {
        "return_path_domain": domain.return_path_domain,
        "published": domain.return_path_published_at is not None,
    }
    record(
        session,
        actor=actor,
        action="domain.return_path",
        subject=f"domain:{domain.name}",
        evidence={"before": before, "after": after},
        at=now,
    )
    return domain
