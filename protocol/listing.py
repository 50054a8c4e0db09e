"""A page of a listing that knows how much it left out, so no reader mistakes it for the whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int  # how many rows the listing has in all

    @property
    def truncated(self) -> bool:
        return self.total > len(self.items)
