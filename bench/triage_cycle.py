"""One degradation-triage detection cycle over a million events (issue 17: "one cycle over a
million events finishes in seconds"), on the signals benchmark's data.

    .venv/bin/python -m bench.triage_cycle [--events 1000000 [10000000]]
        [--backend sqlite postgresql] [--repeat 3] [--old-budget 120] [--json PATH] [--url URL]

For each backend and size N, bench/signals.py's generator fills a fresh database (a SQLite
file in a temporary directory, or a private schema in PostgreSQL's `test`, dropped
afterwards) with N delivery events over the 8 days ending now, and every completed hour is
rolled up, as the hourly deployment would have done. Its cardinality is the signals bench's:
50 source IPs, 300 From domains, 20 tenants × 3 streams, 8 providers; so a cycle has
400 (IP, provider) paths, 2,400 (domain, provider) pairs and 60 streams: 2,860 subjects.

A cycle is protocol/triage.detect at the fill's end: subjects_with_mail, signals_for_all,
assess and suspect for every subject, and incidents.report for every cause (incident,
timeline entry and audit entry written and committed). The first cycle opens the incidents;
then --repeat cycles fold into them, as every 5 minutes in production, and their median is
the figure. Each repetition also times the parts on their own: subjects_with_mail,
signals_for_all, and assess + suspect.

The old path, the same data in the same run: the per-subject reader that detect called before
signals_for_all (commit 1efc396's signals_for, kept below as _old_signals_for: 4 windows × up
to 3 queries per subject), then assess and suspect, subject after subject for at most
--old-budget seconds. The subjects are dealt in proportion to their kinds, so the sample
spreads over the three; when the budget ends first, each kind's mean time per subject times
its number of subjects is the estimate (the table says how many were measured). Every
subject the old path read must read the same as signals_for_all read it (exit status 1 if
not, or if a cycle at a million events misses GOAL_SECONDS).

Results go to bench/out/triage_cycle.json. --url fills and measures an existing empty
database instead (not dropped).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402
from sqlalchemy import Engine, func, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.common import OUT_DIR, console, machine_info, now_iso, say, write_json  # noqa: E402
from bench.signals import Cpu, Steps, backend_of, database, fill  # noqa: E402
from models import DeliveryEvent, EventRollup, Incident, Stream  # noqa: E402
from models.audit import as_utc  # noqa: E402
from models.db import session_scope  # noqa: E402
from models.events import SubjectRollup  # noqa: E402
from protocol import signals, triage  # noqa: E402
from protocol.triage import (  # noqa: E402
    BASELINE,
    Subject,
    SubjectSignals,
    Window,
    assess,
    signals_for_all,
    subjects_with_mail,
    suspect,
)
from runbooks.loader import degradation_triage  # noqa: E402
from runbooks.schema_protocol import EventsRetentionSpec  # noqa: E402

OUT = OUT_DIR / "triage_cycle.json"
GOAL_EVENTS = 1_000_000
GOAL_SECONDS = 10.0  # "finishes in seconds": a cycle at a million events, incidents included
MAX_OLD_BUDGET = 1800
KINDS = ("ip-provider", "domain-provider", "stream")


# ---------------------------------------------------------------- the old path (baseline)
def _old_signals_for(engine: Engine, subject: Subject, now: datetime) -> SubjectSignals:
    """signals_for as it was at commit 1efc396, without `since` (a cycle passed none): each
    window read on its own, raw edges and rolled-up hours, per subject."""
    now = as_utc(now)
    with engine.connect() as conn:
        rolled = signals.rolled_until(conn)

        def read(start: datetime) -> Window:
            return triage._count(_old_rows(conn, subject, start, now, rolled), start, now)

        windows = {
            name: read(now - timedelta(seconds=triage._seconds(name)))
            for name in ("15m", "1h", "24h", BASELINE)
        }
        declared = None
        if subject.kind == "stream" and subject.tenant_id is not None:
            declared = conn.execute(
                select(Stream.declared_per_day).where(
                    Stream.tenant_id == subject.tenant_id, Stream.name == subject.stream
                )
            ).scalar()
    return SubjectSignals(subject, now, windows, None, declared)


def _old_rows(conn, subject: Subject, start: datetime, end: datetime, rolled: datetime | None):
    first_hour = triage._ceil_hour(start)
    rollup_end = min(rolled, triage._floor_hour(end)) if rolled is not None else None
    if rollup_end is None or rollup_end <= first_hour:
        yield from _old_raw(conn, subject, start, end)
        return
    yield from _old_raw(conn, subject, start, first_hour)
    yield from _old_rolled(conn, subject, first_hour, rollup_end)
    yield from _old_raw(conn, subject, rollup_end, end)


def _old_raw(conn, subject: Subject, start: datetime, end: datetime):
    if start >= end:
        return
    e = DeliveryEvent
    yield from conn.execute(
        select(e.kind, e.category, e.permanent, func.count())
        .where(*triage._subject_filter(subject, e), e.at >= start, e.at < end)
        .group_by(e.kind, e.category, e.permanent)
    )


def _old_rolled(conn, subject: Subject, start: datetime, end: datetime):
    if subject.kind == "stream":
        r = SubjectRollup
        where = [r.by == "stream", r.tenant_id == (subject.tenant_id or 0)]
        where.append(r.subject == (subject.stream or ""))
    else:
        r = EventRollup
        where = triage._subject_filter(subject, r)
    yield from conn.execute(
        select(r.kind, r.category, r.permanent, func.sum(r.count))
        .where(*where, r.hour >= start, r.hour < end)
        .group_by(r.kind, r.category, r.permanent)
    )


def _dealt(subjects: list[Subject]) -> list[Subject]:
    """The subjects in an order that keeps every prefix in proportion to the kinds' numbers."""
    by_kind = {k: [s for s in subjects if s.kind == k] for k in KINDS}
    ranked = [
        ((i + 0.5) / len(found), n, s)
        for n, found in enumerate(by_kind.values())
        for i, s in enumerate(found)
    ]
    return [s for *_, s in sorted(ranked, key=lambda t: t[:2])]


