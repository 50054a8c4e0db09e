"""Degradation triage: what the delivery events say about each subject, which cause that
suggests, which action to propose next, and whether the last one helped
(runbooks/degradation-triage.yaml).

A subject is an (IP, provider) path, a (From domain, provider) pair or a tenant's stream. Its
signals are counts over protocol/signals.py's windows (15 min, 1 h, 24 h, and 7 days for the
baseline), all ending now. `assess` compares each rate of the rules with its warn and act
level over a short and a long window, counting it only above its minimums of sends and
events; with the subject's own 7-day baseline (a change of behaviour below the absolute
levels is an "info" finding); and, for a stream, with the volume declared at onboarding.
`suspect` names one cause with its evidence, `propose` the next rung of that cause's ladder not
tried yet, `verify` whether the subject improved since the action.

After an action on a subject ends (`since`), every window that began before it is read from
that moment instead (`SubjectSignals.after`): mail before the action is not held against the
subject twice, and a subject still misbehaving is caught again as soon as its new traffic
reaches the minimums, never exempted for a cool-down.

The decision functions are pure (no I/O, no clock: `now` is an argument) and table-tested at
every threshold; `signals_for` reads the events, raw for what is not rolled up yet and from
the hourly roll-up for whole hours, as protocol/signals.py does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, Engine, and_, case, func, literal, or_, select, union_all
from sqlalchemy.orm import Session

from models import DeliveryEvent, EventKind, EventRollup, Stream, Tenant
from models.audit import as_utc
from models.events import SubjectRollup
from protocol import signals
from runbooks.schema_triage import (
    WINDOW_SECONDS,
    ActionName,
    CauseName,
    Level,
    SignalRule,
    SubjectKind,
    TriageSpec,
)

LevelName = Literal["change", "warn", "act"]
Severity = Literal["info", "warning", "critical"]  # protocol/incidents.py SEVERITIES
SEVERITY: dict[str, Severity] = {"change": "info", "warn": "warning", "act": "critical"}
RANK = {"change": 0, "warn": 1, "act": 2}
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
BASELINE = "7d"
DAY = 86400


# ---------------------------------------------------------------- subjects and counts
@dataclass(frozen=True)
class Subject:
    kind: SubjectKind
    provider: str | None = None  # ip-provider, domain-provider
    ip: str | None = None  # ip-provider
    domain: str | None = None  # domain-provider
    tenant_id: int | None = None  # stream
    stream: str | None = None  # stream
    tenant: str | None = None  # the tenant's name, for the label

    @property
    def label(self) -> str:
        """The incident's subject (protocol/incidents.py): path:IP/provider as the relay's
        reactions write it, domain:NAME/provider, stream:TENANT/STREAM."""
        if self.kind == "ip-provider":
            return f"path:{self.ip}/{self.provider}"
        if self.kind == "domain-provider":
            return f"domain:{self.domain}/{self.provider}"
        return f"stream:{self.tenant or self.tenant_id}/{self.stream}"


def _add(a: Mapping[str, int], b: Mapping[str, int], sign: int = 1) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + sign * v
    return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class Window:
    """What the receivers answered one subject from start to end."""

    start: datetime
    end: datetime
    sent: int = 0  # attempts
    delivered: int = 0
    deferred: Mapping[str, int] = field(default_factory=dict)  # transient answers by category
    refused: Mapping[str, int] = field(default_factory=dict)  # permanent answers by category
    bounced: Mapping[str, int] = field(default_factory=dict)  # asynchronous, permanent
    complaints: int = 0

    @property
    def answered(self) -> int:
        """Recipients that got a final answer: each counts once however often it was tried."""
        return self.delivered + sum(self.refused.values())

    def volume(self, over: str) -> int:
        return {"sent": self.sent, "delivered": self.delivered, "answered": self.answered}[over]

    def events(self, rule: SignalRule) -> dict[str, int]:
        """The signal's events by category (complaints under "complaint")."""
        out: dict[str, int] = {}
        for count in rule.counts:
            if count.outcome == "complaint":
                found = {"complaint": self.complaints} if self.complaints else {}
            else:
                found = getattr(self, count.outcome)
                if count.categories:
                    found = {c: n for c, n in found.items() if c in count.categories}
            out = _add(out, found)
        return out

    def minus(self, other: Window) -> Window:
        """This window less a later part of it (the baseline before the compared window)."""
        return Window(
            self.start,
            other.start,
            self.sent - other.sent,
            self.delivered - other.delivered,
            _add(self.deferred, other.deferred, -1),
            _add(self.refused, other.refused, -1),
            _add(self.bounced, other.bounced, -1),
            self.complaints - other.complaints,
        )

    def as_json(self) -> dict:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "sent": self.sent,
            "delivered": self.delivered,
            "deferred": dict(sorted(self.deferred.items())),
            "refused": dict(sorted(self.refused.items())),
            "bounced": dict(sorted(self.bounced.items())),
            "complaints": self.complaints,
        }


