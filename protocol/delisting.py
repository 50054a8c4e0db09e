"""Getting a listed IP off a blocklist (runbooks/blocklist-delisting.yaml): the protection the
scan puts on at once, the incident's evidence, the request's facts, the watch, and the way
back through the warm-up runbook's re-warm plan.

Protection is a `Suspension` of the IP at each provider that consults the list (the relay
reads them; relay/delivery/egress.py moves the mail to the pool's other IPs within their
warm-up room, else to the fallback pool, else it waits without spending an attempt). It is
time-bounded (`protect_hours`) and renewed by every scan that still sees the listing, so it
ends by itself if nobody acts; a provider that consults no list keeps taking the IP's mail.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from models import DeliveryEvent, EventKind, Suspension, Tenant
from models.audit_trail import record
from protocol import incidents
from runbooks.schema_blocklists import Blocklist

RULE_PREFIX = "blocklist:"


def rule_id(list_id: str) -> str:
    return f"{RULE_PREFIX}{list_id}"


def protect(
    session: Session,
    ip: str,
    blocklist: Blocklist,
    *,
    hours: int,
    now: datetime,
    actor: str,
    runbook: tuple[str, str],
) -> dict:
    """Suspend the IP at every provider that consults the list until now + hours, or extend
    the suspension it already has (one row per provider, never a second). Audited when it
    starts; a renewal only moves the end."""
    until = now + timedelta(hours=hours)
    started, renewed = [], []
    for provider in blocklist.consulted_by:
        row = session.exec(
            select(Suspension).where(
                Suspension.source_ip == ip,
                Suspension.provider == provider,
                Suspension.rule_id == rule_id(blocklist.id),
                Suspension.expires_at > now,
            )
        ).first()
        if row is None:
            session.add(
                Suspension(
                    source_ip=ip,
                    provider=provider,
                    action="suspend",
                    reason=f"listed on {blocklist.name} ({blocklist.zone})",
                    rule_id=rule_id(blocklist.id),
                    created_at=now,
                    expires_at=until,
                )
            )
            started.append(provider)
        elif row.expires_at < until:
            row.expires_at = until
            session.add(row)
            renewed.append(provider)
    if started:
        record(
            session,
            actor=actor,
            action="blocklist.protect",
            subject=f"ip:{ip}",
            evidence={
                "list": blocklist.id,
                "providers": started,
                "until": until.isoformat(),
                "why": f"{blocklist.name} is consulted by {', '.join(blocklist.consulted_by)}",
            },
            runbook_id=runbook[0],
            runbook_version=runbook[1],
            at=now,
        )
    return {"started": started, "renewed": renewed, "until": until.isoformat()}


def lift(
    session: Session, ip: str, list_id: str, *, now: datetime, actor: str, runbook: tuple[str, str]
) -> list[str]:
    """End the listing's suspensions now (the listing cleared); audited."""
    rows = session.exec(
        select(Suspension).where(
            Suspension.source_ip == ip,
            Suspension.rule_id == rule_id(list_id),
            Suspension.expires_at > now,
        )
    ).all()
    for row in rows:
        row.expires_at = now
        session.add(row)
    providers = sorted(r.provider for r in rows)
    if rows:
        record(
            session,
            actor=actor,
            action="blocklist.unprotect",
            subject=f"ip:{ip}",
            evidence={"list": list_id, "providers": providers, "why": "the listing cleared"},
            runbook_id=runbook[0],
            runbook_version=runbook[1],
            at=now,
        )
    return providers


