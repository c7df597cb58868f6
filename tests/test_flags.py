"""The one table of flags (`registrar.flags.FLAGS`) against the docs' option tables: every flag
documented, nothing documented that does not exist, and each default as the table has it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from registrar.flags import COMMANDS, COMMON, FLAGS, Flag, build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HEADER = "| flag | meaning | default |"


def option_rows() -> list[tuple[set[str], str, str]]:
    """Every row of every option table in the docs: (its flags, meaning, default)."""
    rows = []
    for path in DOCS:
        in_table = False
        for line in path.read_text().splitlines():
            if line.strip() == HEADER:
                in_table = True
                continue
            if not in_table or line.startswith("|---"):
                continue
            if not line.startswith("|"):
                in_table = False
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            flags = set(re.findall(r"`(--[a-z0-9-]+)", cells[0]))
            rows.append((flags, cells[1], cells[2]))
    return rows


ROWS = option_rows()


def rows_of(flag: Flag) -> list[tuple[set[str], str, str]]:
    """The rows documenting `flag`: when several commands give its name a meaning of its own,
    the row whose meaning starts with the command's name (the common one: none of theirs)."""
    named = [row for row in ROWS if flag.name in row[0]]
    others = {c for f in FLAGS if f.name == flag.name and f is not flag for c in f.commands}
    if COMMON in flag.commands:
        return [row for row in named if not any(row[1].startswith(f"`{c}") for c in others)]
    if not others:
        return named
    return [row for row in named if any(row[1].startswith(f"`{c}") for c in flag.commands)]


def test_every_flag_is_documented_and_every_documented_flag_exists() -> None:
    documented = set().union(*(flags for flags, _, _ in ROWS))
    assert documented == {f.name for f in FLAGS}


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f"{f.name}:{','.join(f.commands)}")
def test_each_default_is_the_documented_one(flag: Flag) -> None:
    rows = rows_of(flag)
    assert rows, f"{flag.name} ({', '.join(flag.commands)}): no row of its own in the docs"
    defaults = [default for _, _, default in rows]
    if flag.kind == "switch":
        assert "off" in defaults
    elif flag.default == "":
        assert "empty" in defaults
    elif flag.default is not None:
        assert any(f"`{flag.default}`" in d for d in defaults), (flag.name, defaults)


def test_the_parser_is_the_table() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    for name, command in COMMANDS.items():
        options = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert options - {"-h", "--help"} == {f.name for f in FLAGS if f.takes(name)}, name
        assert {f.name for f in FLAGS if name in f.commands} <= options, command
