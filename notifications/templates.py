"""Renders message texts from runbooks/templates/<language>/<name>.j2 for their audience.

The audience follows from the name's prefix, and each has its own Jinja environment:

- `slack_`: Slack mrkdwn. Every expression passes through Slack's escaping (&, <, >), so data
  such as "<!channel>" or a "<url|label>" in evidence shows as text instead of acting.
- `prefect_`, `md_`: Markdown (Prefect artifacts and forms). Every expression is escaped so
  that data cannot add markup, links, HTML or table cells; `{{ value | code }}` shows a value as
  a code span (backticks in it fenced, `|` escaped for tables, newlines folded).
- `text_`: plain text for the CLI and logs; nothing is escaped.
- `email_`: a customer email in plain text; nothing is escaped. The first line is
  `Subject: …`, then a blank line, then the body (see `render_email`).

A missing variable is an error (StrictUndefined), never an empty string in a message to a
person. runbooks/templates/variables.yaml documents every template's variables with an
example; tests/unit/test_templates.py renders each one from it in every language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined, meta
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from runbooks.loader import RUNBOOK_DIR

TEMPLATE_DIR = RUNBOOK_DIR / "templates"
LANGUAGES = ("en", "it")

Audience = Literal["slack", "markdown", "text", "email"]
AUDIENCES: dict[str, Audience] = {
    "slack_": "slack",
    "prefect_": "markdown",
    "md_": "markdown",
    "text_": "text",
    "email_": "email",
}


def audience_of(name: str) -> Audience:
    """The audience a template name's prefix says; a name without a known prefix is refused."""
    for prefix, audience in AUDIENCES.items():
        if name.startswith(prefix):
            return audience
    raise ValueError(f"template {name!r} has no audience prefix ({', '.join(AUDIENCES)})")


def slack_escape(text: str) -> str:
    """Slack's own rule for message text: escape exactly &, < and >."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# CommonMark lets any ASCII punctuation be backslash-escaped; these are the characters that
# start emphasis, code, links, HTML, entities, headings, strikethrough or a GFM table cell.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")
_LIST_MARKER = re.compile(r"^(\d{0,9})([-+.)])(?=\s|$)")  # "- x", "+ x", "1. x", "2) x"


def markdown_escape(text: str) -> str:
    """Data as literal Markdown text on one line: specials backslash-escaped, a leading list or
    heading marker neutralised, line breaks folded into a space (a newline ends a table row)."""
    text = _MD_SPECIAL.sub(r"\\\1", _LINE_BREAKS.sub(" ", text))
    return _LIST_MARKER.sub(r"\1\\\2", text)


def markdown_code(value: Any) -> Markup:
    """A value as an inline code span: backslash escapes do not work inside one, so the fence
    is longer than any run of backticks in the value; `|` is escaped as GFM tables require."""
    text = _LINE_BREAKS.sub(" ", str(value)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Markup(f"{fence}{pad}{text}{pad}{fence}")


def _slack_finalize(value: Any) -> Markup:
    # Runs on every {{ expression }} before autoescape; Markup tells autoescape it is done,
    # so quotes stay quotes (Slack would show HTML's &#34; literally).
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup(slack_escape(str(value)))


def _markdown_finalize(value: Any) -> Markup:
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup(markdown_escape(str(value)))


@cache
def environment(audience: Audience = "slack") -> Environment:
    escaping = {"slack": _slack_finalize, "markdown": _markdown_finalize}.get(audience)
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=escaping is not None,
        undefined=StrictUndefined,
        finalize=escaping,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    if audience == "markdown":
        env.filters["code"] = markdown_code
    return env


def render(name: str, language: str, **context: Any) -> str:
    """runbooks/templates/<language>/<name>.j2 rendered for its audience with context, stripped."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; have {', '.join(LANGUAGES)}")
    template = environment(audience_of(name)).get_template(f"{language}/{name}.j2")
    return template.render(**context).strip()


@dataclass(frozen=True)
class EmailText:
    subject: str
    body: str


def render_email(name: str, language: str, **context: Any) -> EmailText:
    """An `email_` template as its subject (one line, whitespace folded) and its body."""
    if audience_of(name) != "email":
        raise ValueError(f"template {name!r} is not an email_ template")
    text = render(name, language, **context)
    first, _, rest = text.partition("\n")
    if not first.startswith("Subject: ") or not rest.startswith("\n"):
        raise ValueError(
            f"{language}/{name}.j2 must start with a 'Subject: …' line and a blank line"
        )
    subject = " ".join(first.removeprefix("Subject: ").split())
    return EmailText(subject=subject, body=rest.strip() + "\n")


# ---------------------------------------------------------------- the documented variables
VARIABLES_FILE = TEMPLATE_DIR / "variables.yaml"

# A variable's type, as variables.yaml names it: plain data, or a model the caller passes.
_PLAIN: dict[str, Any] = {
    "str": str,
    "int": int,
    "bool": bool,
    "list[str]": list[str],
    "pairs": list[tuple[str, Any]],  # (label, value) rows, e.g. a proposal or evidence
    "records": list[dict[str, Any]],  # rows with named fields, e.g. a timeline
}
_MODELS = ("Approval", "Incident", "Suspension")


def _model(type_name: str):
    import models

    return getattr(models, type_name)


class Variable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal[
        "str", "int", "bool", "list[str]", "pairs", "records", "Approval", "Incident", "Suspension"
    ]
    description: str = Field(min_length=3)
    nullable: bool = Field(default=False, description="None is a valid value")
    optional: bool = Field(
        default=False, description="Callers may leave it out: only some branches use it"
    )
    example: Any = Field(description="A realistic value; the template test renders with it")

    @model_validator(mode="after")
    def _example_fits(self) -> Variable:
        self.value()
        return self

    def value(self) -> Any:
        """The example as the template receives it (a model for a model type)."""
        if self.example is None:
            if not self.nullable:
                raise ValueError("example is null but the variable is not nullable")
            return None
        if self.type in _MODELS:
            return _model(self.type).model_validate(self.example)
        return TypeAdapter(_PLAIN[self.type]).validate_python(self.example, strict=False)


class TemplateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audience: Audience
    description: str = Field(min_length=3)
    used_by: str = Field(min_length=3, description="Which code renders it")
    variables: dict[str, Variable] = Field(default_factory=dict)

    def example_context(self) -> dict[str, Any]:
        return {name: v.value() for name, v in self.variables.items()}


class TemplateCatalogue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    templates: dict[str, TemplateDoc]

    @model_validator(mode="after")
    def _audience_matches_prefix(self) -> TemplateCatalogue:
        for name, doc in self.templates.items():
            if audience_of(name) != doc.audience:
                raise ValueError(
                    f"{name}: audience {doc.audience} but its prefix says {audience_of(name)}"
                )
        return self


def load_catalogue(path: Path = VARIABLES_FILE) -> TemplateCatalogue:
    """variables.yaml, validated (a bad entry raises pydantic's ValidationError naming it)."""
    return TemplateCatalogue.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def template_variables(name: str, language: str) -> set[str]:
    """The variables a template file reads (Jinja's own analysis of its source)."""
    env = environment(audience_of(name))
    source, _, _ = env.loader.get_source(env, f"{language}/{name}.j2")  # type: ignore[union-attr]
    return meta.find_undeclared_variables(env.parse(source))


def template_names(language: str) -> set[str]:
    return {p.stem for p in (TEMPLATE_DIR / language).glob("*.j2")}
