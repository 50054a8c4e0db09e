"""Every shipped runbook loads; a bad file is refused naming file, path and reason."""

import re
from pathlib import Path

import pytest

from runbooks.loader import RUNBOOK_DIR, RunbookError, load_all, load_file
from tests.conftest import VENV_BIN


def test_every_shipped_runbook_loads():
    files = sorted(RUNBOOK_DIR.glob("*.yaml"))
    loaded = load_all()
    assert len(loaded) == len(files) >= 1
    for file in files:
        assert load_file(file).id in loaded


def _copy_signing(tmp_path: Path, transform) -> Path:
    text = (RUNBOOK_DIR / "dkim-signing.yaml").read_text()
    target = tmp_path / "dkim-signing.yaml"
    target.write_text(transform(text))
    return target


@pytest.mark.parametrize(
    ("transform", "path", "reason"),
    [
        (
            lambda t: t.replace("  rsa_bits: 2048", "  rsa_bits: 2048\n  rsa_bitz: 1"),
            "dkim-signing.spec.rsa_bitz",
            "Extra inputs are not permitted",
        ),
        (
            lambda t: t.replace("rsa_bits: 2048", "rsa_bits: 1024"),
            "dkim-signing.spec.rsa_bits",
            "Input should be 2048, 3072 or 4096",
        ),
        (
            lambda t: re.sub(r'version: "[^"]*"', "version: one", t, count=1),
            "dkim-signing.version",
            "String should match pattern",
        ),
        (
            lambda t: t.replace("kind: dkim-signing", "kind: nonsense"),
            "(document)",
            "Input tag 'nonsense' found using 'kind' does not match",
        ),
    ],
)
def test_bad_file_is_refused_with_file_path_reason(tmp_path, transform, path, reason):
    bad = _copy_signing(tmp_path, transform)
    with pytest.raises(RunbookError) as exc:
        load_all(tmp_path)
    assert exc.value.file == bad
    assert exc.value.path == path
    assert exc.value.reason.startswith(reason)


