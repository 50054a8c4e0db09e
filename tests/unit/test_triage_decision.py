"""protocol/triage: the degradation-triage runbook's pure decisions, at and around every level
and minimum of runbooks/degradation-triage.yaml, the baseline and declared-volume rules,
windows that start again after an action, and the cause, proposal and verification tables."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta

import pytest

from protocol.triage import (
    Cause,
    Finding,
    Subject,
    SubjectSignals,
    Window,
    assess,
    causes,
    propose,
    suspect,
    verify,
    verify_after,
)
from runbooks.loader import degradation_triage
from runbooks.schema_triage import Level, SignalRule, TriageSpec

RULES = degradation_triage().spec
NOW = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)
SECONDS = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
ORDER = ["15m", "1h", "24h", "7d"]
PATH = Subject("ip-provider", provider="yahoo", ip="127.0.0.10")
DOMAIN = Subject("domain-provider", provider="google", domain="acme.example")
STREAM = Subject("stream", tenant_id=1, stream="news", tenant="acme")


def counts(rule: SignalRule, events: int, volume: int) -> dict:
    """A window's fields holding `events` of the signal over a denominator of `volume`."""
    first = rule.counts[0]
    if first.outcome == "complaint":
        return {"sent": volume, "delivered": volume, "complaints": events}
    category = first.categories[0]
    return {"sent": volume, "delivered": volume - events, first.outcome: {category: events}}


def win(name: str, end: datetime = NOW, start: datetime | None = None, **fields) -> Window:
    return Window(start or end - timedelta(seconds=SECONDS[name]), end, **fields)


def signals(
    at: str | None = None,
    fields: dict | None = None,
    *,
    subject: Subject = STREAM,
    after: Window | None = None,
    declared: int | None = None,
    extra: dict[str, dict] | None = None,
) -> SubjectSignals:
    """Windows holding `fields` from window `at` up (the longer windows contain the shorter),
    plus `extra` fields added to named windows."""
    windows = {}
    for name in ORDER:
        f: dict = dict(fields or {}) if at and ORDER.index(name) >= ORDER.index(at) else {}
        for k, v in (extra or {}).get(name, {}).items():
            f[k] = f.get(k, 0) + v if isinstance(v, int) else v
        windows[name] = win(name, **f)
    return SubjectSignals(subject, NOW, windows, after, declared)


def found(findings, signal: str, window: str | None = None) -> list[str]:
    return [f.level for f in findings if f.signal == signal and window in (None, f.window)]


# ---------------------------------------------------------------- the shipped numbers
def test_the_shipped_levels_are_the_ones_the_report_quotes():
    levels = {
        name: [
            (lv.window, lv.warn, lv.act, lv.min_sends, lv.min_events) for lv in (r.short, r.long)
        ]
        for name, r in RULES.signals.items()
    }
    assert levels == {
        "complaint": [("1h", 0.005, 0.01, 200, 5), ("24h", 0.001, 0.003, 1000, 10)],
        "hard_bounce": [("1h", 0.05, 0.10, 200, 10), ("24h", 0.025, 0.05, 1000, 20)],
        "refused_blocked": [("1h", 0.02, 0.05, 100, 5), ("24h", 0.01, 0.02, 500, 10)],
        "refused_authentication": [("1h", 0.01, 0.05, 50, 5), ("24h", 0.005, 0.02, 500, 10)],
        "refused_content": [("1h", 0.02, 0.05, 100, 5), ("24h", 0.01, 0.03, 500, 10)],
        "refused_policy": [("1h", 0.03, 0.10, 100, 5), ("24h", 0.02, 0.05, 500, 10)],
        "deferred_rate_limited": [("15m", 0.10, 0.20, 50, 10), ("1h", 0.10, 0.15, 200, 20)],
        "deferred_reputation": [("15m", 0.05, 0.10, 50, 5), ("1h", 0.05, 0.10, 200, 10)],
    }
    b, d = RULES.baseline, RULES.declared
    assert (b.factor, b.min_events, b.min_baseline_sends) == (2.0, 5, 1000)
    assert (b.volume_factor, b.volume_min_sends) == (2.0, 500)
    assert (d.warn_factor, d.act_factor, d.min_sends) == (1.5, 2.0, 200)
    for rule in RULES.signals.values():
        assert rule.short.source and rule.long.source
    # At least as strict as the shared-SES reference point of issue 17.
    c, hb = RULES.signals["complaint"], RULES.signals["hard_bounce"]
    assert c.short.act <= 0.01 and c.short.warn <= 0.005 and c.long.act <= 0.003
    assert c.long.warn <= 0.0015 and c.short.min_sends <= 200 and c.long.min_sends <= 1000
    assert hb.short.act <= 0.10 and hb.long.act <= 0.05