@dataclass(frozen=True)
class SubjectSignals:
    """One subject's windows (15m, 1h, 24h and the 7d baseline), all ending at `end`; `after`:
    from the end of the last action on it to `end`, when that is within the longest window;
    and, for a stream, the daily volume it declared at onboarding."""

    subject: Subject
    end: datetime
    windows: Mapping[str, Window]
    after: Window | None = None
    declared_per_day: int | None = None
    # The hour of its first event within the 7-day window; None: unknown, taken as the
    # window's start. A subject younger than the week has fewer days behind it.
    first_seen: datetime | None = None


# ---------------------------------------------------------------- findings (pure)
@dataclass(frozen=True)
class Finding:
    signal: str  # a signal of the rules, or volume_declared / volume_change
    level: LevelName
    window: str  # "15m", "1h", "24h" as the rules name it
    start: datetime  # where the window began: later than end - window after an action
    rate: float  # for volume_*: the ratio to the declaration or the average day
    threshold: float  # the level it reached (baseline: factor × the baseline's rate)
    events: int  # the numerator (volume_*: final answers)
    sends: int  # the denominator (volume_*: the declared or average day)
    source: str
    categories: Mapping[str, int] = field(default_factory=dict, hash=False)  # events by category
    baseline_rate: float | None = None

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.level]

    def as_json(self) -> dict:
        return {
            "signal": self.signal,
            "level": self.level,
            "severity": self.severity,
            "window": self.window,
            "from": self.start.isoformat(),
            "rate": round(self.rate, 6),
            "threshold": round(self.threshold, 6),
            "events": self.events,
            "sends": self.sends,
            "categories": dict(sorted(self.categories.items())),
            "baseline_rate": None if self.baseline_rate is None else round(self.baseline_rate, 6),
            "source": self.source,
        }


def _window(signals: SubjectSignals, name: str, now: datetime, since: datetime | None) -> Window:
    """The window `name` ending now, or the counts since the last action when that ended
    inside it (the window starts again from then)."""
    if since is not None and since > now - timedelta(seconds=_seconds(name)):
        after = signals.after
        if after is None or after.start != since or after.end != now:
            raise ValueError(
                f"{signals.subject.label}: the signals hold no window from {since.isoformat()} "
                "(read them with the same since)"
            )
        return after
    return signals.windows[name]


def _seconds(name: str) -> int:
    return WINDOW_SECONDS.get(name) or signals.WINDOWS[name]


def _level(signal: str, rule: SignalRule, level: Level, w: Window) -> Finding | None:
    events = w.events(rule)
    n, volume = sum(events.values()), w.volume(rule.over)
    if volume < level.min_sends or n < level.min_events:
        return None  # too little to be a rate: noise
    rate = n / volume
    name: LevelName | None = "act" if rate >= level.act else "warn" if rate >= level.warn else None
    if name is None:
        return None
    threshold = level.act if name == "act" else level.warn
    return Finding(
        signal, name, level.window, w.start, rate, threshold, n, volume, level.source, events
    )


def assess(
    signals: SubjectSignals, rules: TriageSpec, now: datetime, since: datetime | None = None
) -> list[Finding]:
    """Every threshold the subject reached at `now`, worst first. `since`: the end of the last
    action on the subject; the windows that began before it start again from it."""
    if signals.end != now:
        raise ValueError(f"signals read at {signals.end.isoformat()}, assessed at {now}")
    found: list[Finding] = []
    for name, rule in rules.signals.items():
        absolute = [
            f
            for level in (rule.short, rule.long)
            if (f := _level(name, rule, level, _window(signals, level.window, now, since)))
        ]
        found += absolute
        if not absolute and rule.change_min is not None:
            change = _change(signals, name, rule, rules, now, since)
            if change is not None:
                found.append(change)
    found += _declared(signals, rules, now, since)
    found += _volume_change(signals, rules, now, since)
    return sorted(found, key=lambda f: -RANK[f.level])


