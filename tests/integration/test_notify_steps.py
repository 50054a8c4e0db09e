"""The notify step of the operator verbs: after an approved pause the flow tells the tenant (or
says why it could not) as a step of its own, and a notice that cannot be sent never fails it."""

from __future__ import annotations

import pytest
from sqlmodel import select

from flows.operator_verbs import pause_tenant
from models import AuditEntry, ProcedureStep, Tenant
from models.db import session_scope
from protocol import tenants
from tests.integration.test_checkpoint_prefect import (  # noqa: F401  (fixtures)
    Run,
    prefect_api,
    stack,
    wait_paused,
)

pytestmark = pytest.mark.integration


def test_an_approved_pause_notifies_as_its_own_step_and_an_unsent_notice_is_reported(stack):  # noqa: F811
    with session_scope(stack.engine) as s:
        tenants.set_tenant(s, "acme", contact="ops@acme.example", language="en")
        s.commit()
    run = Run(pause_tenant, tenant="acme", reason="complaint spike")
    approval = stack.pending_approval("tenant:acme")
    wait_paused(approval.flow_run_id)
    assert stack.click(approval.id, "approve", "U0ALICE").status_code == 200

    outcome = run.join()
    assert (outcome.outcome, outcome.decided_by) == ("done", "alice")
    notice = outcome.detail["notice"]
    # This home has no notice sender (no `axiom init`): the pause stands, the step says why.
    assert (notice["sent"], notice["reason"], notice["to"], notice["in_language"]) == (
        False,
        "no_sender",
        "ops@acme.example",
        "en",
    )
    assert "run axiom init" in notice["said"]
    with session_scope(stack.engine) as s:
        assert s.exec(select(Tenant).where(Tenant.name == "acme")).one().paused
        actions = [e.action for e in s.exec(select(AuditEntry)).all()]
        steps = {row.step: row.result for row in s.exec(select(ProcedureStep)).all()}
    assert list(steps)[-2:] == ["act", "notify"]
    assert steps["notify"] == notice  # recorded once: a run started again replays it
    assert "tenant.pause" in actions and "notice.sent" not in actions
