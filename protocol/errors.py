"""What every control-plane action shares: how a refusal reads and who an action is by."""

from __future__ import annotations

import re

# Names an operator types: tenants, pools, streams.
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DOMAIN_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class ServiceError(Exception):
    """A refused control-plane action; the message names the bad value."""


def operator_actor(operator: str | None) -> str:
    return f"operator:{operator}" if operator else "cli"
