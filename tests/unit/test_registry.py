"""The registry of procedures: every deployment from a runbook with id, version and schedule."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.schedules import Cron
from sqlmodel import select

from flows import resources
from flows.deployments import deployments
from flows.registry import Procedure, prefect_schedules, procedures
from models import Approval, AuditEntry
from models import Procedure as ProcedureRow
from models.db import session_scope
from protocol import egress, tenants
from runbooks.loader import procedures as procedure_runbooks
from runbooks.loader import procedures_sweep, suspend_stream
from runbooks.schema_protocol import ProcedureRunbook, Schedule


def test_every_procedure_is_governed_by_a_runbook_with_id_and_version():
    registered = procedures()
    names = [p.deployment_name for p in registered]
    assert len(names) == len(set(names))
    for procedure in registered:
        rules = procedure.runbook()
        assert isinstance(rules, ProcedureRunbook)
        assert rules.id and rules.version
    # and every procedure runbook shipped has a deployment
    assert {p.runbook().id for p in registered} == set(procedure_runbooks())


def test_every_deployment_is_built_from_the_registry_with_described_parameters():
    built = deployments()
    assert [f"{d.flow_name}/{d.name}" for d in built] == [p.deployment_name for p in procedures()]
    for deployment, procedure in zip(built, procedures(), strict=True):
        rules = procedure.runbook()
        assert deployment.version == f"{rules.id}-{rules.version}"
        assert deployment.description
        fields = deployment._parameter_openapi_schema.properties
        assert fields or rules.schedule.enabled, deployment.name  # only a schedule needs no form
        undescribed = [name for name, f in fields.items() if not f.get("description")]
        assert not undescribed, f"{procedure.deployment_name}: {undescribed}"
        expected = rules.schedule.enabled and procedure.scheduled
        assert bool(deployment.schedules) == expected, deployment.name
    sweep = next(d for d in built if d.flow_name == "procedures-sweep")
    (every,) = sweep.schedules
    assert every.schedule.interval == timedelta(
        seconds=procedures_sweep().schedule.interval_seconds
    )
    assert "suspend-stream/on-demand" in {p.deployment_name for p in procedures()}
    # a runbook may have a scheduled deployment and an on-demand one
    rotation = {d.name: bool(d.schedules) for d in built if d.flow_name == "dkim-rotation"}
    assert rotation == {"scheduled": True, "on-demand": False}


def test_schedules_map_to_prefect_schedule_objects():
    assert prefect_schedules(Schedule(enabled=False, cron="0 3 * * *")) == []
    (cron,) = prefect_schedules(Schedule(cron="0 3 * * 1-5"))
    assert (cron.cron, cron.timezone, cron.interval) == ("0 3 * * 1-5", "UTC", None)
    (every,) = prefect_schedules(Schedule(interval_seconds=900))
    assert (every.interval, every.cron) == (timedelta(minutes=15), None)


def test_a_scheduled_runbook_becomes_a_scheduled_deployment():
    """No shipped procedure is scheduled yet; the registry must carry one when it is."""
    from flows.suspend_stream import suspend_stream as flow

    for schedule, kind, field, value in [
        (Schedule(cron="*/10 * * * *"), CronSchedule, "cron", "*/10 * * * *"),
        (Schedule(interval_seconds=3600), IntervalSchedule, "interval", timedelta(hours=1)),
    ]:
        rules = suspend_stream().model_copy(update={"schedule": schedule})
        deployment = Procedure("scheduled", flow, lambda r=rules: r, "test").deployment()
        (created,) = deployment.schedules
        assert isinstance(created.schedule, kind)
        assert getattr(created.schedule, field) == value
        assert created.active


@pytest.mark.parametrize(
    "expression",
    ["0 3 * * *", "*/5 * * * *", "0 0 1 jan *", "15 8-18/2 * * mon-fri", "@daily", "0 0 * * 7"],
)
def test_what_the_runbook_schema_accepts_prefect_accepts(expression):
    Schedule(cron=expression)
    assert Cron(expression).cron == expression  # Prefect's own check (croniter) agrees


def test_suspend_stream_asks_and_audits_under_its_own_runbook(
    engine, db_url, monkeypatch, tmp_path
):
    """The approval row and its audit entry name suspend-stream and its version."""
    import flows.checkpoint
    import flows.suspend_stream as module

    class Stop(Exception):
        """Ends the run right after the approval is recorded, before the pause."""

    def stop():
        raise Stop

    with session_scope(engine) as s:
        egress.ensure_default_pool(s)
        tenants.add_tenant(s, "acme")
        s.commit()
    run_id = uuid.uuid4()
    monkeypatch.setenv("AXIOM_HOME", str(tmp_path))
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("AXIOM_DATABASE_URL", db_url)
    resources.forget()  # the flow reads its settings from this environment
    monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test"))
    context = SimpleNamespace(
        flow=SimpleNamespace(name="suspend-stream"),
        flow_run=SimpleNamespace(id=run_id, deployment_id=None, parameters={"tenant": "acme"}),
    )
    monkeypatch.setattr(flows.checkpoint.FlowRunContext, "get", classmethod(lambda cls: context))
    monkeypatch.setattr(flows.checkpoint, "get_run_logger", stop)
    try:
        with pytest.raises(Stop):
            module.suspend_stream.fn("acme", "marketing", "spam-trap hits")
    finally:
        resources.forget()
    with session_scope(engine) as s:
        approval = s.exec(select(Approval)).one()
        entry = s.exec(select(AuditEntry).where(AuditEntry.action == "approval.requested")).one()
    assert (approval.kind, approval.flow_run_id) == ("stream.suspend", str(run_id))
    assert (approval.runbook_id, approval.runbook_version) == ("suspend-stream", "1.0")
    assert (entry.runbook_id, entry.runbook_version) == ("suspend-stream", "1.0")
    with session_scope(engine) as s:
        (procedure,) = s.exec(select(ProcedureRow)).all()
    assert (procedure.name, procedure.flow_run_id) == ("suspend-stream", str(run_id))
    assert (procedure.runbook_id, procedure.parameters) == ("suspend-stream", {"tenant": "acme"})
