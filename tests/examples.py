"""How many examples a hypothesis property runs: its full count in `make test`, a tenth of it
(at least 2) in `make test-fast`, which sets AXIOM_TEST_FAST=1 to stay under a minute.

    @settings(max_examples=examples(3000), deadline=None)

The properties and their assertions are the same in both; only the sample is smaller.
"""

from __future__ import annotations

import os

FAST = os.environ.get("AXIOM_TEST_FAST") == "1"


def examples(full: int) -> int:
    return max(2, full // 10) if FAST else full