# ------------------------------------------------- every level, both sides, every minimum
def _level_cases():
    """For every signal and window: below/at warn, below/at act, and each minimum one short."""
    for name, rule in RULES.signals.items():
        for lv in (rule.short, rule.long):
            v = 10_000  # rates of the rules are whole numbers of events in 10,000
            warn, act = round(lv.warn * v), round(lv.act * v)
            yield name, lv.window, warn - 1, v, None
            yield name, lv.window, warn, v, "warn"
            yield name, lv.window, act - 1, v, "warn"
            yield name, lv.window, act, v, "act"
            events = max(lv.min_events, math.ceil(lv.act * lv.min_sends) + 1)
            yield name, lv.window, events, lv.min_sends - 1, None  # one send short
            yield name, lv.window, events, lv.min_sends, "act"
            if (lv.min_events - 1) / lv.min_sends >= lv.warn:  # the minimum can bind
                yield name, lv.window, lv.min_events - 1, lv.min_sends, None
                at = lv.min_events / lv.min_sends
                yield (
                    name,
                    lv.window,
                    lv.min_events,
                    lv.min_sends,
                    "act" if at >= lv.act else "warn",
                )


@pytest.mark.parametrize(("signal", "window", "events", "volume", "level"), list(_level_cases()))
def test_each_level_of_each_signal_on_both_sides_and_its_minimums(
    signal, window, events, volume, level
):
    rule = RULES.signals[signal]
    got = assess(signals(window, counts(rule, events, volume)), RULES, NOW)
    assert found(got, signal, window) == ([level] if level else [])


def test_a_minimum_of_events_binds_where_the_rate_alone_would_act():
    """The shipped hard-bounce levels imply their event minimums (200 × 5 % = 10); a rule
    where they do not shows that events are counted apart from sends."""
    level = Level(window="1h", warn=0.01, act=0.02, min_sends=100, min_events=5, source="t")
    rule = SignalRule(
        description="t", counts=[{"outcome": "complaint"}], over="delivered", short=level,
        long=level.model_copy(update={"window": "24h"}),
    )  # fmt: skip
    data = RULES.model_dump()
    spec = TriageSpec.model_validate(
        data | {"signals": data["signals"] | {"complaint": rule.model_dump()}}
    )
    assert found(assess(signals("1h", counts(rule, 4, 100)), spec, NOW), "complaint", "1h") == []
    assert found(assess(signals("1h", counts(rule, 5, 100)), spec, NOW), "complaint", "1h") == [
        "act"
    ]


def test_one_complaint_in_five_messages_is_noise():
    rule = RULES.signals["complaint"]
    assert assess(signals("15m", counts(rule, 1, 5)), RULES, NOW) == []


def test_the_short_window_catches_what_the_long_one_dilutes():
    """A bad hour in a good day: the 1 h complaint level acts, the 24 h one does not."""
    rule = RULES.signals["complaint"]
    bad_hour = counts(rule, 10, 800)  # 1.25 % over 1 h
    good_day = {"sent": 20_000, "delivered": 20_000}  # 10 in 20,800 over 24 h: 0.048 %
    got = assess(signals("1h", bad_hour, extra={"24h": good_day, "7d": good_day}), RULES, NOW)
    assert found(got, "complaint", "1h") == ["act"] and found(got, "complaint", "24h") == []


def test_the_long_window_catches_a_low_volume_subject_the_short_one_cannot_judge():
    rule = RULES.signals["complaint"]
    last_hour = counts(rule, 2, 50)  # under 200 sends: no rate
    day = counts(rule, 4, 1000)  # 0.4 % over 24 h, 1,000 sends, but 4 < 10 complaints
    got = assess(signals("1h", last_hour, extra={"24h": day}), RULES, NOW)
    assert found(got, "complaint") == []
    day = counts(rule, 10, 1500)  # 0.67 %: act
    got = assess(signals("1h", last_hour, extra={"24h": day}), RULES, NOW)
    assert found(got, "complaint", "24h") == ["act"] and found(got, "complaint", "1h") == []


