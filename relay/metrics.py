"""Prometheus metrics of the submission and inbound paths (multiprocess-safe)."""

from __future__ import annotations

from dataclasses import dataclass

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