def old_path(
    db, subjects: list[Subject], now: datetime, rules, budget: float, batched: dict, errors: list
) -> dict:
    """The per-subject reader, then assess and suspect, for at most `budget` seconds."""
    counts = Counter(s.kind for s in subjects)
    spent: Counter[str] = Counter()
    done: Counter[str] = Counter()
    causes = 0
    steps = Steps(f"{db.backend}: old per-subject path", len(subjects))
    started = time.perf_counter()
    try:
        for n, subject in enumerate(_dealt(subjects), 1):
            t = time.perf_counter()
            read = _old_signals_for(db.engine, subject, now)
            causes += suspect(assess(read, rules, now), subject, rules) is not None
            spent[subject.kind] += time.perf_counter() - t
            done[subject.kind] += 1
            # The old reader has no first_seen (added after it): the windows are compared.
            if read != dataclasses.replace(batched[subject], first_seen=None):
                errors.append(f"{subject.label}: the old reader and signals_for_all differ")
            if n % 100 == 0 or n == len(subjects):
                steps.advance(100 if n % 100 == 0 else n % 100)
            if time.perf_counter() - started > budget:
                break
    finally:
        steps.close()
    per_kind = {}
    for kind in KINDS:
        if counts[kind] and not done[kind]:
            errors.append(f"the old path's budget ended before any {kind} subject was read")
            continue
        mean = spent[kind] / done[kind] if done[kind] else 0.0
        per_kind[kind] = {
            "subjects": counts[kind],
            "measured": done[kind],
            "seconds": round(spent[kind], 3),
            "per_subject_ms": round(1000 * mean, 2),
            "estimate_s": round(mean * counts[kind], 2),
        }
    measured = sum(done.values())
    return {
        "subjects": len(subjects),
        "measured": measured,
        "complete": measured == len(subjects),
        "seconds": round(sum(spent.values()), 2),
        "read_decide_s": round(sum(k["estimate_s"] for k in per_kind.values()), 2),
        "causes_in_sample": causes,
        "per_kind": per_kind,
        "budget_s": budget,
    }


# ---------------------------------------------------------------- the cycle
def cycle(engine: Engine, rules, now: datetime) -> tuple[triage.CycleReport, float]:
    t = time.perf_counter()
    with session_scope(engine) as session:
        report = triage.detect(
            session, rules.spec, now=now, actor="bench", runbook=(rules.id, rules.version)
        )
        session.commit()
    return report, time.perf_counter() - t


