"""What the one-shot commands print, through one place: values read from etcd are anyone's
input, so every cell and line is made printable first (no newline or escape sequence of
theirs reaches the terminal: it could forge rows or drive the terminal)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def printable(text: str) -> str:
    """Values come from anyone who can write under the prefix: no newline or escape sequence
    of theirs reaches the terminal (it could forge rows or drive the terminal)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def write_table(table: Sequence[tuple[str, ...]], out: TextIO) -> None:
    table = [tuple(printable(cell) for cell in row) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def address(value: Mapping[str, Any]) -> str:
    """A stored value's `host:port` as the commands show it: as written, `?` for what is
    missing (printed through `say` or `write_table`, which make it printable)."""
    return f"{value.get('host', '?')}:{value.get('port', '?')}"


def say(line: str, out: TextIO) -> None:
    """One line, made printable."""
    out.write(printable(line) + "\n")
