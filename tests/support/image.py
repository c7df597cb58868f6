"""The project's own container image for the real tests.

No image registry is reachable here, so the Dockerfile is built on a local base made by
``scripts/build-base-image.sh`` (debootstrap; built once, then cached on the engine), with
pip given this machine's CA bundle (already inside that base). The image is tagged with the
session's unique prefix and removed, with every container made from it, when the session ends.

Tests import the fixture from here (``from tests.support.image import registrar_image``), so
it does not live in conftest.py. A module that imports it gets its own copy of the fixture
definition; the build itself is done once per process (``ensure_registrar_image``) and the
removal is idempotent.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registrar.adapters.docker_source import DockerSource
from tests.support.docker_env import DockerError, docker

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "registrar-base:bookworm"
BASE_SCRIPT = ROOT / "scripts" / "build-base-image.sh"
# Inside the local base: the host's bundle, copied in by build-base-image.sh.
PIP_CERT = "/etc/ssl/certs/ca-certificates.crt"
# Fixed test-only value of the REVISION build arg, checked in the image's labels.
TEST_REVISION = "rgt-test-revision"


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    base_seconds: float  # time spent in build-base-image.sh (about 0 when cached)
    build_seconds: float  # time of `docker build`

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(docker("image", "inspect", self.tag))
        return data[0]

    @property
    def size(self) -> int:
        return int(self.inspect()["Size"])


def ensure_base_image(name: str = BASE_IMAGE, timeout: float = 900) -> float:
    """Build the local base unless it exists (the script checks); seconds it took."""
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BASE_SCRIPT), name],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise DockerError(
            f"{BASE_SCRIPT.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return time.monotonic() - started


def build_image(tag: str, base: str = BASE_IMAGE, timeout: float = 900) -> BuiltImage:
    """``docker build`` of the project's Dockerfile on ``base``, tagged ``tag``."""
    base_seconds = ensure_base_image(base)
    started = time.monotonic()
    proc = subprocess.run(
        [
            "docker", "build", "--quiet", "--force-rm", "--tag", tag,
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"PIP_CERT={PIP_CERT}",
            "--build-arg", f"REVISION={TEST_REVISION}",
            str(ROOT),
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise DockerError(f"docker build of {tag} failed ({proc.returncode}):\n"
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return BuiltImage(tag, base, base_seconds, time.monotonic() - started)


_lock = threading.Lock()
_built: dict[str, BuiltImage] = {}


def ensure_registrar_image(tag: str) -> BuiltImage:
    """``build_image(tag)`` once per process."""
    with _lock:
        if tag not in _built:
            _built[tag] = build_image(tag)
        return _built[tag]


def remove_image(tag: str) -> None:
    """Remove every container made from ``tag`` (by id), then the tag itself."""
    ids = docker("ps", "-a", "-q", "--filter", f"ancestor={tag}", check=False).split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False, timeout=120)
    docker("rmi", "-f", tag, check=False, timeout=120)
    with _lock:
        _built.pop(tag, None)


def image_tag(session_prefix: str) -> str:
    return f"{session_prefix}-registrar:test"


@pytest.fixture(scope="session")
def registrar_image(session_prefix: str, docker_client: DockerSource) -> Iterator[BuiltImage]:
    """The Dockerfile built on the local debootstrap base, tagged ``{prefix}-registrar:test``
    (``.tag``, ``.size``, ``.build_seconds``, ``.base_seconds``); removed at the end."""
    tag = image_tag(session_prefix)
    error = None
    try:
        built = ensure_registrar_image(tag)
    except (DockerError, OSError, subprocess.TimeoutExpired) as exc:
        error = f"cannot build the registrar image: {exc}"
    if error:
        pytest.fail(error, pytrace=False)
    print(f"registrar image {tag}: {built.size / 1e6:.0f} MB, base {built.base_seconds:.1f} s, "
          f"build {built.build_seconds:.1f} s")
    yield built
    remove_image(tag)
