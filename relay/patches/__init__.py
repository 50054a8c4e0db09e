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


def _modules() -> list[ModuleType]:
    from relay.patches import aiosmtpd, aiosmtplib, dkimpy

    return [dkimpy, aiosmtpd, aiosmtplib]


def check_versions() -> None:
    """Raise PatchVersionError (one line) for the first library outside its tested range."""
    for module in _modules():
        version = metadata.version(module.DISTRIBUTION)
        if not module.TESTED.contains(version, prereleases=True):
            path = module.__name__.replace(".", "/") + ".py"
            raise PatchVersionError(
                f"{module.DISTRIBUTION} {version} is not a version {path} was tested with "
                f"({module.TESTED})"
            )


def install_all() -> None:
    """Check every library's version, then install every patch module. Idempotent."""
    check_versions()
    for module in _modules():
        module.install()


def uninstall_all() -> None:
    """Every library as published again (for tests that installed in their own process)."""
    for module in _modules():
        module.uninstall()


def install_all_or_exit() -> None:
    """install_all() for a process's entry point: a version mismatch ends the process with
    one line on stderr (exit status 1) instead of a traceback."""
    try:
        install_all()
    except PatchVersionError as exc:
        raise SystemExit(f"error: {exc}") from None
