"""The sandbox's state file (SQLite under AXIOM_HOME/sandbox/): what the CLI steers, what the world shows.

The running world and `axiom sandbox …` commands are separate processes; they meet here.
Commands write listings, DNS overrides, knobs and requests; the world polls `version()` (SQLite's
data_version, which changes when another connection commits) and reloads, and writes back the
standings of source IPs and From domains, what its MX servers answered, where accepted mail was
filed (inbox or spam: never told to the relay) and the complaint reports it sent.
Every call opens its own short connection, so it is safe from threads and other processes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS listing (
    zone TEXT NOT NULL, subject TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL,
    listed_at REAL NOT NULL, PRIMARY KEY (zone, subject));
CREATE TABLE IF NOT EXISTS dns_override (
    name TEXT NOT NULL, rdtype TEXT NOT NULL, vals TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (name, rdtype));
CREATE TABLE IF NOT EXISTS knob (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS standing (
    provider TEXT NOT NULL, ip TEXT NOT NULL, score REAL NOT NULL, blocked_until REAL NOT NULL,
    accepted INTEGER NOT NULL, deferred INTEGER NOT NULL, rejected INTEGER NOT NULL,
    complaints INTEGER NOT NULL, updated_at REAL NOT NULL, clean_days REAL NOT NULL DEFAULT 0,
    allowance REAL NOT NULL DEFAULT 0, day INTEGER NOT NULL DEFAULT 0,
    last_active_day INTEGER NOT NULL DEFAULT 0, today TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (provider, ip));
CREATE TABLE IF NOT EXISTS command (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, args TEXT NOT NULL,
    created_at REAL NOT NULL, done_at REAL, result TEXT);
CREATE TABLE IF NOT EXISTS verdict (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, provider TEXT NOT NULL,
    ip TEXT NOT NULL, rcpt TEXT NOT NULL, outcome TEXT NOT NULL, reply TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS complaint (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, provider TEXT NOT NULL,
    ip TEXT NOT NULL, recipient TEXT NOT NULL, message_id TEXT NOT NULL, status TEXT NOT NULL,
    reply TEXT NOT NULL, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS domain_standing (
    provider TEXT NOT NULL, domain TEXT NOT NULL, score REAL NOT NULL,
    blocked_until REAL NOT NULL, accepted INTEGER NOT NULL, deferred INTEGER NOT NULL,
    rejected INTEGER NOT NULL, complaints INTEGER NOT NULL, updated_at REAL NOT NULL,
    clean_days REAL NOT NULL, allowance REAL NOT NULL, day INTEGER NOT NULL,
    last_active_day INTEGER NOT NULL, today TEXT NOT NULL, PRIMARY KEY (provider, domain));
CREATE TABLE IF NOT EXISTS placement (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, day TEXT NOT NULL,
    provider TEXT NOT NULL, ip TEXT NOT NULL, from_domain TEXT NOT NULL, rcpt TEXT NOT NULL,
    message_id TEXT NOT NULL, folder TEXT NOT NULL, rule TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS placement_at ON placement (at);
CREATE INDEX IF NOT EXISTS placement_rcpt ON placement (rcpt);
CREATE TABLE IF NOT EXISTS placement_daily (
    day TEXT NOT NULL, provider TEXT NOT NULL, ip TEXT NOT NULL, from_domain TEXT NOT NULL,
    inbox INTEGER NOT NULL DEFAULT 0, spam INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, provider, ip, from_domain));
CREATE TABLE IF NOT EXISTS world (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
INSERT OR IGNORE INTO meta VALUES ('placements_dropped', 0);
"""
# Columns the standing table gained after its first release: added to an older state file.
STANDING_ADDED = {
    "clean_days": "REAL NOT NULL DEFAULT 0",
    "allowance": "REAL NOT NULL DEFAULT 0",
    "day": "INTEGER NOT NULL DEFAULT 0",
    "last_active_day": "INTEGER NOT NULL DEFAULT 0",
    "today": "TEXT NOT NULL DEFAULT '{}'",
}
MAX_VERDICTS = 100_000  # older rows are dropped; the table is for status and scenarios
# Per-recipient placements kept (about 150 bytes each); placement_daily keeps every count.
MAX_PLACEMENTS = 1_000_000


