"""The commands' typed results and the one text-table style they are rendered in.

Each command's library function returns a dataclass deriving from `Report`: fields for code,
``to_dict()`` for JSON (``--json`` and the files written beside a bundle) and ``lines()`` for the
terminal. Tables are plain aligned columns, never wrapped, so logs and pipes read them line by line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


class Report:
    """Mixin of the result dataclasses: ``to_dict()`` is the JSON form, ``lines()`` the text form."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        raise NotImplementedError


def aligned(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows (the first is usually a header) as lines of columns two spaces apart; the columns whose
    index is in ``right`` (numbers) are right-aligned."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


def percent(fraction: float | None, missing: str = "n/a") -> str:
    """``0.9712`` -> ``"97.1%"``; None -> ``missing``."""
    return missing if fraction is None else f"{100 * fraction:.1f}%"
