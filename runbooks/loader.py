"""Loads and validates every runbook file; errors name the file, the field path and why."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from runbooks.schema import ClassificationRunbook, DkimSigningRunbook, ProvidersRunbook
from runbooks.schema_blocklists import (
    BlocklistDelistingRunbook,
    BlocklistScanRunbook,
    BlocklistsRunbook,
)
from runbooks.schema_delivery import DeliveryRunbook, ShapingRunbook
from runbooks.schema_domains import (
    DkimRotationRunbook,
    DnsRecordsRunbook,
    DomainHealthRunbook,
    DomainOnboardingRunbook,
)
from runbooks.schema_protocol import (
    CheckpointsRunbook,
    EventsRetentionRunbook,
    OperatorVerbsRunbook,
    ProcedureRunbook,
    ProceduresSweepRunbook,
    ReactionsWatchRunbook,
    SuspendStreamRunbook,
)
from runbooks.schema_triage import DegradationTriageRunbook
from runbooks.schema_warmup import IpWarmupRunbook

# Every kind of runbook file; `kind` picks the schema.
Runbook = Annotated[
    DkimSigningRunbook
    | ClassificationRunbook
    | ProvidersRunbook
    | DeliveryRunbook
    | ShapingRunbook
    | CheckpointsRunbook
    | OperatorVerbsRunbook
    | SuspendStreamRunbook
    | ProceduresSweepRunbook
    | ReactionsWatchRunbook
    | EventsRetentionRunbook
    | DnsRecordsRunbook
    | DomainOnboardingRunbook
    | DkimRotationRunbook
    | DomainHealthRunbook
    | IpWarmupRunbook
    | BlocklistsRunbook
    | BlocklistScanRunbook
    | BlocklistDelistingRunbook
    | DegradationTriageRunbook,
    Field(discriminator="kind"),
]

RUNBOOK_DIR = Path(__file__).parent
# What notifications/templates.py renders from: <language>/<name>.j2.
TEMPLATE_DIR = RUNBOOK_DIR / "templates"
_adapter: TypeAdapter[Runbook] = TypeAdapter(Runbook)
# libyaml's safe loader where PyYAML was built with it: the shipped runbooks in 0.03 s against
# 0.22 s, paid by every process that starts (relay, CLI command, flow run); same documents.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RunbookError(Exception):
    def __init__(self, file: Path, path: str, reason: str):
        super().__init__(f"{file}: {path}: {reason}")
        self.file, self.path, self.reason = file, path, reason


def load_file(file: Path) -> Runbook:
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=_LOADER)
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
    """Every *.yaml under directory, keyed by id; a duplicate id is an error, and so is a
    procedure naming a checkpoint kind or a template that does not exist."""
    found: dict[str, Runbook] = {}
    files: dict[str, Path] = {}
    for file in sorted(directory.glob("*.yaml")):
        runbook = load_file(file)
        if runbook.id in found:
            raise RunbookError(file, "id", f"duplicate runbook id {runbook.id!r}")
        found[runbook.id], files[runbook.id] = runbook, file
    for runbook_id, runbook in found.items():
        if isinstance(runbook, ProcedureRunbook):
            _check_references(files[runbook_id], runbook, found)
    return found


def _check_references(file: Path, runbook: ProcedureRunbook, found: dict[str, Runbook]) -> None:
    declared = found.get("checkpoints")
    if not isinstance(declared, CheckpointsRunbook):  # a directory of a few files: the shipped
        declared = load_file(RUNBOOK_DIR / "checkpoints.yaml")
    kinds = {c.kind for c in declared.spec.checkpoints}
    for n, kind in enumerate(runbook.checkpoints):
        if kind not in kinds:
            raise RunbookError(
                file, f"{runbook.id}.checkpoints.{n}", f"{kind} is not declared in checkpoints"
            )
    languages = sorted(p for p in TEMPLATE_DIR.iterdir() if p.is_dir())
    for n, name in enumerate(runbook.templates):
        missing = [lang.name for lang in languages if not (lang / f"{name}.j2").is_file()]
        if missing:
            raise RunbookError(
                file,
                f"{runbook.id}.templates.{n}",
                f"no template {name}.j2 in {', '.join(missing)}",
            )


def procedures() -> dict[str, ProcedureRunbook]:
    """The shipped runbooks that are procedures (a schedule, checkpoints, templates)."""
    return {k: v for k, v in shipped().items() if isinstance(v, ProcedureRunbook)}


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


def suspend_stream() -> SuspendStreamRunbook:
    return _typed("suspend-stream", SuspendStreamRunbook)


def procedures_sweep() -> ProceduresSweepRunbook:
    return _typed("procedures-sweep", ProceduresSweepRunbook)


def reactions_watch() -> ReactionsWatchRunbook:
    return _typed("reactions-watch", ReactionsWatchRunbook)


def events_retention() -> EventsRetentionRunbook:
    return _typed("events-retention", EventsRetentionRunbook)


def dns_records() -> DnsRecordsRunbook:
    return _typed("dns-records", DnsRecordsRunbook)


def domain_onboarding() -> DomainOnboardingRunbook:
    return _typed("domain-onboarding", DomainOnboardingRunbook)


def dkim_rotation() -> DkimRotationRunbook:
    return _typed("dkim-rotation", DkimRotationRunbook)


def domain_health() -> DomainHealthRunbook:
    return _typed("domain-health", DomainHealthRunbook)


def _typed(runbook_id: str, kind: type):
    runbook = shipped()[runbook_id]
    if not isinstance(runbook, kind):
        raise RunbookError(RUNBOOK_DIR, runbook_id, f"expected kind {kind.__name__}")
    return runbook


def ip_warmup() -> IpWarmupRunbook:
    return _typed("ip-warmup", IpWarmupRunbook)


def blocklists() -> BlocklistsRunbook:
    return _typed("blocklists", BlocklistsRunbook)


def blocklist_scan() -> BlocklistScanRunbook:
    return _typed("blocklist-scan", BlocklistScanRunbook)


def blocklist_delisting() -> BlocklistDelistingRunbook:
    return _typed("blocklist-delisting", BlocklistDelistingRunbook)


def degradation_triage() -> DegradationTriageRunbook:
    return _typed("degradation-triage", DegradationTriageRunbook)
