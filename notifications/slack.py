"""Slack Web API calls: approval messages with buttons, their outcome, replies and alerts.

Every text comes from a template (notifications/templates.py); this module only lays out the
Block Kit around it. A failed call raises SlackUnavailable, decided once here as transient
(retry later: network, 5xx, rate limit) or permanent (bad token, unknown channel); callers
never lose a checkpoint over it, they retry or fall back on the other answer paths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from config.settings import Settings
from models import Approval
from models.audit import as_utc
from notifications.templates import render
from protocol.approvals import NotifierUnavailable, Posted

__all__ = ["Posted", "SlackNotifier", "SlackUnavailable"]

log = logging.getLogger("axiom.slack")

ACTION_APPROVE = "approval.approve"
ACTION_REJECT = "approval.reject"
ACTION_COMMENT = "approval.comment"
COMMENT_VIEW = "approval.comment"

# Slack's answers worth another try later; anything else is a setting or a bug.
_TRANSIENT_ERRORS = {
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
}
_EVIDENCE_ITEMS = 10
_EVIDENCE_VALUE_CHARS = 160

# Button and form labels: interface chrome, not messages, so they live here, not in templates.
LABELS = {
    "en": {
        "approve": "Approve",
        "reject": "Reject",
        "comment": "Answer with a comment…",
        "form_title": "Answer approval",
        "form_submit": "Send",
        "form_cancel": "Cancel",
        "form_verdict": "Decision",
        "form_comment": "Comment",
    },
    "it": {
        "approve": "Approva",
        "reject": "Rifiuta",
        "comment": "Rispondi con un commento…",
        "form_title": "Rispondi",
        "form_submit": "Invia",
        "form_cancel": "Annulla",
        "form_verdict": "Decisione",
        "form_comment": "Commento",
    },
}


class SlackUnavailable(NotifierUnavailable):
    """A Slack Web API call that failed; the approval desk retries it when transient."""

    def __init__(self, method: str, error: str, *, transient: bool):
        super().__init__(f"{method}: {error}", transient=transient)
        self.method, self.error = method, error


class SlackNotifier:
    """The approval desk's Notifier in Slack, plus what only the Slack answer path needs
    (ephemeral replies, the comment form)."""

    def __init__(
        self,
        client: WebClient,
        channel: str,
        *,
        language: str = "en",
        ui_url: str | Callable[[], str] | None = None,
    ):
        self.client = client
        self.channel = channel
        self.language = language
        self._ui_url = ui_url  # a callable is resolved at first use (it may import Prefect)

    @property
    def ui_url(self) -> str | None:
        if callable(self._ui_url):
            self._ui_url = self._ui_url()
        return self._ui_url

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackNotifier | None:
        """None when no bot token or channel is set: approvals then go through the other paths."""
        if not settings.slack_configured:
            return None
        client = WebClient(
            token=settings.slack_bot_token,
            base_url=settings.slack_api_url,
            timeout=10,
            retry_handlers=[],  # retries are ours, with back-off, where losing time is fine
        )
        return cls(
            client,
            settings.slack_channel or "",
            language=settings.slack_language,
            ui_url=settings.prefect_ui,
        )

    # ------------------------------------------------------------ approvals
    def post_approval(self, approval: Approval) -> Posted:
        reply = self._call(
            "chat.postMessage",
            channel=self.channel,
            text=self._fallback(approval),
            blocks=self.approval_blocks(approval),
            unfurl_links=False,
        )
        return Posted(reply["channel"], reply["ts"])

    def show_outcome(self, approval: Approval) -> None:
        """Replace the buttons with who decided and when (or that it expired)."""
        if not (approval.slack_channel and approval.slack_ts):
            return
        self._call(
            "chat.update",
            channel=approval.slack_channel,
            ts=approval.slack_ts,
            text=self._fallback(approval),
            blocks=self.approval_blocks(approval),
        )

    def tell(self, channel: str, user: str, text: str) -> None:
        """An ephemeral reply only the person who clicked sees."""
        self._call("chat.postEphemeral", channel=channel, user=user, text=text)

    def open_comment_form(self, trigger_id: str, approval: Approval, channel: str) -> None:
        labels = LABELS[self.language]
        view = {
            "type": "modal",
            "callback_id": COMMENT_VIEW,
            "private_metadata": json.dumps({"approval_id": approval.id, "channel": channel}),
            "title": {"type": "plain_text", "text": labels["form_title"][:24]},
            "submit": {"type": "plain_text", "text": labels["form_submit"]},
            "close": {"type": "plain_text", "text": labels["form_cancel"]},
            "blocks": [
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": self._request_text(approval)},
                },
                {
                    "type": "input",
                    "block_id": "verdict",
                    "label": {"type": "plain_text", "text": labels["form_verdict"]},
                    "element": {
                        "type": "radio_buttons",
                        "action_id": "verdict",
                        "options": [
                            _option(labels["approve"], "approve"),
                            _option(labels["reject"], "reject"),
                        ],
                    },
                },
                {
                    "type": "input",
                    "block_id": "comment",
                    "optional": True,
                    "label": {"type": "plain_text", "text": labels["form_comment"]},
                    "element": {
                        "type": "plain_text_input",
                        "action_id": "comment",
                        "multiline": True,
                        "max_length": 2000,
                    },
                },
            ],
        }
        self._call("views.open", trigger_id=trigger_id, view=view)

    # ------------------------------------------------------------ alerts
    def alert(self, template: str, **context: Any) -> Posted:
        """An alert (incident, protective reaction, escalation) rendered from a template."""
        text = render(template, self.language, **context)
        reply = self._call(
            "chat.postMessage",
            channel=self.channel,
            text=text,
            blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}],
            unfurl_links=False,
        )
        return Posted(reply["channel"], reply["ts"])

    def message(self, template: str, *, at: Posted | None = None, **context: Any) -> Posted:
        """A message kept up to date: posted the first time, then edited in place (chat.update)
        so an incident or a run of reactions is one message that changes, not a storm."""
        text = render(template, self.language, **context)
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}]
        if at is None:
            reply = self._call(
                "chat.postMessage",
                channel=self.channel,
                text=text,
                blocks=blocks,
                unfurl_links=False,
            )
            return Posted(reply["channel"], reply["ts"])
        self._call("chat.update", channel=at.channel, ts=at.ts, text=text, blocks=blocks)
        return at

    # ------------------------------------------------------------ layout
    def approval_blocks(self, approval: Approval) -> list[dict]:
        blocks: list[dict] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": self._request_text(approval)}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": render(
                            "slack_approval_context",
                            self.language,
                            approval=approval,
                            expires_at=_when(approval.expires_at),
                            roles=approval.allowed_roles.split(","),
                            flow_run_url=self.flow_run_url(approval),
                        ),
                    }
                ],
            },
        ]
        if approval.state == "pending":
            labels = LABELS[self.language]
            value = str(approval.id)
            blocks.append(
                {
                    "type": "actions",
                    "block_id": f"approval:{approval.id}",
                    "elements": [
                        _button(labels["approve"], ACTION_APPROVE, value, "primary"),
                        _button(labels["reject"], ACTION_REJECT, value, "danger"),
                        _button(labels["comment"], ACTION_COMMENT, value, None),
                    ],
                }
            )
        else:
            blocks.append(
                {
                    "type": "section",
                    "text": {
                        "type": "mrkdwn",
                        "text": render(
                            "slack_approval_outcome",
                            self.language,
                            approval=approval,
                            decided_at=_when(approval.decided_at),
                        ),
                    },
                }
            )
        return blocks

    def flow_run_url(self, approval: Approval) -> str | None:
        if not (self.ui_url and approval.flow_run_id):
            return None
        return f"{self.ui_url}/runs/flow-run/{approval.flow_run_id}"

    def _request_text(self, approval: Approval) -> str:
        return render(
            "slack_approval_request",
            self.language,
            approval=approval,
            proposal=compact(approval.proposal),
            evidence=compact(approval.evidence),
        )[:3000]

    def _fallback(self, approval: Approval) -> str:
        # Notification text for clients that cannot show blocks (and for screen readers).
        return render(
            "slack_approval_fallback",
            self.language,
            approval=approval,
            decided_at=_when(approval.decided_at),
        )

    def _call(self, method: str, **kwargs: Any) -> dict:
        try:
            response = self.client.api_call(method, json=kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = (exc.response.data or {}).get("error", f"HTTP {status}")
            transient = status == 429 or status >= 500 or error in _TRANSIENT_ERRORS
            raise SlackUnavailable(method, error, transient=transient) from None
        except (SlackClientError, OSError) as exc:  # refused, reset, timed out, bad reply
            raise SlackUnavailable(method, f"{type(exc).__name__}: {exc}", transient=True) from None
        return response.data  # type: ignore[return-value]


def compact(data: dict) -> list[tuple[str, str]]:
    """At most ten items, each value on one short line: a message is read, not scrolled."""
    items = []
    for key, value in list(data.items())[:_EVIDENCE_ITEMS]:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = " ".join(text.split())
        if len(text) > _EVIDENCE_VALUE_CHARS:
            text = text[: _EVIDENCE_VALUE_CHARS - 1] + "…"
        items.append((str(key), text))
    if len(data) > _EVIDENCE_ITEMS:
        items.append(("…", f"+{len(data) - _EVIDENCE_ITEMS}"))
    return items


def approval_channels(settings: Settings) -> str:
    """One line for `axiom up` and the logs: where approvals can be answered."""
    cli = "`axiom approve ID --as NAME`"
    if settings.slack_configured:
        return f"approvals: Slack channel {settings.slack_channel}, the Prefect UI, {cli}"
    return f"approvals: the Prefect UI (Resume on the paused run) and {cli}; Slack is not set up"


def _when(moment: datetime | None) -> str:
    return as_utc(moment).strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def _button(text: str, action_id: str, value: str, style: str | None) -> dict:
    button = {
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "action_id": action_id,
        "value": value,
    }
    if style:
        button["style"] = style
    return button


def _option(text: str, value: str) -> dict:
    return {"text": {"type": "plain_text", "text": text}, "value": value}
