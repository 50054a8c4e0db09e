"""Where a simulated provider files a message it accepted: the inbox or the spam folder.

The decision reads what the provider knows at DATA: the sending IP's standing at it and the From
domain's (organisational domain; sandbox/reputation.py keeps both), their recent complaint rates
on mail delivered to the inbox, and the authentication results (sandbox/authn.py). The rules
are data, `placement` in sandbox/behaviour.yaml, each with its source or "our choice". A share
below 1 is applied with a stable number drawn from the Message-ID and the recipient
(sandbox/mailbox.py share_of), so the same world state files the same message the same way.

The SMTP reply is 250 either way. The decision is kept where a test or a report can read it and
the relay cannot: in the stored copy (mail/<provider>/ is the inbox, mail/<provider>/spam/ the
spam folder, and an X-Sandbox-Folder: header the MDA prepends), and in the state file, per
recipient and counted per provider, IP, From domain and day of the world's clock.

    summary(home, start, end) -> {provider: {"inbox": n, "spam": n}}   (world-clock time)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from sandbox.behaviour import ComplaintWindow, PlacementRule, behaviour
from sandbox.behaviour import Placement as PlacementModel
from sandbox.mailbox import share_of
from sandbox.state import StateStore

Folder = Literal["inbox", "spam"]
FOLDERS: tuple[Folder, ...] = ("inbox", "spam")
HEADER = "X-Sandbox-Folder"


@dataclass(frozen=True)
class Signals:
    """What a provider knows about one accepted message when it files it."""

    provider: str
    ip_tier: str
    domain_tier: str | None  # None: no From domain to judge
    ip_inbox: int  # delivered to the inbox from this IP, within the spam-rate window
    ip_complaints: int
    domain_inbox: int
    domain_complaints: int
    spf_pass: bool
    dkim_pass: bool
    dmarc: str  # pass, fail, none, temperror, permerror
    dmarc_policy: str | None
    bulk: bool


@dataclass(frozen=True)
class Placement:
    folder: Folder
    rule: str  # the deciding rule ("" when none held)
    share: float  # its spam share

    def header(self) -> str:
        """The line the simulated MDA prepends to the stored copy (never sent over SMTP)."""
        if not self.rule:
            return f"{HEADER}: {self.folder}"
        return f"{HEADER}: {self.folder}; rule={self.rule}; spam-share={self.share:g}"


def draw(message_id: str, recipient: str) -> float:
    """A stable number in [0, 1) for one copy of one message."""
    return share_of(f"{message_id}|{recipient}", "placement")


def decide(model: PlacementModel, signals: Signals, drawn: float) -> Placement:
    """The folder: spam when `drawn` is below the largest spam share of the rules that hold.
    The first rule with that share is the reason (rules are ordered in behaviour.yaml)."""
    deciding: PlacementRule | None = None
    for rule in model.rules:
        if not rule.applies_to(signals.provider) or not _holds(rule, signals, model.complaints):
            continue
        if deciding is None or rule.spam_share > deciding.spam_share:
            deciding = rule
    if deciding is None:
        return Placement("inbox", "", 0.0)
    folder: Folder = "spam" if drawn < deciding.spam_share else "inbox"
    return Placement(folder, deciding.name, deciding.spam_share)


def _holds(rule: PlacementRule, s: Signals, window: ComplaintWindow) -> bool:
    match rule.when:
        case "dmarc_quarantine":
            return s.dmarc == "fail" and s.dmarc_policy == "quarantine"
        case "unauthenticated":
            return not (s.spf_pass or s.dkim_pass)
        case "bulk_dmarc_not_passing":
            return s.bulk and s.dmarc != "pass"
        case "ip_tier":
            return s.ip_tier == rule.tier
        case "domain_tier":
            return s.domain_tier is not None and s.domain_tier == rule.tier
        case "ip_complaint_rate":
            return _reaches(s.ip_inbox, s.ip_complaints, rule, window, window.min_inbox)
        case "domain_complaint_rate":
            return s.domain_tier is not None and _reaches(
                s.domain_inbox,
                s.domain_complaints,
                rule,
                window,
                window.domain_min_inbox or window.min_inbox,
            )
    raise ValueError(f"unknown placement condition {rule.when!r}")


def _reaches(
    inbox: int, complaints: int, rule: PlacementRule, window: ComplaintWindow, min_inbox: int
) -> bool:
    """The complaint rate on inbox-delivered mail reaches the rule's line, counted only past the
    minimums (one complaint among a handful of messages is noise)."""
    assert rule.at_least is not None
    if inbox < min_inbox or complaints < window.min_complaints:
        return False
    return complaints / inbox >= rule.at_least


# ---------------------------------------------------------------- reading it back
class PlacementHistoryError(Exception):
    """The range asked for starts before the per-recipient history the state file keeps."""


def summary(
    home: Path | StateStore,
    start: datetime | float | None = None,
    end: datetime | float | None = None,
    *,
    ip: str | None = None,
    from_domain: str | None = None,
) -> dict[str, dict[str, int]]:
    """{provider: {"inbox": n, "spam": n}} for every simulated provider, over [start, end) of the
    world's clock (datetimes, or epoch seconds as the sandbox clock gives them; None: open),
    optionally for one source IP and/or one From domain (compared as organisational domains).

    `home` is AXIOM_HOME (or the world's StateStore). Raises PlacementHistoryError when start
    precedes the oldest per-recipient row kept (the state file keeps the newest MAX_PLACEMENTS)."""
    from sandbox.authn import organisational_domain

    state = home if isinstance(home, StateStore) else StateStore.for_home(home)
    since, until = _epoch(start), _epoch(end)
    kept_from = state.placements_kept_from()
    if kept_from is not None and (since is None or since < kept_from):
        raise PlacementHistoryError(
            f"placements before {kept_from} were dropped (MAX_PLACEMENTS); ask from there on"
        )
    domain = organisational_domain(from_domain) if from_domain else None
    counts = state.placement_counts(since, until, ip=ip, from_domain=domain)
    out = {p.name: dict.fromkeys(FOLDERS, 0) for p in behaviour().providers}
    for (provider, folder), n in counts.items():
        out.setdefault(provider, dict.fromkeys(FOLDERS, 0))[folder] = n
    return out


def _epoch(moment: datetime | float | None) -> float | None:
    if moment is None or isinstance(moment, int | float):
        return moment
    if moment.tzinfo is None:
        raise ValueError("give an aware datetime (the world's clock is UTC)")
    return moment.timestamp()