@dataclass(frozen=True)
class Listing:
    zone: str
    subject: str  # an IP address or a domain
    code: str
    reason: str
    listed_at: float


@dataclass(frozen=True)
class Override:
    name: str
    rdtype: str
    values: tuple[str, ...]  # empty: the name has no record of this type
    reason: str


@dataclass(frozen=True)
class StandingRow:
    provider: str
    ip: str
    score: float
    blocked_until: float
    accepted: int
    deferred: int
    rejected: int
    complaints: int
    updated_at: float
    # The daily history (sandbox/reputation.py): clean sending days so far, the allowance
    # they earn, the UTC day number (of the world's clock) the `today` counters belong to,
    # the last day anything was sent. day 0: a row from before the daily model.
    clean_days: float = 0.0
    allowance: float = 0.0
    day: int = 0
    last_active_day: int = 0
    today: dict[str, int] = field(default_factory=dict)


STANDING_COLUMNS = [f.name for f in fields(StandingRow)]
# A From domain's standing (sandbox/placement.py) has the same columns, the domain where an
# IP's has its address (StandingRow.ip holds the domain then).
DOMAIN_STANDING_COLUMNS = ["provider", "domain", *STANDING_COLUMNS[2:]]


@dataclass(frozen=True)
class PlacementRow:
    """Where one accepted copy was filed (sandbox/placement.py)."""

    at: float  # the world's clock
    day: str  # its UTC date, YYYY-MM-DD
    provider: str
    ip: str
    from_domain: str  # organisational
    rcpt: str  # lower-case
    message_id: str
    folder: str  # inbox or spam
    rule: str  # the deciding rule, "" when none held


@dataclass(frozen=True)
class Command:
    id: int
    name: str
    args: dict[str, Any]


class StateStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(standing)")}
            for column, kind in STANDING_ADDED.items():
                if column not in have:  # fixed names and types, above
                    db.execute(f"ALTER TABLE standing ADD COLUMN {column} {kind}")

    @classmethod
    def for_home(cls, home: Path) -> StateStore:
        return cls(home / "sandbox" / "state.db")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=10000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def generation(self) -> int:
        """Grows with every change to listings, overrides, knobs and commands (cheap to poll)."""
        with self._connect() as db:
            return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        with self._transaction() as db:
            yield db
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    # --- listings ---
    def list(self, zone: str, subject: str, code: str, reason: str) -> None:
        with self._change() as db:
            db.execute(
                "INSERT INTO listing VALUES (?, ?, ?, ?, ?) ON CONFLICT (zone, subject) DO UPDATE"
                " SET code = excluded.code, reason = excluded.reason,"
                " listed_at = excluded.listed_at",
                (zone, subject.lower(), code, reason, time.time()),
            )

    def unlist(self, zone: str, subject: str) -> bool:
        with self._change() as db:
            cur = db.execute(
                "DELETE FROM listing WHERE zone = ? AND subject = ?", (zone, subject.lower())
            )
            return cur.rowcount > 0

    def listings(self) -> list[Listing]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM listing ORDER BY zone, subject").fetchall()
        return [Listing(*row) for row in rows]

    # --- DNS overrides ---
    def override(self, name: str, rdtype: str, values: Iterable[str], reason: str) -> None:
        with self._change() as db:
            db.execute(
                "INSERT INTO dns_override VALUES (?, ?, ?, ?) ON CONFLICT (name, rdtype)"
                " DO UPDATE SET vals = excluded.vals, reason = excluded.reason",
                (name.lower().rstrip("."), rdtype.upper(), json.dumps(list(values)), reason),
            )

    def clear_override(self, name: str, rdtype: str) -> bool:
        with self._change() as db:
            cur = db.execute(
                "DELETE FROM dns_override WHERE name = ? AND rdtype = ?",
                (name.lower().rstrip("."), rdtype.upper()),
            )
            return cur.rowcount > 0

    def overrides(self) -> list[Override]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM dns_override ORDER BY name, rdtype").fetchall()
        return [Override(n, t, tuple(json.loads(v)), r) for n, t, v, r in rows]

    # --- knobs (small JSON values) ---
    def set_knob(self, name: str, value: Any) -> None:
        with self._change() as db:
            if value is None:
                db.execute("DELETE FROM knob WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO knob VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                    " SET value = excluded.value",
                    (name, json.dumps(value)),
                )

    def knobs(self) -> dict[str, Any]:
        with self._connect() as db:
            return {n: json.loads(v) for n, v in db.execute("SELECT name, value FROM knob")}

    def clear_steering(self) -> dict[str, int]:
        """Remove every listing, DNS override and knob (`axiom sandbox reset`); the counts."""
        with self._change() as db:
            return {
                table: db.execute(f"DELETE FROM {table}").rowcount  # fixed table names
                for table in ("listing", "dns_override", "knob")
            }

    # --- commands for the running world ---
    def request(self, name: str, **args: Any) -> int:
        with self._change() as db:
            cur = db.execute(
                "INSERT INTO command (name, args, created_at) VALUES (?, ?, ?)",
                (name, json.dumps(args), time.time()),
            )
            return int(cur.lastrowid or 0)

    def pending_commands(self) -> list[Command]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, name, args FROM command WHERE done_at IS NULL ORDER BY id"
            ).fetchall()
        return [Command(i, n, json.loads(a)) for i, n, a in rows]

    def finish_command(self, command_id: int, result: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE command SET done_at = ?, result = ? WHERE id = ?",
                (time.time(), result, command_id),
            )

    def command_result(self, command_id: int) -> str | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT done_at, result FROM command WHERE id = ?", (command_id,)
            ).fetchone()
        return None if row is None or row[0] is None else (row[1] or "")

    # --- what the world writes back ---
    def save_standings(self, rows: Iterable[StandingRow], *, domains: bool = False) -> None:
        """IPs' standings, or with domains=True From domains' (StandingRow.ip holds the domain)."""
        table, names = _standing_table(domains)
        columns = ", ".join(names)
        marks = ", ".join("?" for _ in names)
        updates = ", ".join(f"{c} = excluded.{c}" for c in names[2:])
        with self._transaction() as db:
            db.executemany(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})"
                f" ON CONFLICT ({names[0]}, {names[1]}) DO UPDATE SET {updates}",
                [(*astuple(r)[:-1], json.dumps(r.today)) for r in rows],
            )

    def delete_standings(self, provider: str | None, ip: str | None) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM standing WHERE (? IS NULL OR provider = ?) AND (? IS NULL OR ip = ?)",
                (provider, provider, ip, ip),
            )

    def standings(self, *, domains: bool = False) -> list[StandingRow]:
        table, names = _standing_table(domains)
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {', '.join(names)} FROM {table} ORDER BY {names[1]}, provider"
            ).fetchall()
        return [StandingRow(*row[:-1], json.loads(row[-1])) for row in rows]

    def delete_domain_standings(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM domain_standing")

    def add_verdicts(self, rows: Iterable[tuple[float, str, str, str, str, str]]) -> None:
        """(at, provider, ip, recipient, outcome, reply) for each answer the MX servers gave."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO verdict (at, provider, ip, rcpt, outcome, reply)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                list(rows),
            )
            db.execute(
                "DELETE FROM verdict WHERE id <= (SELECT max(id) FROM verdict) - ?",
                (MAX_VERDICTS,),
            )

    def verdict_counts(self, since_id: int = 0) -> dict[tuple[str, str], int]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, outcome, count(*) FROM verdict WHERE id > ?"
                " GROUP BY provider, outcome",
                (since_id,),
            ).fetchall()
        return {(p, o): n for p, o, n in rows}

    def verdict_tally(self, start: float, end: float) -> dict[str, dict[str, int]]:
        """ip -> outcome -> answers the MX servers gave in [start, end) of the world's time."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT ip, outcome, count(*) FROM verdict WHERE at >= ? AND at < ?"
                " GROUP BY ip, outcome",
                (start, end),
            ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for ip, outcome, n in rows:
            out.setdefault(ip, {})[outcome] = n
        return out

    def last_verdict_id(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT coalesce(max(id), 0) FROM verdict").fetchone()[0])

    def add_complaint(
        self, provider: str, ip: str, recipient: str, message_id: str, path: str
    ) -> int:
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO complaint (created_at, provider, ip, recipient, message_id, status,"
                " reply, path) VALUES (?, ?, ?, ?, ?, 'pending', '', ?)",
                (time.time(), provider, ip, recipient, message_id, path),
            )
            return int(cur.lastrowid or 0)

    def settle_complaint(self, complaint_id: int, status: str, reply: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE complaint SET status = ?, reply = ? WHERE id = ?",
                (status, reply[:1000], complaint_id),
            )

    def complaints(self, since_id: int = 0) -> list[dict[str, Any]]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM complaint WHERE id > ? ORDER BY id", (since_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    def last_complaint_id(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT coalesce(max(id), 0) FROM complaint").fetchone()[0])

    # --- where accepted mail was filed (sandbox/placement.py) ---
    def add_placements(self, rows: Iterable[PlacementRow]) -> None:
        """Each copy's folder, and the count per day, provider, IP, From domain and folder."""
        rows = list(rows)
        if not rows:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO placement (at, day, provider, ip, from_domain, rcpt, message_id,"
                " folder, rule) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [astuple(r) for r in rows],
            )
            db.executemany(
                "INSERT INTO placement_daily (day, provider, ip, from_domain, inbox, spam)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, provider, ip, from_domain)"
                " DO UPDATE SET inbox = inbox + excluded.inbox, spam = spam + excluded.spam",
                [
                    (
                        r.day,
                        r.provider,
                        r.ip,
                        r.from_domain,
                        r.folder == "inbox",
                        r.folder == "spam",
                    )
                    for r in rows
                ],
            )
            cut = db.execute(
                "SELECT coalesce(max(id), 0) - ? FROM placement", (MAX_PLACEMENTS,)
            ).fetchone()[0]
            if cut > 0:
                gone = db.execute("DELETE FROM placement WHERE id <= ?", (cut,)).rowcount
                if gone:
                    db.execute(
                        "UPDATE meta SET value = value + ? WHERE key = 'placements_dropped'",
                        (gone,),
                    )

    def placements_kept_from(self) -> float | None:
        """The world time of the oldest per-recipient row kept, once older ones were dropped."""
        with self._connect() as db:
            dropped = db.execute(
                "SELECT value FROM meta WHERE key = 'placements_dropped'"
            ).fetchone()
            if not dropped or not dropped[0]:
                return None
            return db.execute("SELECT min(at) FROM placement").fetchone()[0]

    def placement_counts(
        self,
        start: float | None = None,
        end: float | None = None,
        *,
        ip: str | None = None,
        from_domain: str | None = None,
    ) -> dict[tuple[str, str], int]:
        """(provider, folder) -> copies filed in [start, end) of the world's time."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, folder, count(*) FROM placement"
                " WHERE (? IS NULL OR at >= ?) AND (? IS NULL OR at < ?)"
                " AND (? IS NULL OR ip = ?) AND (? IS NULL OR from_domain = ?)"
                " GROUP BY provider, folder",
                (start, start, end, end, ip, ip, from_domain, from_domain),
            ).fetchall()
        return {(p, f): n for p, f, n in rows}

    def placements_of(self, recipients: Iterable[str]) -> list[PlacementRow]:
        """Every placement of mail to these recipients (a scenario's own), oldest first."""
        wanted = sorted({r.lower() for r in recipients})
        out: list[PlacementRow] = []
        with self._connect() as db:
            for k in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[k : k + 500]
                marks = ", ".join("?" for _ in chunk)
                out += [
                    PlacementRow(*row)
                    for row in db.execute(
                        "SELECT at, day, provider, ip, from_domain, rcpt, message_id, folder, rule"
                        f" FROM placement WHERE rcpt IN ({marks}) ORDER BY id",
                        chunk,
                    )
                ]
        return out

    def placement_daily(self) -> list[dict[str, Any]]:
        """Every (day, provider, ip, from_domain) with its inbox and spam counts."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT day, provider, ip, from_domain, inbox, spam FROM placement_daily"
                " ORDER BY day, provider, ip, from_domain"
            ).fetchall()
        return [dict(row) for row in rows]

    # --- the running world announces itself ---
    def announce(self, info: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM world")
            db.executemany(
                "INSERT INTO world VALUES (?, ?)", [(k, json.dumps(v)) for k, v in info.items()]
            )

    def withdraw(self) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM world")

    def world(self) -> dict[str, Any]:
        with self._connect() as db:
            return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM world")}


def _standing_table(domains: bool) -> tuple[str, list[str]]:
    return (
        ("domain_standing", DOMAIN_STANDING_COLUMNS) if domains else ("standing", STANDING_COLUMNS)
    )
