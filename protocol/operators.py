"""The people who may answer checkpoints, with the roles that say which kinds (deny by default)."""

from __future__ import annotations

import re

from sqlmodel import Session, col, select

from models import (
    Operator,
)
from models.audit_trail import record
from protocol.errors import ServiceError
from runbooks.loader import checkpoints

_OPERATOR_NAME = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
_SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,31}$")


def add_operator(session: Session, name: str, roles: list[str], slack_id: str | None):
    """A person who may answer checkpoints of the kinds their roles allow (deny by default)."""

    if not _OPERATOR_NAME.match(name):
        raise ServiceError(
            f"operator name {name!r} must be lowercase letters, digits, '.', '_', '-'"
        )
    declared = checkpoints().spec.role_names
    unknown = sorted(set(roles) - declared)
    if unknown:
        raise ServiceError(
            f"role(s) {', '.join(unknown)} not declared in runbooks/checkpoints.yaml "
            f"(declared: {', '.join(sorted(declared))})"
        )
    if slack_id is not None and not _SLACK_USER_ID.match(slack_id):
        raise ServiceError(f"Slack user id {slack_id!r} must look like U0123ABCD")
    if session.exec(select(Operator).where(Operator.name == name)).first():
        raise ServiceError(f"operator {name!r} already exists")
    if slack_id is not None:
        holder = session.exec(select(Operator).where(Operator.slack_user_id == slack_id)).first()
        if holder is not None:
            raise ServiceError(f"Slack user {slack_id} already belongs to operator {holder.name}")
    operator = Operator(name=name, roles=",".join(sorted(set(roles))), slack_user_id=slack_id)
    session.add(operator)
    session.flush()
    record(
        session,
        actor="cli",
        action="operator.add",
        subject=f"operator:{name}",
        evidence={"roles": sorted(set(roles)), "slack_user_id": slack_id},
    )
    return operator


def operator_named(session: Session, name: str) -> Operator | None:
    """The registered operator with this name; None for an unknown or empty name."""
    name = name.strip()
    if not name:
        return None
    return session.exec(select(Operator).where(Operator.name == name)).first()


def permitted(session: Session, name: str, kind: str, what: str) -> tuple[Operator | None, str]:
    """The registered operator `name` when one of their roles may answer checkpoints of `kind`
    (runbooks/checkpoints.yaml, deny by default), with ""; else None and the refusal, which
    says that `what` needs one of the kind's roles."""
    allowed = set(checkpoints().spec.for_kind(kind).roles)
    needed = f"{what} needs one of the roles [{', '.join(sorted(allowed))}]"
    operator = operator_named(session, name)
    if operator is None:
        return (
            None,
            f"{name.strip()} is not a registered operator ({needed}; see `axiom operator add`)",
        )
    if not allowed & role_set(operator.roles):
        return None, f"operator {operator.name} holds roles [{operator.roles or 'none'}]; {needed}"
    return operator, ""


def role_set(roles: str) -> set[str]:
    """An operator's or a checkpoint's comma-separated roles as a set."""
    return {r.strip() for r in roles.split(",") if r.strip()}


def list_operators(session: Session) -> list[Operator]:
    return list(session.exec(select(Operator).order_by(col(Operator.name))).all())
