"""Checkpoints against a real Prefect server: every answer path, expiry and refusals, end to end.

A flow run reaches its checkpoint and pauses; the fake Slack receives the request; an answer
arrives by a signed Slack click (through the control process's HTTP app on loopback), by `axiom approve`
(a real CLI process), or by the Prefect resume form; the run wakes, acts only on the recorded
decision, and the audit chain verifies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from uuid import UUID

import httpx
import pytest
import uvicorn
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    temporary_settings,
)
from prometheus_client import CollectorRegistry
from sqlmodel import col, select

from axiom.control import build_app
from config.settings import load_settings
from flows import resources
from flows.checkpoint import request_approval
from flows.suspend_stream import HOLD_POOL, suspend_stream
from models import Approval, AuditEntry, IpPool, Stream
from models.audit_trail import verify
from models.db import make_engine, migrate, session_scope
from protocol import egress, operators, tenants
from protocol.approvals import PrefectResumer
from testbed import cli as axiom_cli
from tests.conftest import VENV_BIN, free_port
from tests.fakes.slack import FakeSlack, button_click, sign

pytestmark = pytest.mark.integration

SECRET = "e3b0c44298fc1c149afbf4c8996fb924"
CHANNEL = "C0APPROVALS"


@pytest.fixture(scope="module")
def prefect_api():
    # Imported here: it imports Prefect's whole server (about a second), which every test
    # worker would otherwise pay at collection.
    from prefect.testing.utilities import prefect_test_harness

    # Heartbeats cost about a second per flow run; an empty env value would not parse.
    with (
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield PREFECT_API_URL.value()


class Stack:
    """One Axiom home: database, fake Slack, the control process's HTTP app, settings in the
    environment (and the flows' process-wide settings and engine read afresh from them)."""

    def __init__(self, tmp_path, prefect_api: str, monkeypatch):
        self.db_url = f"sqlite:///{tmp_path / 'axiom.db'}"
        migrate(self.db_url)
        self.engine = make_engine(self.db_url)
        self.slack = FakeSlack()
        self.env = {
            "AXIOM_HOME": str(tmp_path),
            "AXIOM_CONFIG": str(tmp_path / "absent.toml"),
            "AXIOM_DATABASE_URL": self.db_url,
            "AXIOM_SLACK_BOT_TOKEN": self.slack.token,
            "AXIOM_SLACK_CHANNEL": CHANNEL,
            "AXIOM_SLACK_API_URL": self.slack.base_url,
            "AXIOM_SLACK_SIGNING_SECRET": SECRET,
            "AXIOM_SLACK_RETRY_INITIAL_SECONDS": "0.1",
            "AXIOM_PREFECT_API_URL": prefect_api,
            "AXIOM_CHECKPOINT_POLL_SECONDS": "1",
        }
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        resources.forget()  # flows run in this process's threads: this test's home from now on
        with session_scope(self.engine) as s:
            egress.ensure_default_pool(s)
            tenants.add_tenant(s, "acme")
            operators.add_operator(s, "alice", ["deliverability"], "U0ALICE")
            operators.add_operator(s, "carol", [], "U0CAROL")
            s.commit()
        self.http_port = free_port()
        app, _ = build_app(load_settings(), self.engine, CollectorRegistry())
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.http_port, log_level="warning")
        )
        self.server_thread = threading.Thread(target=self.server.run, daemon=True)
        self.server_thread.start()
        _wait(lambda: _port_open(self.http_port), "control HTTP endpoint")

    def close(self) -> None:
        self.server.should_exit = True
        self.server_thread.join(10)
        self.slack.close()
        self.engine.dispose()
        resources.forget()

    # ------------------------------------------------------------ driving
    def pending_approval(self, subject: str) -> Approval:
        def found():
            with session_scope(self.engine) as s:
                return s.exec(
                    select(Approval).where(Approval.subject == subject, Approval.state == "pending")
                ).first()

        return _wait(found, f"a pending approval on {subject}")

    def approval(self, approval_id: int) -> Approval:
        with session_scope(self.engine) as s:
            return s.get(Approval, approval_id)

    def click(self, approval_id: int, action: str, user: str) -> httpx.Response:
        body = button_click(approval_id, action, user, CHANNEL)
        return httpx.post(
            f"http://127.0.0.1:{self.http_port}/slack/interactivity",
            content=body,
            headers=sign(SECRET, body),
            timeout=3,  # Slack's own limit
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        return axiom_cli.run(args, env | self.env, timeout=60)

    def audit(self) -> list[AuditEntry]:
        with session_scope(self.engine) as s:
            return list(s.exec(select(AuditEntry).order_by(col(AuditEntry.id))).all())

    def chain_verifies(self) -> bool:
        with session_scope(self.engine) as s:
            count, broken = verify(s)
        return count > 0 and broken is None


@pytest.fixture
def stack(tmp_path, prefect_api, monkeypatch):
    built = Stack(tmp_path, prefect_api, monkeypatch)
    yield built
    built.close()


class Run:
    """A flow called in a thread, as a served deployment would run it in its own process."""

    def __init__(self, fn: Callable, **params):
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, params), daemon=True)
        self.thread.start()

    def _run(self, fn, params):
        try:
            self.result = fn(**params)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "flow run did not finish"
        if self.error:
            raise self.error
        return self.result


