"""The approval desk wired from settings: Slack as its notifier, Prefect as its resumer."""

from __future__ import annotations

from sqlalchemy import Engine

from config.settings import Settings
from models.sandbox_clock import clock_for
from notifications.slack import SlackNotifier
from protocol.approvals import ApprovalDesk, PrefectResumer


def approval_desk(settings: Settings, engine: Engine) -> ApprovalDesk:
    """What the checkpoint, `axiom approve` and the control process answer with.

    Without a Slack bot token and channel the desk has no notifier: requests are answered in
    the Prefect UI and with `axiom approve`. PrefectResumer stays in protocol/ (it imports
    Prefect only when a run is resumed): waking a paused run is part of the answer path.
    """
    return ApprovalDesk(
        engine,
        resume=PrefectResumer(settings.prefect_api),
        notifier=SlackNotifier.from_settings(settings),
        retry_initial=settings.slack_retry_initial_seconds,
        clock=clock_for(settings.environment, engine).now,  # the sandbox's shifted time there
    )
