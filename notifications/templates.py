"""Renders message texts from runbooks/templates/<language>/, escaped for Slack mrkdwn.

Autoescape is on and every expression passes through Slack's escaping (&, <, >), so data
such as "<!channel>" or a "<url|label>" in evidence shows as text instead of acting. A missing
variable is an error (StrictUndefined), never an empty string in a message to a person.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from runbooks.loader import RUNBOOK_DIR

TEMPLATE_DIR = RUNBOOK_DIR / "templates"
LANGUAGES = ("en", "it")


def slack_escape(text: str) -> str:
    """Slack's own rule for message text: escape exactly &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _finalize(value: Any) -> Markup:
    # Runs on every {{ expression }} before autoescape; Markup tells autoescape it is done,
    # so quotes stay quotes (Slack would show HTML's &#34; literally).
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup(slack_escape(str(value)))


@cache
def environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, language: str, **context: Any) -> str:
    """runbooks/templates/<language>/<name>.j2 rendered with context, stripped."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; have {', '.join(LANGUAGES)}")
    return environment().get_template(f"{language}/{name}.j2").render(**context).strip()
