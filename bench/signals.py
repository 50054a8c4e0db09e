"""How long do a triage cycle's aggregations take? (issue 13 §1: under a second at a million.)

    .venv/bin/python -m bench.signals [--events 1000000 10000000] [--backend sqlite postgresql]
                                      [--repeat 3] [--json PATH] [--url URL]

For each backend and size N, a fresh database (a SQLite file in a temporary directory, or a
private schema in PostgreSQL's database `test`, dropped afterwards) is migrated and filled
server-side with N delivery events spread evenly over the 8 days ending now, deterministic and
with realistic cardinality: 20 tenants with 3 streams, 300 From domains (each its tenant's,
sending on 2 of its streams), 50 source IPs (2 per tenant stream), the providers of
runbooks/providers.yaml by market share, ~90.6 % delivered, 6 % transient and 3 % permanent
failures across categories, 0.3 % asynchronous bounces, 0.1 % complaints; plus a hold tally
of 3 rows per 15-minute interval. The event indexes are dropped for the fill and rebuilt from
their own definitions afterwards; PostgreSQL then gets VACUUM ANALYZE (what autovacuum would do).

Then window_stats() (protocol/signals.py) is timed for each subject (provider, ip, domain,
stream) and window (15m, 1h, 24h, 7d): first on raw events only, then after
roll_up_and_expire() has rolled up every completed hour (its own time is reported too). A
"triage cycle" is all 16 calls in a row. Each pass over the 16 calls is repeated --repeat
times after one untimed warm-up pass, and the medians are reported.

Checks (the exit status is 1 if one fails, or if the run of a million events misses the
goal): in every window the counts window_stats reports (sent + async bounces + complaints over
all subjects, and held mail) add up to the events and tallies filled into it, computed from
the fill's formula and by count(*); and the rolled-up answers equal the raw ones.

Results go to bench/out/signals.json. --url fills and measures an existing empty database
instead (tests/unit/test_bench_signals.py runs it so at a tiny N); it is not dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import Engine, create_engine, func, insert, select, text  # noqa: E402

from bench.common import OUT_DIR, console, machine_info, now_iso, say, write_json  # noqa: E402
from bench.setups import machine_busy  # noqa: E402
from models import DeliveryEvent, EventRollup, HoldTally, Tenant  # noqa: E402
from models.db import make_engine, migrate, normalise_url  # noqa: E402
from models.events import SubjectRollup  # noqa: E402
from protocol.signals import SUBJECTS, WINDOWS, roll_up_and_expire, window_stats  # noqa: E402
from runbooks.loader import RUNBOOK_DIR, load_file  # noqa: E402
from runbooks.schema_protocol import EventsRetentionSpec  # noqa: E402

OUT = OUT_DIR / "signals.json"
PG_URL = os.environ.get("AXIOM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
GOAL_SECONDS = 1.0  # a triage cycle's aggregations at a million events (issue 13 §1)
GOAL_EVENTS = 1_000_000
SPAN = timedelta(days=8)
CHUNK = 500_000  # events per INSERT … SELECT (one progress step, one transaction)
TENANTS = 20
STREAMS = ("transactional", "marketing", "notifications")
DOMAINS = 300
IPS = 50
TALLY_INTERVAL = timedelta(minutes=15)  # relay/spool/claims.py TALLY_INTERVAL_SECONDS

# Share of recipients per provider (runbooks/providers.yaml's names), per 100; an MX host and
# a recipient domain for each. Roughly a B2C sender's mix in Europe and North America.
PROVIDER_SHARE = {
    "google": (35, "gmail-smtp-in.l.google.com", "gmail.com"),
    "microsoft": (20, "outlook-com.olc.protection.outlook.com", "outlook.com"),
    "yahoo": (12, "mta5.am0.yahoodns.net", "yahoo.com"),
    "apple": (8, "mx01.mail.icloud.com", "icloud.com"),
    "comcast": (3, "mx1.comcast.net", "comcast.net"),
    "gmx": (5, "mx00.gmx.net", "gmx.de"),
    "orange": (5, "smtp-in.orange.fr", "orange.fr"),
    "generic": (12, "mx.example.net", "example.net"),
}

# Outcomes per 10,000 events: (share, kind, category, permanent, attempt, reply code,
# enhanced code, reply text, action).
OUTCOMES = [
    (30, "bounce", "mailbox_unknown", True, None, 550, "5.1.1", "User unknown", "suppress_recipient"),
    (10, "complaint", "abuse", False, None, None, None, None, "suppress_recipient"),
    (150, "attempt", "mailbox_unknown", True, 1, 550, "5.1.1", "The email account that you tried to reach does not exist", "suppress_recipient"),
    (30, "attempt", "bad_domain", True, 1, 550, "5.1.2", "Host unknown", "suppress_recipient"),
    (30, "attempt", "mailbox_disabled", True, 1, 550, "5.2.1", "Mailbox disabled", "suppress_recipient"),
    (30, "attempt", "policy", True, 1, 550, "5.7.1", "Message rejected due to local policy", "none"),
    (20, "attempt", "content", True, 1, 552, "5.7.0", "Our system has detected that this message is likely unsolicited mail", "check_content"),
    (15, "attempt", "reputation", True, 1, 550, "5.7.1", "Service unavailable, client host blocked using Spamhaus", "suspend_path"),
    (15, "attempt", "blocklisted", True, 1, 554, "5.7.1", "Client host rejected: listed", "suspend_path"),
    (10, "attempt", "message_too_large", True, 1, 552, "5.3.4", "Message size exceeds fixed limit", "none"),
    (250, "attempt", "rate_limited", False, 1, 421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail", "throttle_path"),
    (150, "attempt", "transient", False, 2, 451, "4.3.0", "Temporary local problem, please try again", "retry"),
    (80, "attempt", "reputation", False, 1, 421, "4.7.0", "Temporary System Problem. Try again later", "throttle_path"),
    (50, "attempt", "mailbox_full", False, 3, 452, "4.2.2", "The email account that you tried to reach is over quota", "retry"),
    (30, "attempt", "tls", False, 1, 454, "4.7.5", "TLS not available due to local problem", "retry"),
    (20, "attempt", "authentication", False, 1, 451, "4.7.26", "Unauthenticated email is not accepted", "check_authentication"),
    (20, "attempt", "rdns", False, 1, 450, "4.7.25", "Client host rejected: cannot find your hostname", "check_rdns"),
]  # fmt: skip
OUTCOMES.append(
    (10_000 - sum(o[0] for o in OUTCOMES), "attempt", "delivered", False, 1, 250, "2.0.0",
     "OK 1700000000 a1si123456.1 - gsmtp", "none")
)  # fmt: skip
HOLD_REASONS = ("capped", "paced", "suspended")

# Multipliers of the hashes that pick each event's outcome, sender, provider, recipient and
# latency from its number: (i * A mod 2^32) >> 12, independent enough across A.
HASHES = (2654435761, 2246822519, 3266489917, 668265263, 374761393)


def _hash(column: str, which: int) -> str:
    return f"((({column} * {HASHES[which]}) % 4294967296) / 4096)"


# ---------------------------------------------------------------- the database
@dataclass
class Database:
    backend: str  # sqlite | postgresql
    url: str
    engine: Engine
    drop: Callable[[], None]
    path: Path | None = None  # the SQLite file

    def size_bytes(self) -> int:
        if self.path is not None:
            wal = Path(f"{self.path}-wal")
            return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                         "JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE n.nspname = current_schema() AND c.relkind = 'r'")
                ).scalar() or 0
            )  # fmt: skip

    def table_bytes(self, table: str) -> int:
        """Table and its indexes."""
        with self.engine.connect() as conn:
            if self.path is not None:
                try:
                    return int(
                        conn.execute(
                            text("SELECT sum(pgsize) FROM dbstat WHERE name = :t OR name IN "
                                 "(SELECT name FROM sqlite_master WHERE tbl_name = :t)"),
                            {"t": table},
                        ).scalar() or 0
                    )  # fmt: skip
                except Exception:  # dbstat is not compiled in every SQLite
                    return 0
            return int(
                conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar()
            )


@contextlib.contextmanager
def database(backend: str, url: str | None) -> Iterator[Database]:
    """A migrated, empty database: the given one, or a fresh one dropped afterwards."""
    if url is not None:
        migrate(url)
        engine = make_engine(url)
        path = Path(url.split("///", 1)[1]) if url.startswith("sqlite") else None
        try:
            yield Database(backend, url, engine, lambda: None, path)
        finally:
            engine.dispose()
        return
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-signals-") as tmp:
            path = Path(tmp) / "axiom.db"
            url = f"sqlite:///{path}"
            migrate(url)
            engine = make_engine(url)
            try:
                yield Database(backend, url, engine, lambda: None, path)
            finally:
                engine.dispose()
        return
    admin = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    schema = f"bench_signals_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}&application_name=bench-signals"
    engine = None
    try:
        migrate(url)
        engine = make_engine(url)
        yield Database(backend, url, engine, lambda: None)
    finally:
        if engine is not None:
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


# ---------------------------------------------------------------- the fill
@dataclass
class Fill:
    events: int
    end: datetime  # "now": every event is before it
    start_us: int  # the first event's time, microseconds since the epoch
    step_us: int  # between consecutive events
    tallies: list[dict]
    seconds: dict[str, float]

    def at(self, i: int) -> datetime:
        """Event i's time (1-based), as the fill stores it."""
        us = self.start_us + (i - 1) * self.step_us
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)

    def events_between(self, start: datetime, end: datetime) -> int:
        """Events with start <= at < end, from the fill's formula."""

        def first_at_or_after(moment: datetime) -> int:  # 0-based index
            us = _epoch_us(moment) - self.start_us
            return min(self.events, max(0, -(-us // self.step_us)))

        return first_at_or_after(end) - first_at_or_after(start)

    def held_between(self, start: datetime, end: datetime) -> int:
        """Held mail window_stats counts for [start, end): tally intervals that overlap it."""
        return sum(
            t["count"] for t in self.tallies if start - TALLY_INTERVAL <= t["interval_start"] < end
        )


def _epoch_us(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _lookup_tables(tenant_ids: list[int]) -> dict[str, tuple[list[str], list[tuple]]]:
    """The small tables the fill joins by an integer key k: outcome per 1/10,000, provider per
    1/100, sender (From domain, tenant, stream, source IP) per 1/1200."""
    outcome_rows = []
    for share, *values in OUTCOMES:
        outcome_rows += [tuple(values)] * share
    providers = [p.name for p in load_file(RUNBOOK_DIR / "providers.yaml").spec.providers]
    missing = set(PROVIDER_SHARE) ^ set(providers)
    if missing:
        raise RuntimeError(
            f"bench/signals.py's provider shares and providers.yaml differ: {missing}"
        )
    provider_rows = []
    for name in providers:
        share, mx, domain = PROVIDER_SHARE[name]
        provider_rows += [(name, mx, domain)] * share
    assert len(outcome_rows) == 10_000 and len(provider_rows) == 100
    sender_rows = []
    for d in range(DOMAINS):
        tenant = d % TENANTS
        for s in (d % 3, (d + 1) % 3):  # each From domain sends on two of its tenant's streams
            for pool in range(2):  # each tenant stream has two source IPs (shared modulo 50)
                ip = (tenant * 3 + s + 60 * pool) % IPS
                sender_rows.append(
                    (f"d{d:03d}.t{tenant:02d}.example", tenant_ids[tenant], STREAMS[s],
                     f"198.51.100.{10 + ip}")
                )  # fmt: skip
    return {
        "bench_outcome": (
            ["kind", "category", "permanent", "attempt", "reply_code", "enhanced_code",
             "reply_text", "action"],
            outcome_rows,
        ),
        "bench_provider": (["name", "mx_host", "rcpt_domain"], provider_rows),
        "bench_sender": (["domain", "tenant_id", "stream", "ip"], sender_rows),
    }  # fmt: skip


_COLUMN_TYPES = {
    "permanent": "BOOLEAN",
    "attempt": "INTEGER",
    "reply_code": "INTEGER",
    "tenant_id": "INTEGER",
}


def _fill_sql(backend: str, senders: int) -> str:
    i = "s.i"
    us = f"(:start_us + ({i} - 1) * :step_us)"
    if backend == "sqlite":
        at = (
            f"strftime('%Y-%m-%d %H:%M:%S', {us} / 1000000, 'unixepoch') || '.' || "
            f"printf('%06d', {us} % 1000000)"
        )  # SQLAlchemy's DateTime on SQLite: 'YYYY-MM-DD HH:MM:SS.ffffff', UTC
        message_id = f"'01J' || printf('%023d', {i})"
        head = "WITH RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i < :hi) "
        series = "s"
    else:
        at = f"TIMESTAMPTZ 'epoch' + {us} * INTERVAL '1 microsecond'"
        message_id = f"'01J' || lpad({i}::text, 23, '0')"
        head = ""
        series = "generate_series(CAST(:lo AS BIGINT), CAST(:hi AS BIGINT)) AS s(i)"
    return (
        head + "INSERT INTO deliveryevent (id, at, kind, tenant_id, stream, from_domain, "
        "message_id, recipient_id, recipient, attempt, source_ip, provider, mx_host, "
        "reply_code, enhanced_code, reply_text, category, permanent, action, latency_ms) "
        f"SELECT {i}, {at}, o.kind, se.tenant_id, se.stream, se.domain, {message_id}, {i}, "
        f"'u' || ({_hash(i, 3)} % 400000) || '@' || p.rcpt_domain, o.attempt, se.ip, p.name, "
        "p.mx_host, o.reply_code, o.enhanced_code, o.reply_text, o.category, o.permanent, "
        f"o.action, 40 + {_hash(i, 4)} % 3000 "
        f"FROM {series} "
        f"JOIN bench_outcome o ON o.k = {_hash(i, 0)} % 10000 "
        f"JOIN bench_sender se ON se.k = {_hash(i, 1)} % {senders} "
        f"JOIN bench_provider p ON p.k = {_hash(i, 2)} % 100"
    )


def _index_definitions(db: Database) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of every index on deliveryevent but the primary key's."""
    with db.engine.connect() as conn:
        if db.backend == "sqlite":
            rows = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                     "AND tbl_name = 'deliveryevent' AND sql IS NOT NULL")
            ).all()  # fmt: skip
        else:
            rows = conn.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'deliveryevent' "
                     "AND schemaname = current_schema() AND indexname <> 'deliveryevent_pkey'")
            ).all()  # fmt: skip
    return [(str(name), str(sql)) for name, sql in rows]


