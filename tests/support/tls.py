"""Throw-away certificate authorities and certificates for TLS tests, made with the `openssl`
command (the `cryptography` package is not installed here).

    ca = CertificateAuthority(tmp_path / "pki", "rgt-ca")
    server = ca.issue("etcd", server=True)          # SAN IP:127.0.0.1, DNS:localhost
    client = ca.issue("registrar")                  # CN=registrar, clientAuth
    etcd = EtcdServer(..., scheme="https", ssl_context=client_context(ca, client),
                      extra_args=etcd_tls_args(ca, server))

Keys are EC P-256 (fast to make), unencrypted PEM; certificates are valid for two days.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class TlsError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise TlsError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path

    @property
    def pair(self) -> tuple[str, str]:
        return str(self.cert), str(self.key)


class CertificateAuthority:
    """A self-signed CA in `directory` (`ca.crt`, `ca.key`) that issues certificates."""

    def __init__(self, directory: str | Path, name: str = "rgt-ca") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = self.dir / f"{name}.crt"
        self.key = self.dir / f"{name}.key"
        _openssl(
            "req", "-x509", *_CURVE, "-keyout", self.key.name, "-out", self.cert.name,
            "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )  # fmt: skip

    def issue(
        self,
        cn: str,
        *,
        server: bool = False,
        ips: tuple[str, ...] = ("127.0.0.1",),
        dns: tuple[str, ...] = ("localhost",),
        with_cn: bool = True,
    ) -> Issued:
        """A certificate for `cn` signed by this CA: a client certificate, or with `server` one
        that also serves `ips`/`dns` (etcd uses its server certificate as a client to its peers
        too, so it gets both usages). Without `with_cn`, `cn` is only its organisation: a
        certificate with no Common Name at all."""
        stem = f"{self.name}-{cn}"
        key, csr, cert, ext = (self.dir / f"{stem}.{s}" for s in ("key", "csr", "crt", "ext"))
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
        if server:
            alt = [f"IP:{ip}" for ip in ips] + [f"DNS:{name}" for name in dns]
            lines.append("extendedKeyUsage=serverAuth,clientAuth")
            if alt:
                lines.append("subjectAltName=" + ",".join(alt))
        else:
            lines.append("extendedKeyUsage=clientAuth")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", *_CURVE, "-keyout", key.name, "-out", csr.name, "-subj",
                 f"/CN={cn}" if with_cn else f"/O={cn}",
                 cwd=self.dir)
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.cert.name, "-CAkey", self.key.name,
            "-CAcreateserial", "-out", cert.name, "-days", DAYS, "-extfile", ext.name,
            cwd=self.dir,
        )  # fmt: skip
        return Issued(cert, key)


def etcd_tls_args(ca: CertificateAuthority, server: Issued, client_cert_auth: bool = True) -> (
    list[str]
):
    """etcd flags serving clients over TLS with `server`, trusting client certificates of `ca`."""
    args = ["--cert-file", str(server.cert), "--key-file", str(server.key),
            "--trusted-ca-file", str(ca.cert)]
    if client_cert_auth:
        args.append("--client-cert-auth")
    return args


def client_context(ca: CertificateAuthority, client: Issued | None = None) -> ssl.SSLContext:
    """An ssl context trusting `ca` and presenting `client` (for HTTPS health checks)."""
    context = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        context.load_cert_chain(*client.pair)
    return context