def test_hard_bounces_count_refusals_and_asynchronous_bounces_over_final_answers():
    fields = {
        "sent": 1000,
        "delivered": 960,
        "refused": {"mailbox_unknown": 30, "policy": 10},  # policy is not a hard bounce
        "bounced": {"mailbox_disabled": 20},
    }
    got = assess(signals("1h", fields), RULES, NOW)
    [f] = [f for f in got if f.signal == "hard_bounce" and f.window == "1h"]
    assert (f.events, f.sends, f.level) == (50, 1000, "warn")  # 50 / (960 + 40) = 5 %
    assert f.categories == {"mailbox_unknown": 30, "mailbox_disabled": 20}


# ---------------------------------------------------------------- the baseline rule
def _deferrals(rate_now: float, rate_before: float, sends_now=1000, sends_before=10_000):
    """Rate-limit deferrals over the last hour (the signal's long window) and the 7 days."""
    n, before = round(rate_now * sends_now), round(rate_before * sends_before)
    hour = {"sent": sends_now, "delivered": sends_now - n, "deferred": {"rate_limited": n}}
    week = {
        "sent": sends_now + sends_before,
        "delivered": sends_now + sends_before - n - before,
        "deferred": {"rate_limited": n + before},
    }
    windows = {"15m": win("15m"), "1h": win("1h", **hour), "24h": win("24h", **hour)}
    return SubjectSignals(STREAM, NOW, windows | {"7d": win("7d", **week)})


@pytest.mark.parametrize(
    ("now_rate", "before_rate", "sends_before", "expected"),
    [
        (0.08, 0.04, 10_000, ["change"]),  # doubles, +4 points, under the 10 % warn level
        (0.079, 0.04, 10_000, []),  # under 2×
        (0.03, 0.015, 10_000, []),  # doubles, but only +1.5 points (change_min 2)
        (0.04, 0.02, 10_000, ["change"]),  # doubles, +2 points exactly
        (0.08, 0.04, 999, []),  # the baseline's week is too small to say what is usual
        (0.08, 0.0, 10_000, ["change"]),  # from nothing: the absolute change decides
        (0.12, 0.04, 10_000, ["warn"]),  # over the absolute level: the level, not a change
    ],
)
def test_a_rate_at_twice_its_own_week_is_a_change_of_behaviour(
    now_rate, before_rate, sends_before, expected
):
    got = assess(_deferrals(now_rate, before_rate, sends_before=sends_before), RULES, NOW)
    assert found(got, "deferred_rate_limited", "1h") == expected
    if expected == ["change"]:
        [f] = [f for f in got if f.signal == "deferred_rate_limited"]
        assert f.severity == "info" and f.baseline_rate == pytest.approx(before_rate, abs=1e-3)


@pytest.mark.parametrize(
    ("rate_now", "sends_now", "expected"),
    [
        (0.08, 199, []),  # under the long window's 200 sends
        (0.08, 200, ["change"]),
        (0.02, 200, []),  # 4 deferrals: under the baseline's 5 events
        (0.025, 200, ["change"]),
    ],
)
def test_the_baseline_needs_its_minimums_in_the_compared_window(rate_now, sends_now, expected):
    got = assess(_deferrals(rate_now, 0.0, sends_now=sends_now), RULES, NOW)
    assert found(got, "deferred_rate_limited") == expected


# ---------------------------------------------------------------- volume
@pytest.mark.parametrize(
    ("answered", "declared", "expected"),
    [
        (1499, 1000, []),
        (1500, 1000, ["warn"]),  # 1.5 × declared
        (1999, 1000, ["warn"]),
        (2000, 1000, ["act"]),  # 2 × declared: a doubling
        (199, 10, []),  # 20 × a tiny declaration, but under 200 sends: noise
        (200, 10, ["act"]),
        (200, 0, ["act"]),  # declared nothing, sends 200
        (5000, None, []),  # nothing declared
    ],
)
def test_a_stream_over_its_declared_daily_volume_is_a_volume_spike(answered, declared, expected):
    s = signals("24h", {"sent": answered, "delivered": answered}, declared=declared)
    assert found(assess(s, RULES, NOW), "volume_declared") == expected


