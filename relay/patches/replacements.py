"""Names we replace in a library's namespaces, each with the library's own, to put back."""

from __future__ import annotations

from types import ModuleType
from typing import Any


class Replacements:
    """(namespace, name, the library's own, ours) for every name a library looks up at call
    time; install() and uninstall() swap them, installed() says whether ours are in place."""

    def __init__(self, *entries: tuple[ModuleType, str, Any, Any]):
        self.entries = entries

    def install(self) -> None:
        """Idempotent."""
        for namespace, name, _, ours in self.entries:
            setattr(namespace, name, ours)

    def uninstall(self) -> None:
        """The library as published again."""
        for namespace, name, theirs, _ in self.entries:
            setattr(namespace, name, theirs)

    def installed(self) -> bool:
        return all(getattr(ns, name) is ours for ns, name, _, ours in self.entries)
