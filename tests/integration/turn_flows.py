"""The control plane's load on SQLite's write turn (models/db.py), served by its own runner for
tests/integration/test_sqlite_turns.py: every deployment `axiom flows serve` serves (the
scheduled ones run on their schedules) and two flows shaped like degradation triage's.

- turn-detect: a detection cycle as it stood on 7 December 06:39, when every SQLite writer of
  every process timed out for a minute: its session reads (and so holds the write turn), then
  reads the signals on a connection of its own from the engine (`session.get_bind()`, as that
  version of protocol/triage.signals_for_all did: `signals.rolled_until` first), then writes
  the incident and commits.
- turn-respond: a respond procedure (flows/procedure.py): a few short steps, then it suspends
  until its verification (sleep_until), as degradation-triage/respond does after lower_rate.

Run as `python -m tests.integration.turn_flows` from the checkout's root; it prints
"flows ready" like `axiom flows serve`.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from prefect import flow
from sqlmodel import func, select

from flows import resources
from flows.procedure import ProcedureId, procedure
from models import AuditEntry, DeliveryEvent
from models.audit_trail import record
from models.db import session_scope
from protocol import signals

RUNBOOK = SimpleNamespace(id="test-turns", version="1")


@flow(name="turn-detect")
def turn_detect() -> dict:
    """Read in the cycle's session, read the signals beside it, write the finding."""
    engine = resources.engine_for(resources.settings())
    with session_scope(engine) as session:
        entries = session.exec(select(func.count()).select_from(AuditEntry)).one()
        with session.get_bind().connect() as conn:  # the signals' own connection
            rolled = signals.rolled_until(conn)
            events = conn.execute(select(func.count()).select_from(DeliveryEvent)).scalar()
        record(
            session,
            actor="flow:turn-detect",
            action="test.detected",
            subject="test:turns",
            evidence={"entries": entries, "events": events, "rolled": str(rolled)},
        )
        session.commit()
    return {"entries": entries, "events": events}


@flow(name="turn-respond")
def turn_respond(n: int = 0, procedure_id: ProcedureId = None) -> dict:
    """Three short steps, then wait an hour for the verification (the run suspends)."""
    with procedure(RUNBOOK, subject=f"test:respond-{n}", procedure_id=procedure_id) as p:  # type: ignore[arg-type]
        p.step("read", lambda s: {"entries": s.exec(select(func.count(AuditEntry.id))).one()})
        p.step("act", lambda s: _act(s, n, p.actor))
        p.step("note", lambda s: _act(s, n, p.actor, "test.noted"))
        p.sleep_until("verify-wait", p.now() + timedelta(hours=1), waiting_for="verifying")
        p.finish({"n": n})
        return {"n": n}


def _act(session, n: int, actor: str, action: str = "test.acted") -> dict:
    entry = record(session, actor=actor, action=action, subject=f"test:respond-{n}")
    session.flush()
    return {"entry": entry.id}


if __name__ == "__main__":
    from axiom.cli.processes import serve_flows

    # As `axiom flows serve`, with this module's two flows beside the Protocol's. They are taken
    # from this module by its name, not as __main__, so that a run forked from the server that
    # preloaded the flows' modules (axiom/flow_runs.py) finds them there.
    from tests.integration import turn_flows as this

    serve_flows([(this.turn_detect, "test"), (this.turn_respond, "test")])
