"""Which mailboxes exist at a simulated provider, and the mail they received (one file each).

Existence is decided by a hash of the address, so the same address is unknown every time and
on every machine; local parts starting with "unknown" never exist, for tests and scenarios.
Delivered mail lands in AXIOM_HOME/sandbox/mail/<provider>/ (the inbox) or its spam/ folder
(sandbox/placement.py decides) as one .eml per recipient, with Return-Path, Delivered-To,
Received, Authentication-Results and X-Sandbox-Folder prepended as an MDA would.
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
SPAM_FOLDER = "spam"  # under the provider's folder, which is the inbox (as Maildir's INBOX is)
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
    folder: str = "inbox"

    @property
    def headers(self):
        return BytesHeaderParser().parsebytes(self.data)


class Mailboxes:
    def __init__(self, root: Path):
        self.root = root

    def store(
        self, provider: str, recipient: str, trace: list[str], data: bytes, folder: str = "inbox"
    ) -> Path:
        """Write one delivered copy to the inbox or the spam folder (blocking: call it from a
        thread)."""
        folder = self._folder(provider, folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{next(_counter):06d}-{_SAFE.sub('_', recipient.lower())[:80]}.eml"
        path = folder / name
        head = "".join(line + "\r\n" for line in trace).encode()
        temp = path.with_suffix(".tmp")
        temp.write_bytes(head + data)
        temp.rename(path)
        return path

    def _folder(self, provider: str, folder: str) -> Path:
        if folder not in ("inbox", SPAM_FOLDER):
            raise ValueError(f"unknown folder {folder!r}")
        return self.root / provider if folder == "inbox" else self.root / provider / SPAM_FOLDER

    def messages(
        self, provider: str | None = None, folder: str | None = None
    ) -> list[StoredMessage]:
        """Stored copies, inbox and spam folder alike unless `folder` says which."""
        providers = [provider] if provider else [p.name for p in self._providers()]
        found = []
        for name in providers:
            for box in [folder] if folder else ["inbox", SPAM_FOLDER]:
                for path in sorted(self._folder(name, box).glob("*.eml")):
                    data = path.read_bytes()
                    rcpt = BytesHeaderParser().parsebytes(data).get("Delivered-To", "")
                    found.append(StoredMessage(path, name, str(rcpt), data, box))
        return found

    def counts(self) -> dict[str, int]:
        """Copies kept per provider, inbox and spam folder together."""
        return {name: sum(by.values()) for name, by in self.folder_counts().items()}

    def folder_counts(self) -> dict[str, dict[str, int]]:
        return {
            p.name: {
                box: len(list(self._folder(p.name, box).glob("*.eml")))
                for box in ("inbox", SPAM_FOLDER)
            }
            for p in self._providers()
        }

    def _providers(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*") if p.is_dir())


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
    folder: str = "",
) -> list[str]:
    """The lines an MDA prepends; `folder` is the X-Sandbox-Folder line (sandbox/placement.py)."""
    return [
        f"Return-Path: <{mail_from}>",
        f"Delivered-To: {recipient}",
        f"Received: from {helo} ({helo} [{ip}])\r\n\tby {mx_host} with {'ESMTPS' if tls else 'ESMTP'}"
        f" id {reference}\r\n\tfor <{recipient}>; {formatdate(usegmt=True)}",
        authentication,
        *filter(None, [folder]),
    ]