def _change(
    signals: SubjectSignals,
    name: str,
    rule: SignalRule,
    rules: TriageSpec,
    now: datetime,
    since: datetime | None,
) -> Finding | None:
    """The baseline rule: the long window's rate at factor × the 7 days before it, and at
    least change_min above it; both above their minimums."""
    b = rules.baseline
    current = _window(signals, rule.long.window, now, since)
    prior = signals.windows[BASELINE].minus(signals.windows[rule.long.window])
    events = current.events(rule)
    n, volume = sum(events.values()), current.volume(rule.over)
    prior_volume = prior.volume(rule.over)
    if volume < rule.long.min_sends or n < b.min_events or prior_volume < b.min_baseline_sends:
        return None
    rate, base = n / volume, sum(prior.events(rule).values()) / prior_volume
    if rate < b.factor * base or rate - base < (rule.change_min or 0):
        return None
    return Finding(
        name,
        "change",
        rule.long.window,
        current.start,
        rate,
        b.factor * base,
        n,
        volume,
        b.source,
        events,
        baseline_rate=base,
    )


def _declared(
    signals: SubjectSignals, rules: TriageSpec, now: datetime, since: datetime | None
) -> list[Finding]:
    """A stream's final answers over 24 h against its declared daily volume."""
    d, declared = rules.declared, signals.declared_per_day
    if signals.subject.kind != "stream" or declared is None:
        return []
    w = _window(signals, "24h", now, since)
    if w.answered < d.min_sends:
        return []
    ratio = w.answered / declared if declared else float("inf")
    name: LevelName | None = (
        "act" if ratio >= d.act_factor else "warn" if ratio >= d.warn_factor else None
    )
    if name is None:
        return []
    threshold = d.act_factor if name == "act" else d.warn_factor
    finding = Finding(
        "volume_declared", name, "24h", w.start, ratio, threshold, w.answered, declared, d.source
    )
    return [finding]


def _volume_change(
    signals: SubjectSignals, rules: TriageSpec, now: datetime, since: datetime | None
) -> list[Finding]:
    """The last 24 h against the average day of the 6 before (the 7-day baseline less the
    day): a day at volume_factor × the usual is a change of behaviour."""
    b = rules.baseline
    day = _window(signals, "24h", now, since)
    prior = signals.windows[BASELINE].minus(signals.windows["24h"])
    if day.answered < b.volume_min_sends or prior.answered < b.min_baseline_sends:
        return []
    # The usual day is averaged over the days the subject has sent in: a stream on its second
    # day has one day behind it, not six (counting the rest as silent days made every new
    # stream's second day a "change").
    begun = prior.start
    if signals.first_seen is not None:
        begun = max(begun, as_utc(signals.first_seen))
    behind = (prior.end - begun).total_seconds()
    if behind < DAY:
        return []  # less than a day before the compared one: nothing usual to compare with
    average = prior.answered * DAY / behind
    ratio = day.answered / average
    if ratio < b.volume_factor:
        return []
    return [
        Finding(
            "volume_change",
            "change",
            "24h",
            day.start,
            ratio,
            b.volume_factor,
            day.answered,
            round(average),
            b.source,
            baseline_rate=average,
        )
    ]


# ---------------------------------------------------------------- cause, proposal, verdict
@dataclass(frozen=True)
class Cause:
    name: CauseName
    subject: Subject
    severity: Severity  # the worst of its evidence
    evidence: tuple[Finding, ...]  # the findings that suggest it
    others: tuple[Finding, ...] = ()  # the subject's other findings, for the report

    @property
    def behaviour_change(self) -> bool:
        """Only baseline findings: a low-severity change of behaviour, below every level."""
        return all(f.level == "change" for f in self.evidence)

    def as_json(self) -> dict:
        return {
            "cause": self.name,
            "subject": self.subject.label,
            "severity": self.severity,
            "behaviour_change": self.behaviour_change,
            "evidence": [f.as_json() for f in self.evidence],
            "others": [f.as_json() for f in self.others],
        }


def _matches(finding: Finding, signal: str, category: str | None) -> bool:
    if finding.signal != signal:
        return False
    if category is None:
        return True
    top = max(finding.categories.items(), key=lambda kv: kv[1], default=(None, 0))
    return top[0] == category  # the category holds the most of its events (a tie: the first)


