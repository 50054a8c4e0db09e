"""Protective suspensions and throttles of (IP, provider) paths that have not yet run out."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from models import Suspension


def active_suspensions(session: Session, now: datetime) -> list[Suspension]:
    """Soonest to expire first."""
    return list(
        session.exec(
            select(Suspension)
            .where(Suspension.expires_at > now)
            .order_by(col(Suspension.expires_at))
        ).all()
    )
