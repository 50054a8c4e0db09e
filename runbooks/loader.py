"""Loads and validates every runbook file; errors name the file, the field path and why."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from runbooks.schema import ClassificationRunbook, DkimSigningRunbook, ProvidersRunbook
from runbooks.schema_delivery import DeliveryRunbook, ShapingRunbook
from runbooks.schema_protocol import CheckpointsRunbook, OperatorVerbsRunbook

# Every kind of runbook file; `kind` picks the schema.
Runbook = Annotated[
    DkimSigningRunbook
    | ClassificationRunbook
    | ProvidersRunbook
    | DeliveryRunbook
    | ShapingRunbook
    | CheckpointsRunbook
    | OperatorVerbsRunbook,
    Field(discriminator="kind"),
]

RUNBOOK_DIR = Path(__file__).parent
_adapter: TypeAdapter[Runbook] = TypeAdapter(Runbook)


class RunbookError(Exception):
    def __init__(self, file: Path, path: str, reason: str):
        super().__init__(f"{file}: {path}: {reason}")
        self.file, self.path, self.reason = file, path, reason


def load_file(file: Path) -> Runbook:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(document)"
        raise RunbookError(file, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RunbookError(file, "(document)", "must be a mapping with kind, id, version, spec")
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "(document)"
        raise RunbookError(file, path, err["msg"]) from None


def load_all(directory: Path = RUNBOOK_DIR) -> dict[str, Runbook]:
    """Every *.yaml under directory, keyed by id; a duplicate id is an error."""
    found: dict[str, Runbook] = {}
    for file in sorted(directory.glob("*.yaml")):
        runbook = load_file(file)
        if runbook.id in found:
            raise RunbookError(file, "id", f"duplicate runbook id {runbook.id!r}")
        found[runbook.id] = runbook
    return found


@cache
def shipped() -> dict[str, Runbook]:
    """The runbooks shipped with this version, loaded once per process."""
    return load_all()


def dkim_signing() -> DkimSigningRunbook:
    return _typed("dkim-signing", DkimSigningRunbook)


def delivery() -> DeliveryRunbook:
    return _typed("delivery", DeliveryRunbook)


def shaping() -> ShapingRunbook:
    return _typed("shaping", ShapingRunbook)


def checkpoints() -> CheckpointsRunbook:
    return _typed("checkpoints", CheckpointsRunbook)


def operator_verbs() -> OperatorVerbsRunbook:
    return _typed("operator-verbs", OperatorVerbsRunbook)


def _typed(runbook_id: str, kind: type):
    runbook = shipped()[runbook_id]
    if not isinstance(runbook, kind):
        raise RunbookError(RUNBOOK_DIR, runbook_id, f"expected kind {kind.__name__}")
    return runbook