def traffic(session: Session, ip: str, *, now: datetime, hours: int) -> list[dict]:
    """The IP's mail over the last hours by tenant and stream: attempts, delivered, deferred,
    refused, asynchronous bounces and complaints — where to look for the cause."""
    since = now - timedelta(hours=hours)
    rows = session.exec(
        select(
            DeliveryEvent.tenant_id,
            DeliveryEvent.stream,
            DeliveryEvent.kind,
            DeliveryEvent.category,
            DeliveryEvent.permanent,
            func.count(),
        )
        .where(DeliveryEvent.source_ip == ip, DeliveryEvent.at >= since)
        .group_by(
            DeliveryEvent.tenant_id,
            DeliveryEvent.stream,
            DeliveryEvent.kind,
            DeliveryEvent.category,
            DeliveryEvent.permanent,
        )
    ).all()
    names = dict(session.exec(select(Tenant.id, Tenant.name)).all())
    table: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tenant_id, stream, kind, category, permanent, n in rows:
        c = table[(names.get(tenant_id, "?"), stream or "?")]
        if kind == EventKind.complaint:
            c["complaints"] += n
        elif kind == EventKind.bounce:
            c["bounced"] += n
        else:
            c["sent"] += n
            key = "delivered" if category == "delivered" else "refused" if permanent else "deferred"
            c[key] += n
    keys = ("sent", "delivered", "deferred", "refused", "bounced", "complaints")
    out = [
        {"tenant": t, "stream": s, **{k: counts.get(k, 0) for k in keys}}
        for (t, s), counts in table.items()
    ]
    return sorted(out, key=lambda r: (-r["sent"], r["tenant"], r["stream"]))


def open_incident(
    session: Session,
    ip: str,
    blocklist: Blocklist,
    listing: dict,
    *,
    cause: str,
    hours: int,
    now: datetime,
    actor: str,
    runbook: tuple[str, str],
) -> dict:
    """The incident with the evidence: the listing, its code's meaning and reason, and the
    IP's last day by tenant and stream (complaints and bounces included)."""
    rows = traffic(session, ip, now=now, hours=hours)
    codes = listing.get("codes") or []
    summary = f"{ip} listed on {blocklist.name}: {listing.get('meaning') or 'listed'}"
    reported = incidents.report(
        session,
        subject=f"ip:{ip}",
        cause=cause,
        severity="critical",
        summary=summary,
        actor=actor,
        now=now,
        evidence={
            "list": blocklist.id,
            "zone": blocklist.zone,
            "codes": codes,
            "meaning": listing.get("meaning"),
            "reason": listing.get("reason"),
            "consulted_by": blocklist.consulted_by,
            f"traffic_{hours}h": rows,
        },
        runbook_id=runbook[0],
        runbook_version=runbook[1],
    )
    return {"incident_id": reported.incident.id, "summary": summary, "traffic": rows}


def facts(listing: dict, rows: list[dict], fixed: str, protected: list[str]) -> list[tuple]:
    """What a removal request states: what was sent, what came back, what was done."""
    total = {k: sum(r[k] for r in rows) for k in ("sent", "complaints", "bounced", "refused")}
    top = ", ".join(f"{r['tenant']}/{r['stream']} {r['sent']}" for r in rows[:3]) or "none"
    return [
        ("listed since", listing.get("first_seen") or "?"),
        ("code", ", ".join(listing.get("codes") or []) or "?"),
        ("messages in the last 24 h", f"{total['sent']:,}"),
        ("by tenant and stream", top),
        ("complaints", str(total["complaints"])),
        ("bounces and refusals", str(total["bounced"] + total["refused"])),
        ("stopped towards", ", ".join(protected) or "no provider consults this list"),
        ("cause and fix", fixed),
    ]


def still_suspended(session: Session, ip: str, list_id: str, now: datetime) -> list[str]:
    return sorted(
        session.exec(
            select(Suspension.provider).where(
                Suspension.source_ip == ip,
                Suspension.rule_id == rule_id(list_id),
                col(Suspension.expires_at) > now,
            )
        ).all()
    )


def listing(session: Session, ip: str, list_id: str) -> dict | None:
    """The list's last verdict on the IP, as the scan stored it (an error never changes it)."""
    from models.blocklists import BlocklistListing

    row = session.exec(
        select(BlocklistListing).where(
            BlocklistListing.target == ip, BlocklistListing.list_id == list_id
        )
    ).first()
    if row is None:
        return None
    return {
        "state": row.state,
        "codes": list(row.codes or []),
        "meaning": row.meaning,
        "reason": row.reason,
        "first_seen": f"{row.first_seen:%Y-%m-%d %H:%M} UTC" if row.first_seen else None,
        "cleared_at": row.cleared_at.isoformat() if row.cleared_at else None,
        "last_error": row.last_error,
    }
