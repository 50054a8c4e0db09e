"""Durable procedures: where each Protocol procedure is, what it waits for, and until when.

A procedure (one run of a runbook on one subject) outlives any process: its flow run may be
suspended for weeks, the control plane stopped and started, or the run lost altogether, and
the procedure goes on from these rows (RUNBOOKS.md, "State, not memory"). `ProcedureStep`
records each step that has been done, keyed by (procedure, step), with what it returned: a
run that starts again from the top replays the recorded steps instead of doing them twice.
"""

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field


class ProcedureState:
    RUNNING = "running"  # a flow run is executing it (or was, and will be woken)
    WAITING = "waiting"  # no process: for an approval, or for a time
    FINISHED = "finished"
    FAILED = "failed"

    OPEN = (RUNNING, WAITING)


class Procedure(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)  # the flow's name, e.g. suspend-stream
    deployment: str | None = Field(default=None, max_length=128)  # "<flow>/<deployment>"
    runbook_id: str = Field(max_length=64)
    runbook_version: str = Field(max_length=32)
    subject: str = Field(default="", max_length=255)
    parameters: dict = json_field()  # what a new run needs to continue it (secrets never)
    state: str = Field(default=ProcedureState.RUNNING, max_length=16, index=True)
    waiting_for: str | None = Field(default=None, max_length=255)  # for people: "approval #7"
    approval_id: int | None = Field(default=None, foreign_key="approval.id")
    wait_key: str | None = Field(default=None, max_length=128)  # the step that waits
    wait_since: datetime | None = timestamp_field()
    wait_until: datetime | None = timestamp_field(index=True)  # a time, or the approval's expiry
    flow_run_id: str | None = Field(default=None, max_length=64, index=True)  # the latest run
    woken_at: datetime | None = timestamp_field()  # when a run was last asked to continue it
    wakes: int = 0
    outcome: dict = json_field()
    created_at: datetime = created_at_field()
    updated_at: datetime = created_at_field()
    finished_at: datetime | None = timestamp_field()


class ProcedureStep(SQLModel, table=True):
    __tablename__ = "procedure_step"
    __table_args__ = (UniqueConstraint("procedure_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    procedure_id: int = Field(foreign_key="procedure.id", index=True)
    step: str = Field(max_length=128)
    result: dict = json_field()
    flow_run_id: str | None = Field(default=None, max_length=64)
    done_at: datetime = created_at_field()
