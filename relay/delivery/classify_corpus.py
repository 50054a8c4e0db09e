"""Measures the classifier against a corpus of real replies labelled by others (tests/corpus/).

A corpus file holds replies as bounces and provider pages write them, the label their source
gives each, the table mapping those labels to our categories, and a tune/holdout split drawn
from a hash of the text before any rule was tuned. Loading checks all of it, so an entry can
neither carry a category its label does not map to nor move between the parts.

A label coarser than our categories maps to a list of categories, every one of which its
source's own definition covers (Sisimai's "blocked": the client IP or host name was refused,
our blocklisted, reputation or rdns); a reading in that list agrees. The list is the label's,
so it applies alike to every entry with that label, tune and holdout.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from relay.delivery.classify import Classification, classify, provider_for_mx, read_reply, rules
from runbooks.schema import Category

Part = Literal["tune", "holdout"]
PARTS: tuple[Part, ...] = ("tune", "holdout")
HOLDOUT_ONE_IN = 5
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.05 s for the corpus, not 0.3


class CorpusError(ValueError):
    """The corpus file cannot be read or does not validate; the message names file and place."""


def corpus_key(text: str) -> str:
    """What near-duplicates share: case, addresses, IPv4 addresses and digits do not count."""
    key = text.lower()
    key = re.sub(r"[\w.+=-]+@[\w.-]+", "@", key)
    key = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}\b", "ip", key)
    key = re.sub(r"\d+", "0", key)
    return re.sub(r"\s+", " ", key).strip(" .")


def corpus_part(text: str) -> Part:
    """The part a text belongs to, fixed by its key's SHA-256 (first 8 hex digits mod 5)."""
    digest = hashlib.sha256(corpus_key(text).encode()).hexdigest()
    return "holdout" if int(digest[:8], 16) % HOLDOUT_ONE_IN == 0 else "tune"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# One category, or the categories a coarser source label covers, its principal one first.
Expected = Category | tuple[Category, ...]


def _distinct(value: Expected) -> Expected:
    if isinstance(value, tuple) and (len(value) < 2 or len(set(value)) != len(value)):
        raise ValueError("a list of categories names two or more, each once")
    return value


_Expected = Annotated[Expected, AfterValidator(_distinct)]


def acceptable(expected: Expected) -> tuple[Category, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def expected_name(expected: Expected) -> str:
    """How reports name it: 'mailbox_unknown', or 'blocklisted|reputation|rdns'."""
    return "|".join(acceptable(expected))


class CorpusEntry(_Strict):
    text: str = Field(min_length=1)
    expected: _Expected
    label: str = Field(pattern=r"^[a-z0-9-]+:[\w-]+$", description="<source>:<its own label>")
    source: str = Field(min_length=1, description="owner/repo@commit:path, or a URL")
    mx: str | None = None  # the remote host the source names
    provider: str | None = None  # the provider whose own table the text comes from
    split: Part

    def provider_for_classifying(self) -> str | None:
        """As the bounce path does: the named provider, else the MX's; None when unknown."""
        provider = self.provider or (provider_for_mx(self.mx) if self.mx else None)
        return None if provider == rules().fallback_provider else provider


class Corpus(_Strict):
    split_rule: str
    labels: dict[str, dict[str, _Expected]]  # source -> its label -> our category (or list)
    entries: list[CorpusEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Corpus:
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.entries):
            source, _, label = entry.label.partition(":")
            mapped = self.labels.get(source, {}).get(label)
            if mapped is None:
                raise ValueError(f"entries.{index}.label: {entry.label!r} is not in labels")
            if acceptable(mapped) != acceptable(entry.expected):
                raise ValueError(
                    f"entries.{index}.expected: {expected_name(entry.expected)!r}, but labels "
                    f"map {entry.label!r} to {expected_name(mapped)!r}"
                )
            if entry.split != corpus_part(entry.text):
                raise ValueError(
                    f"entries.{index}.split: {entry.split!r}, but the split rule puts this "
                    f"text in {corpus_part(entry.text)!r}"
                )
            key = corpus_key(entry.text)
            if key in seen:
                raise ValueError(f"entries.{index}.text: a near-duplicate of entries.{seen[key]}")
            seen[key] = index
            if entry.provider is not None and entry.provider not in rules().by_provider:
                raise ValueError(f"entries.{index}.provider: {entry.provider!r} is not a provider")
        return self


def load_corpus(path: Path) -> Corpus:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CorpusError(f"{path}: {exc}") from None
    try:
        return Corpus.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise CorpusError(f"{path}: {where}: {first['msg']}") from None


@dataclass(frozen=True, slots=True)
class Outcome:
    entry: CorpusEntry
    got: Classification

    @property
    def agrees(self) -> bool:
        """The reading is one its label accepts."""
        return self.got.category in acceptable(self.entry.expected)


@dataclass(frozen=True, slots=True)
class CorpusReport:
    outcomes: tuple[Outcome, ...]

    def agreement(self, part: Part | None = None) -> tuple[int, int]:
        """(entries whose category agrees, entries) in one part, or in all when None."""
        chosen = [o for o in self.outcomes if part is None or o.entry.split == part]
        return sum(o.agrees for o in chosen), len(chosen)

    def confusion(self, part: Part | None = None) -> Counter[tuple[str, str]]:
        """(expected, got) -> count, agreements included; expected as expected_name gives it."""
        return Counter(
            (expected_name(o.entry.expected), o.got.category)
            for o in self.outcomes
            if part is None or o.entry.split == part
        )

    def by_label(self, part: Part | None = None) -> dict[str, tuple[int, int]]:
        """Source label -> (entries whose category agrees, entries), in one part or in all."""
        counts: dict[str, list[int]] = {}
        for o in self.outcomes:
            if part is None or o.entry.split == part:
                tally = counts.setdefault(o.entry.label, [0, 0])
                tally[0] += o.agrees
                tally[1] += 1
        return {label: (agree, total) for label, (agree, total) in sorted(counts.items())}


def evaluate(corpus: Corpus) -> CorpusReport:
    """Every entry read leniently (as `axiom classify` reads text) and classified."""
    return CorpusReport(
        tuple(
            Outcome(entry, classify(read_reply(entry.text), entry.provider_for_classifying()))
            for entry in corpus.entries
        )
    )
