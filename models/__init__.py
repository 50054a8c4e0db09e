"""SQLModel tables shared by the data plane and the control plane."""

from models.audit import AuditEntry
from models.domains import DkimKey, Domain, DomainState, KeyState
from models.egress import IpAddress, IpPool, IpState, PoolKind, Stream, WarmupDay, WarmupPlan
from models.events import DeliveryEvent, Suppression
from models.procedures import Procedure, ProcedureState, ProcedureStep
from models.protocol import Approval, Incident, Operator, Suspension
from models.sandbox_clock import SandboxClock
from models.spool import Message, Recipient, RecipientState
from models.tenancy import ClientNetwork, Credential, Tenant

__all__ = [
    "Approval",
    "AuditEntry",
    "ClientNetwork",
    "Credential",
    "DeliveryEvent",
    "DkimKey",
    "Domain",
    "DomainState",
    "Incident",
    "IpAddress",
    "IpPool",
    "IpState",
    "KeyState",
    "Message",
    "Operator",
    "PoolKind",
    "Procedure",
    "ProcedureState",
    "ProcedureStep",
    "Recipient",
    "RecipientState",
    "SandboxClock",
    "Stream",
    "Suppression",
    "Suspension",
    "Tenant",
    "WarmupDay",
    "WarmupPlan",
]
