"""Governed vs ungoverned at the small scale (issue 17, "The measure of success" and "Tests"): each
scenario's traffic through the sandbox world twice in one process, under the Protocol and
through a plain relay (testbed/experiment.py; the full scale is `python -m bench.experiment`).

Both runs lose nothing: every recipient ends delivered, refused with a DSN, or still queued. The
governed run refuses at most half of what the ungoverned one refuses, in every scenario, and gets
a larger share of the submitted mail into an inbox in every scenario but one, broken-dkim, where
the test asserts what happens instead (see there, and bench/README.md "Governed vs ungoverned").
Each assertion's failure prints both runs side by side.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest

from testbed.experiment import SCENARIOS, Experiment, ScenarioResult
from testbed.sandbox_stack import fast_dir

pytestmark = pytest.mark.integration

# The five scenarios take about 90 s on an idle 2-core machine (4 minutes when other suites keep
# both cores busy); each gives up at its hard bound, the module fails past the budget.
REAL_TIME_BUDGET = 240.0
HARD_BOUND = 180.0
_timing: dict[str, float] = {}


@pytest.fixture(scope="module")
def results() -> dict[str, ScenarioResult]:
    found = {}
    began = time.monotonic()
    for name, scenario in SCENARIOS.items():
        with tempfile.TemporaryDirectory(prefix=f"experiment-{name}-", dir=fast_dir()) as root:
            experiment = Experiment(scenario, "small", Path(root), time_limit=HARD_BOUND)
            found[name] = asyncio.run(experiment.run())
        print(f"\n{found[name].table()}\n{found[name].seconds} s, {found[name].steps} steps")
    _timing["total"] = time.monotonic() - began
    return found


def test_every_scenario_ran_within_the_budget(results):
    assert set(results) == set(SCENARIOS)
    assert _timing["total"] < REAL_TIME_BUDGET, {n: r.seconds for n, r in results.items()}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_nothing_is_lost_in_either_run(results, name):
    r = results[name]
    for run in (r.governed, r.ungoverned):
        assert run.submitted > 0, r.table()
        assert run.lost == 0 and run.refused_without_dsn == 0, r.table()
        assert run.delivered + run.refused + run.queued == run.submitted, r.table()
        assert run.inbox + run.spam == run.delivered, r.table()  # the world placed each one
    assert r.governed.submitted == r.ungoverned.submitted  # the same traffic


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_governed_run_refuses_at_most_half(results, name):
    """At this scale in all five. At the full scale volume-spike refuses 79 % of the plain
    relay's refusals (bench/README.md): after a clean day its spike passes twice the shared IP's
    allowance in flight, before the first reply can start a reaction; here it has no clean day
    behind it and the reactions stop the wave short of the block line."""
    r = results[name]
    assert r.ungoverned.refused > 0, r.table()  # the trouble costs a plain relay refusals
    assert r.refused_at_most_half, r.table()


@pytest.mark.parametrize(
    "name", [n for n in SCENARIOS if n not in ("broken-dkim", "complaint-spike")]
)
def test_the_governed_run_gets_a_larger_share_into_the_inbox(results, name):
    r = results[name]
    assert r.higher_inbox_share, r.table()


# The second wave of the complaint-spike scenario, in minutes from the trouble's start (09:00).
SECOND_WAVE = 3 * 60


def _triage_held_the_complaints(r: ScenarioResult) -> bool:
    """Whether triage saw the first wave's complaints (a content incident) and held the stream
    before the 12:00 wave met the providers. Yahoo and Microsoft report each complaint about an
    inbox copy and file the sender in spam once 2 are reported; a message reaches 20 recipients
    at once, so 2 to 4 reports arrive per provider before that line, depending on the order the
    deliveries land (the draws themselves are fixed: testbed/sandbox_stack.py spools the same
    Message-IDs in both runs). Triage's minimum is 5 complaints in an hour: the first wave
    crosses it or not. When it does not, the 12:00 wave's own reports can still open a content
    incident later, after the providers' deferrals have started the relay's reactions (CI met
    that once): the wave is then the reactions' to carry, and the second branch applies."""
    g = r.governed
    return (
        g.incidents.get("content", 0) >= 1
        and g.first_intervention is not None
        and g.first_intervention < SECOND_WAVE
    )


