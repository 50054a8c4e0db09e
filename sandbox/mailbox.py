"""Which mailboxes exist at a simulated provider, and the mail they received (one file each).

Existence is decided by a hash of the address, so the same address is unknown every time and
on every machine; local parts starting with "unknown" never exist, for tests and scenarios.
Delivered mail lands in AXIOM_HOME/sandbox/mail/<provider>/ as one .eml per recipient, with
Return-Path, Delivered-To, Received and Authentication-Results prepended as an MDA would.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import formatdate
from pathlib import Path

ALWAYS_UNKNOWN = "unknown"
_SAFE = re.compile(r"[^a-z0-9@._+-]")
_counter = itertools.count()


def mailbox_exists(address: str, unknown_share: float) -> bool:
    local = address.partition("@")[0].lower()
    if local.startswith(ALWAYS_UNKNOWN):
        return False
    digest = hashlib.sha256(address.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 >= unknown_share


def share_of(address: str, salt: str) -> float:
    """A stable number in [0, 1) for an address and a purpose (complaints, …)."""
    digest = hashlib.sha256(f"{salt}\0{address.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class StoredMessage:
    path: Path
    provider: str
    recipient: str
    data: bytes

    @property
    def headers(self):
        return BytesHeaderParser().parsebytes(self.data)


class Mailboxes:
    def __init__(self, root: Path):
        self.root = root

    def store(self, provider: str, recipient: str, trace: list[str], data: bytes) -> Path:
        """Write one delivered copy (blocking: call it from a thread)."""
        folder = self.root / provider
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{next(_counter):06d}-{_SAFE.sub('_', recipient.lower())[:80]}.eml"
        path = folder / name
        head = "".join(line + "\r\n" for line in trace).encode()
        temp = path.with_suffix(".tmp")
        temp.write_bytes(head + data)
        temp.rename(path)
        return path

    def messages(self, provider: str | None = None) -> list[StoredMessage]:
        folders = [self.root / provider] if provider else sorted(self.root.glob("*"))
        found = []
        for folder in folders:
            for path in sorted(folder.glob("*.eml")):
                data = path.read_bytes()
                rcpt = BytesHeaderParser().parsebytes(data).get("Delivered-To", "")
                found.append(StoredMessage(path, folder.name, str(rcpt), data))
        return found

    def counts(self) -> dict[str, int]:
        return {f.name: len(list(f.glob("*.eml"))) for f in sorted(self.root.glob("*"))}


def trace_headers(
    *,
    mail_from: str,
    recipient: str,
    mx_host: str,
    helo: str,
    ip: str,
    tls: bool,
    reference: str,
    authentication: str,
) -> list[str]:
    return [
        f"Return-Path: <{mail_from}>",
        f"Delivered-To: {recipient}",
        f"Received: from {helo} ({helo} [{ip}])\r\n\tby {mx_host} with {'ESMTPS' if tls else 'ESMTP'}"
        f" id {reference}\r\n\tfor <{recipient}>; {formatdate(usegmt=True)}",
        authentication,
    ]
