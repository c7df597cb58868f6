"""Security against the real thing: etcd over TLS with client certificates, etcd with
authentication and a role limited to the two prefixes (the SPEC's "Privileges"), Docker behind a
read-only filter, hostile values in etcd. Certificates are made here with openssl.

The etcd servers of this module are its own (TLS, auth), started once for the module; every
test works under its own node name so they do not see each other's keys.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from registrar import cli
from registrar.adapters.etcd_store import b64
from tests.helpers import etcd_requests, metrics_flag, scrape
from tests.support.docker_readonly import ReadOnlyDockerProxy
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader, Gateway, KVMeta, kv_meta, raw_range
from tests.support.proc import wait_until
from tests.support.tls import (
    CertificateAuthority,
    Issued,
    client_context,
    etcd_tls_args,
)

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
TTL = 3
PASSWORD = "Pw-s3cr3t-do-not-leak-4711"  # the registrar user's password
ROOT_PASSWORD = "root-pw-1c2d3e"
# With auth enabled, a simple token expires after this many seconds without use. Lease
# heartbeats do not use it, so an agent with nothing to write loses its token every few seconds.
TOKEN_TTL = 1
NO_METRICS = ["--metrics-addr", "127.0.0.1:0"]  # watch would listen on 0.0.0.0:9477


# --- etcd clients and tools -------------------------------------------------------------
class Client:
    """A plain etcd client for assertions (etcd's JSON gateway, `tests.support.etcd_reader`):
    TLS and/or user, authenticating anew when etcd has expired the token (TOKEN_TTL is
    short)."""

    def __init__(
        self,
        url: str,
        *,
        ca: Path | None = None,
        client: Issued | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        context = None
        if url.startswith("https://"):
            assert ca is not None
            context = ssl.create_default_context(cafile=str(ca))
            if client is not None:
                context.load_cert_chain(*client.pair)
        self._gateway = Gateway(url, ssl_context=context, user=user, password=password)

    def get(self, key: str) -> str | None:
        kv = self._gateway.range(key)
        return None if kv is None else raw_range(kv).decode()

    def meta(self, key: str) -> KVMeta:
        got = self._gateway.range(key)
        assert got is not None, f"{key} is not in etcd"
        return kv_meta(got)

    def put(self, key: str, value: str) -> None:
        self._gateway.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key: str) -> None:
        self._gateway.call("/v3/kv/deleterange", {"key": b64(key)})

    def close(self) -> None:
        self._gateway.close()


def etcdctl(url: str, *args: str, tls: Sequence[str] = (), user: str | None = None) -> str:
    cmd = ["etcdctl", "--endpoints", url, *tls]
    if user:
        cmd += ["--user", user]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"etcdctl {args}: {result.stderr}"
    return result.stdout


def run_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m registrar ARGS` to completion, without REGISTRAR_* of the outer environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "registrar", *args], capture_output=True, text=True,
        env=base, timeout=60, cwd=ROOT,
    )


def raw_prefix(reader: EtcdReader, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` with its value as bytes (values here need not be UTF-8)."""
    return reader.raw_prefix(prefix)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


def start_etcd(base: Path, name: str, **kw: Any) -> EtcdServer:
    server = EtcdServer(base, name=name, **kw)
    try:
        server.start(timeout=30)
    except Exception:
        server.destroy()
        raise
    return server


# --- fixtures -----------------------------------------------------------------------------
class Pki:
    def __init__(self, base: Path) -> None:
        self.ca = CertificateAuthority(base / "ca", "rgt-ca")
        self.server = self.ca.issue("etcd", server=True)
        self.client = self.ca.issue("registrar")  # CN = the etcd user name
        self.root = self.ca.issue("root")
        self.rogue = CertificateAuthority(base / "rogue", "rogue-ca")
        self.rogue_client = self.rogue.issue("registrar")

    def flags(self, client: Issued | None = None, ca: Path | None = None) -> list[str]:
        out = ["--etcd-ca", str(ca or self.ca.cert)]
        if client is not None:
            out += ["--etcd-cert", str(client.cert), "--etcd-key", str(client.key)]
        return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd serving clients over TLS only, requiring a client certificate of our CA."""
    server = start_etcd(
        tmp_path_factory.mktemp("etcd-tls"), "rgt-tls", scheme="https",
        ssl_context=client_context(pki.ca, pki.client),
        extra_args=etcd_tls_args(pki.ca, pki.server),
    )
    yield server
    server.destroy()


class AuthEtcd:
    """etcd with authentication on and a role `registrar-role` granting readwrite on
    `{prefix}/` and `{control}/` only; user `registrar` has just that role."""

    def __init__(self, server: EtcdServer, prefix: str, control: str,
                 tls: Sequence[str] = ()) -> None:
        self.server = server
        self.url = server.url
        self.prefix = prefix
        self.control = control
        self.tls = list(tls)
        self.root = f"root:{ROOT_PASSWORD}"

    def setup(self, password: str | None = PASSWORD) -> None:
        ctl = self.ctl
        ctl("user", "add", "root", "--new-user-password", ROOT_PASSWORD)
        ctl("role", "add", "registrar-role")
        for path in (self.prefix, self.control):
            ctl("role", "grant-permission", "--prefix=true", "registrar-role", "readwrite",
                f"{path}/")
        if password is None:
            ctl("user", "add", "registrar", "--no-password")
        else:
            ctl("user", "add", "registrar", "--new-user-password", password)
        ctl("user", "grant-role", "registrar", "registrar-role")
        ctl("auth", "enable")

    def ctl(self, *args: str, user: str | None = None) -> str:
        return etcdctl(self.url, *args, tls=self.tls, user=user)

    def admin(self, **kw: Any) -> Client:
        return Client(self.url, user="root", password=ROOT_PASSWORD, **kw)

    def scope_args(self, *command: str, node: str) -> list[str]:
        return [*command, "--etcd", self.url, "--prefix", self.prefix,
                "--control-prefix", self.control, "--node", node, "--ttl", str(TTL)]


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEtcd]:
    """Plain-http etcd with auth: simple tokens that expire after TOKEN_TTL s of disuse."""
    tag = os.urandom(3).hex()
    server = start_etcd(
        tmp_path_factory.mktemp("etcd-auth"), "rgt-auth",
        extra_args=["--auth-token", "simple", "--auth-token-ttl", str(TOKEN_TTL)],
    )
    auth = AuthEtcd(server, f"/rgt-sec-{tag}", f"/rgt-secctl-{tag}")
    try:
        auth.setup()
        auth.ctl("user", "add", "narrow", "--new-user-password", PASSWORD, user=auth.root)
        auth.ctl("role", "add", "narrow-role", user=auth.root)
        auth.ctl("role", "grant-permission", "--prefix=true", "narrow-role", "readwrite",
                 f"{auth.prefix}/", user=auth.root)
        auth.ctl("user", "grant-role", "narrow", "narrow-role", user=auth.root)
        auth.ctl("user", "add", "reader", "--new-user-password", PASSWORD, user=auth.root)
        auth.ctl("role", "add", "reader-role", user=auth.root)
        for path in (auth.prefix, auth.control):
            auth.ctl("role", "grant-permission", "--prefix=true", "reader-role", "read",
                     f"{path}/", user=auth.root)
        auth.ctl("user", "grant-role", "reader", "reader-role", user=auth.root)
    except BaseException:
        server.destroy()
        raise
    yield auth
    server.destroy()


def user_env(password: str = PASSWORD) -> dict[str, str]:
    return {"REGISTRAR_ETCD_PASSWORD": password}


# === bad TLS files: exit 2 at start-up, one line, before any connection ====================
@pytest.mark.parametrize("case", [
    "missing-ca", "ca-not-pem", "ca-is-a-key", "ca-is-a-directory", "cert-without-key",
    "key-not-matching", "key-encrypted", "cert-not-pem", "tls-files-with-http",
])
def test_bad_tls_files_exit_2_with_one_line(
    case: str, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.client.key), "-aes256", "-passout",
                    "pass:x", "-out", str(encrypted)], check=True, capture_output=True)
    url = "https://127.0.0.1:1"  # never dialled: settings fail first
    c = pki.client
    args, flag = {
        "missing-ca": (["--etcd-ca", str(tmp_path / "nope.crt")], "--etcd-ca"),
        "ca-not-pem": (["--etcd-ca", str(junk)], "--etcd-ca"),
        "ca-is-a-key": (["--etcd-ca", str(c.key)], "--etcd-ca"),
        "ca-is-a-directory": (["--etcd-ca", str(tmp_path)], "--etcd-ca"),
        "cert-without-key": (["--etcd-cert", str(c.cert)], "--etcd-cert"),
        "key-not-matching": (
            ["--etcd-cert", str(c.cert), "--etcd-key", str(pki.root.key)], "--etcd-key"),
        "key-encrypted": (["--etcd-cert", str(c.cert), "--etcd-key", str(encrypted)],
                          "--etcd-key"),
        "cert-not-pem": (["--etcd-cert", str(junk), "--etcd-key", str(c.key)], "--etcd-cert"),
        "tls-files-with-http": (["--etcd-ca", str(pki.ca.cert)], "--etcd-ca"),
    }[case]
    if case == "tls-files-with-http":
        url = "http://127.0.0.1:1"
    assert cli.main(["watch", "--etcd", url, *args]) == 2
    out = capsys.readouterr()
    line = one_line(out.err)
    assert line.startswith("registrar: error: ") and flag in line, line
    assert out.out == ""


# === TLS ===================================================================================
def test_registers_and_lists_over_tls_with_a_client_certificate(
    pki: Pki, tls_etcd: EtcdServer, containers: Any, registrar: Any, unique: str
) -> None:
    prefix, node = f"/rgt-{unique}", f"node-{unique}"
    common = ["--etcd", tls_etcd.url, *pki.flags(pki.client), "--prefix", prefix,
              "--node", node]
    c = containers(labels={"registrar.service": "web"})
    sidecar = registrar("register", c.name, *common, "--ttl", str(TTL))
    key = f"{prefix}/web/{node}:{c.name}:8080"
    admin = Client(tls_etcd.url, ca=pki.ca.cert, client=pki.root)
    try:
        raw = wait_until(lambda: admin.get(key), timeout=15, message=sidecar.logs)
        assert json.loads(str(raw))["port"] == c.port(8080)
        assert admin.meta(key).lease_id != 0

        listed = run_cli(["ls", "--json", *common])
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line)["key"] for line in listed.stdout.splitlines()] == [key]

        assert sidecar.stop(10) == 0
        assert admin.get(key) is None  # revoked over TLS before exiting
    finally:
        admin.close()


@pytest.mark.parametrize("case", ["wrong-ca", "no-client-cert", "client-cert-of-another-ca"])
def test_tls_refused_by_either_side_is_one_clear_line(
    case: str, pki: Pki, tls_etcd: EtcdServer
) -> None:
    flags, words = {
        "wrong-ca": (pki.flags(pki.client, ca=pki.rogue.cert), ["not trusted", "--etcd-ca"]),
        "no-client-cert": (pki.flags(None), ["TLS", "--etcd-cert"]),
        "client-cert-of-another-ca": (pki.flags(pki.rogue_client), ["TLS", "--etcd-cert"]),
    }[case]
    done = run_cli(["ls", "--etcd", tls_etcd.url, *flags])
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("registrar: cannot read /services/ from etcd: "), line
    for word in words:
        assert word in line, line


def test_tls_refused_at_runtime_is_retried_with_a_clear_log(
    pki: Pki, tls_etcd: EtcdServer, registrar: Any, unique: str
) -> None:
    flag, port = metrics_flag()
    agent = registrar("watch", "--etcd", tls_etcd.url, *pki.flags(None), "--node",
                      f"node-{unique}", "--prefix", f"/rgt-{unique}", *flag)
    agent.wait_for_log(r"etcd unreachable or refusing requests: TLS: .*--etcd-cert", timeout=15)
    tried = etcd_requests(port)
    wait_until(lambda: etcd_requests(port) > tried, timeout=10)  # tried again, after the log
    assert agent.alive, agent.logs()
    assert scrape(port)["registrar_etcd_up"] == 0
    assert agent.stop(15) == 0
    assert "Traceback" not in agent.logs()
    assert not re.search(r"^[EIW]\d{4} ", agent.logs(), re.M), "gRPC's own lines leaked"


# === etcd authentication and RBAC =========================================================
def test_agent_promote_ls_and_shutdown_with_the_role_alone(
    auth_etcd: AuthEtcd, containers: Any, registrar: Any, unique: str
) -> None:
    node = f"node-{unique}"
    user = ["--etcd-user", "registrar"]
    c = containers(labels={"registrar.service": f"web{unique}", "registrar.version": "v1"})
    flag, port = metrics_flag()
    agent = registrar(*auth_etcd.scope_args("watch", node=node), *user, *flag, "--explicit",
                      env=user_env())
    key = f"{auth_etcd.prefix}/web{unique}/{node}:{c.name}:8080"
    admin = auth_etcd.admin()
    try:
        wait_until(lambda: admin.get(key), timeout=15, message=agent.logs)

        promoted = run_cli([*auth_etcd.scope_args("promote", f"web{unique}", "v1", node=node),
                            *user, "--timeout", "10"], env=user_env())
        assert promoted.returncode == 0, promoted.stderr
        assert json.loads(admin.get(f"{auth_etcd.control}/promoted/web{unique}") or "{}")[
            "version"] == "v1"

        listed = run_cli([*auth_etcd.scope_args("ls", node=node), *user, "--json"],
                         env=user_env())
        assert listed.returncode == 0, listed.stderr
        assert key in [json.loads(line)["key"] for line in listed.stdout.splitlines()]
        assert scrape(port)["registrar_etcd_up"] == 1

        # The password is nowhere: not on the command line, in logs, metrics or output.
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes().decode()
        metrics_text = json.dumps(scrape(port))
        assert agent.stop(15) == 0
        assert admin.get(key) is None  # revoking the lease needs write on its keys: granted
        for text in (cmdline, agent.logs(), metrics_text, promoted.stdout, promoted.stderr,
                     listed.stdout, listed.stderr):
            assert PASSWORD not in text
    finally:
        admin.close()


def test_sidecar_with_the_role_alone(
    auth_etcd: AuthEtcd, containers: Any, registrar: Any, unique: str
) -> None:
    node = f"node-{unique}"
    c = containers(labels={"registrar.service": "api"})
    sidecar = registrar(*auth_etcd.scope_args("register", c.name, node=node),
                        "--etcd-user", "registrar", env=user_env())
    key = f"{auth_etcd.prefix}/api/{node}:{c.name}:8080"
    admin = auth_etcd.admin()
    try:
        wait_until(lambda: admin.get(key), timeout=15, message=sidecar.logs)
        c.stop()
        assert sidecar.wait(15) == 0
        assert admin.get(key) is None
        assert PASSWORD not in sidecar.logs()
    finally:
        admin.close()


def test_an_expired_token_is_renewed_without_dropping_keys(
    auth_etcd: AuthEtcd, containers: Any, registrar: Any, unique: str
) -> None:
    """A sidecar (not an agent: on a shared Docker engine other tests' containers would keep an
    agent writing, and its token fresh) sits idle past the token's TTL, with heartbeats only.
    Then a promotion makes it move its key to standby and back: each time its token has expired
    and it must authenticate again, without an outage and without losing its lease."""
    node, service = f"node-{unique}", f"tok{unique}"
    user = ["--etcd-user", "registrar"]
    c = containers(labels={"registrar.service": service, "registrar.version": "v1"})
    flag, port = metrics_flag()
    sidecar = registrar(*auth_etcd.scope_args("register", c.name, node=node), *user,
                        "--resync", "0", "--log-level", "debug", *flag, env=user_env())
    key = f"{auth_etcd.prefix}/{service}/{node}:{c.name}:8080"
    standby = f"{auth_etcd.control}/standby/{service}/{node}:{c.name}:8080"
    other = f"{auth_etcd.prefix}/{service}/other-node:web-9:8080"  # a v2 instance elsewhere
    admin = auth_etcd.admin()
    try:
        wait_until(lambda: admin.get(key), timeout=15, message=sidecar.logs)
        lease = admin.meta(key).lease_id
        admin.put(other, json.dumps({"service": service, "version": "v2", "host": "10.0.0.2",
                                     "port": 1}))
        for version in ("v2", None):  # promote v2 (ours leaves rotation), then clear
            time.sleep(TOKEN_TTL + 2.5)  # heartbeats only: the token expires
            renewals = sidecar.logs().count("auth token expired; authenticating again")
            args = [service, version] if version else [service, "--clear"]
            done = run_cli([*auth_etcd.scope_args("promote", *args, node=node), *user,
                            "--timeout", "5"], env=user_env())
            assert done.returncode == 0, done.stdout + done.stderr + sidecar.logs()
            assert sidecar.logs().count("auth token expired; authenticating again") > renewals
            here, gone = (standby, key) if version else (key, standby)
            assert admin.get(gone) is None
            assert admin.meta(here).lease_id == lease  # the same lease all along

        logs = sidecar.logs()
        assert "etcd unreachable" not in logs  # renewed in place: no outage, no etcd_up flap
        assert "watching promotions failed" not in logs  # its watch outlived the token
        assert scrape(port)["registrar_etcd_up"] == 1
        assert sidecar.stop(15) == 0
        assert admin.get(key) is None
    finally:
        admin.delete(other)
        admin.close()


def test_wrong_password_is_retried_with_a_clear_log_and_ls_exits_1(
    auth_etcd: AuthEtcd, registrar: Any, unique: str
) -> None:
    wrong = "Wr0ng-pw-never-logged-9931"
    node = f"node-{unique}"
    flag, port = metrics_flag()
    agent = registrar(*auth_etcd.scope_args("watch", node=node), "--etcd-user", "registrar",
                      *flag, "--log-level", "debug", env=user_env(wrong))
    agent.wait_for_log(r"etcd refused user 'registrar': check --etcd-user", timeout=15)
    tried = etcd_requests(port)
    wait_until(lambda: etcd_requests(port) > tried, timeout=10)  # tried again, after the log
    assert agent.alive and scrape(port)["registrar_etcd_up"] == 0

    listed = run_cli([*auth_etcd.scope_args("ls", node=node), "--etcd-user", "registrar"],
                     env=user_env(wrong))
    assert listed.returncode == 1
    line = one_line(listed.stderr)
    assert "etcd refused user 'registrar'" in line and "authentication failed" in line

    no_user = run_cli(auth_etcd.scope_args("ls", node=node))
    assert no_user.returncode == 1
    assert "requires authentication" in one_line(no_user.stderr)

    assert agent.stop(15) == 0
    for text in (agent.logs(), listed.stderr, listed.stdout):
        assert wrong not in text and PASSWORD not in text


def test_a_role_without_the_control_prefix_is_refused_clearly(
    auth_etcd: AuthEtcd, registrar: Any, unique: str
) -> None:
    """readwrite on --prefix alone is not enough for watch (it reads promotions and keeps
    standby keys under --control-prefix): it says so and retries."""
    agent = registrar(*auth_etcd.scope_args("watch", node=f"node-{unique}"),
                      "--etcd-user", "narrow", *NO_METRICS, env=user_env())
    agent.wait_for_log(r"user 'narrow' lacks a permission: .*--control-prefix", timeout=15)
    assert agent.alive
    assert agent.stop(15) == 0


def test_drain_needs_write_on_draining_alone(
    auth_etcd: AuthEtcd, containers: Any, registrar: Any, unique: str
) -> None:
    """The SPEC's Privileges: `drain` reads the prefixes and writes only
    `{control_prefix}/draining/`; the owner (here a sidecar) does the rest with its own role."""
    drainer = f"drainer{unique}"
    auth_etcd.ctl("user", "add", drainer, "--new-user-password", PASSWORD, user=auth_etcd.root)
    auth_etcd.ctl("role", "add", f"{drainer}-role", user=auth_etcd.root)
    for perm, path in (("read", auth_etcd.prefix), ("read", auth_etcd.control),
                       ("readwrite", f"{auth_etcd.control}/draining")):
        auth_etcd.ctl("role", "grant-permission", "--prefix=true", f"{drainer}-role", perm,
                      f"{path}/", user=auth_etcd.root)
    auth_etcd.ctl("user", "grant-role", drainer, f"{drainer}-role", user=auth_etcd.root)
    node = f"node-{unique}"
    c = containers(labels={"registrar.service": "dr"})
    sidecar = registrar(*auth_etcd.scope_args("register", c.name, node=node),
                        "--etcd-user", "registrar", env=user_env())
    key = f"{auth_etcd.prefix}/dr/{node}:{c.name}:8080"
    admin = auth_etcd.admin()
    try:
        wait_until(lambda: admin.get(key), timeout=15, message=sidecar.logs)
        base = [*auth_etcd.scope_args("drain", c.name, node=node), "--etcd-user", drainer,
                "--timeout", "10"]
        drained = run_cli(base, env=user_env())
        assert drained.returncode == 0, drained.stderr
        assert admin.get(key) is None
        undone = run_cli([*base, "--undo"], env=user_env())
        assert undone.returncode == 0, undone.stderr
        assert admin.get(key) is not None
        assert sidecar.stop(15) == 0
    finally:
        admin.close()


def test_ls_needs_read_only(auth_etcd: AuthEtcd, unique: str) -> None:
    admin = auth_etcd.admin()
    key = f"{auth_etcd.prefix}/ro{unique}/other-node:web-1:8080"
    try:
        admin.put(key, json.dumps({"service": f"ro{unique}", "host": "10.0.0.1", "port": 1}))
        listed = run_cli([*auth_etcd.scope_args("ls", f"ro{unique}", node="n"),
                          "--etcd-user", "reader"], env=user_env())
        assert listed.returncode == 0, listed.stderr
        assert "10.0.0.1:1" in listed.stdout
    finally:
        admin.delete(key)
        admin.close()


def test_a_client_certificate_with_a_cn_under_auth_is_refused_clearly_one_without_works(
    pki: Pki, containers: Any, registrar: Any, unique: str, tmp_path: Path
) -> None:
    """etcd with TLS client-cert-auth and auth on refuses every JSON-gateway request made with
    a client certificate that has a Common Name (its gateway cannot take the CN as the user;
    etcd's docs say so): registrar says that in one line and what to do instead, writes
    nothing, and stops cleanly. A certificate without a CN, with --etcd-user and the
    password, works."""
    tls = ["--cacert", str(pki.ca.cert), "--cert", str(pki.root.cert), "--key",
           str(pki.root.key)]
    server = start_etcd(tmp_path / "etcd", "rgt-cn", scheme="https",
                        ssl_context=client_context(pki.ca, pki.client),
                        extra_args=etcd_tls_args(pki.ca, pki.server))
    try:
        auth = AuthEtcd(server, f"/rgt-{unique}", f"/rgt-ctl-{unique}", tls=tls)
        auth.setup()
        node = f"node-{unique}"
        c = containers(labels={"registrar.service": "cn"})
        key = f"{auth.prefix}/cn/{node}:{c.name}:8080"
        no_cn = pki.ca.issue(f"registrar-{unique}", with_cn=False)
        admin = auth.admin(ca=pki.ca.cert, client=no_cn)  # root, by password, over the gateway
        try:
            refused = registrar(*auth.scope_args("register", c.name, node=node),
                                *pki.flags(pki.client))
            refused.wait_for_log(r"Common Name.*without a CN", timeout=15)
            assert admin.get(key) is None
            assert refused.stop(15) == 0
            assert "Traceback" not in refused.logs()

            agent = registrar(*auth.scope_args("register", c.name, node=node),
                              *pki.flags(no_cn), "--etcd-user", "registrar", env=user_env())
            wait_until(lambda: admin.get(key), timeout=15, message=agent.logs)
            assert agent.stop(15) == 0
            assert admin.get(key) is None
        finally:
            admin.close()
    finally:
        server.destroy()


UNITS = ROOT / "units"


def test_shipped_units_never_put_the_password_on_a_command_line() -> None:
    """`ps` shows command lines and `systemctl show` shows Environment=: the password must
    come from an EnvironmentFile= (or the environment docker passes through with `-e NAME`)."""
    units = [p for p in UNITS.rglob("*") if p.suffix in (".service", ".conf")]
    if not units:
        pytest.skip("no unit files under units/ yet")
    for unit in units:
        for number, line in enumerate(unit.read_text().splitlines(), 1):
            text = line.strip()
            where = f"{unit.relative_to(ROOT)}:{number}: {text}"
            assert "--etcd-password" not in text, where
            assert not re.search(r"ETCD_PASSWORD=\S", text), where
            if text.startswith("Environment="):
                assert "PASSWORD" not in text, where


# === Docker: read only =====================================================================
def test_everything_works_through_a_read_only_docker_socket(
    etcd: EtcdServer, etcd_reader: Any, containers: Any, registrar: Any, unique: str
) -> None:
    proxy = ReadOnlyDockerProxy()
    try:
        # the filter is real: a write through it is refused
        refused = subprocess.run(["docker", "-H", proxy.url, "network", "create",
                                  f"rgt-ro-{unique}"], capture_output=True, text=True)
        assert refused.returncode != 0 and "refused" in refused.stderr
        proxy.refused.clear()

        prefix, node = f"/rgt-{unique}", f"node-{unique}"
        common = ["--etcd", etcd.url, "--prefix", prefix, "--node", node, "--ttl", str(TTL),
                  "--docker", proxy.url]
        agent = registrar("watch", *common, "--explicit", *NO_METRICS)
        agent.wait_for_log("docker connected", timeout=15)
        a = containers(labels={"registrar.service": "ro"})
        b = containers(labels={"registrar.service": "ro-side"})
        sidecar = registrar("register", b.name, *common, "--node", f"side-{unique}")
        key_a = f"{prefix}/ro/{node}:{a.name}:8080"
        key_b = f"{prefix}/ro-side/side-{unique}:{b.name}:8080"
        wait_until(lambda: etcd_reader.get(key_a), timeout=10, message=agent.logs)
        wait_until(lambda: etcd_reader.get(key_b), timeout=10, message=sidecar.logs)

        a.stop()  # seen through the events stream, which passes the filter
        wait_until(lambda: etcd_reader.get(key_a) is None, timeout=10, message=agent.logs)
        b.stop()
        assert sidecar.wait(15) == 0
        assert agent.stop(15) == 0

        methods = {method for method, _ in proxy.passed}
        paths = [path for _, path in proxy.passed]
        assert methods == {"GET"}
        assert any("/events" in p for p in paths) and any("/json" in p for p in paths)
        assert proxy.refused == [], proxy.refused
    finally:
        proxy.close()


# === hostile values in etcd ================================================================
GARBAGE: dict[str, bytes] = {
    "web/other-node:web-1:8080": b"not json at all",
    "web/other-node:web-2:8080": b'["a", "list"]',
    "web/other-node:web-3:8080": b'{"host": {"nested": [1, 2]}, "port": "x", "registered_at": 7}',
    "web/other-node:web-4:8080": bytes(range(256)),
    "web/other-node:web-5:8080": b'{"service": "web", "host": "10.0.0.9", "port": 80}' * 3000,
    "onlyservice": b"{}",
    "a/b/c/d": b"{}",
    "../escape": b"{}",
    "web/": b"",
}


def test_foreign_and_garbage_values_crash_neither_the_agent_nor_ls(
    etcd: EtcdServer, etcd_reader: Any, containers: Any, registrar: Any, unique: str
) -> None:
    prefix, control, node = f"/rgt-{unique}", f"/rgt-ctl-{unique}", f"node-{unique}"
    for rest, raw in GARBAGE.items():
        etcd_reader.put(f"{prefix}/{rest}", raw)
    etcd_reader.put(f"{control}/promoted/web", b"\xff\xfe not json")
    etcd_reader.put(f"{control}/promoted/a/b", b'{"version": 1}')
    stale = f"{prefix}/web/{node}:gone-container:8080"  # ours, left by an earlier run
    etcd_reader.put(stale, b"\x00garbage")
    before = raw_prefix(etcd_reader, f"{prefix}/")

    common = ["--etcd", etcd.url, "--prefix", prefix, "--control-prefix", control,
              "--node", node, "--ttl", str(TTL)]
    c = containers(labels={"registrar.service": "web"})
    agent = registrar("watch", *common, "--explicit", *NO_METRICS)
    key = f"{prefix}/web/{node}:{c.name}:8080"
    wait_until(lambda: etcd_reader.get(key), timeout=15, message=agent.logs)
    wait_until(lambda: etcd_reader.get(stale) is None, timeout=5, message=agent.logs)
    after = raw_prefix(etcd_reader, f"{prefix}/")
    for k, v in before.items():  # every other key untouched
        if k != stale:
            assert after.get(k) == v, k

    for extra in ([], ["--json"], ["web"]):
        listed = run_cli(["ls", *common, *extra])
        assert listed.returncode == 0, listed.stderr
        assert key in listed.stdout or c.name in listed.stdout
    assert agent.alive
    assert agent.stop(15) == 0
    assert "Traceback" not in agent.logs()
    etcd_reader.delete_prefix(f"{prefix}/")
    etcd_reader.delete_prefix(f"{control}/")


def test_deeply_nested_json_crashes_neither_ls_nor_the_agent(
    etcd: EtcdServer, etcd_reader: Any, containers: Any, registrar: Any, unique: str
) -> None:
    prefix, control, node = f"/rgt-{unique}", f"/rgt-ctl-{unique}", f"node-{unique}"
    deep = b"[" * 200_000
    etcd_reader.put(f"{prefix}/web/other-node:deep:8080", deep)
    etcd_reader.put(f"{control}/promoted/web", deep)
    try:
        common = ["--etcd", etcd.url, "--prefix", prefix, "--control-prefix", control,
                  "--node", node, "--ttl", str(TTL)]
        listed = run_cli(["ls", *common])
        c = containers(labels={"registrar.service": "deep"})
        agent = registrar("watch", *common, "--explicit", *NO_METRICS)
        key = f"{prefix}/deep/{node}:{c.name}:8080"
        try:
            wait_until(lambda: etcd_reader.get(key), timeout=4, message=agent.logs)
        finally:
            agent.stop(15)
        assert listed.returncode == 0, listed.stderr
        assert "Traceback" not in agent.logs()
    finally:
        etcd_reader.delete_prefix(f"{prefix}/")
        etcd_reader.delete_prefix(f"{control}/")


def test_a_router_whose_report_is_refused_says_so_once_and_is_unhealthy(
    auth_etcd: AuthEtcd, registrar: Any, unique: str, tmp_path: Path
) -> None:
    """A router whose role may read both prefixes but not write `{control}/routers/`: it routes,
    but no canary could see its traffic, so it says why once, counts it and /healthz is 503."""
    from tests.helpers import healthz
    from tests.support.proc import free_port

    flag, metrics_port = metrics_flag()
    router = registrar(*auth_etcd.scope_args("haproxy", node=f"router-{unique}"),
                       "--bind", f"web{unique}=127.0.0.1:{free_port()}", "--mode", "http",
                       "--config", str(tmp_path / "haproxy.cfg"), "--etcd-user", "reader",
                       *flag, env=user_env())
    router.wait_for_log("etcd refuses the router's report", timeout=15)
    wait_until(lambda: healthz(metrics_port) == 503, timeout=10)
    wait_until(lambda: sum(v for k, v in scrape(metrics_port).items()
                           if k.startswith("registrar_etcd_write_refusals_total")) >= 2,
               timeout=10)
    assert scrape(metrics_port)["registrar_etcd_writes_refused"] == 1
    assert router.logs().count("etcd refuses the router's report") == 1
    assert "lacks a permission" in router.logs()
    assert router.stop(15) == 0