@pytest.mark.integration  # the axiom CLI as a subprocess: `make test`, not test-fast
def test_cli_validate(tmp_path):
    import subprocess

    ok = subprocess.run(
        [str(VENV_BIN / "axiom"), "runbooks", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "runbook(s) valid" in ok.stdout
    _copy_signing(
        tmp_path,
        lambda t: t.replace("  canonicalization: relaxed/relaxed", "  canonicalization: loose"),
    )
    bad = subprocess.run(
        [str(VENV_BIN / "axiom"), "runbooks", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert (
        f"{tmp_path}/dkim-signing.yaml: dkim-signing.spec.canonicalization:"
        in bad.stderr.replace("\n", "")
    )


# ---------------------------------------------------------------- procedures and schedules


def test_schedule_cron_or_interval_or_off():
    from runbooks.schema_protocol import Schedule

    assert Schedule(cron="0 3 * * *").describe() == "cron 0 3 * * * UTC"
    assert Schedule(interval_seconds=900).describe() == "every 15m"
    assert Schedule(interval_seconds=86400).describe() == "every 1d"
    assert Schedule(interval_seconds=90).describe() == "every 90s"
    assert Schedule(enabled=False).describe() == "on demand"
    # Switched off, it may keep its timing so switching it back on is one word.
    kept = Schedule(enabled=False, cron="*/5 * * * *")
    assert (kept.enabled, kept.cron, kept.describe()) == (False, "*/5 * * * *", "on demand")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cron": "0 3 * * *", "interval_seconds": 60}, "give cron or interval_seconds, not both"),
        ({"enabled": False, "cron": "@daily", "interval_seconds": 60}, "not both"),
        ({}, "an enabled schedule needs cron or interval_seconds"),
        ({"enabled": True}, "an enabled schedule needs cron or interval_seconds"),
        ({"interval_seconds": 0}, "greater than or equal to 1"),
        ({"cron": "0 3 * *"}, "needs 5 fields"),
        ({"cron": "61 * * * *"}, "the minute field '61' is not within 0-59"),
        ({"cron": "0 3 * * 8"}, "the day of week field '8'"),
        ({"cron": "0 3 * foo *"}, "the month field 'foo'"),
        ({"cron": "*/0 * * * *"}, "bad step in the minute field"),
        ({"every": "day"}, "Extra inputs are not permitted"),
    ],
)
def test_schedule_refuses(fields, reason):
    from pydantic import ValidationError

    from runbooks.schema_protocol import Schedule

    with pytest.raises(ValidationError, match=reason):
        Schedule(**fields)


def test_procedure_runbooks_carry_id_version_and_schedule():
    from runbooks.loader import operator_verbs, procedures, procedures_sweep, suspend_stream

    rules = suspend_stream()
    assert (rules.id, rules.version) == ("suspend-stream", "1.0")
    assert rules.spec.checkpoint in rules.checkpoints == ["stream.suspend"]
    assert not rules.schedule.enabled and not operator_verbs().schedule.enabled
    assert set(procedures()) == {
        "suspend-stream",
        "operator-verbs",
        "procedures-sweep",
        "reactions-watch",
        "events-retention",
        "domain-onboarding",
        "dkim-rotation",
        "domain-health",
        "ip-warmup",
        "blocklist-scan",
        "blocklist-delisting",
        "degradation-triage",
    }
    assert procedures_sweep().schedule.interval_seconds == 60  # the sweep runs by itself


def _copy_procedure(tmp_path: Path, transform) -> Path:
    target = tmp_path / "suspend-stream.yaml"
    target.write_text(transform((RUNBOOK_DIR / "suspend-stream.yaml").read_text()))
    return target


@pytest.mark.parametrize(
    ("transform", "path", "reason"),
    [
        (
            lambda t: t.replace("stream.suspend", "stream.purge"),
            "suspend-stream.checkpoints.0",
            "stream.purge is not declared in checkpoints",
        ),
        (
            lambda t: t.replace("  - prefect_approval_form", "  - customer_notice"),
            "suspend-stream.templates.5",
            "no template customer_notice.j2 in en, it",
        ),
        (
            lambda t: t.replace("  enabled: false", "  enabled: true"),
            "suspend-stream.schedule",
            "Value error, an enabled schedule needs cron or interval_seconds",
        ),
        (
            lambda t: t.replace("  checkpoint: stream.suspend", "  checkpoint: stream.hold"),
            "suspend-stream",
            "Value error, spec.checkpoint stream.hold is not in checkpoints",
        ),
        (
            lambda t: t.replace("schedule:\n  enabled: false\n", ""),
            "suspend-stream.schedule",
            "Field required",
        ),
    ],
)
def test_bad_procedure_is_refused_with_file_path_reason(tmp_path, transform, path, reason):
    bad = _copy_procedure(tmp_path, transform)
    with pytest.raises(RunbookError) as exc:
        load_all(tmp_path)
    assert (exc.value.file, exc.value.path) == (bad, path)
    assert exc.value.reason.startswith(reason)


def test_runbooks_list_says_prefect_unreachable_in_the_run_columns(monkeypatch, tmp_path):
    """No traceback: the run columns say so, the reason goes to stderr; --json for scripts."""
    import json

    from typer.testing import CliRunner

    from axiom.cli import app
    from axiom.cli.app import out
    from tests.conftest import free_port

    # The console is made once per process: another test in this process may have fixed its
    # width before COLUMNS is set here (pytest-xdist runs many tests in one worker).
    monkeypatch.setattr(out, "width", 200)

    monkeypatch.setenv("AXIOM_HOME", str(tmp_path))
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("AXIOM_PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    runner = CliRunner()
    shown = runner.invoke(app, ["runbooks", "list"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.stdout.splitlines() if "suspend-stream/on-demand" in x)
    assert line.count("Prefect unreachable") == 2 and "on demand" in line
    assert "Prefect unreachable:" in shown.stderr and "Traceback" not in shown.output

    scripted = runner.invoke(app, ["runbooks", "list", "--json"])
    assert scripted.exit_code == 0
    document = json.loads(scripted.stdout)
    assert "ConnectError" in document["prefect_error"]
    rows = {r["deployment"]: r for r in document["runbooks"] if r["deployment"]}
    assert rows["suspend-stream/on-demand"]["prefect"] == "unreachable"
    assert rows["suspend-stream/on-demand"]["last_run"] is None
    data = {r["runbook"]: r for r in document["runbooks"] if not r["deployment"]}
    assert data["dkim-signing"]["schedule"] is None  # rules, not a procedure