def causes(findings: Iterable[Finding], subject: Subject, rules: TriageSpec) -> list[Cause]:
    """Every cause the findings suggest on this subject, the one to act on first: worst
    severity, then the rules' order. A finding may suggest more than one cause."""
    findings = list(findings)
    found: list[tuple[int, int, Cause]] = []
    for order, (name, rule) in enumerate(rules.causes.items()):
        if subject.kind not in rule.subjects:
            continue
        clues = [c for c in rule.clues if c.subjects is None or subject.kind in c.subjects]
        evidence = tuple(
            f for f in findings if any(_matches(f, c.signal, c.category) for c in clues)
        )
        if not evidence:
            continue
        severity = max((f.severity for f in evidence), key=SEVERITY_RANK.__getitem__)
        others = tuple(f for f in findings if f not in evidence)
        cause = Cause(name, subject, severity, evidence, others)
        found.append((-SEVERITY_RANK[severity], order, cause))
    return [c for *_, c in sorted(found, key=lambda t: t[:2])]


def suspect(findings: Iterable[Finding], subject: Subject, rules: TriageSpec) -> Cause | None:
    """The one cause to open (or update) an incident for; None when nothing was found."""
    found = causes(findings, subject, rules)
    return found[0] if found else None


@dataclass(frozen=True)
class Action:
    name: ActionName
    cause: CauseName
    subject: Subject
    approval: Literal["required", "automatic"]
    checkpoint: str | None  # the kind to ask when approval is required
    duration_seconds: int | None = None
    rate_factor: float | None = None
    rung: int = 0  # its place in the cause's ladder

    def as_json(self) -> dict:
        return {
            "action": self.name,
            "cause": self.cause,
            "subject": self.subject.label,
            "approval": self.approval,
            "checkpoint": self.checkpoint,
            "duration_seconds": self.duration_seconds,
            "rate_factor": self.rate_factor,
            "rung": self.rung,
        }


def propose(cause: Cause, rules: TriageSpec, tried: Iterable[str] = ()) -> Action | None:
    """The first rung of the cause's ladder that was not tried on this incident, is proposed
    at the cause's severity and can act on its subject. None: nothing left (or a change of
    behaviour, which is watched, not acted on): a person decides."""
    done = set(tried)
    for rung, step in enumerate(rules.causes[cause.name].ladder):
        action = rules.actions[step.action]
        if (
            step.action in done
            or cause.severity not in step.severities
            or cause.subject.kind not in action.subjects
        ):
            continue
        return Action(
            step.action,
            cause.name,
            cause.subject,
            action.approval,
            rules.checkpoint if action.approval == "required" else None,
            action.duration_seconds,
            action.rate_factor,
            rung,
        )
    return None


def verify_after(cause: Cause, rules: TriageSpec) -> timedelta:
    return timedelta(seconds=rules.causes[cause.name].verify_after_seconds)


def verify(
    before: Cause, after: Iterable[Finding], rules: TriageSpec
) -> Literal["improved", "not_improved"]:
    """`after`: assess() over the windows since the action. Not improved while a signal of
    the cause is found again at warn or above, or at the lowest level it was found at before
    (a change of behaviour that persists). Too little traffic since the action to reach the
    minimums is no finding: improved, and the windows that start again from the action catch
    the subject as soon as it sends enough."""
    clues = {c.signal for c in rules.causes[before.name].clues}
    lowest: dict[str, int] = {}
    for f in before.evidence:
        lowest[f.signal] = min(lowest.get(f.signal, RANK["warn"]), RANK[f.level])
    for f in after:
        if f.signal in clues and RANK[f.level] >= lowest.get(f.signal, RANK["warn"]):
            return "not_improved"
    return "improved"


# ---------------------------------------------------------------- reading the signals
READ_WINDOWS = ("15m", "1h", "24h", BASELINE)
# Up to this many subjects of a kind, a read keeps to their rows (one subject: through its
# index, as the CLI and the tests read one); more, and it reads the kind's every subject in
# the same few scans and keeps the wanted ones.
FILTER_SUBJECTS = 8
# Window starts per statement, one conditional sum each: the four windows and the distinct
# ends of actions (`since`); more starts take another statement.
MAX_STARTS = 32