class Steps:
    """Progress of a long step: a bar on a terminal, a line per step otherwise."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = time.monotonic()
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(what, total=total)

    def advance(self, amount: int, note: str = "") -> None:
        self.done += amount
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)
        else:
            rate = self.done / max(1e-9, time.monotonic() - self.started)
            say(f"  {self.what}: {self.done:,}/{self.total:,} ({rate:,.0f}/s) {note}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def fill(db: Database, events: int, end: datetime) -> Fill:
    span_us = _epoch_us(end) - _epoch_us(end - SPAN)
    step_us = max(1, span_us // events)
    start_us = _epoch_us(end) - step_us * events  # the last event one step before the end
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with db.engine.begin() as conn:
        conn.execute(insert(Tenant), [{"name": f"tenant-{t:02d}"} for t in range(TENANTS)])
        tenant_ids = [
            int(v) for v in conn.execute(select(Tenant.id).order_by(Tenant.name)).scalars()
        ]
    tables = _lookup_tables(tenant_ids)
    indexes = _index_definitions(db)
    params = {"start_us": start_us, "step_us": step_us}
    sql = _fill_sql(db.backend, len(tables["bench_sender"][1]))
    steps = Steps(f"{db.backend}: filling {events:,} events", events)
    try:
        if db.backend == "sqlite":
            assert db.path is not None
            db.engine.dispose()  # journal_mode can change only with no other connection
            conn = sqlite3.connect(db.path, isolation_level=None)
            try:
                for pragma in ("journal_mode=DELETE", "synchronous=OFF", "cache_size=-1000000",
                               "temp_store=MEMORY"):  # fmt: skip
                    conn.execute(f"PRAGMA {pragma}")
                _create_lookups(
                    lambda sql, rows=None: (
                        conn.executemany(sql, rows) if rows else conn.execute(sql)
                    ),
                    tables,
                    "TEMP TABLE",
                    "?",
                )
                for name, _ in indexes:
                    conn.execute(f'DROP INDEX "{name}"')
                seconds["prepare"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                for lo in range(1, events + 1, CHUNK):
                    hi = min(events, lo + CHUNK - 1)
                    conn.execute("BEGIN")
                    conn.execute(sql, params | {"lo": lo, "hi": hi})
                    conn.execute("COMMIT")
                    steps.advance(hi - lo + 1)
                seconds["insert"] = time.perf_counter() - t1
                t1 = time.perf_counter()
                for _, create in indexes:
                    conn.execute(create)
                seconds["indexes"] = time.perf_counter() - t1
                conn.execute("PRAGMA journal_mode=WAL")
            finally:
                conn.close()
        else:
            with db.engine.connect() as conn:
                conn.execute(text("SET synchronous_commit = off"))
                conn.execute(text("SET maintenance_work_mem = '256MB'"))

                def run(statement: str, values=None):
                    return conn.execute(text(statement), values or {})

                _create_lookups(run, tables, "TEMP TABLE", ":")
                for name, _ in indexes:
                    run(f'DROP INDEX "{name}"')
                conn.commit()
                seconds["prepare"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                for lo in range(1, events + 1, CHUNK):
                    hi = min(events, lo + CHUNK - 1)
                    run(sql, params | {"lo": lo, "hi": hi})
                    conn.commit()
                    steps.advance(hi - lo + 1)
                seconds["insert"] = time.perf_counter() - t1
                run(
                    "SELECT setval(pg_get_serial_sequence('deliveryevent', 'id'), :n)",
                    {"n": events},
                )
                t1 = time.perf_counter()
                for _, create in indexes:
                    run(create)
                conn.commit()
                seconds["indexes"] = time.perf_counter() - t1
                for table in tables:
                    run(f"DROP TABLE {table}")
                conn.commit()
    finally:
        steps.close()
    tallies = _tallies(end, tenant_ids)
    with db.engine.begin() as conn:
        conn.execute(insert(HoldTally), tallies)
    if db.backend == "postgresql":
        t1 = time.perf_counter()
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # autovacuum's job (visibility map, statistics), done now rather than mid-timing
            conn.execute(text("VACUUM ANALYZE deliveryevent, hold_tally, tenant"))
        seconds["vacuum_analyze"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    return Fill(events, end, start_us, step_us, tallies, seconds)


def _create_lookups(run, tables: dict, kind: str, style: str) -> None:
    for name, (columns, rows) in tables.items():
        decl = ", ".join(f"{c} {_COLUMN_TYPES.get(c, 'TEXT')}" for c in columns)
        run(f"CREATE {kind} {name} (k INTEGER PRIMARY KEY, {decl})")
        names = ["k", *columns]
        marks = ", ".join("?" if style == "?" else f":{c}" for c in names)
        stmt = f"INSERT INTO {name} ({', '.join(names)}) VALUES ({marks})"
        if style == "?":
            run(stmt, [(k, *row) for k, row in enumerate(rows)])
        else:
            run(stmt, [dict(zip(names, (k, *row), strict=True)) for k, row in enumerate(rows)])


def _tallies(end: datetime, tenant_ids: list[int]) -> list[dict]:
    """Three hold-tally rows per 15-minute interval over the 8 days."""
    first = end - SPAN
    epoch = int(first.timestamp())
    slot = datetime.fromtimestamp(epoch - epoch % 900, tz=UTC)
    rows = []
    k = 0
    while slot < end:
        for j, reason in enumerate(HOLD_REASONS):
            tenant = (k + 7 * j) % TENANTS
            rows.append(
                {"interval_start": slot, "reason": reason, "tenant_id": tenant_ids[tenant],
                 "stream": STREAMS[(k + j) % 3], "provider": ("yahoo", "google", "microsoft")[j],
                 "source_ip": f"198.51.100.{10 + (tenant * 3 + j) % IPS}",
                 "count": 1 + (k * 7 + j) % 20, "last_detail": reason}
            )  # fmt: skip
        k += 1
        slot += TALLY_INTERVAL
    return rows


# ---------------------------------------------------------------- timing and checking
class Cpu:
    """CPU seconds of this process and of the PostgreSQL backends serving it (not their
    parallel workers, which come and go), and the machine's busy share, between start() and
    stop(): the rest of the busy time is other people's."""

    def __init__(self, db: Database):
        self.db = db
        self.pids: list[int] = []

    def ours(self) -> float:
        t = os.times()
        total = t.user + t.system
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def start(self) -> None:
        if self.db.backend == "postgresql":
            with self.db.engine.connect() as conn:
                self.pids = list(
                    conn.execute(
                        text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                             "AND application_name = 'bench-signals'")
                    ).scalars()
                )  # fmt: skip
        self.t0, self.busy0, self.ours0 = time.monotonic(), machine_busy(), self.ours()

    def stop(self) -> dict:
        busy1, ours1 = machine_busy(), self.ours()
        elapsed = time.monotonic() - self.t0
        jiffies = busy1[1] - self.busy0[1]
        machine = (busy1[0] - self.busy0[0]) / jiffies if jiffies else 0.0
        cores = os.cpu_count() or 1
        ours = min(machine, (ours1 - self.ours0) / (elapsed * cores)) if elapsed else 0.0
        return {
            "seconds": round(elapsed, 3),
            "machine_busy": round(machine, 3),
            "ours": round(ours, 3),
            "others": round(machine - ours, 3),
        }


