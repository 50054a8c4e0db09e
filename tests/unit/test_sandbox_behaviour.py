"""sandbox/behaviour.yaml: it loads, refuses what is wrong, and speaks the relay's language.

The simulated providers are only useful if the relay reads their replies as it would read the
real ones, so every reply text is classified here by the relay's own classifier, with the
provider recognised from the simulated MX host name by the relay's own MX-suffix table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relay.delivery.classify import classify, provider_for_mx
from sandbox.behaviour import BEHAVIOUR_FILE, BehaviourError, behaviour, load_behaviour

# reply key -> (categories the relay must give it, whether it must be permanent)
EXPECTED = {
    "accepted": ({"delivered"}, False),
    "rate_limited": ({"rate_limited", "reputation"}, False),
    "rate_limited_cold": ({"rate_limited", "reputation"}, False),
    "rate_limited_damaged": ({"rate_limited", "reputation"}, False),
    "blocked": ({"reputation", "blocklisted"}, True),
    "blocklisted": ({"blocklisted"}, True),
    "dbl_listed": ({"blocklisted"}, True),
    "tls_required": ({"tls"}, False),
    "no_ptr": ({"rdns"}, True),
    "unauthenticated": ({"authentication"}, True),
    "dmarc_reject": ({"authentication"}, True),
    "bulk_unauthenticated": ({"authentication", "policy"}, True),
    "bulk_spf": ({"authentication"}, True),
    "bulk_dkim": ({"authentication"}, True),
    "bulk_dmarc": ({"authentication"}, True),
    "per_connection_limit": ({"rate_limited"}, False),
    "unknown_mailbox": ({"mailbox_unknown"}, True),
}
FILLED = {
    "ip": "127.0.0.10",
    "rcpt": "ann@example.net",
    "rcpt_domain": "example.net",
    "mail_from": "shop@acme.example",
    "mail_from_domain": "acme.example",
    "from_domain": "acme.example",
    "zone": "zen.spamhaus.org",
    "txt": "Listed by SBL, see https://check.spamhaus.org/",
    "ref": "abc123",
}


def test_the_shipped_file_loads_with_every_provider_and_zone():
    model = behaviour()
    assert {p.name for p in model.providers} == {"google", "microsoft", "yahoo", "apple", "generic"}
    assert {"zen.spamhaus.org", "dbl.spamhaus.org", "b.barracudacentral.org", "bl.spamcop.net"} <= {
        z.zone for z in model.dnsbl
    }
    for domain in ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "example.net"):
        assert model.provider_for_domain(domain) is not None


@pytest.mark.parametrize("provider", [p.name for p in behaviour().providers])
def test_mx_hosts_are_recognised_as_their_provider_by_the_relay(provider):
    p = behaviour().provider(provider)
    for _pref, host in p.mx:
        assert provider_for_mx(host) == provider


@pytest.mark.parametrize(
    ("provider", "key"),
    [(p.name, key) for p in behaviour().providers for key in p.replies],
)
def test_every_reply_is_classified_by_the_relay_as_intended(provider, key):
    p = behaviour().provider(provider)
    text = p.reply(key, mx_host=p.mx[0][1], **FILLED)
    assert "{" not in text and "}" not in text
    verdict = classify(text, provider)
    categories, permanent = EXPECTED[key]
    assert verdict.category in categories, (text, verdict)
    assert verdict.permanent is permanent, (text, verdict)
    assert verdict.rule_id not in ("no-rule", "unparseable"), (text, verdict)


def test_the_relay_suspends_a_google_path_on_the_simulated_rate_limit():
    """The Protocol's own reaction rules fire on the simulated texts (runbooks/shaping.yaml)."""
    from runbooks import loader

    shaping = loader.shaping()
    google = behaviour().provider("google")
    text = google.reply("rate_limited", **FILLED)
    rules = [r for r in shaping.spec.reactions if r.provider == "google" and r.text]
    import re

    assert any(re.search(r.text, text, re.IGNORECASE) for r in rules)


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(BEHAVIOUR_FILE.read_text())
    mutate(data)
    path = tmp_path / "behaviour.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_fields_are_refused_with_their_path(tmp_path):
    path = _write(tmp_path, lambda d: d["providers"][0].update(surprise=1))
    with pytest.raises(BehaviourError, match=r"providers\.0\.surprise"):
        load_behaviour(path)


def test_unknown_placeholders_in_replies_are_refused(tmp_path):
    def mutate(d):
        d["providers"][0]["replies"]["accepted"]["text"] = "250 2.0.0 OK {nonsense}"

    with pytest.raises(BehaviourError, match="nonsense"):
        load_behaviour(_write(tmp_path, mutate))


def test_a_provider_consulting_a_dnsbl_needs_a_blocklist_reply(tmp_path):
    def mutate(d):
        microsoft = next(p for p in d["providers"] if p["name"] == "microsoft")
        del microsoft["replies"]["blocklisted"]  # it consults ZEN (runbooks/blocklists.yaml)

    with pytest.raises(BehaviourError, match="blocklisted"):
        load_behaviour(_write(tmp_path, mutate))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("dnsbl", []),
        lambda d: d["providers"][0].__setitem__("dnsbl_zones", ["zen.spamhaus.org"]),
    ],
)
def test_the_lists_are_declared_once_in_the_runbook_not_here(tmp_path, mutate):
    with pytest.raises(BehaviourError, match=r"runbooks/blocklists\.yaml"):
        load_behaviour(_write(tmp_path, mutate))


def test_the_world_serves_every_declared_list_and_providers_consult_what_it_says():
    from runbooks.loader import blocklists

    model = behaviour()
    for b in blocklists().spec.lists:
        zone = model.zone(b.zone)
        assert (zone.kind, zone.codes, zone.errors) == (b.kind, b.codes, b.errors)
        for part in b.parts:
            assert model.zone(part.zone).part_of == b.zone
        for provider in b.consulted_by:
            p = model.provider(provider)
            assert b.zone in (p.dnsbl_zones if b.kind == "ip" else [p.dbl_zone])
    assert model.provider("google").dnsbl_zones == []  # Google consults no public list


def test_reputation_tiers_must_be_ordered(tmp_path):
    def mutate(d):
        d["reputation"]["tiers"].reverse()

    with pytest.raises(BehaviourError, match="ordered"):
        load_behaviour(_write(tmp_path, mutate))


def test_published_numbers_carry_their_source():
    model = behaviour()
    assert model.reputation.spam_rate.limit == 0.003
    assert "support.google.com" in str(model.reputation.spam_rate.source.url)
    google = model.provider("google")
    assert google.auth.bulk_threshold_per_day == 5000
    assert "14229414" in str(google.auth.source.url)
    assert model.provider("yahoo").messages_per_connection == 20
    assert model.provider("yahoo").messages_per_connection_source is not None
    assert model.provider("google").feedback is None  # aggregate-only feedback loop
    assert model.provider("apple").feedback is None  # no feedback loop at all
