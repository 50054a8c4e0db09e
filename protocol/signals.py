"""Signals the runbooks read: delivery events per window and subject, their hourly roll-up, and
how long they are kept (runbooks/events-retention.yaml).

The relay writes one DeliveryEvent per outcome (relay/spool/claims.py), the inbound listener
one per asynchronous bounce and complaint, and the hold tally counts what was not sent now.
A triage cycle asks, per subject (a provider, a source IP, a From domain, a tenant's stream),
for rates over the last 15 minutes, hour, day and a 7-day baseline. The short windows read
raw events through the (at) index; every completed hour is also rolled up, by every subject
at once into event_rollup (history: which IP at which provider for which domain) and by each
kind of subject into event_rollup_subject, so the long windows read whole hours from the
latter, through an index that holds every column they read, and only the edges from raw
events. At a million events over 8 days an hour has ~3,700 event_rollup rows for ~5,200
events (the subjects multiply), but ~110 per provider, ~370 per IP or stream and ~770 per
From domain in event_rollup_subject: on SQLite a triage cycle took 6.0 s reading event_rollup
and 0.5 s reading event_rollup_subject (bench/signals.py; figures in bench/README.md).

Rates, as `axiom stats` shows them:
- sent: delivery attempts; delivered, deferred (transient failures) and refused (permanent
  failures, by category) split them.
- bounce rate: hard failures (refusals plus asynchronous bounces) over the recipients that got
  a final answer (delivered plus refused).
- complaint rate: complaints over delivered, as Gmail's Postmaster Tools computes its spam rate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, insert, literal, select

from models import DeliveryEvent, EventKind, EventRollup, HoldTally, Tenant
from models.announcements import ControlCursor
from models.audit import as_utc
from models.audit_trail import record
from models.events import ROLLUP_KEY, SubjectRollup
from runbooks.schema_protocol import EventsRetentionSpec

CURSOR = "event-rollup"  # position: the epoch second up to which hours are rolled up
WINDOWS = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
SUBJECTS = ("provider", "ip", "domain", "stream")
MAX_DELETES_PER_RUN = 40  # statements of delete_batch rows; the next run continues


def _event_columns(by: str, table=DeliveryEvent) -> tuple:
    if by not in SUBJECTS:
        raise ValueError(f"{by!r}: group by one of {', '.join(SUBJECTS)}")
    return {
        "provider": (table.provider,),
        "ip": (table.source_ip,),
        "domain": (table.from_domain,),
        "stream": (table.tenant_id, table.stream),
    }[by]


def parse_window(window: str) -> int:
    try:
        return WINDOWS[window]
    except KeyError:
        raise ValueError(f"{window!r}: the window is one of {', '.join(WINDOWS)}") from None


@dataclass
class SubjectStats:
    subject: str
    sent: int = 0
    delivered: int = 0
    deferred: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # permanent failures by category
    bounced: int = 0  # asynchronous bounces
    complaints: int = 0
    held: dict[str, int] = field(default_factory=dict)  # not sent now, by reason (hold tally)

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def bounce_rate(self) -> float:
        answered = self.delivered + self.refused_total
        return (self.refused_total + self.bounced) / answered if answered else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.delivered if self.delivered else 0.0

    def add(self, kind: str, category: str, permanent: bool, count: int) -> None:
        if kind == EventKind.complaint:
            self.complaints += count
        elif kind == EventKind.bounce:
            self.bounced += count
        else:
            self.sent += count
            if category == "delivered":
                self.delivered += count
            elif permanent:
                self.refused[category] = self.refused.get(category, 0) + count
            else:
                self.deferred += count

    def as_json(self) -> dict:
        return {
            "subject": self.subject,
            "sent": self.sent,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "refused": self.refused_total,
            "refused_by_category": dict(sorted(self.refused.items())),
            "bounced_async": self.bounced,
            "complaints": self.complaints,
            "bounce_rate": round(self.bounce_rate, 6),
            "complaint_rate": round(self.complaint_rate, 6),
            "held": dict(sorted(self.held.items())),
        }


@dataclass
class Stats:
    by: str
    window: str
    start: datetime
    end: datetime
    rolled_until: datetime | None
    subjects: list[SubjectStats]

    def as_json(self) -> dict:
        return {
            "by": self.by,
            "window": self.window,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "rolled_up_until": self.rolled_until.isoformat() if self.rolled_until else None,
            "subjects": [s.as_json() for s in self.subjects],
        }


def rolled_until(conn) -> datetime | None:
    position = conn.execute(
        select(ControlCursor.position).where(ControlCursor.name == CURSOR)
    ).scalar()
    return datetime.fromtimestamp(position, tz=UTC) if position else None


def window_stats(engine: Engine, by: str, window: str, now: datetime) -> Stats:
    """Counts and rates per subject over the window ending at now, busiest subject first."""
    seconds = parse_window(window)
    end = as_utc(now)
    start = end - timedelta(seconds=seconds)
    with engine.connect() as conn:
        rolled = rolled_until(conn)
        rows = list(_counts(conn, by, start, end, rolled))
        held = list(_held(conn, by, start, end)) if by != "domain" else []
        names = dict(conn.execute(select(Tenant.id, Tenant.name)).all()) if by == "stream" else {}
    stats: dict[str, SubjectStats] = {}

    def subject(key: tuple) -> SubjectStats:
        label = _label(by, key, names)
        s = stats.get(label)
        if s is None:
            s = stats[label] = SubjectStats(label)
        return s

    for *key, kind, category, permanent, count in rows:
        subject(tuple(key)).add(kind, category, bool(permanent), int(count))
    for *key, reason, count in held:
        s = subject(tuple(key))
        s.held[reason] = s.held.get(reason, 0) + int(count)
    ordered = sorted(stats.values(), key=lambda s: (-(s.sent + sum(s.held.values())), s.subject))
    return Stats(by, window, start, end, rolled, ordered)


def _counts(conn, by: str, start: datetime, end: datetime, rolled: datetime | None):
    """(subject…, kind, category, permanent, count) rows: whole rolled-up hours from the
    roll-up, the rest from raw events."""
    first_hour = _ceil_hour(start)
    if rolled is None or rolled <= first_hour:
        yield from _raw(conn, by, start, end)
        return
    rollup_end = min(rolled, _floor_hour(end))
    if rollup_end > first_hour:
        yield from _raw(conn, by, start, first_hour)
        yield from _rolled(conn, by, first_hour, rollup_end)
        yield from _raw(conn, by, rollup_end, end)
    else:
        yield from _raw(conn, by, start, end)


def _raw(conn, by: str, start: datetime, end: datetime):
    if start >= end:
        return
    cols = _event_columns(by)
    e = DeliveryEvent
    stmt = (
        select(*cols, e.kind, e.category, e.permanent, func.count())
        .where(e.at >= start, e.at < end)
        .group_by(*cols, e.kind, e.category, e.permanent)
    )
    yield from conn.execute(stmt)


def _rolled(conn, by: str, start: datetime, end: datetime):
    r = SubjectRollup
    cols = (r.tenant_id, r.subject) if by == "stream" else (r.subject,)
    stmt = (
        select(*cols, r.kind, r.category, r.permanent, func.sum(r.count))
        .where(r.by == by, r.hour >= start, r.hour < end)
        .group_by(*cols, r.kind, r.category, r.permanent)
    )
    yield from conn.execute(stmt)


def _held(conn, by: str, start: datetime, end: datetime):
    h = HoldTally
    cols = {
        "provider": (h.provider,),
        "ip": (h.source_ip,),
        "stream": (h.tenant_id, h.stream),
    }[by]
    stmt = (
        select(*cols, h.reason, func.sum(h.count))
        .where(h.interval_start >= start - timedelta(minutes=15), h.interval_start < end)
        .group_by(*cols, h.reason)
    )
    yield from conn.execute(stmt)


def _label(by: str, key: tuple, names: dict[int, str]) -> str:
    if by == "stream":
        tenant_id, stream = key
        if not tenant_id and not stream:
            return "(unknown)"
        return f"{names.get(tenant_id, tenant_id or '?')}/{stream or '?'}"
    value = key[0]
    return str(value) if value not in (None, "") else "(none)"


# ---------------------------------------------------------------- roll-up and retention
@dataclass
class Retention:
    hours_rolled: int = 0
    rollup_rows: int = 0
    raw_deleted: int = 0
    rollups_deleted: int = 0
    tallies_deleted: int = 0
    rolled_until: datetime | None = None

    @property
    def idle(self) -> bool:
        return not (self.hours_rolled or self.raw_deleted or self.rollups_deleted)

    def as_json(self) -> dict:
        return {
            "hours_rolled": self.hours_rolled,
            "rollup_rows": self.rollup_rows,
            "raw_deleted": self.raw_deleted,
            "rollups_deleted": self.rollups_deleted,
            "tallies_deleted": self.tallies_deleted,
            "rolled_up_until": self.rolled_until.isoformat() if self.rolled_until else None,
        }


def roll_up_and_expire(
    engine: Engine,
    spec: EventsRetentionSpec,
    now: datetime,
    *,
    actor: str,
    runbook: tuple[str, str] = ("events-retention", ""),
) -> Retention:
    """Roll up every completed hour not rolled up yet (at most spec.hours_per_run), each hour
    in one transaction with the cursor's move, so an hour is rolled up once whoever runs it;
    then delete raw events past spec.raw_days in hours already rolled up, roll-ups past
    spec.rollup_days (rollups_deleted counts event_rollup's; event_rollup_subject's go with
    them) and hold-tally rows past spec.raw_days. Deletions are audited."""
    now = as_utc(now)
    result = Retention()
    end = _floor_hour(now)
    with engine.connect() as conn:
        rolled = rolled_until(conn)
        if rolled is None:
            first = conn.execute(select(func.min(DeliveryEvent.at))).scalar()
            rolled = _floor_hour(as_utc(first)) if first is not None else end
    hour = rolled
    while hour < end and result.hours_rolled < spec.hours_per_run:
        result.rollup_rows += _roll_hour(engine, hour)
        result.hours_rolled += 1
        hour += timedelta(hours=1)
    result.rolled_until = hour
    if hour != rolled or result.hours_rolled == 0:
        _move_cursor(engine, hour)
    raw_cut = min(now - timedelta(days=spec.raw_days), hour)
    for _ in range(MAX_DELETES_PER_RUN):
        with engine.begin() as conn:
            ids = select(DeliveryEvent.id).where(DeliveryEvent.at < raw_cut)
            ids = ids.limit(spec.delete_batch).scalar_subquery()
            deleted = conn.execute(delete(DeliveryEvent).where(DeliveryEvent.id.in_(ids))).rowcount
        result.raw_deleted += deleted
        if deleted < spec.delete_batch:
            break
    with engine.begin() as conn:
        rollup_cut = now - timedelta(days=spec.rollup_days)
        result.rollups_deleted = conn.execute(
            delete(EventRollup).where(EventRollup.hour < rollup_cut)
        ).rowcount
        conn.execute(  # each kind's range of the index that starts with it
            delete(SubjectRollup).where(
                SubjectRollup.by.in_(SUBJECTS), SubjectRollup.hour < rollup_cut
            )
        )
        result.tallies_deleted = conn.execute(
            delete(HoldTally).where(HoldTally.interval_start < now - timedelta(days=spec.raw_days))
        ).rowcount
    if result.raw_deleted or result.rollups_deleted or result.tallies_deleted:
        from sqlmodel import Session

        with Session(engine) as session:
            record(
                session,
                actor=actor,
                action="events.expire",
                subject="events",
                evidence={
                    "raw_deleted": result.raw_deleted,
                    "raw_before": raw_cut.isoformat(),
                    "rollups_deleted": result.rollups_deleted,
                    "tallies_deleted": result.tallies_deleted,
                    "raw_days": spec.raw_days,
                    "rollup_days": spec.rollup_days,
                },
                runbook_id=runbook[0],
                runbook_version=runbook[1] or None,
                at=now,
            )
            session.commit()
    return result


def _roll_hour(engine: Engine, hour: datetime) -> int:
    """One hour's events per subject into event_rollup, from there per kind of subject into
    event_rollup_subject, and the cursor past it, together. Unknown subjects become "" / 0,
    so the unique key matches them (NULLs never do)."""
    e = DeliveryEvent
    subject = (
        e.kind,
        func.coalesce(e.tenant_id, 0),
        func.coalesce(e.stream, ""),
        func.coalesce(e.from_domain, ""),
        func.coalesce(e.source_ip, ""),
        func.coalesce(e.provider, ""),
        e.category,
        e.permanent,
    )
    rows = (
        select(literal(hour, EventRollup.hour.type), *subject, func.count())
        .where(e.at >= hour, e.at < hour + timedelta(hours=1))
        .group_by(*subject)
    )
    with engine.begin() as conn:
        written = conn.execute(
            insert(EventRollup).from_select(["hour", *ROLLUP_KEY, "count"], rows)
        ).rowcount
        for by in SUBJECTS:
            conn.execute(_subject_rollup(by, hour))
        _set_cursor(conn, hour + timedelta(hours=1))
    return max(written, 0)


def _subject_rollup(by: str, hour: datetime):
    """INSERT … SELECT of one kind of subject's rows for the hour from event_rollup's."""
    r = EventRollup
    if by == "stream":
        tenant, subject = r.tenant_id, r.stream
        key = (tenant, subject)
    else:
        tenant, subject = literal(0), _event_columns(by, EventRollup)[0]
        key = (subject,)
    rows = (
        select(
            literal(by),
            literal(hour, SubjectRollup.hour.type),
            tenant,
            subject,
            r.kind,
            r.category,
            r.permanent,
            func.sum(r.count),
        )
        .where(r.hour >= hour, r.hour < hour + timedelta(hours=1))
        .group_by(*key, r.kind, r.category, r.permanent)
    )
    columns = ["by", "hour", "tenant_id", "subject", "kind", "category", "permanent", "count"]
    return insert(SubjectRollup).from_select(columns, rows)


def _move_cursor(engine: Engine, until: datetime) -> None:
    with engine.begin() as conn:
        _set_cursor(conn, until)


def _set_cursor(conn, until: datetime) -> None:
    position = int(until.timestamp())
    updated = conn.execute(
        ControlCursor.__table__.update()
        .where(ControlCursor.name == CURSOR)
        .values(position=position, updated_at=datetime.now(UTC))
    ).rowcount
    if not updated:
        conn.execute(
            insert(ControlCursor).values(
                name=CURSOR, position=position, updated_at=datetime.now(UTC)
            )
        )


def _floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(moment: datetime) -> datetime:
    floor = _floor_hour(moment)
    return floor if floor == moment else floor + timedelta(hours=1)


def rollup_hours(engine: Engine) -> dict[datetime, int]:
    """Events per rolled-up hour (tests and the retention report)."""
    out: dict[datetime, int] = defaultdict(int)
    with engine.connect() as conn:
        for hour, count in conn.execute(
            select(EventRollup.hour, func.sum(EventRollup.count)).group_by(EventRollup.hour)
        ):
            out[as_utc(hour)] += int(count)
    return dict(out)