def _check(fill: Fill, stats, errors: list[str], phase: str) -> dict:
    """Do the counts of one window_stats answer add up to what was filled into its window?"""
    counted = sum(s.sent + s.bounced + s.complaints for s in stats.subjects)
    held = sum(sum(s.held.values()) for s in stats.subjects)
    expected = fill.events_between(stats.start, stats.end)
    expected_held = fill.held_between(stats.start, stats.end) if stats.by != "domain" else 0
    if counted != expected or held != expected_held:
        errors.append(
            f"{phase} {stats.by}/{stats.window}: counted {counted} events and {held} held, "
            f"filled {expected} and {expected_held}"
        )
    return {"events": counted, "held": held, "subjects": len(stats.subjects)}


def time_cycles(
    db: Database, fill: Fill, repeat: int, phase: str, errors: list[str]
) -> tuple[dict, dict]:
    """One warm-up pass and `repeat` timed passes over the 16 calls; the answers of the
    warm-up pass (for the raw/rolled comparison)."""
    calls = [(by, w) for by in SUBJECTS for w in WINDOWS]
    samples: dict[str, list[float]] = {f"{by}/{w}": [] for by, w in calls}
    cycles: list[float] = []
    cycle_cpu: list[float] = []
    answers: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    cpu = Cpu(db)
    t0 = time.perf_counter()
    for by, w in calls:  # warm-up, checked
        stats = window_stats(db.engine, by, w, fill.end)
        answers[f"{by}/{w}"] = stats.as_json()["subjects"]
        counts[f"{by}/{w}"] = _check(fill, stats, errors, phase)
    warm = time.perf_counter() - t0
    cpu.start()
    for r in range(repeat):
        cycle, cpu0 = 0.0, cpu.ours()
        for by, w in calls:
            t = time.perf_counter()
            window_stats(db.engine, by, w, fill.end)
            took = time.perf_counter() - t
            samples[f"{by}/{w}"].append(took)
            cycle += took
        cycles.append(cycle)
        cycle_cpu.append(cpu.ours() - cpu0)
        say(f"  {phase} pass {r + 1}/{repeat}: triage cycle {cycle:.3f} s, "
            f"{cycle_cpu[-1]:.2f} s CPU")  # fmt: skip
    load = cpu.stop()
    result = {
        "warm_up_cycle_s": round(warm, 4),
        "cycle_s": {"median": round(statistics.median(cycles), 4),
                    "all": [round(c, 4) for c in cycles]},
        "cycle_cpu_s": {"median": round(statistics.median(cycle_cpu), 3),
                        "all": [round(c, 3) for c in cycle_cpu]},
        "calls_s": {k: {"median": round(statistics.median(v), 4), "all": [round(x, 4) for x in v]}
                    for k, v in samples.items()},
        "counts": counts,
        "load": load,
    }  # fmt: skip
    return result, answers