def test_the_declared_volume_is_a_stream_s_only():
    s = signals("24h", {"sent": 5000, "delivered": 5000}, subject=PATH, declared=100)
    assert found(assess(s, RULES, NOW), "volume_declared") == []


@pytest.mark.parametrize(
    ("today", "week_before", "expected"),
    [
        (2000, 6000, ["change"]),  # 2,000 against an average day of 1,000
        (1999, 6000, []),
        (499, 600, []),  # 5 × the average day, but under 500 today
        (500, 999, []),  # the 6 days before hold too little to say what is usual
        (500, 1000, ["change"]),
    ],
)
def test_a_day_at_twice_the_usual_day_is_a_change_of_behaviour(today, week_before, expected):
    s = signals(
        "24h",
        {"sent": today, "delivered": today},
        extra={"7d": {"sent": week_before, "delivered": week_before}},
    )
    assert found(assess(s, RULES, NOW), "volume_change") == expected


@pytest.mark.parametrize(
    ("first_seen", "expected"),
    [
        (None, ["change"]),  # unknown: six days behind it, 500 against 167 a day
        (timedelta(days=7), ["change"]),  # there all week: the same
        (timedelta(days=6), ["change"]),  # five days behind it: 500 against 200
        (timedelta(days=4), []),  # three days: 500 against 333
        (timedelta(days=2), []),  # one day behind it: 500 against 1,000
        (timedelta(hours=30), []),  # six hours behind it: less than a day, nothing usual yet
    ],
)
def test_a_young_subject_s_usual_day_is_averaged_over_the_days_it_has_sent(first_seen, expected):
    """A stream in its first week is not a change of behaviour because the days before it
    existed were silent: the usual day counts from the subject's first event in the week."""
    s = signals(
        "24h",
        {"sent": 500, "delivered": 500},
        extra={"7d": {"sent": 1000, "delivered": 1000}},
    )
    if first_seen is not None:
        s = dataclasses.replace(s, first_seen=NOW - first_seen)
    assert found(assess(s, RULES, NOW), "volume_change") == expected


# ---------------------------------------------------------------- since: windows start again
def test_windows_start_again_from_the_end_of_the_last_action():
    rule = RULES.signals["refused_blocked"]
    bad_hour = counts(rule, 50, 500)  # 10 % over 1 h and 24 h: act
    since = NOW - timedelta(minutes=20)
    clean = win("1h", start=since, sent=300, delivered=300)
    s = signals("1h", bad_hour, after=clean)
    assert found(assess(s, RULES, NOW), "refused_blocked") == ["act", "act"]
    # Since the action ended, the subject sends cleanly: what came before is not held twice.
    assert found(assess(s, RULES, NOW, since=since), "refused_blocked") == []


def test_a_subject_still_misbehaving_after_an_action_is_caught_again():
    rule = RULES.signals["refused_blocked"]
    since = NOW - timedelta(minutes=20)
    still = win("1h", start=since, **counts(rule, 10, 100))  # 10 % since the action
    got = assess(signals(after=still), RULES, NOW, since=since)
    assert found(got, "refused_blocked", "1h") == ["act"]  # 24 h: under its 500 sends
    assert found(got, "refused_blocked", "24h") == []
    assert {f.start for f in got} == {since}
    # Too little since the action to be a rate yet: not found now, not exempted either.
    few = win("1h", start=since, **counts(rule, 9, 99))
    assert assess(signals(after=few), RULES, NOW, since=since) == []


def test_only_the_windows_that_began_before_the_action_start_again():
    rule = RULES.signals["deferred_rate_limited"]
    since = NOW - timedelta(minutes=40)  # inside 1 h, before the last 15 min
    last_quarter = counts(rule, 20, 100)  # 20 % over 15 min: act
    after = win("1h", start=since, sent=400, delivered=380, deferred={"rate_limited": 20})
    got = assess(signals("15m", last_quarter, after=after), RULES, NOW, since=since)
    assert found(got, "deferred_rate_limited", "15m") == ["act"]  # read as it is
    assert found(got, "deferred_rate_limited", "1h") == []  # 5 % since the action


