"""Domain onboarding: what the customer declared, the dedicated-or-shared decision, activation.

The flow (flows/domain_onboarding.py) reads top-down; the logic is here:

- `Declared`: the stream the customer says they will send (kind, volume, days, list);
- `read_pools` → `PoolEvidence`: what the decision needs from the database (no writes);
- `decide_pool(evidence, rule)`: the Protocol's rule as a pure function (no I/O, no clock),
  tested with tables at and around every threshold (tests/unit/test_pool_decision.py);
- `choose_pool(proposal, comment, evidence)`: the approver may take the other pool by writing
  `pool=NAME` in the approval's comment; anything else in the comment is just a comment;
- `activate(...)`: one transaction writing the domain's state, its keys, its return path, the
  stream's pool binding and declared volume, each audited under the runbook.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal

from sqlmodel import Session, col, select

from models import IpAddress, IpPool, IpState, PoolKind, Stream, StreamKind
from models.audit_trail import record
from protocol import warmup
from protocol.domains import get_domain, mark_domain_active
from protocol.errors import NAME, ServiceError
from protocol.return_paths import set_return_path
from protocol.tenants import get_tenant
from runbooks.loader import ip_warmup
from runbooks.schema_domains import PoolRule

ListSource = Literal["opt_in", "double_opt_in", "customers", "imported", "purchased", "rented"]
_POOL_IN_COMMENT = re.compile(r"\bpool\s*[=:]\s*([a-z0-9][a-z0-9-]*)", re.IGNORECASE)
# IP states that send (relay/delivery/egress.py SENDING_STATES), and those that still need a
# warm-up before they carry a stream's full volume
_SENDING = {IpState.cold, IpState.warming, IpState.active}


@dataclass(frozen=True)
class Declared:
    """What the customer declared for the stream at onboarding."""

    kind: str  # StreamKind
    per_day: int
    per_month: int
    days_per_week: int
    list_source: str
    list_age_months: int

    def __post_init__(self) -> None:
        if self.kind not in StreamKind.__members__:
            raise ServiceError(
                f"stream kind {self.kind!r} must be one of {', '.join(StreamKind.__members__)}"
            )
        for name in ("per_day", "per_month", "list_age_months"):
            if getattr(self, name) < 0:
                raise ServiceError(f"{name} {getattr(self, name)} must be 0 or more")
        if not 1 <= self.days_per_week <= 7:
            raise ServiceError(f"sending days per week {self.days_per_week} must be 1 to 7")


@dataclass(frozen=True)
class PoolInfo:
    name: str
    kind: str  # dedicated | shared
    sending_ips: tuple[str, ...] = ()
    cold_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoolEvidence:
    tenant: str
    stream: str
    declared: Declared
    other_streams_per_month: int  # what the tenant's other streams declared
    pools: dict[str, PoolInfo] = field(default_factory=dict)

    @property
    def tenant_per_month(self) -> int:
        return self.other_streams_per_month + self.declared.per_month

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PoolEvidence:
        """Read back from a procedure step (JSON: tuples became lists)."""
        return cls(
            tenant=data["tenant"],
            stream=data["stream"],
            declared=Declared(**data["declared"]),
            other_streams_per_month=data["other_streams_per_month"],
            pools={
                name: PoolInfo(
                    name=pool["name"],
                    kind=pool["kind"],
                    sending_ips=tuple(pool["sending_ips"]),
                    cold_ips=tuple(pool["cold_ips"]),
                )
                for name, pool in data["pools"].items()
            },
        )


@dataclass(frozen=True)
class PoolProposal:
    pool: str
    pool_kind: str  # dedicated | shared
    fallback_pool: str | None  # where mail goes while the pool's IPs are cold or capped
    alternative: str  # the other choice, for the approver (`pool=NAME` in the comment)
    create_pool: bool  # the dedicated pool does not exist yet
    cold_ips: tuple[str, ...]  # of the chosen pool: the warm-up runbook must take them
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """label/value rows for the Slack message, the artifact and the CLI."""
        return [
            ("pool", f"{self.pool} ({self.pool_kind})"),
            ("fallback", self.fallback_pool or "none"),
            ("other choice", f"pool={self.alternative}"),
            *(("reason", r) for r in self.reasons),
            *(("warning", w) for w in self.warnings),
        ]


def decide_pool(evidence: PoolEvidence, rule: PoolRule) -> PoolProposal:
    """Dedicated only with enough regular volume; otherwise the shared pool of the kind."""
    d = evidence.declared
    shared = rule.shared_pools[d.kind]  # type: ignore[index]
    regular = d.days_per_week >= rule.regular_min_days_per_week
    enough = d.per_month >= rule.dedicated_min_per_month
    reasons: list[str] = []
    warnings: list[str] = []
    if enough and regular:
        reasons.append(
            f"{d.per_month:,} messages a month on {d.days_per_week} days a week: at least "
            f"{rule.dedicated_min_per_month:,} a month, sent regularly (≥ "
            f"{rule.regular_min_days_per_week} days a week), justifies a dedicated IP"
        )
    elif enough:
        reasons.append(
            f"{d.per_month:,} messages a month, but on {d.days_per_week} days a week (regular "
            f"is ≥ {rule.regular_min_days_per_week}): irregular volume keeps a dedicated IP "
            "cold, so shared"
        )
    else:
        reasons.append(
            f"{d.per_month:,} messages a month is under {rule.dedicated_min_per_month:,}: "
            "too little to build a dedicated IP's reputation, so shared"
        )
    dedicated_name = rule.dedicated_pool_format.format(tenant=evidence.tenant)
    separate = evidence.tenant_per_month >= rule.separate_min_per_month
    if separate and d.kind != StreamKind.mixed:
        dedicated_name = f"{dedicated_name}-{d.kind}"
        if enough and regular:
            reasons.append(
                f"the tenant declares {evidence.tenant_per_month:,} a month (≥ "
                f"{rule.separate_min_per_month:,}): {d.kind} gets a dedicated pool of its own"
            )
    elif separate:
        warnings.append(
            f"the tenant declares {evidence.tenant_per_month:,} a month (≥ "
            f"{rule.separate_min_per_month:,}): split this mixed stream into transactional and "
            "marketing, so each gets its own IPs"
        )
    if d.list_source in rule.risky_list_sources:
        warnings.append(
            f"list source {d.list_source!r}: recipients did not ask this sender for mail; "
            "expect complaints and spam traps"
        )
    if d.list_age_months > rule.stale_list_months:
        warnings.append(
            f"the list is {d.list_age_months} months old (> {rule.stale_list_months}): expect "
            "hard bounces; clean it before the first send"
        )
    if enough and regular:
        pool = evidence.pools.get(dedicated_name)
        cold = pool.cold_ips if pool else ()
        if pool is None or not pool.sending_ips:
            warnings.append(
                f"pool {dedicated_name} has no IP yet: add one (`axiom pool add-ip`); until "
                f"then its mail leaves from {shared}"
            )
        return PoolProposal(
            pool=dedicated_name,
            pool_kind="dedicated",
            fallback_pool=shared,
            alternative=shared,
            create_pool=pool is None,
            cold_ips=cold,
            reasons=tuple(reasons),
            warnings=tuple(warnings),
        )
    pool = evidence.pools.get(shared)
    return PoolProposal(
        pool=shared,
        pool_kind="shared",
        fallback_pool=None,
        alternative=dedicated_name,
        create_pool=False,
        cold_ips=pool.cold_ips if pool else (),
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def choose_pool(
    proposal: PoolProposal, comment: str | None, evidence: PoolEvidence, rule: PoolRule
) -> PoolProposal:
    """The approved proposal, or the other choice when the comment says `pool=NAME`.

    NAME may be the proposal's own pool, its alternative, or any existing pool; anything else
    is refused (ServiceError naming it), and the flow then activates nothing."""
    found = _POOL_IN_COMMENT.search(comment or "")
    if found is None:
        return proposal
    name = found.group(1).lower()
    if name == proposal.pool:
        return proposal
    shared = rule.shared_pools[evidence.declared.kind]  # type: ignore[index]
    if name != proposal.alternative and name not in evidence.pools:
        raise ServiceError(
            f"the approval names pool {name!r}, which does not exist and is not the proposed "
            f"alternative {proposal.alternative!r}"
        )
    info = evidence.pools.get(name)
    kind = info.kind if info else ("shared" if name == shared else "dedicated")
    return PoolProposal(
        pool=name,
        pool_kind=kind,
        fallback_pool=shared if kind == "dedicated" and name != shared else None,
        alternative=proposal.pool,
        create_pool=info is None,
        cold_ips=info.cold_ips if info else (),
        reasons=(f"the approver chose pool {name} (proposed: {proposal.pool})",),
        warnings=proposal.warnings,
    )


def read_pools(session: Session, tenant: str, stream: str, declared: Declared) -> PoolEvidence:
    """What decide_pool needs: every pool with its sending and cold IPs, and what the tenant's
    other streams declared. Reads only."""
    owner = get_tenant(session, tenant)
    others = session.exec(
        select(Stream).where(Stream.tenant_id == owner.id, Stream.name != stream)
    ).all()
    pools: dict[str, PoolInfo] = {}
    for pool in session.exec(select(IpPool)).all():
        ips = session.exec(select(IpAddress).where(IpAddress.pool_id == pool.id)).all()
        pools[pool.name] = PoolInfo(
            name=pool.name,
            kind=str(pool.kind),
            sending_ips=tuple(sorted(ip.address for ip in ips if ip.state in _SENDING)),
            cold_ips=tuple(sorted(ip.address for ip in ips if ip.state == IpState.cold)),
        )
    return PoolEvidence(
        tenant=tenant,
        stream=stream,
        declared=declared,
        other_streams_per_month=sum(s.declared_per_month or 0 for s in others),
        pools=pools,
    )


def activate(
    session: Session,
    *,
    tenant: str,
    domain_name: str,
    stream: str,
    declared: Declared,
    choice: PoolProposal,
    approval_id: int,
    approved_by: str,
    actor: str,
    now: datetime,
    runbook: tuple[str, str],
) -> dict:
    """The checkpoint's approved outcome, in the step's one transaction: the pool (created when
    a dedicated one is new), the stream bound to it with what was declared, the domain active
    with its keys signing and its return path in use, each audited."""
    if not NAME.match(stream):
        raise ServiceError(f"stream name {stream!r} must be lowercase letters, digits and '-'")
    owner = get_tenant(session, tenant)
    audit = {"actor": actor, "runbook_id": runbook[0], "runbook_version": runbook[1], "at": now}
    pool = session.exec(select(IpPool).where(IpPool.name == choice.pool)).first()
    if pool is None:
        pool = IpPool(name=choice.pool, kind=PoolKind(choice.pool_kind))
        session.add(pool)
        session.flush()
        record(
            session,
            action="pool.add",
            subject=f"pool:{choice.pool}",
            evidence={"kind": choice.pool_kind, "for": f"{tenant}/{stream}"},
            **audit,
        )
    fallback = None
    if choice.fallback_pool:
        fallback = session.exec(select(IpPool).where(IpPool.name == choice.fallback_pool)).first()
        if fallback is None:
            raise ServiceError(f"fallback pool {choice.fallback_pool!r} does not exist")
    row = session.exec(
        select(Stream).where(Stream.tenant_id == owner.id, Stream.name == stream)
    ).first() or Stream(tenant_id=owner.id, name=stream, pool_id=pool.id)
    before = {"pool_id": row.pool_id, "fallback_pool_id": row.fallback_pool_id} if row.id else None
    row.pool_id, row.fallback_pool_id = pool.id or 0, fallback.id if fallback else None
    row.kind, row.declared_per_day = declared.kind, declared.per_day
    row.declared_per_month, row.sending_days_per_week = declared.per_month, declared.days_per_week
    row.list_source, row.list_age_months = declared.list_source, declared.list_age_months
    row.declared_at = now
    session.add(row)
    record(
        session,
        action="stream.set",
        subject=f"stream:{tenant}/{stream}",
        evidence={
            "pool": choice.pool,
            "fallback": choice.fallback_pool,
            "before": before,
            "declared": asdict(declared),
            "approval_id": approval_id,
        },
        **audit,
    )
    domain = get_domain(session, domain_name)
    mark_domain_active(
        session,
        domain.name,
        actor,
        f"onboarding approved by {approved_by}",
        now=now,
        evidence={"approval_id": approval_id, "approved_by": approved_by, "pool": choice.pool},
        runbook=runbook,
    )
    set_return_path(session, domain.name, published=True, actor=actor, now=now)
    cold = _cold_ips(session, pool.id or 0)
    # A new sending domain warms even on a warm pool (its own caps per provider); the cold
    # IPs of the pool are the flow's to hand to the ip-warmup runbook, which asks warmup.start.
    domain_warmup = warmup.start_domain(session, domain.name, ip_warmup(), actor=actor, now=now)
    return {
        "activated": domain.name,
        "pool": choice.pool,
        "pool_kind": choice.pool_kind,
        "fallback_pool": choice.fallback_pool,
        "cold_ips": cold,
        "domain_warmup": domain_warmup,
    }


def _cold_ips(session: Session, pool_id: int) -> list[str]:
    return sorted(
        session.exec(
            select(IpAddress.address).where(
                IpAddress.pool_id == pool_id, col(IpAddress.state) == IpState.cold
            )
        ).all()
    )