def test_complaint_spike_the_providers_or_triage_stop_it(results):
    """Two outcomes, each the Protocol doing its job (README, "The measure of success"):
    - triage saw 5 complaints within the hour: a content incident, the stream paused at the
      10:00 cycle and kept paused (the list is never cleaned): no refusals, no more mail to spam,
      the 12:00 wave still queued at the end, so the inbox share is not higher (the held mail
      counts as not delivered; the plain relay's goes to spam or is refused);
    - it did not (or only once the 12:00 wave was under way): the providers' deferrals at the
      12:00 wave start the relay's reactions, the overflow pool carries the wave, and the
      governed run gets a larger share into the inbox.
    """
    r = results["complaint-spike"]
    g, u = r.governed, r.ungoverned
    if _triage_held_the_complaints(r):
        assert g.interventions.get("stream.suspend") == 1, g.interventions
        assert g.refused == 0 and g.queued >= r.size.per_day // 2 - 1, r.table()
        assert g.spam <= u.spam and g.inbox + g.spam < u.inbox + u.spam, r.table()
    else:
        assert g.interventions.get("suspension (reaction)", 0) >= 1, g.interventions
        assert r.higher_inbox_share, r.table()


def test_broken_dkim_the_inbox_share_is_not_higher_and_why(results):
    """Not higher: the same share reaches the inbox in both runs (the waves sent before the
    record broke). The first wave after the break goes out whole within seconds, before the
    next 5-minute triage cycle, and every provider refuses it: each refusal costs the From
    domain standing, which turns damaged at all three. The cycle after it holds the stream;
    when the customer fixes the record the operator releases it and the held mail is delivered,
    to the spam folder (the damaged domain), where the plain relay's was refused. The relay's
    reactions have no rule for authentication refusals (they protect an IP's path, and this is
    the domain's), so nothing stops a wave in its middle."""
    r = results["broken-dkim"]
    g, u = r.governed, r.ungoverned
    assert g.inbox == u.inbox > 0, r.table()
    assert g.spam > 0 and u.spam <= u.delivered // 50, r.table()  # released, then spam-foldered
    assert g.refused < u.refused, r.table()
    assert g.interventions.get("stream.suspend") == 1, g.interventions


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_only_the_governed_run_intervenes_and_soon(results, name):
    """Within the hour of the trouble's start, except for complaints: the recipients' reports
    reach the relay only from Yahoo and Microsoft, and the providers file a sender's mail in
    spam once 2 of its inbox copies are reported (the spam-rate line), after which nobody
    reports it: the stream never reaches triage's minimum of 5 complaints an hour. The Protocol
    sees the damage instead, as the providers' deferrals, when mail meets them: during the
    09:00 wave when a provider turns on the IP within it, else with the 12:00 wave."""
    r = results[name]
    assert r.ungoverned.first_intervention is None, r.ungoverned.timeline
    assert r.ungoverned.interventions == {}, r.ungoverned.interventions
    assert r.governed.first_intervention is not None, r.table()
    bound = 3 * 60 + 5 if name == "complaint-spike" else 60
    assert 0 <= r.governed.first_intervention <= bound, r.governed.timeline


def test_what_protected_each_scenario(results):
    """The Protocol's part that acted, per scenario (its timeline is in each table)."""
    acted = {name: r.governed.interventions for name, r in results.items()}
    assert acted["cold-ip-campaign"] == {"mail held (a cap, hold, pause or suspension)": 1}
    assert results["cold-ip-campaign"].governed.deferred == 0  # the caps kept under the limits
    assert acted["blocklisting"].get("blocklist.protect") == 1, acted["blocklisting"]
    assert acted["broken-dkim"].get("stream.suspend") == 1, acted["broken-dkim"]
    assert acted["volume-spike"].get("stream.move", 0) >= 1, acted["volume-spike"]
    assert results["complaint-spike"].governed.incidents, results["complaint-spike"].table()
    # which part acted in complaint-spike: test_complaint_spike_the_providers_or_triage_stop_it
