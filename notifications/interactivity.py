"""POST /slack/interactivity: Slack's button clicks and form submissions, verified first.

Served by the control process (axiom/control.py), never by the relay. As Slack advises and
Netflix Dispatch does, nothing is parsed before the signature over the raw body and the
timestamp window (5 minutes) check out; a signature seen before within the window is a replay.
What an attacker can send costs little: a body over MAX_BODY_BYTES (Slack's payloads are a
few KB) is refused from its Content-Length before any of it is read, or as soon as the count
passes the limit when it comes chunked; unsigned and stale requests are refused on their
headers alone; every refusal before verification closes the connection, so an unread body is
never drained. Those refusals are counted (axiom_slack_requests_refused_total{reason}) and
logged at most once per reason every REFUSAL_LOG_SECONDS, with how many were refused
meanwhile — never an audit row each, which let anyone grow the audit trail at will.

Slack wants an answer within 3 seconds, so a verified request is acknowledged at once and the
work — ApprovalDesk.decide, which waits on the database and on Prefect — runs in a worker
thread; its outcome reaches the person as an ephemeral message. Refusals after verification
(unknown operator, no role, already decided) come from a genuine Slack user: the desk audits
those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from slack_sdk.signature import SignatureVerifier
from sqlalchemy import Engine
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from config.settings import Settings
from notifications.desk import approval_desk
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
MAX_BODY_BYTES = 64 * 1024  # Slack's interaction payloads are a few KB
REFUSAL_LOG_SECONDS = 10.0
REASONS = ("too_large", "unsigned", "stale", "bad_signature", "replay", "not_configured")


class Refusals:
    """Requests refused before verification: a Prometheus counter and a rate-limited log line.

    One line per reason at most every `every` seconds, saying how many more were refused since
    the previous line: a flood of forged requests costs a counter increment each, not a log
    line or an audit row.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        every: float = REFUSAL_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.counter = Counter(
            "axiom_slack_requests_refused",
            "Requests to POST /slack/interactivity refused before verification, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:  # every reason is exported from the start, at 0
            self.counter.labels(reason)
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def refuse(self, reason: str, peer: str, message: str) -> None:
        self.counter.labels(reason).inc()
        now = self.clock()
        with self._lock:
            last = self._logged_at.get(reason)
            if last is not None and now - last < self.every:
                self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
                return
            meanwhile = self._unlogged.pop(reason, 0)
            self._logged_at[reason] = now
        if last is None:
            log.warning("Slack request from %s refused (%s): %s", peer, reason, message)
        else:
            log.warning(
                "Slack request from %s refused (%s): %s; %d more refused for %s in the %.0f s "
                "since the last such line",
                peer,
                reason,
                message,
                meanwhile,
                reason,
                now - last,
            )


class SlackInteractivity:
    def __init__(
        self,
        *,
        signing_secret: str | None,
        desk: ApprovalDesk,
        slack: SlackNotifier | None,
        refusals: Refusals,
        language: str = "en",
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.verifier = SignatureVerifier(signing_secret) if signing_secret else None
        self.desk = desk
        self.slack = slack
        self.refusals = refusals
        self.language = language
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self._seen: dict[str, float] = {}  # signature → request timestamp, for replays
        self._work: set[asyncio.Task] = set()

    def routes(self) -> list[BaseRoute]:
        return [Route(PATH, self.endpoint, methods=["POST"])]

    async def endpoint(self, request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        if self.verifier is None:
            message = "Slack interactivity is off: AXIOM_SLACK_SIGNING_SECRET is not set"
            return self._refuse("not_configured", 503, message, peer)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._refuse("too_large", 413, self._too_large_message(), peer)
        timestamp = request.headers.get("x-slack-request-timestamp")
        signature = request.headers.get("x-slack-signature")
        refused = self._check_headers(timestamp, signature)
        if refused is None:
            body = await self._read_at_most(request)
            if body is None:
                refused = ("too_large", 413, self._too_large_message())
            else:
                assert timestamp is not None and signature is not None
                refused = self._check_signature(body, timestamp, signature)
        if refused is not None:
            return self._refuse(*refused, peer)
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
    async def _read_at_most(self, request: Request) -> bytes | None:
        """The raw body, or None as soon as it passes the limit (the rest is never read)."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    return None
                chunks.append(chunk)
        except ClientDisconnect:
            return b""  # nobody is left to answer; an empty body fails the signature check
        return b"".join(chunks)

    def _check_headers(
        self, timestamp: str | None, signature: str | None
    ) -> tuple[str, int, str] | None:
        if not timestamp or not signature:
            return "unsigned", 401, "unsigned request: X-Slack-Signature and timestamp required"
        try:
            age = abs(self.clock() - int(timestamp))
        except ValueError:
            return "stale", 403, "X-Slack-Request-Timestamp is not a number"
        if age > WINDOW_SECONDS:
            return "stale", 403, "stale request: timestamp outside the 5-minute window"
        return None

    def _check_signature(
        self, body: bytes, timestamp: str, signature: str
    ) -> tuple[str, int, str] | None:
        """None when genuine and new; else (reason, HTTP status, message)."""
        assert self.verifier is not None
        try:
            genuine = self.verifier.is_valid(body, timestamp, signature)
        except UnicodeDecodeError:  # Slack's bodies are UTF-8 form data; this is not Slack
            genuine = False
        if not genuine:
            return "bad_signature", 401, "bad signature"
        now = self.clock()
        for seen, at in list(self._seen.items()):
            if now - at > WINDOW_SECONDS:
                del self._seen[seen]
        if signature in self._seen:
            return "replay", 403, "replayed request: this signature was already used"
        self._seen[signature] = int(timestamp)
        return None

    def _refuse(self, reason: str, status: int, message: str, peer: str) -> Response:
        self.refusals.refuse(reason, peer, message)
        # Close rather than drain: whatever of the body is still coming is never read.
        return PlainTextResponse(message, status, headers={"Connection": "close"})

    def _too_large_message(self) -> str:
        return f"request body over {self.max_body_bytes} bytes: not a Slack interaction"

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


def routes(
    settings: Settings, engine: Engine, registry: CollectorRegistry = REGISTRY
) -> tuple[list[BaseRoute], SlackInteractivity]:
    """POST /slack/interactivity for the control process (503 until a secret is set)."""
    desk = approval_desk(settings, engine)
    endpoint = SlackInteractivity(
        signing_secret=settings.slack_signing_secret,
        desk=desk,
        slack=desk.notifier if isinstance(desk.notifier, SlackNotifier) else None,
        refusals=Refusals(registry),
        language=settings.slack_language,
    )
    return endpoint.routes(), endpoint


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
