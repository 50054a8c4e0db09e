"""sandbox/placement.py: where a simulated provider files mail it accepted, at each rule's line.

The rules are behaviour.yaml's `placement` section; these tests pin the published lines (Gmail
0.1 % target and 0.3 % maximum, Yahoo 0.3 %, DMARC p=quarantine, bulk senders' alignment) and
the sandbox's own choices, each at and around its threshold."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from sandbox.behaviour import BEHAVIOUR_FILE, BehaviourError, behaviour, load_behaviour
from sandbox.mailbox import Mailboxes, trace_headers
from sandbox.placement import PlacementHistoryError, Signals, decide, draw, summary
from sandbox.reputation import Reputation
from sandbox.state import PlacementRow, StandingRow, StateStore

CLEAN = Signals(
    provider="google",
    ip_tier="established",
    domain_tier="established",
    ip_inbox=0,
    ip_complaints=0,
    domain_inbox=0,
    domain_complaints=0,
    spf_pass=True,
    dkim_pass=True,
    dmarc="pass",
    dmarc_policy="none",
    bulk=False,
)


def place(drawn: float = 0.0, **changes):
    """Decide for CLEAN with changes; drawn 0.0 sends any share > 0 to spam."""
    return decide(behaviour().placement, dataclasses.replace(CLEAN, **changes), drawn)


def rule(name: str):
    return next(r for r in behaviour().placement.rules if r.name == name)


# ---------------------------------------------------------------- the rules as data
def test_every_rule_names_a_source_or_says_it_is_our_choice():
    rules = behaviour().placement.rules
    assert rules
    for r in rules:
        assert r.source is not None or r.choice, r.name
    assert "support.google.com" in str(rule("google-ip-spam-rate-limit").source.url)
    assert "rfc7489" in str(rule("dmarc-quarantine").source.url)
    assert "senders.yahooinc.com" in str(rule("yahoo-ip-spam-rate-limit").source.url)
    assert rule("google-ip-spam-rate-limit").at_least == 0.003
    assert rule("google-ip-spam-rate-target").at_least == 0.001
    assert rule("yahoo-ip-spam-rate-limit").at_least == 0.003


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(BEHAVIOUR_FILE.read_text())
    mutate(data["placement"]["rules"])
    path = tmp_path / "behaviour.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rules: rules[0].pop("source"), "give a source, or say our choice"),
        (lambda rules: rules[0].update(providers=["aol"]), "unknown provider"),
        (lambda rules: rules[0].update(tier="cold"), "`tier` goes with"),
        (lambda rules: rules[0].update(at_least=0.1), "`at_least` goes with"),
        (lambda rules: rules[0].update(when="gut_feeling"), "placement.rules.0.when"),
        (lambda rules: rules.append(dict(rules[0])), "unique"),
    ],
)
def test_a_wrong_rule_is_refused_with_the_reason(tmp_path, mutate, message):
    with pytest.raises(BehaviourError, match=message):
        load_behaviour(_write(tmp_path, mutate))


# ---------------------------------------------------------------- complaint rates
def test_clean_mail_from_a_good_ip_lands_in_the_inbox_at_every_provider():
    for provider in (p.name for p in behaviour().providers):
        decided = place(provider=provider, ip_inbox=5000, domain_inbox=5000)
        assert (decided.folder, decided.rule) == ("inbox", ""), provider


@pytest.mark.parametrize(
    ("inbox", "complaints", "folder", "rule_name"),
    [
        (1000, 3, "spam", "google-ip-spam-rate-limit"),  # 0.30 %: "never reach"
        (1001, 3, "spam", "google-ip-spam-rate-target"),  # just under 0.3 %, over 0.1 %
        (2000, 2, "spam", "google-ip-spam-rate-target"),  # 0.10 %: not below the target
        (2001, 2, "inbox", ""),  # just under 0.1 %
    ],
)
def test_gmail_files_by_the_ips_spam_rate_at_its_published_lines(
    inbox, complaints, folder, rule_name
):
    decided = place(ip_inbox=inbox, ip_complaints=complaints)
    assert (decided.folder, decided.rule) == (folder, rule_name)


def test_between_gmails_target_and_maximum_half_goes_to_spam_by_a_stable_draw():
    share = rule("google-ip-spam-rate-target").spam_share
    assert share == 0.5
    assert place(share - 0.001, ip_inbox=1000, ip_complaints=2).folder == "spam"
    kept = place(share, ip_inbox=1000, ip_complaints=2)
    assert (kept.folder, kept.rule) == ("inbox", "google-ip-spam-rate-target")
    draws = [draw(f"<{n}@acme.example>", "ann@gmail.com") for n in range(4000)]
    assert draws == [draw(f"<{n}@acme.example>", "ANN@gmail.com") for n in range(4000)]
    spam = sum(place(d, ip_inbox=1000, ip_complaints=2).folder == "spam" for d in draws)
    assert 0.45 < spam / len(draws) < 0.55


@pytest.mark.parametrize("provider", ["yahoo", "microsoft", "apple", "generic"])
def test_other_providers_draw_the_line_at_three_per_thousand(provider):
    assert place(provider=provider, ip_inbox=1000, ip_complaints=3).folder == "spam"
    assert place(provider=provider, ip_inbox=1001, ip_complaints=3).folder == "inbox"
    # the domain's rate alike
    assert place(provider=provider, domain_inbox=1000, domain_complaints=3).folder == "spam"
    assert place(provider=provider, domain_inbox=1001, domain_complaints=3).folder == "inbox"


def test_yahoo_and_gmail_rules_cite_their_own_pages():
    assert place(provider="yahoo", ip_inbox=1000, ip_complaints=3).rule == (
        "yahoo-ip-spam-rate-limit"
    )
    assert place(provider="yahoo", domain_inbox=1000, domain_complaints=3).rule == (
        "yahoo-domain-spam-rate-limit"
    )
    assert place(provider="apple", ip_inbox=100, ip_complaints=3).rule == "ip-spam-rate-limit"


def test_a_rate_counts_only_past_its_minimums():
    window = behaviour().placement.complaints
    assert (window.min_inbox, window.min_complaints) == (20, 2)
    assert place(ip_inbox=19, ip_complaints=5).folder == "inbox"  # too little mail
    assert place(ip_inbox=20, ip_complaints=1).folder == "inbox"  # one complaint: an anecdote
    assert place(ip_inbox=20, ip_complaints=2).folder == "spam"
    # a From domain's rate is read over all its IPs: from a day's 200 inbox messages
    assert window.domain_min_inbox == 200
    assert place(domain_inbox=199, domain_complaints=50).folder == "inbox"
    assert place(domain_inbox=200, domain_complaints=2).folder == "spam"


def test_a_domain_rate_needs_a_domain():
    assert place(domain_inbox=1000, domain_complaints=3).rule == "google-domain-spam-rate-limit"
    assert place(domain_tier=None, domain_inbox=1000, domain_complaints=3).folder == "inbox"


# ---------------------------------------------------------------- authentication
def test_dmarc_quarantine_sends_failing_mail_to_spam_everywhere():
    for provider in (p.name for p in behaviour().providers):
        decided = place(provider=provider, dkim_pass=False, dmarc="fail", dmarc_policy="quarantine")
        assert (decided.folder, decided.rule) == ("spam", "dmarc-quarantine"), provider
    # p=none asks nothing of a small sender
    assert place(dkim_pass=False, dmarc="fail", dmarc_policy="none").folder == "inbox"


@pytest.mark.parametrize(
    ("provider", "dmarc", "folder"),
    [
        ("google", "fail", "spam"),  # Gmail: unaligned bulk mail, spam foldering
        ("yahoo", "fail", "spam"),
        ("yahoo", "none", "spam"),  # Yahoo: bulk mail must pass DMARC
        ("microsoft", "fail", "spam"),
        ("apple", "fail", "inbox"),  # iCloud asks for a published policy, refused at DATA
    ],
)
def test_bulk_senders_must_pass_dmarc(provider, dmarc, folder):
    assert place(provider=provider, dmarc=dmarc, bulk=True).folder == folder
    assert place(provider=provider, dmarc=dmarc, bulk=False).folder == "inbox"
    assert place(provider=provider, dmarc="pass", bulk=True).folder == "inbox"


def test_outlook_files_unauthenticated_mail_in_junk_where_others_refuse_it_at_data():
    unauthenticated = {"spf_pass": False, "dkim_pass": False, "dmarc": "none"}
    assert place(provider="microsoft", **unauthenticated).rule == "microsoft-unauthenticated-junk"
    assert place(provider="microsoft", spf_pass=False).folder == "inbox"  # DKIM passes
    for provider in ("google", "yahoo", "apple"):
        assert behaviour().provider(provider).auth.all_senders == "spf_or_dkim"


# ---------------------------------------------------------------- reputation
@pytest.mark.parametrize(
    ("tier", "folder"),
    [("established", "inbox"), ("warming", "inbox"), ("cold", "inbox"), ("damaged", "spam")],
)
def test_the_ips_and_the_domains_tier(tier, folder):
    assert place(ip_tier=tier).folder == folder
    assert place(domain_tier=tier).folder == folder
    if folder == "spam":
        assert place(ip_tier=tier).rule == "ip-damaged"
        assert place(domain_tier=tier).rule == "domain-damaged"


def test_the_reason_kept_is_the_first_rule_with_the_largest_share():
    decided = place(ip_tier="damaged", ip_inbox=100, ip_complaints=5)
    assert (decided.folder, decided.rule) == ("spam", "google-ip-spam-rate-limit")
    assert decided.header() == (
        "X-Sandbox-Folder: spam; rule=google-ip-spam-rate-limit; spam-share=1"
    )
    assert place().header() == "X-Sandbox-Folder: inbox"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_complaint_rate_counts_inbox_mail_of_the_last_day():
    clock = Clock()
    rep = Reputation(behaviour().reputation, clock)
    for _ in range(30):
        rep.delivered("yahoo", "127.0.0.10")
    for _ in range(20):
        rep.inboxed("yahoo", "127.0.0.10")
    rep.penalise("yahoo", "127.0.0.10", "complaint")
    assert rep.inbox_complaints("yahoo", "127.0.0.10") == (20, 1)
    assert rep.inbox_complaints("google", "127.0.0.10") == (0, 0)  # per provider
    clock.now += behaviour().reputation.spam_rate.window_seconds + 1
    assert rep.inbox_complaints("yahoo", "127.0.0.10") == (0, 0)


def test_a_domain_standing_loses_for_auth_failures_not_per_complaint():
    model = behaviour().reputation
    losses = behaviour().placement.domain_losses
    domains = Reputation(model.model_copy(update={"losses": losses}), Clock())
    domains.penalise("google", "acme.example", "complaint")
    assert domains.standing("google", "acme.example").score == model.initial_score
    domains.penalise("google", "acme.example", "auth_failure")
    assert domains.standing("google", "acme.example").score == model.initial_score - 2.0
    assert domains.inbox_complaints("google", "acme.example") == (0, 1)


# ---------------------------------------------------------------- where it is kept
def test_spam_is_stored_in_the_providers_spam_folder_with_its_header(tmp_path):
    boxes = Mailboxes(tmp_path)
    decided = place(ip_tier="damaged")
    trace = trace_headers(
        mail_from="shop@acme.example",
        recipient="ann@gmail.com",
        mx_host="gmail-smtp-in.l.google.com",
        helo="mta10.axiom.test",
        ip="127.0.0.10",
        tls=True,
        reference="r1",
        authentication="Authentication-Results: mx; dkim=pass",
        folder=decided.header(),
    )
    path = boxes.store("google", "ann@gmail.com", trace, b"Subject: hi\r\n\r\nbody\r\n", "spam")
    assert path.parent == tmp_path / "google" / "spam"
    boxes.store("google", "bo@gmail.com", trace[:-1], b"Subject: hi\r\n\r\nbody\r\n")
    [spam] = boxes.messages("google", folder="spam")
    assert spam.folder == "spam" and spam.recipient == "ann@gmail.com"
    assert spam.headers["X-Sandbox-Folder"].startswith("spam; rule=ip-damaged")
    assert [m.folder for m in boxes.messages()] == ["inbox", "spam"]
    assert boxes.folder_counts() == {"google": {"inbox": 1, "spam": 1}}
    assert boxes.counts() == {"google": 2}
    with pytest.raises(ValueError, match="unknown folder"):
        boxes.store("google", "cy@gmail.com", trace, b"x", "junk")


def _row(at: float, provider: str, folder: str, ip: str = "127.0.0.10", domain="acme.example"):
    day = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")
    return PlacementRow(at, day, provider, ip, domain, f"r{at}@x.example", "<m>", folder, "")


DAY1 = datetime(2026, 11, 26, tzinfo=UTC).timestamp()
DAY2 = DAY1 + 86400


def test_placements_are_counted_per_provider_ip_domain_and_day(tmp_path):
    state = StateStore.for_home(tmp_path)
    state.add_placements(
        [
            _row(DAY1 + 10, "google", "inbox"),
            _row(DAY1 + 20, "google", "spam"),
            _row(DAY1 + 30, "google", "inbox", ip="127.0.0.11"),
            _row(DAY2 + 10, "yahoo", "spam", domain="other.example"),
        ]
    )
    assert state.placement_daily() == [
        {
            "day": "2026-11-26",
            "provider": "google",
            "ip": "127.0.0.10",
            "from_domain": "acme.example",
            "inbox": 1,
            "spam": 1,
        },
        {
            "day": "2026-11-26",
            "provider": "google",
            "ip": "127.0.0.11",
            "from_domain": "acme.example",
            "inbox": 1,
            "spam": 0,
        },
        {
            "day": "2026-11-27",
            "provider": "yahoo",
            "ip": "127.0.0.10",
            "from_domain": "other.example",
            "inbox": 0,
            "spam": 1,
        },
    ]
    everything = summary(tmp_path)
    assert everything["google"] == {"inbox": 2, "spam": 1}
    assert everything["yahoo"] == {"inbox": 0, "spam": 1}
    assert everything["apple"] == {"inbox": 0, "spam": 0}  # every provider, zeros included
    # [start, end) of the world's clock, datetimes or epoch seconds
    day1 = summary(tmp_path, datetime.fromtimestamp(DAY1, UTC), DAY2)
    assert (day1["google"], day1["yahoo"]) == ({"inbox": 2, "spam": 1}, {"inbox": 0, "spam": 0})
    assert summary(tmp_path, DAY1 + 20, DAY1 + 30)["google"] == {"inbox": 0, "spam": 1}
    assert summary(tmp_path, ip="127.0.0.11")["google"] == {"inbox": 1, "spam": 0}
    assert summary(tmp_path, from_domain="news.other.example")["yahoo"] == {"inbox": 0, "spam": 1}
    with pytest.raises(ValueError, match="aware datetime"):
        summary(tmp_path, datetime(2026, 11, 26))
    [found] = state.placements_of(["R" + f"{DAY1 + 20}@X.example"])
    assert (found.folder, found.provider) == ("spam", "google")


def test_a_range_before_the_kept_history_is_refused_not_undercounted(tmp_path, monkeypatch):
    import sandbox.state

    monkeypatch.setattr(sandbox.state, "MAX_PLACEMENTS", 2)
    state = StateStore.for_home(tmp_path)
    assert summary(state, DAY1)["google"] == {"inbox": 0, "spam": 0}
    state.add_placements([_row(DAY1 + n, "google", "inbox") for n in range(5)])
    assert state.placements_kept_from() == DAY1 + 3
    assert summary(state, DAY1 + 3)["google"] == {"inbox": 2, "spam": 0}
    with pytest.raises(PlacementHistoryError, match="dropped"):
        summary(state, DAY1)
    # the daily counts keep everything
    assert state.placement_daily()[0]["inbox"] == 5


def test_domain_standings_are_kept_apart_from_the_ips(tmp_path):
    state = StateStore.for_home(tmp_path)
    state.save_standings(
        [StandingRow("google", "acme.example", -4.0, 0.0, 5, 0, 1, 0, 1.0)], domains=True
    )
    state.save_standings([StandingRow("google", "127.0.0.10", 9.0, 0.0, 5, 0, 1, 0, 1.0)])
    assert [(r.ip, r.score) for r in state.standings(domains=True)] == [("acme.example", -4.0)]
    assert [(r.ip, r.score) for r in state.standings()] == [("127.0.0.10", 9.0)]
    state.delete_domain_standings()
    assert state.standings(domains=True) == [] and len(state.standings()) == 1