def _subject_filter(subject: Subject, table) -> list:
    """The subject's columns on DeliveryEvent (None as NULL) or EventRollup ("" / 0)."""
    raw = table is DeliveryEvent

    def eq(column, value, unknown):
        if value is None:
            return column.is_(None) if raw else column == unknown
        return column == value

    if subject.kind == "ip-provider":
        return [eq(table.source_ip, subject.ip, ""), eq(table.provider, subject.provider, "")]
    if subject.kind == "domain-provider":
        return [eq(table.from_domain, subject.domain, ""), eq(table.provider, subject.provider, "")]
    return [eq(table.tenant_id, subject.tenant_id, 0), eq(table.stream, subject.stream, "")]


def _rolled_filter(subject: Subject) -> list:
    """The subject's rows in its roll-up: a stream's in event_rollup_subject, a pair's in
    event_rollup (which alone has both columns of the pair)."""
    if subject.kind == "stream":
        r = SubjectRollup
        return [r.tenant_id == (subject.tenant_id or 0), r.subject == (subject.stream or "")]
    return _subject_filter(subject, EventRollup)


def _key_columns(kind: SubjectKind, table) -> tuple:
    """The columns that name a subject of this kind in the table, as _key orders them."""
    if kind == "ip-provider":
        return (table.source_ip, table.provider)
    if kind == "domain-provider":
        return (table.from_domain, table.provider)
    if table is SubjectRollup:
        return (table.tenant_id, table.subject)
    return (table.tenant_id, table.stream)


def _key(subject: Subject) -> tuple:
    """The subject's raw key (None where not known, as the raw events hold it)."""
    if subject.kind == "ip-provider":
        return (subject.ip, subject.provider)
    if subject.kind == "domain-provider":
        return (subject.domain, subject.provider)
    return (subject.tenant_id, subject.stream)


def _rolled_key(subject: Subject) -> tuple:
    """Its key in the roll-up, where "not known" is "" / 0 (and so is "")."""
    first, second = _key(subject)
    return (first or (0 if subject.kind == "stream" else ""), second or "")


def _floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(moment: datetime) -> datetime:
    floor = _floor_hour(moment)
    return floor if floor == moment else floor + timedelta(hours=1)


@dataclass(frozen=True)
class _Split:
    """Where one window [start, end) is read: whole rolled-up hours from the roll-up
    ([rolled_from, rolled_to)), the edges and what is not rolled up yet from raw events."""

    start: datetime
    raw: tuple[tuple[datetime, datetime], ...]
    rolled_from: datetime | None = None
    rolled_to: datetime | None = None


def _split(start: datetime, end: datetime, rolled: datetime | None) -> _Split:
    first_hour = _ceil_hour(start)
    rollup_end = min(rolled, _floor_hour(end)) if rolled is not None else None
    if rollup_end is None or rollup_end <= first_hour:
        return _Split(start, ((start, end),) if start < end else ())
    raw = tuple((a, b) for a, b in ((start, first_hour), (rollup_end, end)) if a < b)
    return _Split(start, raw, first_hour, rollup_end)


