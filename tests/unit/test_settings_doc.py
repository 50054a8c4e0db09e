"""The README's settings table is the one the settings model renders, and every setting says
what it is for."""

from __future__ import annotations

from pathlib import Path

from config.settings import Settings
from config.settings_doc import BEGIN, END, settings_table, with_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_the_generated_settings_table():
    text = README.read_text()
    region = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert region.strip() == settings_table().strip(), (
        "README.md's settings table is stale: run `.venv/bin/python -m config.settings_doc "
        "README.md`"
    )


def test_every_setting_has_a_row_with_its_description():
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description, f"AXIOM_{name.upper()} has no description in config/settings.py"
        assert f"| `AXIOM_{name.upper()}` |" in table


def test_rewriting_keeps_the_text_around_the_region():
    before = f"intro\n{BEGIN}\nold table\n{END}\noutro\n"
    after = with_table(before)
    assert after.startswith(f"intro\n{BEGIN}\n| setting | default | meaning |\n")
    assert after.endswith(f"{END}\noutro\n")
    assert "old table" not in after
    assert with_table(after) == after


def test_defaults_read_as_an_operator_would_type_them():
    table = settings_table()
    assert "| `AXIOM_HOME` | `./var` |" in table
    assert "| `AXIOM_MAX_MESSAGE_SIZE` | 25 MiB |" in table
    assert "| `AXIOM_DELIVERY_ENABLED` | `true` |" in table
    assert "| `AXIOM_SLACK_BOT_TOKEN` | unset |" in table
