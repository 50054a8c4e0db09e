"""The dedicated-or-shared rule (protocol/onboarding.py decide_pool) at and around every
threshold of runbooks/domain-onboarding.yaml, and the approver's choice of the other pool."""

from __future__ import annotations

import pytest

from protocol.errors import ServiceError
from protocol.onboarding import (
    Declared,
    PoolEvidence,
    PoolInfo,
    choose_pool,
    decide_pool,
)
from runbooks.loader import domain_onboarding

RULE = domain_onboarding().spec.pool_rule
DEDICATED = RULE.dedicated_min_per_month  # 100,000 (Mailtrap)
REGULAR = RULE.regular_min_days_per_week  # 5
SEPARATE = RULE.separate_min_per_month  # 250,000 (SendGrid)


def evidence(
    per_month: int,
    days: int = 5,
    kind: str = "transactional",
    others: int = 0,
    source: str = "opt_in",
    age: int = 3,
    pools: dict[str, PoolInfo] | None = None,
) -> PoolEvidence:
    declared = Declared(kind, per_month // 22, per_month, days, source, age)
    known = {"default": PoolInfo("default", "shared", ("127.0.0.1",), ())}
    return PoolEvidence("acme", kind, declared, others, {**known, **(pools or {})})


def test_the_rule_is_the_published_one():
    assert (DEDICATED, REGULAR, SEPARATE) == (100_000, 5, 250_000)


@pytest.mark.parametrize(
    ("per_month", "days", "pool", "kind"),
    [
        (0, 5, "default", "shared"),
        (DEDICATED - 1, 7, "default", "shared"),  # just under: shared
        (DEDICATED, REGULAR, "dedicated-acme", "dedicated"),  # at both thresholds
        (DEDICATED, REGULAR - 1, "default", "shared"),  # enough, but irregular
        (DEDICATED + 1, 7, "dedicated-acme", "dedicated"),
        (SEPARATE - 1, REGULAR, "dedicated-acme", "dedicated"),  # not yet separated
        (SEPARATE, REGULAR, "dedicated-acme-transactional", "dedicated"),
        (SEPARATE, REGULAR - 1, "default", "shared"),
        (10_000_000, 1, "default", "shared"),  # huge but once a week
    ],
)
def test_dedicated_only_with_enough_regular_volume(per_month, days, pool, kind):
    proposal = decide_pool(evidence(per_month, days), RULE)
    assert (proposal.pool, proposal.pool_kind) == (pool, kind)
    if kind == "dedicated":
        # a dedicated pool is new here: created at activation, the shared pool meanwhile
        assert proposal.create_pool and proposal.fallback_pool == "default"
        assert proposal.alternative == "default"
        assert any("no IP yet" in w for w in proposal.warnings)
    else:
        assert proposal.fallback_pool is None and not proposal.create_pool
        assert proposal.alternative.startswith("dedicated-acme")


@pytest.mark.parametrize(
    ("this", "others", "pool"),
    [
        (DEDICATED, SEPARATE - DEDICATED - 1, "dedicated-acme"),  # tenant one under
        (DEDICATED, SEPARATE - DEDICATED, "dedicated-acme-marketing"),  # tenant at it
    ],
)
def test_marketing_and_transactional_apart_when_the_tenants_volume_allows(this, others, pool):
    proposal = decide_pool(evidence(this, kind="marketing", others=others), RULE)
    assert proposal.pool == pool


def test_a_mixed_stream_above_the_separation_volume_is_told_to_split():
    proposal = decide_pool(evidence(SEPARATE, kind="mixed"), RULE)
    assert proposal.pool == "dedicated-acme"  # one pool: a mixed stream cannot be split here
    assert any("split this mixed stream" in w for w in proposal.warnings)
    below = decide_pool(evidence(SEPARATE - 1, kind="mixed"), RULE)
    assert not any("split" in w for w in below.warnings)


@pytest.mark.parametrize(
    ("source", "age", "warned"),
    [
        ("opt_in", RULE.stale_list_months, []),
        ("opt_in", RULE.stale_list_months + 1, ["months old"]),
        ("purchased", 0, ["list source 'purchased'"]),
        ("rented", RULE.stale_list_months + 1, ["list source 'rented'", "months old"]),
        ("double_opt_in", 0, []),
    ],
)
def test_list_warnings(source, age, warned):
    proposal = decide_pool(evidence(1000, source=source, age=age), RULE)
    assert len(proposal.warnings) == len(warned)
    for text, warning in zip(warned, proposal.warnings, strict=True):
        assert text in warning


def test_an_existing_dedicated_pool_with_cold_ips_is_reused_and_reported():
    pools = {
        "dedicated-acme": PoolInfo("dedicated-acme", "dedicated", ("127.0.0.10",), ("127.0.0.10",))
    }
    proposal = decide_pool(evidence(DEDICATED, pools=pools), RULE)
    assert (proposal.pool, proposal.create_pool, proposal.cold_ips) == (
        "dedicated-acme",
        False,
        ("127.0.0.10",),
    )
    assert not any("no IP yet" in w for w in proposal.warnings)


@pytest.mark.parametrize(
    ("comment", "pool", "kind"),
    [
        ("", "dedicated-acme", "dedicated"),
        ("looks fine", "dedicated-acme", "dedicated"),
        ("start shared: pool=default", "default", "shared"),
        ("POOL: default, then revisit", "default", "shared"),
        ("pool=dedicated-acme", "dedicated-acme", "dedicated"),
    ],
)
def test_the_approver_may_choose_the_other_pool_in_the_comment(comment, pool, kind):
    e = evidence(DEDICATED)
    chosen = choose_pool(decide_pool(e, RULE), comment, e, RULE)
    assert (chosen.pool, chosen.pool_kind) == (pool, kind)


def test_choosing_a_pool_that_does_not_exist_is_refused_naming_it():
    e = evidence(1000)
    with pytest.raises(ServiceError, match="'nowhere', which does not exist"):
        choose_pool(decide_pool(e, RULE), "pool=nowhere", e, RULE)
    # the proposal's alternative may be chosen although it does not exist yet: it is created
    chosen = choose_pool(decide_pool(e, RULE), "pool=dedicated-acme", e, RULE)
    assert (chosen.pool_kind, chosen.create_pool, chosen.fallback_pool) == (
        "dedicated",
        True,
        "default",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "newsletter"}, "stream kind 'newsletter' must be one of"),
        ({"days_per_week": 0}, "sending days per week 0 must be 1 to 7"),
        ({"days_per_week": 8}, "sending days per week 8 must be 1 to 7"),
        ({"per_month": -1}, "per_month -1 must be 0 or more"),
    ],
)
def test_bad_declarations_are_refused_naming_the_value(fields, message):
    base = {
        "kind": "transactional",
        "per_day": 10,
        "per_month": 300,
        "days_per_week": 5,
        "list_source": "opt_in",
        "list_age_months": 1,
    }
    with pytest.raises(ServiceError, match=message):
        Declared(**{**base, **fields})
