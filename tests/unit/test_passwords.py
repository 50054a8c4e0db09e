"""Generated credential passwords: strong, and safe to paste into a command line."""

from __future__ import annotations

from unittest import mock

from relay.submission import auth


def test_a_password_never_starts_with_a_dash():
    drawn = iter(["-looks-like-an-option-xyz", "Zk3v9Qq0x-_AbCdEfGhIjKlM"])
    with mock.patch.object(auth.secrets, "token_urlsafe", side_effect=lambda n: next(drawn)):
        assert auth.generate_password() == "Zk3v9Qq0x-_AbCdEfGhIjKlM"


def test_passwords_are_long_random_and_verify_against_their_hash():
    passwords = {auth.generate_password() for _ in range(200)}
    assert len(passwords) == 200
    assert all(len(p) == 24 and not p.startswith("-") for p in passwords)
    one = next(iter(passwords))
    stored = auth.hash_password(one)
    assert auth.verify_password(stored, one)
    assert not auth.verify_password(stored, one + "x")


def test_the_product_hashes_with_the_rfc_9106_low_memory_profile():
    """What `axiom credential add` stores: argon2id, 64 MiB, 3 passes, 4 lanes. The tests'
    seeded tenants use the smallest cost instead (testbed/axiom.py, fast_password_hash), which
    the relay verifies with the parameters the hash carries."""
    from argon2 import extract_parameters
    from argon2.profiles import RFC_9106_LOW_MEMORY

    from testbed.axiom import fast_password_hash

    stored = extract_parameters(auth.hash_password("order-confirmations"))
    assert (stored.type.name, stored.memory_cost, stored.time_cost, stored.parallelism) == (
        "ID",
        RFC_9106_LOW_MEMORY.memory_cost,
        RFC_9106_LOW_MEMORY.time_cost,
        RFC_9106_LOW_MEMORY.parallelism,
    )
    seeded = fast_password_hash("order-confirmations")
    assert extract_parameters(seeded).memory_cost == 1024
    assert auth.verify_password(seeded, "order-confirmations")
    assert not auth.verify_password(seeded, "order-confirmation")