def test_an_action_older_than_the_windows_changes_nothing_and_a_missing_read_is_refused():
    rule = RULES.signals["refused_blocked"]
    s = signals("1h", counts(rule, 50, 500))
    old = NOW - timedelta(days=2)
    assert assess(s, RULES, NOW, since=old) == assess(s, RULES, NOW)
    with pytest.raises(ValueError, match="no window from"):
        assess(s, RULES, NOW, since=NOW - timedelta(minutes=5))
    with pytest.raises(ValueError, match="assessed at"):
        assess(s, RULES, NOW + timedelta(seconds=1))


# ---------------------------------------------------------------- causes
def finding(signal, level="act", categories=None, window="1h") -> Finding:
    return Finding(signal, level, window, NOW, 0.1, 0.05, 10, 100, "t", categories or {})


@pytest.mark.parametrize(
    ("subject", "findings", "cause", "severity"),
    [
        (PATH, [finding("refused_blocked", categories={"blocklisted": 6, "reputation": 4})],
         "blocklisting", "critical"),
        (PATH, [finding("refused_blocked", categories={"blocklisted": 4, "reputation": 6})],
         "reputation", "critical"),
        (DOMAIN, [finding("refused_authentication", "warn")], "authentication", "warning"),
        (STREAM, [finding("refused_authentication")], "authentication", "critical"),
        (STREAM, [finding("volume_declared", "warn")], "volume-spike", "warning"),
        (STREAM, [finding("volume_change", "change")], "volume-spike", "info"),
        (STREAM, [finding("hard_bounce")], "list-quality", "critical"),
        (STREAM, [finding("complaint")], "content", "critical"),
        (STREAM, [finding("refused_content", "warn")], "content", "warning"),
        (PATH, [finding("complaint")], "reputation", "critical"),  # no content on a path
        (PATH, [finding("deferred_rate_limited", "warn")], "reputation", "warning"),
        (PATH, [finding("refused_policy")], "reputation", "critical"),
        (STREAM, [finding("deferred_reputation", "change")], "reputation", "info"),
        # Equally severe: the table's order (a volume spike explains its complaints).
        (STREAM, [finding("complaint"), finding("volume_declared")], "volume-spike", "critical"),
        (STREAM, [finding("hard_bounce"), finding("refused_authentication")], "authentication",
         "critical"),
        # Worse first: act-level rate limits before a warn-level volume spike.
        (STREAM, [finding("volume_declared", "warn"), finding("deferred_rate_limited")],
         "reputation", "critical"),
    ],
)  # fmt: skip
def test_the_findings_suggest_one_cause(subject, findings, cause, severity):
    got = suspect(findings, subject, RULES)
    assert (got.name, got.severity) == (cause, severity)
    assert set(got.evidence) | set(got.others) == set(findings)


def test_no_finding_no_cause_and_a_volume_spike_is_a_stream_s():
    assert suspect([], STREAM, RULES) is None
    assert suspect([finding("volume_declared")], PATH, RULES) is None
    both = causes([finding("complaint"), finding("hard_bounce")], STREAM, RULES)
    assert [c.name for c in both] == ["list-quality", "content"]


def test_a_change_only_cause_is_a_behaviour_change():
    cause = suspect([finding("deferred_rate_limited", "change")], STREAM, RULES)
    assert cause.behaviour_change and cause.severity == "info"
    assert not suspect([finding("complaint", "warn")], STREAM, RULES).behaviour_change


# ---------------------------------------------------------------- proposals
def cause(name, subject=STREAM, severity="critical") -> Cause:
    level = {"critical": "act", "warning": "warn", "info": "change"}[severity]
    signal = next(iter(RULES.causes[name].clues)).signal
    return Cause(name, subject, severity, (finding(signal, level),))