def count_check(db: Database, fill: Fill, errors: list[str]) -> dict:
    """count(*) of raw events per window against the fill's formula (timestamps as stored)."""
    out = {}
    with db.engine.connect() as conn:
        for w, seconds in WINDOWS.items():
            start = fill.end - timedelta(seconds=seconds)
            n = conn.execute(
                select(func.count())
                .select_from(DeliveryEvent)
                .where(DeliveryEvent.at >= start, DeliveryEvent.at < fill.end)
            ).scalar_one()
            expected = fill.events_between(start, fill.end)
            out[w] = {"count": int(n), "formula": expected}
            if n != expected:
                errors.append(f"count(*) in {w}: {n}, the fill's formula says {expected}")
        total = conn.execute(select(func.count()).select_from(DeliveryEvent)).scalar_one()
        first = conn.execute(select(DeliveryEvent.at).where(DeliveryEvent.id == 1)).scalar_one()
    out["total"] = int(total)
    if total != fill.events:
        errors.append(f"{total} events in the table, {fill.events} filled")
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    if first != fill.at(1):
        errors.append(f"event 1 reads back at {first}, filled at {fill.at(1)}")
    return out


def run_one(backend: str, events: int, repeat: int, url: str | None) -> dict:
    errors: list[str] = []
    with database(backend, url) as db:
        end = datetime.now(UTC)
        say(f"{backend}, {events:,} events: filling the 8 days before {end:%Y-%m-%d %H:%M:%S} UTC")
        filled = fill(db, events, end)
        say(f"  filled in {filled.seconds['total']:.1f} s "
            f"({', '.join(f'{k} {v:.1f}' for k, v in filled.seconds.items() if k != 'total')})")  # fmt: skip
        counts = count_check(db, filled, errors)
        db_bytes = db.size_bytes()
        say(f"  {counts['total']:,} events, database {db_bytes / 1e6:,.0f} MB; timing raw events")
        raw, raw_answers = time_cycles(db, filled, repeat, "raw", errors)
        spec = EventsRetentionSpec(
            raw_days=30, rollup_days=400, hours_per_run=24 * 9, delete_batch=50_000
        )
        say("  rolling up every completed hour")
        cpu = Cpu(db)
        cpu.start()
        t = time.perf_counter()
        done = roll_up_and_expire(db.engine, spec, filled.end, actor="bench")
        rollup_s = time.perf_counter() - t
        rollup_load = cpu.stop()
        if done.raw_deleted:
            errors.append(
                f"the roll-up deleted {done.raw_deleted} raw events (none are 30 days old)"
            )
        if db.backend == "postgresql":  # what autovacuum does within a minute, done now
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE event_rollup, event_rollup_subject"))
        with db.engine.connect() as conn:
            rollup_rows = int(
                conn.execute(select(func.count()).select_from(EventRollup)).scalar_one()
            )
            subject_rows = dict(
                conn.execute(
                    select(SubjectRollup.by, func.count()).group_by(SubjectRollup.by)
                ).all()
            )
        say(f"  {done.hours_rolled} hours rolled up into {rollup_rows:,} rows in {rollup_s:.1f} s;"
            " timing after the roll-up")  # fmt: skip
        rolled, rolled_answers = time_cycles(db, filled, repeat, "rolled", errors)
        for key, answer in raw_answers.items():
            if rolled_answers[key] != answer:
                errors.append(f"{key}: the rolled-up answer differs from the raw events'")
        result = {
            "backend": backend,
            "events": events,
            "now": end.isoformat(),
            "fill_s": {k: round(v, 2) for k, v in filled.seconds.items()},
            "hold_tally_rows": len(filled.tallies),
            "database_bytes": db_bytes,
            "deliveryevent_bytes": db.table_bytes("deliveryevent"),
            "count_check": counts,
            "raw": raw,
            "rollup": {
                "seconds": round(rollup_s, 2),
                "hours_rolled": done.hours_rolled,
                "rows": rollup_rows,
                "bytes": db.table_bytes("event_rollup"),
                "subject_rows": {k: int(v) for k, v in subject_rows.items()},
                "subject_bytes": db.table_bytes("event_rollup_subject"),
                "load": rollup_load,
            },
            "rolled": rolled,
            "errors": errors,
        }
    for e in errors:
        console.print(f"[red]check failed:[/red] {e}", highlight=False)
    return result


