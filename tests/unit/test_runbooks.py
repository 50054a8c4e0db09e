"""Every shipped runbook loads; a bad file is refused naming file, path and reason."""

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
            lambda t: t.replace('version: "1.0"', "version: one"),
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
