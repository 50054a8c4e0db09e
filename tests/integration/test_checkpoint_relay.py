"""`axiom relay` serves POST /slack/interactivity next to /healthz: verified, answered, audited."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlmodel import select

from models import AuditEntry
from models.db import make_engine, session_scope
from tests.conftest import RelayProcess
from tests.fakes.slack import button_click, sign

pytestmark = pytest.mark.integration

SECRET = "0d7c5b4a3f2e1d0c9b8a7f6e5d4c3b2a"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the wiring, not the backend
def test_the_relay_serves_slack_interactivity(axiom_home):
    relay = RelayProcess(axiom_home, {"AXIOM_SLACK_SIGNING_SECRET": SECRET}).start()
    try:
        url = f"{relay.http}/slack/interactivity"
        body = button_click(41, "approve", "U0NOBODY")
        assert httpx.post(url, content=body, timeout=10).status_code == 401
        assert httpx.get(f"{relay.http}/healthz", timeout=10).status_code == 200
        signed = httpx.post(url, content=body, headers=sign(SECRET, body), timeout=10)
        assert signed.status_code == 200
        reasons = _wait_for_refusals(axiom_home.db_url, 2)
        assert reasons == ["unsigned", "not_found"]
    finally:
        relay.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_a_signing_secret_the_relay_answers_503(relay):
    response = httpx.post(
        f"{relay.http}/slack/interactivity", content=b"payload=%7B%7D", timeout=10
    )
    assert response.status_code == 503
    assert "AXIOM_SLACK_SIGNING_SECRET" in response.text


def _wait_for_refusals(db_url: str, count: int, timeout: float = 30) -> list[str]:
    engine = make_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(engine) as s:
                rows = s.exec(
                    select(AuditEntry).where(AuditEntry.action == "approval.refused")
                ).all()
            if len(rows) >= count or time.monotonic() > deadline:
                return [r.evidence["reason"] for r in rows]
            time.sleep(0.1)
    finally:
        engine.dispose()