# ---------------------------------------------------------------- report
def print_run(run: dict) -> None:
    table = Table(
        "subject",
        *(f"{w} raw / rolled" for w in WINDOWS),
        title=f"{run['backend']}, {run['events']:,} events: window_stats median seconds "
        f"(fill {run['fill_s']['total']:.0f} s, roll-up {run['rollup']['seconds']:.1f} s, "
        f"{run['rollup']['rows']:,} roll-up rows)",
    )
    for by in SUBJECTS:
        cells = []
        for w in WINDOWS:
            raw = run["raw"]["calls_s"][f"{by}/{w}"]["median"]
            rolled = run["rolled"]["calls_s"][f"{by}/{w}"]["median"]
            cells.append(f"{raw:.4f} / {rolled:.4f}")
        table.add_row(by, *cells)
    console.print(table)


def print_summary(runs: list[dict]) -> None:
    table = Table(
        "backend", "events", "fill s", "roll-up s", "cycle raw s", "cycle rolled s",
        "CPU raw / rolled s", "other load", "checks",
        title="A triage cycle (16 window_stats calls), median",
    )  # fmt: skip
    for run in runs:
        goal = _goal_met(run)
        others = max(run["raw"]["load"]["others"], run["rolled"]["load"]["others"])
        table.add_row(
            run["backend"],
            f"{run['events']:,}",
            f"{run['fill_s']['total']:.1f}",
            f"{run['rollup']['seconds']:.1f}",
            f"{run['raw']['cycle_s']['median']:.3f}",
            f"{run['rolled']['cycle_s']['median']:.3f}"
            + ("" if goal else " [red](goal 1 s)[/red]"),
            f"{run['raw']['cycle_cpu_s']['median']:.2f} / {run['rolled']['cycle_cpu_s']['median']:.2f}",
            f"{100 * others:.0f}%",
            "ok" if not run["errors"] else f"[red]{len(run['errors'])} failed[/red]",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--backend", nargs="+", choices=("sqlite", "postgresql"),
                        default=["sqlite", "postgresql"])  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--url", help="an existing empty database to fill instead (not dropped)")
    args = parser.parse_args(argv)
    if any(n < 1 or n > 50_000_000 for n in args.events):
        parser.error("--events: from 1 to 50,000,000")
    backends = [backend_of(args.url)] if args.url else args.backend
    if args.url and len(args.events) > 1:
        parser.error("--url takes one --events size")
    runs = []
    started = time.monotonic()
    for events in args.events:
        for backend in backends:
            runs.append(run_one(backend, events, max(1, args.repeat), args.url))
            print_run(runs[-1])
            write_json(args.json, _document(runs, started))
    print_summary(runs)
    failed = [r for r in runs if r["errors"]]
    missed = [r for r in runs if not _goal_met(r)]
    return 1 if failed or missed else 0


def _goal_met(run: dict) -> bool:
    """The goal is set at a million events; other sizes are measured, not judged."""
    return run["events"] != GOAL_EVENTS or run["rolled"]["cycle_s"]["median"] < GOAL_SECONDS


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
