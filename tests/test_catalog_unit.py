"""The catalog's systemd unit: systemd accepts it, and what it runs is a `registrar catalog`
with flags and variables registrar knows; the scrape config we ship parses as Prometheus'."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from registrar.settings import parse_settings
from tests.test_units import (
    REGISTRAR_IMAGE_WORD,
    Unit,
    docker_part,
    help_flags,
    raw_commands,
    registrar_part,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "units" / "systemd" / "registrar-catalog.service"
SCRAPE = ROOT / "units" / "prometheus" / "registrar-catalog-scrape.yml"


@pytest.mark.real  # runs systemd-analyze: not in the fast tier
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / UNIT.name)
    result = verify([tmp_path / UNIT.name])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_runs_catalog_with_flags_it_accepts() -> None:
    unit = Unit.load(UNIT)
    runs = [(words, args) for words in raw_commands(unit, "ExecStart")
            if (args := registrar_part(words)) is not None]
    assert len(runs) == 1, f"expected one line running {REGISTRAR_IMAGE_WORD}"
    words, args = runs[0]
    assert args[0] == "catalog"
    accepted = help_flags("catalog")
    docker_args = docker_part(words)
    passed = [docker_args[i + 1] for i, a in enumerate(docker_args) if a in ("-e", "--env")]
    for name in passed:
        flag = "--" + name.removeprefix("REGISTRAR_").lower().replace("_", "-")
        assert name.startswith("REGISTRAR_") and flag in accepted, name
    assert {"REGISTRAR_CATALOG_PASSWORD", "REGISTRAR_LISTEN", "REGISTRAR_CATALOG_CERT"} <= set(
        passed)
    assert "--network=host" in docker_args and "/var/run/docker.sock" not in " ".join(words)
    env = dict(line.split("=", 1) for line in unit.all("Environment"))
    settings = parse_settings(args, env)
    assert settings.catalog is not None and settings.catalog.listen == ("0.0.0.0", 9479)


@pytest.mark.real  # runs promtool: not in the fast tier
def test_the_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make setup` installs Debian's prometheus package"
    config = tmp_path / "prometheus.yml"
    for name in ("registrar-catalog.password", "registrar-catalog-ca.pem"):
        (tmp_path / name).write_text("x")
    config.write_text(SCRAPE.read_text().replace("/etc/prometheus/", f"{tmp_path}/"))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