def parts(engine: Engine, rules, now: datetime) -> tuple[dict[str, float], dict]:
    """The cycle's reading and deciding, timed each on its own (no writes)."""
    took: dict[str, float] = {}
    t = time.perf_counter()
    with Session(engine) as session:
        wanted = subjects_with_mail(session, now)
        took["subjects_with_mail"] = time.perf_counter() - t
        t = time.perf_counter()
        read = signals_for_all(session, wanted, now)
        took["signals_for_all"] = time.perf_counter() - t
    t = time.perf_counter()
    for subject in wanted:
        suspect(assess(read[subject], rules.spec, now), subject, rules.spec)
    took["assess_suspect"] = time.perf_counter() - t
    return took, read


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def run_one(backend: str, events: int, repeat: int, budget: float, url: str | None) -> dict:
    errors: list[str] = []
    rules = degradation_triage()
    with database(backend, url) as db:
        end = datetime.now(UTC)
        say(f"{backend}, {events:,} events: filling the 8 days before {end:%Y-%m-%d %H:%M:%S} UTC")
        filled = fill(db, events, end)
        say(f"  filled in {filled.seconds['total']:.1f} s; rolling up every completed hour")
        spec = EventsRetentionSpec(
            raw_days=30, rollup_days=400, hours_per_run=24 * 9, delete_batch=50_000
        )
        t = time.perf_counter()
        done = signals.roll_up_and_expire(db.engine, spec, filled.end, actor="bench")
        rollup_s = time.perf_counter() - t
        if db.backend == "postgresql":  # what autovacuum does within a minute, done now
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE event_rollup, event_rollup_subject"))
        now = filled.end
        wanted = subjects_with_mail(db.engine, now)
        kinds = Counter(s.kind for s in wanted)
        say(
            f"  {done.hours_rolled} hours rolled up in {rollup_s:.1f} s; {len(wanted):,} subjects "
            f"({', '.join(f'{kinds[k]} {k}' for k in KINDS)}); first cycle (opens the incidents)"
        )
        first, first_s = cycle(db.engine, rules, now)
        with db.engine.connect() as conn:
            incidents = conn.execute(select(func.count()).select_from(Incident)).scalar_one()
        if first.subjects != len(wanted) or len(set(first.incidents)) != incidents:
            errors.append(
                f"the first cycle saw {first.subjects} subjects and opened "
                f"{len(set(first.incidents))} incidents; {len(wanted)} and {incidents} expected"
            )
        say(f"  first cycle {first_s:.2f} s: {len(first.causes)} causes, {incidents} incidents")
        cycles: list[float] = []
        cpu_s: list[float] = []
        timed: dict[str, list[float]] = {}
        cpu = Cpu(db)
        cpu.start()
        batched: dict = {}
        for r in range(repeat):
            took, batched = parts(db.engine, rules, now)
            for k, v in took.items():
                timed.setdefault(k, []).append(v)
            c0 = cpu.ours()
            report, seconds = cycle(db.engine, rules, now)
            cpu_s.append(cpu.ours() - c0)
            cycles.append(seconds)
            if sorted(report.incidents) != sorted(first.incidents):
                errors.append(f"cycle {r + 2} reported other incidents than the first")
            say(
                f"  cycle {r + 2}: {seconds:.2f} s ({cpu_s[-1]:.2f} s CPU); read "
                f"{took['signals_for_all']:.2f} s, subjects {took['subjects_with_mail']:.2f} s, "
                f"assess + suspect {took['assess_suspect']:.2f} s"
            )
        load = cpu.stop()
        say(f"  the old per-subject path, for at most {budget:.0f} s")
        old = old_path(db, wanted, now, rules.spec, budget, batched, errors)
        cycle_s = median(cycles)
        read_decide = median(timed["signals_for_all"]) + median(timed["assess_suspect"])
        # The old cycle: this one with the batched read and decision swapped for the old ones.
        old_cycle = cycle_s - read_decide + old["read_decide_s"]
        with db.engine.connect() as conn:
            rollup_rows = conn.execute(select(func.count()).select_from(EventRollup)).scalar_one()
        result = {
            "backend": backend,
            "events": events,
            "now": now.isoformat(),
            "fill_s": round(filled.seconds["total"], 1),
            "rollup": {"seconds": round(rollup_s, 1), "hours": done.hours_rolled,
                       "event_rollup_rows": int(rollup_rows)},
            "subjects": {k: kinds[k] for k in KINDS} | {"total": len(wanted)},
            "causes": len(first.causes),
            "incidents": int(incidents),
            "first_cycle_s": round(first_s, 3),
            "cycle_s": {"median": cycle_s, "all": [round(c, 3) for c in cycles]},
            "cycle_cpu_s": {"median": median(cpu_s), "all": [round(c, 3) for c in cpu_s]},
            "parts_s": {k: {"median": median(v), "all": [round(x, 4) for x in v]}
                        for k, v in timed.items()},
            "old": old,
            "old_cycle_s": round(old_cycle, 2),
            "read_decide_ratio": round(old["read_decide_s"] / read_decide, 1),
            "cycle_ratio": round(old_cycle / cycle_s, 1),
            "load": load,
            "errors": errors,
        }  # fmt: skip
    for e in errors:
        console.print(f"[red]check failed:[/red] {e}", highlight=False)
    return result


