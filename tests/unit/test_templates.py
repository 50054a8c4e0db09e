"""Message templates for every audience, rendered from their documented variables.

runbooks/templates/variables.yaml lists every template, its audience and each variable with an
example; the one parametrised test below renders every template in every language from it.
"""

from __future__ import annotations

import pytest
from jinja2 import UndefinedError
from pydantic import ValidationError

from notifications.templates import (
    LANGUAGES,
    TemplateCatalogue,
    audience_of,
    load_catalogue,
    markdown_code,
    markdown_escape,
    render,
    render_email,
    template_names,
    template_variables,
)

CATALOGUE = load_catalogue()
DOCUMENTED = sorted(CATALOGUE.templates)


def example(name: str, **changes) -> dict:
    return CATALOGUE.templates[name].example_context() | changes


def test_every_template_file_is_documented_and_exists_in_every_language():
    on_disk = {language: template_names(language) for language in LANGUAGES}
    for language, names in on_disk.items():
        assert not names - set(DOCUMENTED), f"undocumented in {language}: {names - set(DOCUMENTED)}"
        assert not set(DOCUMENTED) - names, f"missing in {language}: {set(DOCUMENTED) - names}"


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", DOCUMENTED)
def test_renders_from_its_documented_variables(name, language):
    doc = CATALOGUE.templates[name]
    used = template_variables(name, language)
    assert not used - set(doc.variables), (
        f"{language}/{name}.j2 reads undocumented {used - set(doc.variables)}"
    )
    unread = {v for v in doc.variables if v not in used}
    assert not unread, f"{language}/{name}.j2 does not read documented {unread}"
    text = render(name, language, **doc.example_context())
    assert text and "{{" not in text and "{%" not in text
    if doc.audience == "email":
        mail = render_email(name, language, **doc.example_context())
        assert mail.subject and "\n" not in mail.subject and mail.body.strip()


def test_the_catalogue_refuses_what_it_cannot_check():
    good = {"type": "int", "description": "a count", "example": 2}
    with pytest.raises(ValidationError, match="audience markdown but its prefix says slack"):
        TemplateCatalogue.model_validate(
            {
                "templates": {
                    "slack_x": {"audience": "markdown", "description": "x x", "used_by": "y y"}
                }
            }
        )
    with pytest.raises(ValidationError, match="Input should be a valid integer"):
        TemplateCatalogue.model_validate(
            {
                "templates": {
                    "text_x": {
                        "audience": "text",
                        "description": "x x",
                        "used_by": "y y",
                        "variables": {"n": good | {"example": "many"}},
                    }
                }
            }
        )
    with pytest.raises(ValidationError, match="example is null but the variable is not nullable"):
        TemplateCatalogue.model_validate(
            {
                "templates": {
                    "text_x": {
                        "audience": "text",
                        "description": "x x",
                        "used_by": "y y",
                        "variables": {"n": good | {"example": None}},
                    }
                }
            }
        )


def test_the_audience_follows_the_prefix():
    assert [audience_of(n) for n in ("slack_a", "prefect_a", "md_a", "text_a", "email_a")] == [
        "slack",
        "markdown",
        "markdown",
        "text",
        "email",
    ]
    with pytest.raises(ValueError, match="template 'alert' has no audience prefix"):
        audience_of("alert")


# ---------------------------------------------------------------- Slack
def test_data_is_escaped_for_slack_but_quotes_stay_quotes():
    text = render("slack_approval_outcome", "en", **example("slack_approval_outcome"))
    assert "ok &amp; &lt;!channel&gt;" in text
    assert "<!channel>" not in text
    reply = render(
        "slack_reply", "en", reason="invalid_answer", approval_id=1, detail='"maybe" isn\'t one'
    )
    assert '"maybe" isn\'t one' in reply


def test_the_italian_texts_are_italian():
    text = render("slack_approval_outcome", "it", **example("slack_approval_outcome"))
    assert "Approvata* da alice" in text


def test_a_missing_variable_is_an_error_not_a_blank():
    context = example("slack_approval_outcome")
    del context["decided_at"]
    with pytest.raises(UndefinedError):
        render("slack_approval_outcome", "en", **context)
    with pytest.raises(UndefinedError):
        render("email_tenant_paused", "it", tenant="acme")


def test_an_unknown_language_is_refused():
    with pytest.raises(ValueError, match="no templates for language 'de'"):
        render("slack_reply", "de", reason="x", approval_id=1, detail="")


# ---------------------------------------------------------------- Markdown
def test_markdown_data_cannot_add_markup_or_table_cells():
    assert markdown_escape("*bold* _it_ `c` [l](http://x) <b>&amp; | ~s~ # h") == (
        r"\*bold\* \_it\_ \`c\` \[l\](http://x) \<b\>\&amp; \| \~s\~ \# h"
    )
    assert markdown_escape("- item") == r"\- item"
    assert markdown_escape("1. first") == r"1\. first"
    assert markdown_escape("2026-03-02 v1.0") == "2026-03-02 v1.0"
    assert markdown_escape("two\nlines\r\n\nthree") == "two lines three"


def test_markdown_code_spans_are_fenced_and_keep_tables_whole():
    assert markdown_code("stream:acme/<m>") == "`stream:acme/<m>`"
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("`x`") == "`` `x` ``"
    assert markdown_code("a|b\nc") == r"`a\|b c`"


def test_the_incident_report_table_keeps_its_columns():
    text = render("prefect_incident_report", "en", **example("prefect_incident_report"))
    rows = [line for line in text.splitlines() if line.startswith("| 09:")]
    assert len(rows) == 2
    for row in rows:  # five cells: six unescaped bars
        assert row.replace("\\|", "").count("|") == 6, row


def test_the_approval_form_shows_subjects_as_code():
    text = render("prefect_approval_form", "en", **example("prefect_approval_form"))
    assert "`stream:acme/<marketing>`" in text
    assert r"spam complaints \& \<\!channel\>" in text


# ---------------------------------------------------------------- plain text and email
def test_plain_text_is_not_escaped():
    text = render("text_notice_outcome", "en", **example("text_notice_outcome", tenant="a&<b>"))
    assert "tenant a&<b> at ops@acme.example" in text
    missing = render(
        "text_notice_outcome",
        "en",
        **example("text_notice_outcome", sent=False, reason="no_contact", to=None),
    )
    assert missing == (
        "notice email_tenant_paused not sent: tenant acme has no contact address "
        "(axiom tenant set acme --contact EMAIL)"
    )


def test_an_email_is_a_subject_and_a_body_in_the_tenants_language():
    it = render_email("email_tenant_paused", "it", **example("email_tenant_paused", tenant="r&d"))
    en = render_email("email_tenant_paused", "en", **example("email_tenant_paused"))
    assert it.subject == "L'invio dal suo account r&d è sospeso"
    assert it.body.startswith("Gentile cliente,") and "451 4.7.1" in it.body
    assert en.subject == "Sending from your account acme is paused"
    assert "support@axiom.example" in en.body
    no_reply = render_email(
        "email_tenant_paused", "en", **example("email_tenant_paused", reply_to=None)
    )
    assert "replies to this address are not read" in no_reply.body
    with pytest.raises(ValueError, match="is not an email_ template"):
        render_email("text_notice_outcome", "en", **example("text_notice_outcome"))
