"""`registrar catalog`'s flags: defaults, environment, and each bad value named (exit 2)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from registrar.cli import main, read_files
from registrar.settings import CatalogSettings, SettingsError, parse_settings


def parse(*argv: str, **env: str) -> CatalogSettings:
    """The settings, and the files they name read (the catalog's TLS files)."""
    settings = read_files(parse_settings(["catalog", *argv], env, "core-01"))
    assert settings.command == "catalog" and settings.catalog is not None
    return settings.catalog


def error(*argv: str, **env: str) -> str:
    with pytest.raises(SettingsError) as info:
        read_files(parse_settings(["catalog", *argv], env, "core-01"))
    return str(info.value)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=cat"],
        check=True, capture_output=True,
    )
    return cert, key


def test_defaults() -> None:
    assert parse() == CatalogSettings(listen=("127.0.0.1", 9479))
    assert parse_settings(["watch"], {}, "n").catalog is None


def test_flags_and_environment(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    got = parse("--listen", "[::1]:8000", "--catalog-user", "ops", "--catalog-cert", str(cert),
                "--catalog-key", str(key), REGISTRAR_CATALOG_PASSWORD="s3cret")
    assert got == CatalogSettings(("::1", 8000), "ops", "s3cret", str(cert), str(key))
    assert "s3cret" not in repr(got)
    assert parse(REGISTRAR_LISTEN="0.0.0.0:9000").listen == ("0.0.0.0", 9000)
    assert parse("--catalog-password", "p", REGISTRAR_CATALOG_USER="u").password == "p"


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--listen", "nowhere"], {}, "--listen"),
    (["--listen", "127.0.0.1:0"], {}, "--listen"),
    (["--listen", "::1:80"], {}, "--listen"),
    (["--catalog-user", "ops"], {}, "--catalog-user"),
    (["--catalog-user", "a:b", "--catalog-password", "p"], {}, "--catalog-user"),
    ([], {"REGISTRAR_CATALOG_PASSWORD": "p"}, "--catalog-user"),
    (["--catalog-cert", "/nonexistent.pem", "--catalog-key", "/nonexistent.pem"], {},
     "--catalog-cert"),
])
def test_bad_values_name_the_flag(argv: list[str], env: dict[str, str], named: str) -> None:
    assert error(*argv, **env).startswith(named)


def test_cert_and_key_go_together(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    assert error("--catalog-cert", str(cert)).startswith("--catalog-cert and --catalog-key")
    assert error("--catalog-cert", str(key), "--catalog-key", str(key)).startswith(
        "--catalog-cert")
    assert error("--catalog-cert", str(cert), "--catalog-key", str(cert)).startswith(
        "--catalog-key")


def test_the_cli_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "--listen", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--listen" in err
    assert main(["catalog", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
