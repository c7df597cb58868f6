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
    [*PACKAGE.glob("core/*.py"), PACKAGE / "settings.py", PACKAGE / "flags.py",
     PACKAGE / "haproxy" / "config.py",
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
    assert {"core/naming.py", "core/planner.py", "settings.py", "flags.py",
            "haproxy/config.py"} <= names
    assert forbidden("pyetcd.client") and forbidden("registrar.adapters.etcd_store")
    assert not forbidden("registrar.core.naming")


def test_the_checker_finds_imports_anywhere_in_a_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import grpc\n    from registrar.agent import command\n")
    assert {"grpc", "registrar.agent", "registrar.agent.command"} <= imported(module)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it imports, at the top or
    inside a function (a lazy import closes a circle all the same)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {name: {dep for dep in imported(path) if dep in modules and dep != name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


SIDECAR_NEVER = ("dataclasses", "inspect", "shutil", "prometheus_client", "http.server",
                 "http.client", "ssl", "jinja2", "random", "typing", "datetime", "urllib.parse",
                 "ipaddress", "linecache", "tokenize")


def test_a_sidecar_start_imports_none_of_the_heavy_modules() -> None:
    """What `registrar register` imports before its first put (README, "Why no gRPC and no
    Docker SDK": each of these cost a sidecar milliseconds or MiB at every start)."""
    import subprocess
    import sys

    code = ("import sys, registrar.cli; registrar.cli.traceback_when_needed(); "
            "import registrar.logs, registrar.agent.command, registrar.settings as s; "
            "s.parse_settings(['register', 'web-1', '--etcd', 'http://127.0.0.1:2379', "
            "'--host-ip', '10.1.2.3'], {}, 'h'); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=30).stdout.split())
    assert "registrar.agent.lease_keeper" in loaded  # the check sees the sidecar's modules
    assert not loaded & set(SIDECAR_NEVER), sorted(loaded & set(SIDECAR_NEVER))


def test_a_traceback_is_logged_when_traceback_was_left_for_later() -> None:
    """`cli.traceback_when_needed`: logging holds a stand-in until an exception is logged,
    which then imports the real module (and `import traceback` gets it from then on)."""
    import subprocess
    import sys

    code = ("import sys; from registrar.cli import traceback_when_needed; "
            "traceback_when_needed(); import logging; logging.basicConfig(); "
            "print('linecache' in sys.modules)\n"
            "try:\n 1/0\nexcept ZeroDivisionError:\n logging.getLogger('x').exception('boom')\n"
            "import traceback; print(traceback.format_exception is not None, "
            "type(sys.modules['traceback']).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=30)
    assert done.stdout.split() == ["False", "True", "module"]
    assert "ZeroDivisionError: division by zero" in done.stderr
    assert 'File "<string>", line 3' in done.stderr


def test_the_router_imports_jinja2_without_openssls_hashes() -> None:
    """`registrar haproxy` tells hashlib there is no `_hashlib` before jinja2 imports it (3.1
    MiB of libcrypto for a bytecode cache it never uses); hashlib still hashes."""
    import subprocess
    import sys

    code = ("import sys; "
            "from registrar.cli import without_openssl_hashes; without_openssl_hashes(); "
            "import registrar.haproxy.command, hashlib, hmac; "
            "print(sys.modules.get('_hashlib') is None, hashlib.sha256(b'a').hexdigest()[:8], "
            "hmac.new(b'k', b'm', 'sha256').hexdigest()[:8])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert out == ["True", "ca978112", "b60090e3"]
