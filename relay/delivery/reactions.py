"""Automatic protective reactions: reply pattern → trigger → action → duration.

A rule that fires writes a Suspension row (suspend or throttle one (IP, provider) path) with
its reason and expiry, and an audit entry. Nothing here is permanent: every row expires by
itself, and structural responses are left to people (DESIGN principle 3).
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, text
from sqlmodel import Session

from models import Suspension
from models.audit_trail import record
from runbooks.schema_delivery import ReactionRule


@dataclass(frozen=True)
class Reaction:
    rule: ReactionRule
    source_ip: str
    provider: str
    evidence: str  # the reply that completed the trigger


class ReactionEngine:
    def __init__(self, rules: list[ReactionRule], runbook_version: str):
        self._rules = [(r, re.compile(r.text, re.IGNORECASE) if r.text else None) for r in rules]
        self._version = runbook_version
        self._hits: dict[tuple[str, str, str], deque[datetime]] = defaultdict(deque)

    def observe(
        self, *, source_ip: str, provider: str, category: str, reply: str, now: datetime
    ) -> list[Reaction]:
        fired = []
        for rule, pattern in self._rules:
            if rule.provider not in ("any", provider):
                continue
            if rule.categories and category not in rule.categories:
                continue
            if pattern is not None and not pattern.search(reply):
                continue
            hits = self._hits[(rule.id, source_ip, provider)]
            hits.append(now)
            while hits and hits[0] <= now - timedelta(seconds=rule.trigger.window_seconds):
                hits.popleft()
            if len(hits) >= rule.trigger.count:
                hits.clear()
                fired.append(Reaction(rule, source_ip, provider, reply))
        return fired

    def apply(self, engine: Engine, reactions: list[Reaction], now: datetime) -> list[Suspension]:
        """Write each reaction once: an active suspension for the same rule and path is kept."""
        created = []
        with Session(engine, expire_on_commit=False) as session:
            if engine.dialect.name == "postgresql":
                # Concurrent jobs see the same reply storm; one writer at a time keeps the
                # "already active?" check and the insert together (SQLite's write lock does this).
                session.exec(text("SELECT pg_advisory_xact_lock(7312)"))
            for reaction in reactions:
                rule = reaction.rule
                active = session.exec(
                    select(Suspension.id).where(
                        Suspension.source_ip == reaction.source_ip,
                        Suspension.provider == reaction.provider,
                        Suspension.rule_id == rule.id,
                        Suspension.expires_at > now,
                    )
                ).first()
                if active is not None:
                    continue
                suspension = Suspension(
                    source_ip=reaction.source_ip,
                    provider=reaction.provider,
                    action=rule.action,
                    limit_per_minute=rule.limit_per_minute,
                    reason=f"{rule.id}: {reaction.evidence}"[:1000],
                    rule_id=rule.id,
                    created_at=now,
                    expires_at=now + timedelta(seconds=rule.duration_seconds),
                )
                session.add(suspension)
                record(
                    session,
                    actor=f"relay:reaction:{rule.id}",
                    action=f"path.{rule.action}",
                    subject=f"path:{reaction.source_ip}/{reaction.provider}",
                    runbook_id="shaping",
                    runbook_version=self._version,
                    evidence={
                        "reply": reaction.evidence,
                        "trigger": rule.trigger.model_dump(),
                        "duration_seconds": rule.duration_seconds,
                        "limit_per_minute": rule.limit_per_minute,
                        "source": str(rule.source.url),
                    },
                    at=now,
                )
                created.append(suspension)
            session.commit()
        return created
