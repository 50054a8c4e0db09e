"""Prometheus metrics of the submission, inbound and delivery paths (multiprocess-safe)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Histogram


@dataclass(frozen=True)
class Metrics:
    accepted: Counter
    rejected: Counter
    auth_failures: Counter
    spool_latency: Histogram


def build_metrics() -> Metrics:
    return Metrics(
        accepted=Counter("axiom_submission_accepted", "Messages accepted (250) into the spool"),
        rejected=Counter(
            "axiom_submission_rejected", "Submission commands refused, by reason", ["reason"]
        ),
        auth_failures=Counter("axiom_auth_failures", "Failed SMTP AUTH attempts"),
        spool_latency=Histogram(
            "axiom_spool_commit_seconds",
            "Time from DATA complete and signed to spool commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        ),
    )


@dataclass(frozen=True)
class InboundMetrics:
    reports: Counter
    rejected: Counter


def build_inbound_metrics() -> InboundMetrics:
    return InboundMetrics(
        reports=Counter(
            "axiom_inbound_reports",
            "Bounces and complaint reports recorded (250), by kind and whether they matched",
            ["kind", "matched"],
        ),
        rejected=Counter(
            "axiom_inbound_rejected", "Inbound commands refused, by reason", ["reason"]
        ),
    )


@dataclass(frozen=True)
class DeliveryMetrics:
    """Outcomes and holds of the delivery engine. Labels are bounded sets: providers are the
    names runbooks/providers.yaml declares (plus its fallback, and "none" before an MX was
    known), categories those of runbooks/classification.yaml, reasons models.HoldReason. No
    per-recipient, per-domain or per-IP label: those are what `axiom stats` is for."""

    outcomes: Counter
    held: Counter

    def settled(self, batch) -> None:
        """Count what one committed batch of settlements (relay/spool/claims.py) recorded."""
        outcomes: dict[tuple[str, str], int] = {}
        held: dict[tuple[str, str], int] = {}
        for _, outcome in batch:
            for attempt in (
                *outcome.delivered,
                *(a for a, _ in outcome.deferred),
                *(a for a, _ in outcome.failed),
            ):
                key = (attempt.provider or "none", attempt.category)
                outcomes[key] = outcomes.get(key, 0) + 1
            if outcome.hold is not None and outcome.postponed:
                key = (str(outcome.hold.reason), outcome.hold.provider or "none")
                held[key] = held.get(key, 0) + len(outcome.postponed)
        # One inc per label set and batch, not per recipient: a batch is up to 256 jobs.
        for (provider, category), n in outcomes.items():
            self.outcomes.labels(provider=provider, category=category).inc(n)
        for (reason, provider), n in held.items():
            self.held.labels(reason=reason, provider=provider).inc(n)


@cache
def delivery_metrics() -> DeliveryMetrics:
    """One set per process (a second registration of the same names would be refused)."""
    return DeliveryMetrics(
        outcomes=Counter(
            "axiom_delivery_outcomes",
            "Delivery attempts' outcomes, by receiving provider and reply category",
            ["provider", "category"],
        ),
        held=Counter(
            "axiom_delivery_held",
            "Recipients not sent now (no attempt made), by reason and provider",
            ["reason", "provider"],
        ),
    )
