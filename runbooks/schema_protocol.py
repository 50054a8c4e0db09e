"""Typed shape of the human checkpoints: who may answer each kind, how long it waits, what then.

Declared the way StackStorm declares `core.ask`: a checkpoint is an ordinary step with the
roles allowed to answer, a time to live, and a safe default taken when no one answers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runbooks.schema import RunbookBase, Strict

# What the checkpoint does when its time to live runs out. Never "approve": silence is not
# consent (DESIGN principle 3); "escalate" also posts an alert so a person picks it up.
SafeDefault = Literal["do_nothing", "do_nothing_and_escalate"]

ROLE_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"


class Role(Strict):
    name: str = Field(pattern=ROLE_PATTERN)
    description: str


class Checkpoint(Strict):
    kind: str = Field(
        pattern=r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$",
        description="noun.verb, e.g. stream.suspend; also the Approval row's kind",
    )
    title: str
    description: str = ""
    # Who may answer; an operator needs at least one of these roles (deny by default).
    roles: list[str] = Field(min_length=1)
    ttl_seconds: int = Field(ge=60, le=7 * 86400)
    safe_default: SafeDefault


class CheckpointsSpec(Strict):
    roles: list[Role] = Field(min_length=1)
    checkpoints: list[Checkpoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointsSpec:
        names = [r.name for r in self.roles]
        if len(names) != len(set(names)):
            raise ValueError("role names must be unique")
        kinds = [c.kind for c in self.checkpoints]
        if len(kinds) != len(set(kinds)):
            raise ValueError("checkpoint kinds must be unique")
        for checkpoint in self.checkpoints:
            unknown = sorted(set(checkpoint.roles) - set(names))
            if unknown:
                raise ValueError(
                    f"checkpoint {checkpoint.kind}: roles {', '.join(unknown)} are not declared"
                )
        return self

    def for_kind(self, kind: str) -> Checkpoint:
        for checkpoint in self.checkpoints:
            if checkpoint.kind == kind:
                return checkpoint
        raise KeyError(f"no checkpoint of kind {kind!r} is declared in runbooks/checkpoints.yaml")

    @property
    def role_names(self) -> set[str]:
        return {r.name for r in self.roles}


class CheckpointsRunbook(RunbookBase):
    kind: Literal["checkpoints"]
    spec: CheckpointsSpec


# --- the operator verbs (runbooks/operator-verbs.yaml, read by protocol/verbs.py) --------


class OperatorVerb(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$", description="noun.verb")
    command: str = Field(description="The CLI command an operator types")
    flow: str = Field(pattern=r"^[a-z][a-z0-9-]+$", description="The Prefect flow's name")
    checkpoint: str = Field(description="The checkpoint kind whose roles may do it")
    wakes: bool = Field(description="Whether it wakes the mail the lifted state postponed")
    description: str


class OperatorVerbsSpec(Strict):
    # The relay re-reads egress state (pools, bindings, IP states, suspensions) at most this
    # long after a change (relay/delivery/egress.py, Egress ttl). Mail woken sooner could be
    # claimed against the old snapshot and postponed again for capped_wait_seconds.
    wake_after_seconds: float = Field(
        ge=0,
        le=60,
        description="Woken mail falls due this long after the change (the egress snapshot's age)",
    )
    verbs: list[OperatorVerb] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> OperatorVerbsSpec:
        names = [v.name for v in self.verbs]
        if len(names) != len(set(names)):
            raise ValueError("verb names must be unique")
        return self

    def verb(self, name: str) -> OperatorVerb:
        for verb in self.verbs:
            if verb.name == name:
                return verb
        raise KeyError(f"no operator verb {name!r} in runbooks/operator-verbs.yaml")


class OperatorVerbsRunbook(RunbookBase):
    kind: Literal["operator-verbs"]
    spec: OperatorVerbsSpec
