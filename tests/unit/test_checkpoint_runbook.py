"""Checkpoint declarations and operators: typed, validated, deny by default."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from sqlmodel import select

from config.settings import ConfigError, load_settings
from models import AuditEntry, Operator
from protocol.errors import ServiceError
from protocol.operators import add_operator
from runbooks.loader import RUNBOOK_DIR, checkpoints, load_file
from runbooks.schema_protocol import CheckpointsSpec


def spec(**changes) -> dict:
    base = {
        "roles": [{"name": "deliverability", "description": "d"}],
        "checkpoints": [
            {
                "kind": "stream.suspend",
                "title": "t",
                "roles": ["deliverability"],
                "ttl_seconds": 3600,
                "safe_default": "do_nothing",
            }
        ],
    }
    return base | changes


def test_shipped_declarations_load_and_never_default_to_approval():
    runbook = checkpoints()
    assert load_file(RUNBOOK_DIR / "checkpoints.yaml") == runbook
    suspend = runbook.spec.for_kind("stream.suspend")
    assert suspend.roles and suspend.ttl_seconds >= 60
    for checkpoint in runbook.spec.checkpoints:
        assert checkpoint.safe_default.startswith("do_nothing")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"checkpoints": [spec()["checkpoints"][0] | {"roles": ["admin"]}]},
            "roles admin are not declared",
        ),
        (
            {"checkpoints": [spec()["checkpoints"][0] | {"safe_default": "approve"}]},
            "Input should be 'do_nothing' or 'do_nothing_and_escalate'",
        ),
        ({"checkpoints": spec()["checkpoints"] * 2}, "checkpoint kinds must be unique"),
        (
            {"checkpoints": [spec()["checkpoints"][0] | {"roles": []}]},
            "List should have at least 1 item",
        ),
        (
            {"checkpoints": [spec()["checkpoints"][0] | {"ttl_seconds": 5}]},
            "greater than or equal to 60",
        ),
        (
            {"checkpoints": [spec()["checkpoints"][0] | {"who": ["anyone"]}]},
            "Extra inputs are not permitted",
        ),
    ],
)
def test_bad_declarations_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        CheckpointsSpec.model_validate(spec(**changes))


def test_an_undeclared_kind_is_an_error_not_a_default():
    with pytest.raises(KeyError, match=r"no checkpoint of kind 'pool\.delete'"):
        checkpoints().spec.for_kind("pool.delete")


def test_operators_are_validated_and_audited(session):
    add_operator(session, "alice", ["deliverability", "lead"], "U0ALICE")
    session.commit()
    row = session.exec(select(Operator).where(Operator.name == "alice")).one()
    assert (row.roles, row.slack_user_id) == ("deliverability,lead", "U0ALICE")
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "operator.add")).one()
    assert entry.evidence == {"roles": ["deliverability", "lead"], "slack_user_id": "U0ALICE"}
    for args, message in [
        (("bob", ["approver"], None), r"role\(s\) approver not declared"),
        (("bob", ["lead"], "alice"), "must look like U0123ABCD"),
        (("bob", ["lead"], "U0ALICE"), "already belongs to operator alice"),
        (("alice", ["lead"], None), "already exists"),
        (("Bob Smith", ["lead"], None), "must be lowercase"),
    ]:
        with pytest.raises(ServiceError, match=message):
            add_operator(session, *args)


def test_slack_and_prefect_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="AXIOM_SLACK_API_URL: expected an http"):
        load_settings(slack_api_url="slack.com/api")
    with pytest.raises(ConfigError, match="AXIOM_SLACK_LANGUAGE"):
        load_settings(slack_language="de")
    settings = load_settings(prefect_api_url="http://127.0.0.1:4999/api/")
    assert settings.prefect_api() == "http://127.0.0.1:4999/api"
    assert settings.prefect_ui() == "http://127.0.0.1:4999"


@pytest.mark.integration  # the axiom CLI as a subprocess: `make test`, not test-fast
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the CLI, not the backend
def test_cli_operators_and_approvals(axiom_home):
    added = axiom_home.cli("operator", "add", "alice", "--role", "lead", "--slack-id", "U0ALICE")
    assert "operator alice added with roles lead" in added.stdout
    listed = json.loads(axiom_home.cli("operator", "list", "--json").stdout)
    assert [(o["name"], o["roles"]) for o in listed] == [("alice", "lead")]
    pending = axiom_home.cli("approvals")
    assert "0 pending; approvals: the Prefect UI" in pending.stdout
    unknown = axiom_home.cli("approve", "42", "--as", "alice", check=False)
    assert unknown.returncode == 3
    assert "refused (not_found): approval #42 does not exist" in unknown.stderr
