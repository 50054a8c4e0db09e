"""How long each test module took, so that `make test` starts the longest first.

`make test` hands whole modules to its workers (`--dist loadfile`: a module's fixtures — its
Prefect server, its sandbox world, the warm-up month — are set up once, on one worker), in
the order of the collection (`--no-loadscope-reorder`). tests/conftest.py orders the
collection by the seconds recorded in tests/durations.json, longest first: the classic rule
for finishing a set of jobs on a few machines early, since a 200-second module started last
would leave the other workers idle behind it. A module missing from the file (a new one)
counts as 0 s and runs among the short ones until the file is refreshed:

    .venv/bin/pytest -n 3 --dist loadfile --junitxml=/tmp/junit.xml
    .venv/bin/python -m tests.durations /tmp/junit.xml > tests/durations.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

FILE = Path(__file__).with_name("durations.json")


def load() -> dict[str, float]:
    """Module path (tests/…/test_x.py) -> seconds; empty when the file is missing."""
    try:
        return json.loads(FILE.read_text())
    except FileNotFoundError:
        return {}


def from_junit(path: Path) -> dict[str, float]:
    """Seconds per module (setup, call and teardown of its tests) from pytest's junit XML."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(path).iter("testcase"):
        module = case.get("classname", "").split(".")
        while module and not module[-1].startswith("test_"):
            module.pop()  # a test class's name
        if module:
            seconds["/".join(module) + ".py"] += float(case.get("time", 0))
    return {m: round(s, 1) for m, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    json.dump(from_junit(Path(sys.argv[1])), sys.stdout, indent=1)
    sys.stdout.write("\n")
