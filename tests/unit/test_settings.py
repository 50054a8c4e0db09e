"""Settings: environment and axiom.toml, and one clear line naming a bad setting."""

import subprocess

import pytest

from config.settings import ConfigError, load_settings
from tests.conftest import VENV_BIN


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("AXIOM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))


def test_defaults(tmp_path):
    s = load_settings()
    assert s.submission_listen == "127.0.0.1:2525"
    assert s.submission_tls_listen == "127.0.0.1:2465"
    assert s.http_listen == "127.0.0.1:8025"
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("var/axiom.db")


def test_toml_file_and_env_precedence(monkeypatch, tmp_path):
    config = tmp_path / "axiom.toml"
    config.write_text('home = "/srv/axiom"\nsubmission_listen = "0.0.0.0:587"\n')
    monkeypatch.setenv("AXIOM_CONFIG", str(config))
    monkeypatch.setenv("AXIOM_SUBMISSION_LISTEN", "127.0.0.2:2587")
    s = load_settings()
    assert str(s.home) == "/srv/axiom"
    assert s.submission_listen == "127.0.0.2:2587"  # the environment wins over the file


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AXIOM_SUBMISSION_LISTEN", "localhost", "AXIOM_SUBMISSION_LISTEN: expected HOST:PORT"),
        ("AXIOM_HTTP_LISTEN", "127.0.0.1:99999", "AXIOM_HTTP_LISTEN: port must be 1-65535"),
        ("AXIOM_DATABASE_URL", "mysql://x", "AXIOM_DATABASE_URL: only sqlite:// and postgresql://"),
        ("AXIOM_MAX_RECIPIENTS", "zero", "AXIOM_MAX_RECIPIENTS: Input should be a valid integer"),
        ("AXIOM_ENVIRONMENT", "staging", "AXIOM_ENVIRONMENT: Input should be 'sandbox' or"),
    ],
)
def test_bad_value_names_the_setting(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_unknown_setting_in_file_is_refused(monkeypatch, tmp_path):
    config = tmp_path / "axiom.toml"
    config.write_text('submision_listen = "127.0.0.1:25"\n')
    monkeypatch.setenv("AXIOM_CONFIG", str(config))
    with pytest.raises(ConfigError, match="AXIOM_SUBMISION_LISTEN: Extra inputs are not permitted"):
        load_settings()


@pytest.mark.integration  # the axiom CLI as a subprocess: `make test`, not test-fast
def test_cli_stops_with_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AXIOM_SUBMISSION_LISTEN": "nope", "AXIOM_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(VENV_BIN / "axiom"), "relay"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: AXIOM_SUBMISSION_LISTEN: expected HOST:PORT, got 'nope'")
