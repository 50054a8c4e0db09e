"""Our changes to dkimpy, aiosmtpd and aiosmtplib: one module per library, installed at start.

Nothing here changes a library when it is imported. The relay's entry points (relay.service)
call install_all(), which first checks that each library's installed version is one its
module was tested with, then installs. A process that never calls it (the sandbox world, a
test's DKIM verifier) runs the libraries as published.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType


class PatchVersionError(RuntimeError):
    """An installed library is not a version its patch module was tested with."""


LIBRARIES = ("dkimpy", "aiosmtpd", "aiosmtplib")  # one module of this package each


def _modules(libraries: tuple[str, ...]) -> list[ModuleType]:
    from relay.patches import aiosmtpd, aiosmtplib, dkimpy

    by_name = {m.DISTRIBUTION: m for m in (dkimpy, aiosmtpd, aiosmtplib)}
    return [by_name[name] for name in libraries or LIBRARIES]


def check_versions(*libraries: str) -> None:
    """Raise PatchVersionError (one line) for the first library outside its tested range."""
    from packaging.specifiers import SpecifierSet  # ~50 ms: only when a relay starts

    for module in _modules(libraries):
        version = metadata.version(module.DISTRIBUTION)
        if not SpecifierSet(module.TESTED).contains(version, prereleases=True):
            path = module.__name__.replace(".", "/") + ".py"
            raise PatchVersionError(
                f"{module.DISTRIBUTION} {version} is not a version {path} was tested with "
                f"({module.TESTED})"
            )


def install(*libraries: str) -> None:
    """Check the versions of the libraries named (all when none is), then install their
    patch modules. Idempotent."""
    check_versions(*libraries)
    for module in _modules(libraries):
        module.install()


def uninstall(*libraries: str) -> None:
    """The libraries named (all when none is) as published again; for tests that installed
    patches in their own process and must not leave them to the next test."""
    for module in _modules(libraries):
        module.uninstall()


def installed(*libraries: str) -> list[str]:
    """Which of the libraries named (all when none is) are patched now."""
    return [m.DISTRIBUTION for m in _modules(libraries) if m.installed()]


def install_all() -> None:
    """What the relay calls at start: every library checked, every patch installed."""
    install()


def uninstall_all() -> None:
    """Every library as published again (tests that installed in their own process)."""
    uninstall()


def install_all_or_exit() -> None:
    """install_all() for a process's entry point: a version mismatch ends the process with
    one line on stderr (exit status 1) instead of a traceback."""
    try:
        install_all()
    except PatchVersionError as exc:
        raise SystemExit(f"error: {exc}") from None