# ---------------------------------------------------------------- report
def print_summary(runs: list[dict]) -> None:
    table = Table(
        "backend", "events", "subjects", "causes", "first s", "cycle s (CPU)", "read s",
        "subjects s", "assess s", "old read + assess s", "old cycle s", "ratio", "load", "checks",
        title="One degradation-triage detection cycle (protocol/triage.detect), median; "
        "old: the per-subject reader, estimated from the subjects measured",
    )  # fmt: skip
    for run in runs:
        parts_s = run["parts_s"]
        old = run["old"]
        goal = _goal_met(run)
        table.add_row(
            run["backend"],
            f"{run['events']:,}",
            f"{run['subjects']['total']:,}",
            f"{run['causes']:,}",
            f"{run['first_cycle_s']:.2f}",
            f"{run['cycle_s']['median']:.2f} ({run['cycle_cpu_s']['median']:.2f})"
            + ("" if goal else f" [red](goal {GOAL_SECONDS:g} s)[/red]"),
            f"{parts_s['signals_for_all']['median']:.2f}",
            f"{parts_s['subjects_with_mail']['median']:.2f}",
            f"{parts_s['assess_suspect']['median']:.2f}",
            f"{old['read_decide_s']:.1f} ({old['measured']:,} of {old['subjects']:,})",
            f"{run['old_cycle_s']:.1f}",
            f"{run['cycle_ratio']:.0f}×",
            f"{100 * run['load']['others']:.0f}%",
            "ok" if not run["errors"] else f"[red]{len(run['errors'])} failed[/red]",
        )
    console.print(table)


def _goal_met(run: dict) -> bool:
    return run["events"] != GOAL_EVENTS or run["cycle_s"]["median"] < GOAL_SECONDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000],
                        help="sizes to run (10000000 as well for the larger one)")  # fmt: skip
    parser.add_argument("--backend", nargs="+", choices=("sqlite", "postgresql"),
                        default=["sqlite", "postgresql"])  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="timed cycles (median reported)")
    parser.add_argument("--old-budget", type=float, default=120.0,
                        help="seconds the old per-subject path may run per database")  # fmt: skip
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--url", help="an existing empty database to fill instead (not dropped)")
    args = parser.parse_args(argv)
    if any(n < 1 or n > 50_000_000 for n in args.events):
        parser.error("--events: from 1 to 50,000,000")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat: from 1 to 10")
    if not 0 < args.old_budget <= MAX_OLD_BUDGET:
        parser.error(f"--old-budget: more than 0 and at most {MAX_OLD_BUDGET} s")
    backends = [backend_of(args.url)] if args.url else args.backend
    if args.url and len(args.events) > 1:
        parser.error("--url takes one --events size")
    runs = []
    started = time.monotonic()
    for events in args.events:
        for backend in backends:
            runs.append(run_one(backend, events, args.repeat, args.old_budget, args.url))
            write_json(args.json, _document(runs, started))
    print_summary(runs)
    failed = [r for r in runs if r["errors"] or not _goal_met(r)]
    return 1 if failed else 0


def _document(runs: list[dict], started: float) -> dict:
    return {
        "when": now_iso(),
        "machine": machine_info(),
        "goal": {"events": GOAL_EVENTS, "cycle_seconds": GOAL_SECONDS},
        "elapsed_s": round(time.monotonic() - started, 1),
        "runs": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
