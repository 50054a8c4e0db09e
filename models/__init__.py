"""SQLModel tables shared by the data plane and the control plane."""

from models.announcements import Announcement, ControlCursor
from models.audit import AuditEntry
from models.blocklists import BlocklistListing
from models.dmarc import DmarcRecord, DmarcReport
from models.domains import DkimKey, Domain, DomainState, KeyState
from models.egress import (
    IpAddress,
    IpPool,
    IpState,
    PoolKind,
    Stream,
    StreamKind,
    WarmupDay,
    WarmupPlan,
    WarmupState,
)
from models.events import (
    DeliveryEvent,
    EventKind,
    EventRollup,
    HoldReason,
    HoldTally,
    Suppression,
)
from models.incidents import Incident, IncidentEvent, IncidentState
from models.procedures import Procedure, ProcedureState, ProcedureStep
from models.protocol import Approval, Operator, Suspension
from models.sandbox_clock import SandboxClock
from models.spool import Message, Recipient, RecipientState
from models.tenancy import ClientNetwork, Credential, Tenant

__all__ = [
    "Announcement",
    "Approval",
    "AuditEntry",
    "BlocklistListing",
    "ClientNetwork",
    "ControlCursor",
    "Credential",
    "DeliveryEvent",
    "DkimKey",
    "DmarcRecord",
    "DmarcReport",
    "Domain",
    "DomainState",
    "EventKind",
    "EventRollup",
    "HoldReason",
    "HoldTally",
    "Incident",
    "IncidentEvent",
    "IncidentState",
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
    "StreamKind",
    "Suppression",
    "Suspension",
    "Tenant",
    "WarmupDay",
    "WarmupPlan",
    "WarmupState",
]