@pytest.mark.parametrize(
    ("name", "subject", "severity", "tried", "action"),
    [
        ("content", STREAM, "critical", [], "pause_stream"),  # the complaint spike
        ("content", STREAM, "critical", ["pause_stream"], "pause_tenant"),
        ("content", STREAM, "critical", ["pause_stream", "pause_tenant"], None),
        ("content", STREAM, "warning", [], "customer_report"),
        ("content", STREAM, "warning", ["customer_report"], "pause_stream"),
        ("content", STREAM, "warning", ["customer_report", "pause_stream"], None),
        ("content", DOMAIN, "critical", [], None),  # no stream to pause on a domain
        ("content", DOMAIN, "warning", [], "customer_report"),
        ("content", STREAM, "info", [], None),  # a change of behaviour is watched
        ("reputation", PATH, "warning", [], "lower_rate"),
        ("reputation", PATH, "critical", ["lower_rate"], None),  # then a person
        ("reputation", STREAM, "critical", [], "move_stream"),
        ("reputation", STREAM, "warning", [], None),
        ("blocklisting", PATH, "critical", [], "lower_rate"),
        ("authentication", STREAM, "critical", [], "pause_stream"),
        ("authentication", DOMAIN, "warning", [], "customer_report"),
        ("volume-spike", STREAM, "warning", [], "customer_report"),
        ("volume-spike", STREAM, "warning", ["customer_report"], "move_stream"),
        ("volume-spike", STREAM, "critical", [], "move_stream"),
        ("volume-spike", STREAM, "critical", ["move_stream"], "pause_stream"),
        ("list-quality", STREAM, "critical", [], "pause_stream"),
    ],
)
def test_the_next_action_is_the_first_rung_not_tried(name, subject, severity, tried, action):
    got = propose(cause(name, subject, severity), RULES, tried)
    assert (got.name if got else None) == action


def test_lowering_a_rate_is_automatic_and_ends_by_itself_the_rest_asks_triage_act():
    lower = propose(cause("reputation", PATH, "warning"), RULES)
    assert (lower.approval, lower.checkpoint) == ("automatic", None)
    assert lower.duration_seconds == 3600 and lower.rate_factor == 0.5
    pause = propose(cause("content"), RULES)
    assert (pause.approval, pause.checkpoint, pause.rung) == ("required", "triage.act", 1)
    assert verify_after(cause("content"), RULES) == timedelta(hours=2)
    assert verify_after(cause("reputation", PATH), RULES) == timedelta(minutes=30)


# ---------------------------------------------------------------- verification
@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        ("act", [], "improved"),
        ("act", [finding("complaint", "act")], "not_improved"),
        ("act", [finding("complaint", "warn")], "not_improved"),  # still over warn
        ("act", [finding("complaint", "change")], "improved"),  # under every level
        ("change", [finding("complaint", "change")], "not_improved"),  # the change persists
        ("act", [finding("refused_content", "warn")], "not_improved"),  # the same cause
        ("act", [finding("hard_bounce", "act")], "improved"),  # another cause's: not this one
    ],
)
def test_verify_after_the_action(before, after, verdict):
    was = Cause("content", STREAM, "critical", (finding("complaint", before),))
    assert verify(was, after, RULES) == verdict


def test_the_rules_refuse_a_clue_or_a_rung_that_names_nothing():
    data = RULES.model_dump()
    bad = data | {"causes": data["causes"] | {"content": data["causes"]["content"] | {
        "clues": [{"signal": "open_rate"}]}}}  # fmt: skip
    with pytest.raises(ValueError, match="no signal 'open_rate'"):
        TriageSpec.model_validate(bad)
    bad = data | {"causes": data["causes"] | {"blocklisting": data["causes"]["blocklisting"] | {
        "clues": [{"signal": "refused_blocked", "category": "content"}]}}}  # fmt: skip
    with pytest.raises(ValueError, match="counts no 'content' events"):
        TriageSpec.model_validate(bad)
    bad = data | {"actions": {k: v for k, v in data["actions"].items() if k != "lower_rate"}}
    with pytest.raises(ValueError, match="no action 'lower_rate'"):
        TriageSpec.model_validate(bad)
    level = data["signals"]["complaint"]["short"] | {"warn": 0.02}
    bad = data | {"signals": data["signals"] | {"complaint": data["signals"]["complaint"] | {
        "short": level}}}  # fmt: skip
    with pytest.raises(ValueError, match="warn must be below act"):
        TriageSpec.model_validate(bad)
