"""When to try a deferred recipient again, and when to give up (runbooks/delivery.yaml)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from runbooks.schema_delivery import RetrySchedule


def next_attempt_at(
    attempts: int, now: datetime, schedule: RetrySchedule, rng: random.Random | None = None
) -> datetime:
    """attempts: how many attempts have been made so far (>= 1)."""
    interval = schedule.first_retry_seconds * schedule.factor ** max(attempts - 1, 0)
    interval = min(interval, schedule.max_interval_seconds)
    spread = interval * schedule.jitter
    interval += (rng or random).uniform(-spread, spread)
    return now + timedelta(seconds=max(interval, 1.0))


def has_expired(created_at: datetime, now: datetime, schedule: RetrySchedule) -> bool:
    return now - created_at >= timedelta(seconds=schedule.max_age_seconds)
