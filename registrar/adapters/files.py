"""The files the command line names, read once at start by the adapters that use them (etcd's
and the catalog's TLS files, HAProxy's template): a bad one is one line and exit status 2 then,
not a vaguer failure at every connection later. `registrar.cli.read_files` calls them."""

from __future__ import annotations

import re

from registrar.flags import SettingsError


def lines(flag: str, path: str) -> list[tuple[int, str]]:
    """The lines of a text file with something on them, numbered from 1, without blank lines
    and `#` comments (`--bind-file`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{flag}: cannot read {path}: {exc}") from None
    return [(number, kept) for number, line in enumerate(text, 1)
            if (kept := line.partition("#")[0].strip())]


def readable(flag: str, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise SettingsError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None
    return path


def pem(flag: str, path: str | None, kind: str) -> str | None:
    """A readable PEM file holding a certificate (`kind` "cert") or an unencrypted private key
    ("key")."""
    if readable(flag, path) is None or path is None:
        return None
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 20).decode("ascii", "replace")
    except OSError as exc:
        raise SettingsError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None
    if kind == "cert" and "-----BEGIN CERTIFICATE-----" not in text:
        raise SettingsError(f"{flag}: {path!r} is not a PEM certificate (BEGIN CERTIFICATE)")
    if kind == "key":
        if "ENCRYPTED" in text:
            raise SettingsError(f"{flag}: {path!r} is encrypted; give an unencrypted PEM key")
        if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            raise SettingsError(f"{flag}: {path!r} is not a PEM private key (BEGIN PRIVATE KEY)")
    return path
