"""The fault matrix in its short form: every scenario of testbed/faults.py with small counts.

Each test runs one scenario against real processes (relay, delivery processes, Knot, smtp-sink,
PostgreSQL, Prefect) and asserts what the scenario promises: nothing acknowledged is lost, and
the fault is met the way the Protocol says (4xx not 5xx, deferred not bounced, no receiver
slowing another, mail flowing without the control plane). `make reliability` runs the same
scenarios with FULL counts (bench/reliability.py) and prints the table.
"""

from __future__ import annotations

import pytest

from testbed import faults as fm
from testbed.faults import SHORT, Row

pytestmark = pytest.mark.integration


def _passed(row: Row) -> None:
    print(
        f"\n{row.scenario}: sent {row.sent}, acknowledged {row.acknowledged}, delivered "
        f"{row.delivered}, duplicates {row.duplicates}, lost {row.lost}, {row.seconds:.1f}s; "
        f"{row.details}"
    )
    assert row.lost == 0, f"acknowledged and lost: {row.details.get('lost (first 5)')}"
    assert not row.failures, row.failures
    assert row.acknowledged > 0


def test_kill9_of_the_relay_during_submission(tmp_path):
    row = fm.kill_relay_during_submission(tmp_path, SHORT)
    _passed(row)
    assert row.acknowledged >= SHORT.kill_rounds * SHORT.round_min_acks
    assert row.delivered == row.acknowledged  # nothing bounces here: every one arrived
    assert all(n > 0 for n in row.details["sessions cut per kill"])
    assert row.details["all duplicates held by a killed relay"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_kill9_of_delivery_processes_mid_batch(tmp_path, db_url):
    row = fm.kill_delivery_mid_batch(tmp_path, SHORT, db_url)
    _passed(row)
    assert row.delivered == row.acknowledged == SHORT.delivery_messages
    held = row.details["claims held at each kill"]
    assert len(held) == SHORT.delivery_kills and all(n > 0 for n in held)
    # at-least-once: a second copy only of what a killed process held
    assert row.details["all duplicates held by a killed worker"]
    assert row.duplicates <= sum(held)


def test_postgresql_outage_answers_451_and_recovers_without_a_restart(tmp_path):
    row = fm.postgres_outage(tmp_path, SHORT)
    _passed(row)
    replies = row.details["replies while down"]
    assert set(replies) == {"451 4.3.0"} and replies["451 4.3.0"] > 0
    assert row.details["250 while down"] == 0
    assert row.details["5xx"] == 0
    assert all(r is not None for r in row.details["first 250 after restart (s)"])
    assert row.details["relay restarted"] is False
    assert row.delivered == row.acknowledged


def test_full_filesystem_refuses_with_4xx_and_keeps_the_spool_intact(tmp_path):
    row = fm.full_filesystem(tmp_path, SHORT)
    _passed(row)
    refused = row.details["refused while full"]
    assert refused and all(code.split()[0] in ("451", "452") for code in refused)
    assert row.details["integrity_check"] == "ok"
    assert row.details["250 after freeing"] >= 5
    assert row.delivered == row.acknowledged


def test_dns_outage_defers_and_delivers_when_it_returns(tmp_path):
    row = fm.dns_unreachable(tmp_path, SHORT)
    _passed(row)
    deferred = row.details["recipients deferred while down"]
    assert deferred > 0 and row.details["deferral"] == {"451 4.4.3": deferred}
    assert row.details["attempts while down (min)"] >= SHORT.dns_rounds
    assert "bounced" not in row.details
    assert row.delivered == row.acknowledged


def test_tarpit_does_not_slow_other_receivers(tmp_path):
    row = fm.tarpit(tmp_path, SHORT)
    _passed(row)
    baseline = row.details["fast receiver, no tarpit (s)"]
    busy = row.details["fast receiver, tarpit busy (s)"]
    assert busy <= max(2 * baseline, baseline + 2 * SHORT.tarpit_delay), (baseline, busy)
    assert row.details["sessions held by the tarpit throughout"] > 0
    assert row.delivered == row.acknowledged  # the tarpit's mail too, in the end


def test_421_on_every_attempt_defers_and_never_bounces_early(tmp_path):
    row = fm.always_421(tmp_path, SHORT)
    _passed(row)
    assert row.details["attempts each while 421"] >= SHORT.busy_rounds
    assert row.details["bounced early"] == 0
    assert set(row.details["deferral"]) == {"421 4.0.0"}
    assert row.delivered == row.acknowledged


def test_mail_flows_while_prefect_is_down(tmp_path):
    row = fm.prefect_down(tmp_path, SHORT)
    _passed(row)
    assert row.details["batch delivered, Prefect down (s)"] is not None
    assert row.details["flow run after return"] == "COMPLETED"
    assert row.delivered == row.acknowledged
