"""How long does a blocklist scan take? (issue 16: 256 IPs × every declared zone, a few seconds.)

    .venv/bin/python -m bench.blocklist_scan [--ips 256] [--concurrency 1 16 64 256]
                                             [--repeat 3] [--json PATH]

Knot (testbed/dns.py) on loopback serves every list of runbooks/blocklists.yaml as the lists
publish it: the RFC 5782 test entry, and a few listings among the scanned IPs (ZEN with one,
two and three codes at once, SpamCop, Barracuda, one Spamhaus error code 127.255.255.254).
protocol.blocklists.scan asks every IP list about every IP (256 × 6 = 1,536 A queries, plus a
TXT query per listing) through one resolver, as the blocklist-scan runbook does, at each
concurrency bound; each setting gets one warm-up pass and --repeat timed passes, and the
median is reported. Then protocol.blocklists.apply writes a scan's answers into a fresh SQLite
database twice (the first pass records the listings and audits them, the second finds nothing
new): the scan's other cost.

Every pass is also checked: exactly the planted listings are listed with their codes, the
error code is an error, everything else is clear; the exit status is 1 if a check fails or
the default concurrency's median misses the goal (GOAL_SECONDS). Results go to
bench/out/blocklist_scan.json. Not part of `make bench` (about 30 s).
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from bench.common import OUT_DIR, console, machine_info, now_iso, say, write_json  # noqa: E402
from models.db import make_engine, migrate, session_scope  # noqa: E402
from protocol import blocklists  # noqa: E402
from protocol.blocklists import DEFAULT_CONCURRENCY, Target, query_name  # noqa: E402
from runbooks.loader import blocklists as blocklists_runbook  # noqa: E402
from testbed.dns import KnotServer  # noqa: E402

OUT = OUT_DIR / "blocklist_scan.json"
NETWORK = ipaddress.ip_network("198.51.100.0/24")  # RFC 5737 documentation range
GOAL_SECONDS = 5.0  # "a few seconds" for 256 IPs
TIMEOUT = 3.0


def planted(ips: list[str]) -> dict[str, dict[str, list[str]]]:
    """list id -> {ip: codes}: a few listings among the scanned IPs."""
    return {
        "spamhaus-zen": {
            ips[1]: ["127.0.0.2"],
            ips[2]: ["127.0.0.3", "127.0.0.4"],
            ips[3]: ["127.0.0.2", "127.0.0.4", "127.0.0.10"],
            ips[4]: ["127.255.255.254"],  # an error, never a listing
        },
        "spamcop": {ips[5]: ["127.0.0.2"], ips[6]: ["127.0.0.2"]},
        "barracuda": {ips[1]: ["127.0.0.2"]},
    }


def zones(spec, entries: dict[str, dict[str, list[str]]]) -> dict[str, list]:
    out: dict[str, list] = {}
    for b in spec.lists:
        test = {"127.0.0.2": ["127.0.0.2"]} if b.kind == "ip" else {"test": ["127.0.1.2"]}
        records = []
        for subject, codes in {**test, **entries.get(b.id, {})}.items():
            owner = query_name(blocklists.parse_target(subject), b.zone) + "."
            for code in codes:
                records.append((owner, "A", code))
                if code in b.codes:
                    text = b.txt.format(subject=subject, meaning=b.codes[code])
                    records.append((owner, "TXT", text))
        out[b.zone] = records
    return out


def verify(answers, entries, ip_lists: int, ips: int) -> list[str]:
    """What a correct scan of this world returns; the differences, if any."""
    problems = []
    if len(answers) != ip_lists * ips:
        problems.append(f"{len(answers)} answers, expected {ip_lists * ips}")
    want = {
        (ip, list_id): codes
        for list_id, listed in entries.items()
        for ip, codes in listed.items()
        if not codes[0].startswith("127.255.")
    }
    errors = {
        (ip, list_id)
        for list_id, listed in entries.items()
        for ip, codes in listed.items()
        if codes[0].startswith("127.255.")
    }
    got = {(a.target, a.list_id): list(a.codes) for a in answers if a.status == "listed"}
    if got != {k: sorted(v, key=ipaddress.ip_address) for k, v in want.items()}:
        problems.append(f"listed {sorted(got)} != planted {sorted(want)}")
    got_errors = {(a.target, a.list_id) for a in answers if a.status == "error"}
    if got_errors != errors:
        problems.append(f"errors {sorted(got_errors)} != {sorted(errors)}")
    if any(a.status == "listed" and not a.reason for a in answers):
        problems.append("a listing without its TXT reason")
    return problems


def time_scans(targets, nameserver, concurrency: int, repeat: int, check) -> dict:
    blocklists.scan(targets, [nameserver], timeout=TIMEOUT, concurrency=concurrency)  # warm-up
    walls, problems = [], []
    answers = []
    for _ in range(repeat):
        started = time.perf_counter()
        answers = blocklists.scan(targets, [nameserver], timeout=TIMEOUT, concurrency=concurrency)
        walls.append(time.perf_counter() - started)
        problems += check(answers)
    queries = len(answers) + sum(a.status == "listed" for a in answers)  # A + TXT
    median = statistics.median(walls)
    return {
        "concurrency": concurrency,
        "walls_s": walls,
        "median_s": median,
        "queries": queries,
        "queries_per_s": queries / median if median else 0.0,
        "problems": problems,
        "answers": answers,
    }


def time_apply(answers) -> dict:
    """apply() into a fresh SQLite database: the first pass records, the second finds nothing."""
    with tempfile.TemporaryDirectory(prefix="axiom-bench-bl-") as tmp:
        url = f"sqlite:///{tmp}/axiom.db"
        migrate(url)
        engine = make_engine(url)
        try:
            passes = []
            for n in range(2):
                with session_scope(engine) as session:
                    started = time.perf_counter()
                    result = blocklists.apply(
                        session,
                        answers,
                        now=datetime.now(UTC),
                        actor="bench",
                        runbook=("blocklist-scan", "bench"),
                    )
                    session.commit()
                    passes.append(
                        {
                            "pass": n + 1,
                            "seconds": time.perf_counter() - started,
                            "events": len(result.events),
                            "errors": len(result.errors),
                        }
                    )
        finally:
            engine.dispose()
    return {"passes": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ips", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not 8 <= args.ips <= NETWORK.num_addresses:
        parser.error(f"--ips: from 8 to {NETWORK.num_addresses}")
    if any(not 1 <= c <= 1024 for c in args.concurrency):
        parser.error("--concurrency: from 1 to 1024")
    repeat = max(1, min(args.repeat, 20))

    spec = blocklists_runbook().spec
    ip_lists = [b for b in spec.lists if b.kind == "ip"]
    ips = [str(a) for a in list(NETWORK)[: args.ips]]
    targets = [Target("ip", a) for a in ips]
    entries = planted(ips)

    def check(answers):
        return verify(answers, entries, len(ip_lists), len(ips))

    runs = []
    say(f"Knot serving {len(spec.lists)} lists; {len(ips)} IPs × {len(ip_lists)} IP lists")
    with KnotServer(zones(spec, entries)) as knot:
        for concurrency in args.concurrency:
            run = time_scans(targets, knot.address, concurrency, repeat, check)
            say(
                f"concurrency {concurrency}: median {run['median_s']:.2f} s "
                f"({run['queries_per_s']:.0f} queries/s)"
                + (f"; PROBLEMS: {run['problems'][0]}" if run["problems"] else "")
            )
            runs.append(run)
    applied = time_apply(runs[-1]["answers"])

    default = next((r for r in runs if r["concurrency"] == DEFAULT_CONCURRENCY), None)
    document = {
        "when": now_iso(),
        "machine": machine_info(),
        "ips": len(ips),
        "ip_lists": [b.id for b in ip_lists],
        "timeout_s": TIMEOUT,
        "repeat": repeat,
        "goal_s": GOAL_SECONDS,
        "default_concurrency": DEFAULT_CONCURRENCY,
        "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs],
        "apply": applied,
    }
    write_json(args.json, document)

    table = Table(
        "concurrency", "queries", "median s", "min s", "max s", "queries/s", "checks",
        title=f"Blocklist scan: {len(ips)} IPs × {len(ip_lists)} lists, Knot on loopback",
        title_justify="left",
    )  # fmt: skip
    for r in runs:
        mark = "default" if r["concurrency"] == DEFAULT_CONCURRENCY else ""
        table.add_row(
            f"{r['concurrency']} {mark}".strip(),
            f"{r['queries']:,}",
            f"{r['median_s']:.2f}",
            f"{min(r['walls_s']):.2f}",
            f"{max(r['walls_s']):.2f}",
            f"{r['queries_per_s']:,.0f}",
            "ok" if not r["problems"] else f"{len(r['problems'])} failed",
        )
    console.print(table)
    for p in applied["passes"]:
        console.print(
            f"apply pass {p['pass']} (SQLite): {p['seconds'] * 1000:.0f} ms, "
            f"{p['events']} events, {p['errors']} errors",
            highlight=False,
        )
    failed = any(r["problems"] for r in runs)
    missed = default is not None and default["median_s"] >= GOAL_SECONDS
    if missed:
        console.print(f"goal missed: median {default['median_s']:.2f} s ≥ {GOAL_SECONDS} s")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