def _merged(spans: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# {key: {window start: [(kind, category, permanent, count), ...], FIRST: earliest time}}
_Found = dict[tuple, dict]
FIRST = "first"  # the key of a subject's earliest event time among its window starts
PAIRS: tuple[SubjectKind, ...] = ("ip-provider", "domain-provider")


def _read_raw(conn, kind: SubjectKind, splits: list[_Split], only: list[Subject] | None):
    """One grouped query over the stretches of raw events some window reads (typically the
    first hour of the 7-day and of the 24-hour window, and the last hour), with a count per
    window start: the events inside that window's raw part."""
    e = DeliveryEvent
    counted = [s for s in splits if s.raw]
    if not counted:
        return {}

    def within(spans) -> list:
        return [and_(e.at >= a, e.at < b) for a, b in spans]

    where = [or_(*within(_merged(span for s in counted for span in s.raw)))]
    if only is not None:
        where.append(or_(*(and_(*_subject_filter(s, e)) for s in only)))
    counts = [func.sum(case((or_(*within(s.raw)), 1), else_=0)) for s in counted]
    keys, outcome = _key_columns(kind, e), (e.kind, e.category, e.permanent)
    first = func.min(e.at)
    query = (
        select(literal(0), *keys, *outcome, *counts, first).where(*where).group_by(*keys, *outcome)
    )
    return _collect(conn.execute(query), (kind,), [s.start for s in counted])[kind]


def _read_rolled(
    conn,
    kinds: tuple[SubjectKind, ...],
    splits: list[_Split],
    only: Mapping[SubjectKind, list[Subject] | None],
) -> dict[SubjectKind, _Found]:
    """One grouped query over the whole rolled-up hours of every window, a sum per window
    start. A stream's come from event_rollup_subject; the pairs' from event_rollup, which
    alone has both columns of a pair. With both kinds of pair in `kinds`, one scan: summed per
    IP, From domain and provider first, then per kind of pair (UNION ALL, the kind's index
    first)."""
    rolled = [s for s in splits if s.rolled_from is not None]
    if not rolled:
        return {}
    if kinds == ("stream",):
        r, where = SubjectRollup, [SubjectRollup.by == "stream"]
    else:
        r, where = EventRollup, []
    if all(only.get(k) is not None for k in kinds):
        where.append(or_(*(and_(*_rolled_filter(s)) for k in kinds for s in only[k] or ())))
    lo = min(s.rolled_from for s in rolled)
    hi = rolled[0].rolled_to  # the same for every window: the roll-up's end, or the hour's
    where += [r.hour >= lo, r.hour < hi]
    sums = [
        func.sum(r.count)
        if s.rolled_from == lo
        else func.sum(case((r.hour >= s.rolled_from, r.count), else_=0))
        for s in rolled
    ]
    outcome = (r.kind, r.category, r.permanent)
    if len(kinds) == 1:
        keys = _key_columns(kinds[0], r)
        query = (
            select(literal(0), *keys, *outcome, *sums, func.min(r.hour))
            .where(*where)
            .group_by(*keys, *outcome)
        )
    else:
        columns = list(dict.fromkeys(c for k in kinds for c in _key_columns(k, r)))
        labelled = (n.label(f"n{i}") for i, n in enumerate(sums))
        pre = (
            select(*columns, *outcome, *labelled, func.min(r.hour).label("first"))
            .where(*where)
            .group_by(*columns, *outcome)
            .cte("by_pair")
        )
        outcome = (pre.c.kind, pre.c.category, pre.c.permanent)
        totals = [func.sum(pre.c[f"n{i}"]) for i in range(len(sums))]
        parts = []
        for j, kind in enumerate(kinds):
            keys = tuple(pre.c[c.name] for c in _key_columns(kind, r))
            parts.append(
                select(literal(j), *keys, *outcome, *totals, func.min(pre.c.first)).group_by(
                    *keys, *outcome
                )
            )
        query = union_all(*parts)
    return _collect(conn.execute(query), kinds, [s.start for s in rolled])


def _collect(rows, kinds: tuple[SubjectKind, ...], starts: list[datetime]):
    """(kind's index, key, key, kind, category, permanent, count per start, earliest time)
    rows by kind of subject, subject and window start; the earliest time of a subject's rows
    under FIRST."""
    found: dict[SubjectKind, _Found] = {k: {} for k in kinds}
    for j, first, second, kind, category, permanent, *counts, earliest in rows:
        by_start = found[kinds[j]].setdefault((first, second), {})
        for start, n in zip(starts, counts, strict=True):
            if n:
                by_start.setdefault(start, []).append((kind, category, permanent, n))
        if earliest is not None:
            # to the hour, as the roll-up keeps it: the same before and after a roll-up
            earliest = _floor_hour(as_utc(_as_datetime(earliest)))
            seen = by_start.get(FIRST)
            if seen is None or earliest < seen:
                by_start[FIRST] = earliest
    return found


def _as_datetime(value) -> datetime:
    """MIN over a UNION may come back as SQLite's text."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _count(rows, start: datetime, end: datetime) -> Window:
    sent = delivered = complaints = 0
    deferred: dict[str, int] = {}
    refused: dict[str, int] = {}
    bounced: dict[str, int] = {}
    for kind, category, permanent, n in rows:
        n = int(n)
        if kind == EventKind.complaint:
            complaints += n
        elif kind == EventKind.bounce:
            if permanent:  # a delayed-delivery notice is not a bounce
                bounced[category] = bounced.get(category, 0) + n
        else:
            sent += n
            if category == "delivered":
                delivered += n
            else:
                into = refused if permanent else deferred
                into[category] = into.get(category, 0) + n
    return Window(start, end, sent, delivered, deferred, refused, bounced, complaints)


@contextmanager
def _connected(bind: Session | Engine) -> Iterator[Connection]:
    """A session's own connection (its transaction: on SQLite a second connection would wait
    for the write turn this session may hold), or a new one from an engine."""
    if isinstance(bind, Session):
        yield bind.connection()
        return
    with bind.connect() as conn:
        yield conn


def signals_for_all(
    bind: Session | Engine,
    subjects: Iterable[Subject],
    now: datetime,
    since: Mapping[Subject, datetime] | None = None,
) -> dict[Subject, SubjectSignals]:
    """Every subject's signals, as signals_for reads each one, in two grouped queries per
    kind of subject (on SQLite the pairs share the second): one over the stretches of raw events the
    windows read, one over their rolled-up hours, each with a conditional sum per window
    start (the four windows and the distinct ends of actions). `since`: the end of the last
    action on a subject (none when absent)."""
    now = as_utc(now)
    wanted = list(dict.fromkeys(subjects))
    ends = {s: as_utc(t) for s, t in (since or {}).items() if t is not None}
    day_ago = now - timedelta(seconds=_seconds("24h"))
    after = {s: ends[s] for s in wanted if s in ends and day_ago < ends[s] <= now}
    window_start = {name: now - timedelta(seconds=_seconds(name)) for name in READ_WINDOWS}
    starts = list(dict.fromkeys([*window_start.values(), *after.values()]))
    of_kind = {k: [s for s in wanted if s.kind == k] for k in (*PAIRS, "stream")}
    of_kind = {k: found for k, found in of_kind.items() if found}
    only = {k: found if len(found) <= FILTER_SUBJECTS else None for k, found in of_kind.items()}
    raw: dict[SubjectKind, _Found] = {k: {} for k in of_kind}
    rolled_up: dict[SubjectKind, _Found] = {k: {} for k in of_kind}
    with _connected(bind) as conn:
        rolled = signals.rolled_until(conn)
        pairs = tuple(k for k in PAIRS if k in of_kind)
        # SQLite sorts to group: both kinds of pair in one sort of event_rollup's week cost
        # 2.6 s of CPU at a million events against 3.7 s for one sort each. PostgreSQL runs
        # each kind's in parallel workers, and the shared one's CTE is slower (6 s against 5).
        together = conn.dialect.name == "sqlite" and all(only[k] is None for k in pairs)
        rolled_reads = [pairs] if together and len(pairs) == 2 else [(k,) for k in pairs]
        rolled_reads += [("stream",)] if "stream" in of_kind else []
        for i in range(0, len(starts), MAX_STARTS):
            splits = [_split(start, now, rolled) for start in starts[i : i + MAX_STARTS]]
            for kind in of_kind:
                _update(raw[kind], _read_raw(conn, kind, splits, only[kind]))
            for kinds in rolled_reads:
                for kind, found in _read_rolled(conn, kinds, splits, only).items():
                    _update(rolled_up[kind], found)
        declared = _declared_volumes(conn, of_kind.get("stream", []))
    out: dict[Subject, SubjectSignals] = {}
    for kind, found in of_kind.items():
        for subject in found:
            r = raw[kind].get(_key(subject), {})
            u = rolled_up[kind].get(_rolled_key(subject), {})

            def read(start: datetime, r=r, u=u) -> Window:
                return _count([*r.get(start, ()), *u.get(start, ())], start, now)

            seen = [t for t in (r.get(FIRST), u.get(FIRST)) if t is not None]
            out[subject] = SubjectSignals(
                subject,
                now,
                {name: read(start) for name, start in window_start.items()},
                read(after[subject]) if subject in after else None,
                declared.get((subject.tenant_id, subject.stream)),
                min(seen) if seen else None,
            )
    return out


def _update(into: _Found, found: _Found) -> None:
    for key, by_start in found.items():
        mine = into.setdefault(key, {})
        for start, rows in by_start.items():
            if start == FIRST:
                seen = mine.get(FIRST)
                mine[FIRST] = rows if seen is None else min(seen, rows)
            else:
                mine.setdefault(start, []).extend(rows)


def _declared_volumes(conn, streams: list[Subject]) -> dict[tuple, int | None]:
    """(tenant id, stream) → the daily volume declared at onboarding."""
    known = [s for s in streams if s.tenant_id is not None and s.stream is not None]
    if not known:
        return {}
    query = select(Stream.tenant_id, Stream.name, Stream.declared_per_day)
    if len(known) <= FILTER_SUBJECTS:
        query = query.where(
            or_(*(and_(Stream.tenant_id == s.tenant_id, Stream.name == s.stream) for s in known))
        )
    return {(t, n): d for t, n, d in conn.execute(query)}


def signals_for(
    bind: Session | Engine, subject: Subject, now: datetime, since: datetime | None = None
) -> SubjectSignals:
    """The subject's windows ending at now: 15m, 1h, 24h and the 7d baseline; `after` from
    since when since is later than the start of the 24 h window; a stream's declared volume.
    One subject's signals_for_all."""
    ends = {subject: since} if since is not None else None
    return signals_for_all(bind, [subject], now, ends)[subject]


