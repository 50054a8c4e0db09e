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
