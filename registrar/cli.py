"""The command line: parse settings (exit 2 on bad input), then run the command."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from registrar.typing_shim import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registrar.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    from registrar.settings import SettingsError, parse_settings

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings(args, os.environ, socket.gethostname())
        if settings.command == "haproxy":
            without_openssl_hashes()
        settings = read_files(settings)
    except SettingsError as exc:
        print(f"registrar: error: {exc}", file=sys.stderr)
        return 2

    traceback_when_needed()
    from registrar import logs

    logs.configure(settings.log_format, settings.log_level)
    from registrar.errors import FatalError

    try:
        if settings.command == "ls":
            from registrar.commands import listing

            return listing.run(settings)
        if settings.command == "haproxy":
            from registrar.haproxy import command as haproxy

            return haproxy.run(settings)
        if settings.command == "maint":
            from registrar.commands import maint

            return maint.run(settings)
        if settings.command == "drain":
            from registrar.commands import drain

            return drain.run(settings)
        if settings.command == "catalog":
            from registrar.catalog import command as catalog

            return catalog.run(settings)
        if settings.command == "promote":
            assert settings.promote is not None
            if settings.promote.canary is not None:
                from registrar.commands.canary import run as canary

                return canary(settings)
            from registrar.commands.promote import run as promote

            return promote(settings)
        from registrar.agent import command

        return command.run(settings)
    except FatalError as exc:
        print(f"registrar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def traceback_when_needed() -> None:
    """Before `logging` is imported: it imports `traceback` (with `linecache`, `tokenize`,
    `textwrap` and `contextlib`: ~2.5 ms of a sidecar's start) for the exceptions it may
    never log. Until a name of it is first used, `traceback` is a stand-in that then imports
    the real module and takes its names (`import traceback` from then on gets the real one).
    Nothing happens when it is already loaded."""
    if "traceback" in sys.modules:
        return
    import types

    class Later(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            del sys.modules["traceback"]
            import traceback

            vars(self).update(vars(traceback))
            return getattr(traceback, name)

    sys.modules["traceback"] = Later("traceback")


def without_openssl_hashes() -> None:
    """Before the router imports jinja2: jinja2 imports hashlib for a template bytecode cache
    registrar never uses, and hashlib loads OpenSSL's libcrypto for it, 3.1 MiB of the
    router's RSS (its budget is 25, README "Why no gRPC and no Docker SDK"). Told there is no
    `_hashlib`, hashlib serves the same algorithms from Python's own modules. Nothing happens
    when it is already loaded (and TLS to etcd loads libcrypto through `ssl` anyway)."""
    modules: Any = sys.modules  # None there means "cannot be imported" (the import system's rule)
    modules.setdefault("_hashlib", None)


def read_files(settings: Settings) -> Settings:
    """The files the flags name, read now by the adapters that use them (SettingsError naming
    the flag): the TLS files and the template checked, --bind-file's binds added. Nothing is
    imported when no flag names a file (the sidecar's start)."""
    if not settings.files:
        return settings
    from registrar.adapters.etcd_store import check_tls_files
    from registrar.adapters.files import lines, readable
    from registrar.settings import NO_BIND, SettingsError, parse_bind

    check_tls_files(settings.etcd)
    hp = settings.haproxy
    if hp is not None:
        readable("--template", hp.template)
        if hp.bind_file is not None:
            path = hp.bind_file
            more = [parse_bind(f"--bind-file {path} line {number}", text)
                    for number, text in lines("--bind-file", path)]
            if not hp.binds and not more:
                raise SettingsError(NO_BIND)
            settings = settings._replace(haproxy=hp._replace(binds=hp.binds + tuple(more)))
    catalog = settings.catalog
    if catalog is not None and catalog.cert is not None and catalog.key is not None:
        from registrar.catalog.server import check_tls_files as check_catalog

        check_catalog(catalog.cert, catalog.key)
    return settings


def entry() -> None:
    sys.exit(main())