def stream_subject(bind: Session | Engine, tenant: str, stream: str) -> Subject:
    """A stream's subject by the tenant's name (the CLI's and the tests' way to name it)."""
    with _connected(bind) as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.name == tenant)).scalar()
    if tenant_id is None:
        raise ValueError(f"no tenant {tenant!r}")
    return Subject("stream", tenant_id=tenant_id, stream=stream, tenant=tenant)


# ---------------------------------------------------------------- one cycle (detection)
def subjects_with_mail(bind: Session | Engine, now: datetime) -> list[Subject]:
    """Every subject that sent in the last 24 h: its (IP, provider) paths, (From domain,
    provider) pairs and tenant streams. A cycle with no mail costs this one query."""
    now = as_utc(now)
    since = now - timedelta(seconds=_seconds("24h"))
    with _connected(bind) as conn:
        rows = conn.execute(
            select(
                DeliveryEvent.source_ip,
                DeliveryEvent.from_domain,
                DeliveryEvent.provider,
                DeliveryEvent.tenant_id,
                DeliveryEvent.stream,
            )
            .where(DeliveryEvent.at >= since, DeliveryEvent.kind == EventKind.attempt)
            .distinct()
        ).all()
        names = dict(conn.execute(select(Tenant.id, Tenant.name)).all()) if rows else {}
    found: set[Subject] = set()
    for ip, domain, provider, tenant_id, stream in rows:
        if ip and provider:
            found.add(Subject("ip-provider", provider=provider, ip=ip))
        if domain and provider:
            found.add(Subject("domain-provider", provider=provider, domain=domain))
        if tenant_id is not None and stream:
            found.add(
                Subject("stream", tenant_id=tenant_id, stream=stream, tenant=names.get(tenant_id))
            )
    return sorted(found, key=lambda s: s.label)


