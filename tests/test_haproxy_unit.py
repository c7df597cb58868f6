"""units/haproxy.service: systemd accepts it, and it passes registrar only what it accepts."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.test_units import Unit, help_flags, raw_commands, verify

UNIT = Path(__file__).resolve().parents[1] / "units" / "haproxy.service"
IMAGE_WORD = "${REGISTRAR_HAPROXY_IMAGE}"


@pytest.mark.real  # runs systemd-analyze: not in the fast tier
def test_haproxy_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = tmp_path / "haproxy.service"
    shutil.copy(UNIT, copy)
    result = verify([copy])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_haproxy_unit_uses_only_flags_registrar_haproxy_accepts() -> None:
    unit = Unit.load(UNIT)
    (words,) = [w for w in raw_commands(unit, "ExecStart") if IMAGE_WORD in w]
    at = words.index(IMAGE_WORD)
    args, docker_args = words[at + 1:], words[:at]
    assert args[0] == "haproxy"
    accepted = help_flags("haproxy")
    assert {a.split("=", 1)[0] for a in args if a.startswith("--")} <= accepted
    passed = [docker_args[i + 1] for i, a in enumerate(docker_args) if a in ("-e", "--env")]
    for name in passed:
        flag = "--" + name.removeprefix("REGISTRAR_").lower().replace("_", "-")
        assert flag in accepted, f"-e {name}: registrar haproxy has no {flag}"
    # the password never on a command line
    assert "PASSWORD=" not in shlex.join(words)