@flow(name="checkpoint-probe")
def probe(ttl_seconds: float | None = None) -> dict:
    """A minimal runbook: one checkpoint, returns the decision it was allowed to act on."""
    ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else None
    decision = request_approval(
        "stream.suspend",
        "stream:acme/probe",
        {"action": "probe"},
        {"why": "test"},
        ttl=ttl,
        settings=resources.settings(),
    )
    return asdict(decision)


def run_state(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state.type.value


def wait_paused(flow_run_id: str) -> None:
    _wait(lambda: run_state(flow_run_id) == "PAUSED", "the run to pause")


def resume_by_hand(flow_run_id: str, run_input: dict) -> str:
    """What the Prefect UI's Resume form (or anyone with API access) sends."""
    with get_client(sync_client=True) as client:
        return client.resume_flow_run(UUID(flow_run_id), run_input=run_input).status.value


# ---------------------------------------------------------------- answer paths
def test_slack_click_resumes_the_run_which_holds_the_stream(stack, monkeypatch):
    made = []
    monkeypatch.setattr(resources, "make_engine", lambda url: made.append(url) or make_engine(url))
    run = Run(suspend_stream, tenant="acme", stream="marketing", reason="spam-trap hits")
    approval = stack.pending_approval("stream:acme/marketing")
    (posted,) = stack.slack.wait_for("chat.postMessage")
    assert posted.args["channel"] == CHANNEL
    assert f"/runs/flow-run/{approval.flow_run_id}|" in str(posted.args["blocks"])
    _wait(lambda: stack.approval(approval.id).slack_ts, "the message's ts to be stored")
    wait_paused(approval.flow_run_id)

    response = stack.click(approval.id, "approve", "U0ALICE")
    assert response.status_code == 200

    outcome = run.join()
    assert (outcome.outcome, outcome.decided_by) == ("held", "alice")
    assert outcome.release_with == "axiom stream set acme marketing --pool default"
    with session_scope(stack.engine) as s:
        stream = s.exec(select(Stream).where(Stream.name == "marketing")).one()
        assert s.get(IpPool, stream.pool_id).name == HOLD_POOL
    row = stack.approval(approval.id)
    assert (row.state, row.decided_via) == ("approved", "slack")
    (update,) = stack.slack.wait_for("chat.update")
    assert "*Approved* by alice via slack" in str(update.args["blocks"])
    assert "you approved" in stack.slack.wait_for("chat.postEphemeral")[0].args["text"]
    actions = [e.action for e in stack.audit()]
    assert actions[-4:] == [
        "approval.requested",
        "approval.approved",
        "pool.add",
        "stream.suspend",
    ]
    assert stack.audit()[-1].evidence["approved_by"] == "alice"
    assert stack.chain_verifies()
    assert run_state(approval.flow_run_id) == "COMPLETED"
    # Both tasks, the checkpoint and its Slack and expiry threads shared one engine.
    assert made == [stack.db_url]


def test_cli_reject_resumes_the_run_which_changes_nothing(stack):
    run = Run(suspend_stream, tenant="acme", stream="news", reason="complaint spike")
    approval = stack.pending_approval("stream:acme/news")
    wait_paused(approval.flow_run_id)

    listed = stack.cli("approvals", "--json")
    assert listed.returncode == 0, listed.stderr
    assert f'"id": {approval.id}' in listed.stdout
    answered = stack.cli(
        "approve", str(approval.id), "--as", "alice", "--reject", "--comment", "rate is normal"
    )
    assert answered.returncode == 0, answered.stderr
    assert f"approval #{approval.id} rejected by alice" in answered.stdout

    outcome = run.join()
    assert (outcome.outcome, outcome.decision) == ("not_held", "rejected")
    with session_scope(stack.engine) as s:
        assert s.exec(select(Stream).where(Stream.name == "news")).first() is None
    row = stack.approval(approval.id)
    assert (row.decided_via, row.comment) == ("cli", "rate is normal")
    update = stack.slack.wait_for("chat.update")[0]
    assert "*Rejected* by alice via cli" in str(update.args["blocks"])
    assert "stream.suspend" not in [e.action for e in stack.audit()]
    assert stack.chain_verifies()

    again = stack.cli("approve", str(approval.id), "--as", "alice")
    assert again.returncode == 3
    assert "refused (already_decided): rejected by alice via cli" in again.stderr


def test_expiry_takes_the_safe_default_and_the_run_completes(stack):
    run = Run(probe, ttl_seconds=3)
    approval = stack.pending_approval("stream:acme/probe")
    stack.slack.wait_for("chat.postMessage")
    decision = run.join(timeout=30)
    assert decision["outcome"] == "expired"
    assert decision["safe_default"] == "do_nothing_and_escalate"
    row = stack.approval(approval.id)
    assert (row.state, row.decided_by) == ("expired", None)
    expired = [e for e in stack.audit() if e.action == "approval.expired"]
    assert len(expired) == 1 and expired[0].actor == "checkpoint:expiry"
    assert "*Expired* at" in str(stack.slack.wait_for("chat.update")[0].args["blocks"])
    alerts = stack.slack.wait_for("chat.postMessage", count=2)[1:]
    assert f"No one answered approval #{approval.id}" in alerts[0].args["text"]
    # Expiry wakes the run through the answer path, not Prefect's pause timeout: not Failed.
    assert run_state(approval.flow_run_id) == "COMPLETED"
    # A click after expiry is refused and told.
    stack.click(approval.id, "approve", "U0ALICE")
    refusal = stack.slack.wait_for("chat.postEphemeral")[0].args["text"]
    assert f"Approval #{approval.id} has expired" in refusal
    assert stack.chain_verifies()


def test_prefect_resume_form_goes_through_the_same_checks(stack):
    run = Run(probe)
    approval = stack.pending_approval("stream:acme/probe")
    wait_paused(approval.flow_run_id)

    # A hand-made resume with an invented approver: Prefect accepts the input (it is
    # well-formed), the run refuses it, audits it and waits again.
    invented = {"decision": "approve", "operator": "mallory", "comment": ""}
    assert resume_by_hand(approval.flow_run_id, invented) == "ACCEPT"
    _wait(
        lambda: [e for e in stack.audit() if e.action == "approval.refused"],
        "the refusal to be audited",
    )
    wait_paused(approval.flow_run_id)
    assert stack.approval(approval.id).state == "pending"

    # A registered operator without the role: refused the same way.
    assert resume_by_hand(approval.flow_run_id, invented | {"operator": "carol"}) == "ACCEPT"
    _wait(
        lambda: len([e for e in stack.audit() if e.action == "approval.refused"]) == 2,
        "the second refusal",
    )
    wait_paused(approval.flow_run_id)

    # Input the form's schema does not allow never reaches the run: HTTP 200, status REJECT.
    refused = PrefectResumer(load_settings().prefect_api(), attempts=1)(
        approval.flow_run_id, {"decision": "maybe", "operator": "alice"}
    )
    assert (refused.accepted, refused.status) == (False, "REJECT")

    # The form, filled in by an operator allowed to answer.
    form = {"decision": "approve", "operator": "alice", "comment": "from the UI"}
    assert resume_by_hand(approval.flow_run_id, form) == "ACCEPT"
    decision = run.join()
    assert (decision["outcome"], decision["decided_by"], decision["via"]) == (
        "approved",
        "alice",
        "prefect-ui",
    )
    refusals = [e for e in stack.audit() if e.action == "approval.refused"]
    assert [(e.actor, e.evidence["reason"]) for e in refusals] == [
        ("prefect-ui:mallory", "unknown_operator"),
        ("prefect-ui:carol", "not_allowed"),
    ]
    assert "*Approved* by alice via prefect-ui" in str(
        stack.slack.wait_for("chat.update")[0].args["blocks"]
    )
    assert stack.chain_verifies()


def test_a_slack_outage_never_loses_the_checkpoint(stack):
    stack.slack.fail("unavailable", times=None)
    run = Run(probe)
    approval = stack.pending_approval("stream:acme/probe")
    stack.slack.wait_for("chat.postMessage", count=2)  # retried with back-off
    wait_paused(approval.flow_run_id)
    answered = stack.cli("approve", str(approval.id), "--as", "alice")
    assert answered.returncode == 0, answered.stderr
    assert run.join()["outcome"] == "approved"
    assert stack.approval(approval.id).slack_ts is None  # Slack never got it; nothing was lost
    assert stack.chain_verifies()


def test_a_flaky_slack_gets_the_message_after_retries_and_the_click_works(stack):
    stack.slack.fail("unavailable", times=2)
    run = Run(probe)
    approval = stack.pending_approval("stream:acme/probe")
    _wait(lambda: stack.approval(approval.id).slack_ts, "the message to be posted")
    assert len(stack.slack.calls_to("chat.postMessage")) == 3
    wait_paused(approval.flow_run_id)
    assert stack.click(approval.id, "reject", "U0ALICE").status_code == 200
    assert run.join()["outcome"] == "rejected"
    assert stack.chain_verifies()


# ---------------------------------------------------------------- helpers
def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait(probe_fn: Callable, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe_fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
