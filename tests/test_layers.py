"""The import contract that keeps the pure core pure (run by `make lint` and the fast tier).

The core decides; it never does I/O. So no pure module imports Docker's, etcd's or HTTP's
libraries, the metrics library, threads, sockets or processes, or any module of the layers
that do (adapters, the loops, the commands).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "registrar"

PURE = sorted(
    [*PACKAGE.glob("core/*.py"), PACKAGE / "settings.py", PACKAGE / "haproxy" / "config.py",
     *PACKAGE.glob("haproxy/runtime.py")]
)
FORBIDDEN = (
    "docker", "pyetcd", "grpc", "requests", "prometheus_client", "tenacity", "threading",
    "socket", "subprocess", "http", "urllib.request",
    "registrar.adapters", "registrar.agent", "registrar.commands", "registrar.haproxy.process",
    "registrar.haproxy.router", "registrar.haproxy.command", "registrar.http_server",
    "registrar.metrics", "registrar.retry", "registrar.prefix_follower", "registrar.shutdown",
    "registrar.router_wait",
)


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_import_no_io(path: Path) -> None:
    bad = sorted(name for name in imported(path) if forbidden(name))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_contract_sees_the_core() -> None:
    names = {str(p.relative_to(PACKAGE)) for p in PURE}
    assert {"core/naming.py", "core/planner.py", "settings.py", "haproxy/config.py"} <= names
    assert forbidden("pyetcd.client") and forbidden("registrar.adapters.etcd_store")
    assert not forbidden("registrar.core.naming")


def test_the_checker_finds_imports_anywhere_in_a_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import grpc\n    from registrar.agent import command\n")
    assert {"grpc", "registrar.agent", "registrar.agent.command"} <= imported(module)
