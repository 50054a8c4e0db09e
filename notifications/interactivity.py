"""POST /slack/interactivity: Slack's button clicks and form submissions, verified first.

As Slack advises and Netflix Dispatch does, nothing is parsed before the signature over the
raw body and the timestamp window (5 minutes) check out; a signature seen before within the
window is a replay. Slack wants an answer within 3 seconds, so a verified request is
acknowledged at once and the work — ApprovalDesk.decide, which waits on the database and on
Prefect — runs in a worker thread; its outcome reaches the person as an ephemeral message.
Every refusal is audited; the ones before verification are answered 401/403 with the reason,
since nothing in an unverified body (user, channel) can be trusted to reply to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from slack_sdk.signature import SignatureVerifier
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from config.settings import Settings
from notifications.slack import (
    ACTION_APPROVE,
    ACTION_COMMENT,
    ACTION_REJECT,
    COMMENT_VIEW,
    SlackNotifier,
    SlackUnavailable,
)
from notifications.templates import render
from protocol.approvals import Answer, ApprovalDesk, Refusal

log = logging.getLogger("axiom.slack.interactivity")

PATH = "/slack/interactivity"
WINDOW_SECONDS = 300  # Slack's advice, and SignatureVerifier's own window


class SlackInteractivity:
    def __init__(
        self,
        *,
        signing_secret: str | None,
        desk: ApprovalDesk,
        slack: SlackNotifier | None,
        language: str = "en",
        clock: Callable[[], float] = time.time,
    ):
        self.verifier = SignatureVerifier(signing_secret) if signing_secret else None
        self.desk = desk
        self.slack = slack
        self.language = language
        self.clock = clock
        self._seen: dict[str, float] = {}  # signature → request timestamp, for replays
        self._work: set[asyncio.Task] = set()

    def routes(self) -> list[BaseRoute]:
        return [Route(PATH, self.endpoint, methods=["POST"])]

    async def endpoint(self, request: Request) -> Response:
        if self.verifier is None:
            return PlainTextResponse(
                "Slack interactivity is off: AXIOM_SLACK_SIGNING_SECRET is not set", 503
            )
        body = await request.body()
        refused = self._verify(
            body,
            request.headers.get("x-slack-request-timestamp"),
            request.headers.get("x-slack-signature"),
        )
        if refused is not None:
            reason, status, message = refused
            peer = request.client.host if request.client else "?"
            await asyncio.to_thread(
                self.desk.audit,
                actor="slack:unverified",
                action="approval.refused",
                subject=f"http:{PATH}",
                evidence={
                    "reason": reason,
                    "peer": peer,
                    "timestamp": request.headers.get("x-slack-request-timestamp"),
                },
            )
            log.warning("Slack request from %s refused: %s", peer, message)
            return PlainTextResponse(message, status)
        try:
            payload = json.loads(parse_qs(body.decode())["payload"][0])
        except (KeyError, ValueError, UnicodeDecodeError):
            return PlainTextResponse("expected a form field 'payload' holding JSON", 400)
        return self._dispatch(payload)

    async def drain(self) -> None:
        """Wait for the work acknowledged so far (tests, and a clean shutdown)."""
        while self._work:
            await asyncio.gather(*list(self._work), return_exceptions=True)

    # ------------------------------------------------------------ verification
    def _verify(
        self, body: bytes, timestamp: str | None, signature: str | None
    ) -> tuple[str, int, str] | None:
        """None when genuine and new; else (reason, HTTP status, message)."""
        assert self.verifier is not None
        if not timestamp or not signature:
            return "unsigned", 401, "unsigned request: X-Slack-Signature and timestamp required"
        now = self.clock()
        try:
            age = abs(now - int(timestamp))
        except ValueError:
            return "stale_timestamp", 403, "X-Slack-Request-Timestamp is not a number"
        if age > WINDOW_SECONDS:
            return "stale_timestamp", 403, "stale request: timestamp outside the 5-minute window"
        try:
            genuine = self.verifier.is_valid(body, timestamp, signature)
        except UnicodeDecodeError:  # Slack's bodies are UTF-8 form data; this is not Slack
            genuine = False
        if not genuine:
            return "bad_signature", 401, "bad signature"
        for seen, at in list(self._seen.items()):
            if now - at > WINDOW_SECONDS:
                del self._seen[seen]
        if signature in self._seen:
            return "replayed", 403, "replayed request: this signature was already used"
        self._seen[signature] = int(timestamp)
        return None

    # ------------------------------------------------------------ dispatch
    def _dispatch(self, payload: dict) -> Response:
        kind = payload.get("type")
        user = (payload.get("user") or {}).get("id") or ""
        if kind == "block_actions" and payload.get("actions"):
            action = payload["actions"][0]
            channel = (payload.get("channel") or {}).get("id") or (
                payload.get("container") or {}
            ).get("channel_id", "")
            approval_id = _int(action.get("value"))
            if approval_id is None:
                return Response(status_code=200)
            if action.get("action_id") == ACTION_COMMENT:
                self._later(self._open_form, payload.get("trigger_id", ""), approval_id, channel)
            elif action.get("action_id") in (ACTION_APPROVE, ACTION_REJECT):
                verdict = "approve" if action["action_id"] == ACTION_APPROVE else "reject"
                self._later(self._answer, approval_id, verdict, user, channel, "")
            return Response(status_code=200)
        view = payload.get("view") or {}
        if kind == "view_submission" and view.get("callback_id") == COMMENT_VIEW:
            meta = json.loads(view.get("private_metadata") or "{}")
            values = view.get("state", {}).get("values", {})
            verdict = (
                (values.get("verdict", {}).get("verdict", {}).get("selected_option") or {}).get(
                    "value"
                )
            ) or ""
            comment = values.get("comment", {}).get("comment", {}).get("value") or ""
            approval_id = _int(meta.get("approval_id"))
            if approval_id is not None:
                self._later(
                    self._answer, approval_id, verdict, user, meta.get("channel", ""), comment
                )
            return Response(status_code=200)  # an empty 200 closes the form
        return JSONResponse({"ok": True, "ignored": kind})

    def _later(self, work: Callable, *args) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(work, *args))
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    # ------------------------------------------------------------ work (worker threads)
    def _answer(
        self, approval_id: int, verdict: str, user: str, channel: str, comment: str
    ) -> None:
        answer = Answer(
            approval_id=approval_id,
            verdict=verdict,
            via="slack",
            slack_user_id=user,
            comment=comment,
        )
        context = {"approval_id": approval_id, "verdict": verdict, "claimed": user}
        try:
            decided = self.desk.decide(answer)
        except Refusal as refusal:
            self._tell(channel, user, reason=refusal.reason, detail=refusal.message, **context)
            return
        except Exception:
            error_id = secrets.token_hex(4)
            log.exception(
                "Slack answer to approval #%s failed [error id %s]", approval_id, error_id
            )
            self._tell(channel, user, reason="error", detail=error_id, **context)
            return
        resumed = decided.resumed
        self._tell(
            channel,
            user,
            reason="decided",
            resumed=resumed is None or resumed.accepted,
            detail=f"{resumed.status} {resumed.reason}".strip() if resumed else "",
            **context,
        )

    def _open_form(self, trigger_id: str, approval_id: int, channel: str) -> None:
        approval = self.desk.get(approval_id)
        if self.slack is None or approval is None:
            return
        try:
            self.slack.open_comment_form(trigger_id, approval, channel)
        except SlackUnavailable as exc:
            log.warning("Slack form for approval #%s not opened: %s", approval_id, exc)

    def _tell(self, channel: str, user: str, **context) -> None:
        text = render("slack_reply", self.language, **context)
        if self.slack is None or not channel or not user:
            log.info("reply to Slack user %s not sent (no bot token): %s", user, text)
            return
        try:
            self.slack.tell(channel, user, text)
        except SlackUnavailable as exc:
            log.warning("ephemeral reply to %s not sent: %s (%s)", user, exc, text)


def routes(settings: Settings, engine: Engine) -> list[BaseRoute]:
    """The relay's HTTP extension: POST /slack/interactivity (503 until a secret is set)."""
    desk = ApprovalDesk.from_settings(settings, engine)
    return SlackInteractivity(
        signing_secret=settings.slack_signing_secret,
        desk=desk,
        slack=desk.slack,
        language=settings.slack_language,
    ).routes()


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