@dataclass
class CycleReport:
    subjects: int = 0
    causes: list[dict] = field(default_factory=list)  # per subject with a cause
    incidents: list[int] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"subjects": self.subjects, "causes": self.causes, "incidents": self.incidents}


def detect(
    session: Session,
    rules: TriageSpec,
    *,
    now: datetime,
    actor: str,
    runbook: tuple[str, str],
    since: Mapping[Subject, datetime] | None = None,
) -> CycleReport:
    """Steps 1 and 2 of the runbook: every subject's signals against the rules, and one
    incident per subject and cause (folded while open: no alert storms), with the suspected
    cause, its evidence and the action the ladder proposes next. It changes nothing the relay
    reads; acting on the proposal (checkpoint triage.act) and verifying are the next steps.
    `since`: the end of the last action per subject, whose windows start again from it."""
    from protocol import incidents

    report = CycleReport()
    wanted = subjects_with_mail(session, now)
    report.subjects = len(wanted)
    ends = {s: as_utc(t) for s, t in (since or {}).items() if t is not None}
    # Every subject is read before anything is written, on this session's connection (on
    # SQLite a second connection would wait behind this session's write turn).
    read = signals_for_all(session, wanted, now, ends)
    found_causes = []
    for subject in wanted:
        findings = assess(read[subject], rules, now, ends.get(subject))
        cause = suspect(findings, subject, rules)
        if cause is not None:
            found_causes.append(cause)
    for cause in found_causes:
        subject = cause.subject
        proposal = propose(cause, rules)
        evidence = cause.as_json() | {"proposal": proposal.as_json() if proposal else None}
        reported = incidents.report(
            session,
            subject=subject.label,
            cause=cause.name,
            severity=cause.severity,
            summary=_summary(cause),
            actor=actor,
            now=now,
            evidence=evidence,
            runbook_id=runbook[0],
            runbook_version=runbook[1],
        )
        report.causes.append(evidence)
        report.incidents.append(reported.incident.id or 0)
    return report


def _summary(cause: Cause) -> str:
    shown = ", ".join(
        f"{f.signal} {f.rate:.2%} over {f.window} ({f.level})" for f in cause.evidence[:3]
    )
    return f"{cause.name.replace('_', ' ')} on {cause.subject.label}: {shown}"
