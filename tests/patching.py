"""The relay's library patches inside a test process, and the libraries as published to verify.

The relay installs relay/patches at start (relay.patches.install_all). A test that runs relay
code in-process installs what that code needs with `patched(...)`, which takes the patches
off again afterwards, so that the next test — or a sandbox receiver in the same process —
verifies with dkimpy as published. `published_dkimpy()` is what the tests' DKIM verifiers
run under; it checks dkimpy's namespace by where each function was defined, not by our own
table of replacements, so a patch that escaped uninstall() fails the verifier loudly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import dkim
import dkim.canonicalization

from relay import patches

# Every name relay/patches/dkimpy.py replaces, with the module dkimpy's own lives in.
DKIMPY_NAMES = (
    (dkim, "rfc822_parse", "dkim"),
    (dkim, "parse_pem_private_key", "dkim.crypto"),
    (dkim, "RSASSA_PKCS1_v1_5_sign", "dkim.crypto"),
    (dkim, "CanonicalizationPolicy", "dkim.canonicalization"),
    (dkim.canonicalization, "compress_whitespace", "dkim.canonicalization"),
    (dkim.canonicalization, "strip_trailing_whitespace", "dkim.canonicalization"),
    (dkim.canonicalization, "unfold_header_value", "dkim.canonicalization"),
)


@contextmanager
def patched(*libraries: str) -> Iterator[None]:
    """The relay's patches for the libraries named (all when none is) while inside."""
    before = set(patches.installed(*libraries))
    patches.install(*libraries)
    try:
        yield
    finally:
        added = [name for name in patches.installed(*libraries) if name not in before]
        if added:
            patches.uninstall(*added)


def assert_published_dkimpy() -> None:
    for namespace, name, home in DKIMPY_NAMES:
        found = getattr(namespace, name)
        assert found.__module__ == home, f"dkim {name} is {found.__module__}.{found.__name__}"
    assert dkim.nacl is sys.modules["nacl"], "dkim.nacl is not pynacl"


@contextmanager
def published_dkimpy() -> Iterator[None]:
    """dkimpy as published while inside, whatever this process installed before."""
    was = "dkimpy" in patches.installed("dkimpy")
    patches.uninstall("dkimpy")
    assert_published_dkimpy()
    try:
        yield
    finally:
        if was:
            patches.install("dkimpy")
