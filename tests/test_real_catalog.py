"""`registrar catalog` as a real process over a real etcd: its JSON, blocking queries, basic auth,
stale while etcd is away, HTTPS, and the page in a real browser (Debian's headless chromium)."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import Browser
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until
from tests.support.tls import CertificateAuthority

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

ROOT = Path(__file__).resolve().parent.parent
AT = "2015-07-20T12:00:00Z"


def instance(service: str, version: str, node: str = "core-01", port: int = 32768,
             **extra: Any) -> str:
    return json.dumps({"service": service, "host": "10.0.0.5", "port": port,
                       "version": version, "node": node, "tags": [], "registered_at": AT,
                       **extra})


class Catalog:
    """One `registrar catalog` under test, with its own prefixes."""

    def __init__(self, registrar: RegistrarFactory, etcd_url: str, unique: str,
                 *extra: str, env: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None, auth: str | None = None) -> None:
        self.prefix, self.control = f"/rgt-{unique}", f"/rgt-{unique}-ctl"
        self.port = free_port()
        self.proc: RegistrarProcess = registrar(
            "catalog", "--etcd", etcd_url, "--prefix", self.prefix, "--control-prefix",
            self.control, "--listen", f"127.0.0.1:{self.port}", *extra, env=env)
        self.base = f"{'https' if context else 'http'}://127.0.0.1:{self.port}"
        self.context = context
        self.auth = auth
        wait_until(lambda: self.status("/healthz") == 200, timeout=15, ignore=(OSError,),
                   message=lambda: "the catalog never answered; log:\n" + self.proc.logs())

    def get(self, path: str, auth: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path)
        if auth or self.auth:
            request.add_header("Authorization", auth or self.auth or "")
        try:
            with urllib.request.urlopen(request, timeout=70, context=self.context) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def status(self, path: str, auth: str | None = None) -> int:
        return self.get(path, auth)[0]

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def catalog(registrar: RegistrarFactory, etcd: EtcdServer,
            unique: str) -> Callable[..., Catalog]:
    def start(*extra: str, **kw: Any) -> Catalog:
        return Catalog(registrar, etcd.url, unique, *extra, **kw)

    return start


def test_the_json_follows_etcd_and_a_blocking_query_answers_at_once(
        catalog: Callable[..., Catalog], etcd_reader: EtcdReader) -> None:
    cat = catalog()
    assert cat.json("/v1/catalog")["services"] == {}
    assert cat.json("/v1/sd/prometheus") == []
    etcd_reader.put(f"{cat.prefix}/web/core-01:web-1:8080",
                    instance("web", "v1", metrics_path="/metrics"))
    etcd_reader.put(f"{cat.control}/standby/web/core-01:web-0:8080", instance("web", "v0"))
    etcd_reader.put(f"{cat.control}/promoted/web", json.dumps({"version": "v1", "at": AT}))
    etcd_reader.put(f"{cat.control}/draining/core-02/web-9", json.dumps({"at": AT}))
    etcd_reader.put(f"{cat.prefix}/web/core-02:web-9:8080", instance("web", "v1", "core-02"))
    answer = wait_until(lambda: (a := cat.json("/v1/catalog"))
                        and len(a["services"].get("web", {}).get("instances", ())) == 3 and a,
                        timeout=5)
    states = {i["instance"]: i["state"] for i in answer["services"]["web"]["instances"]}
    assert states == {"core-01:web-1:8080": "rotation", "core-01:web-0:8080": "standby",
                      "core-02:web-9:8080": "draining"}
    assert answer["services"]["web"]["promoted"] == "v1" and answer["stale"] is False
    groups = cat.json("/v1/sd/prometheus?metrics=true")
    assert [g["targets"] for g in groups] == [["10.0.0.5:32768"]]
    assert groups[0]["labels"]["__metrics_path__"] == "/metrics"

    revision = answer["revision"]
    waits = []
    for n in range(5):
        started = time.monotonic()

        def put_soon(n: int = n) -> None:
            time.sleep(0.5)
            etcd_reader.put(f"{cat.control}/maintenance/node/core-0{n}",
                            json.dumps({"reason": f"r{n}", "at": AT}))

        import threading
        threading.Thread(target=put_soon).start()
        got = cat.json(f"/v1/catalog?index={revision}")
        waits.append(time.monotonic() - started - 0.5)
        assert got["revision"] > revision
        assert any(m["name"] == f"core-0{n}" for m in got["maintenance"])
        revision = got["revision"]
    assert sorted(waits)[2] < 1.0, waits  # the put -> answer, median
    started = time.monotonic()
    assert cat.json(f"/v1/catalog?index={revision}&wait=1")["revision"] == revision
    assert 0.9 < time.monotonic() - started < 5


def test_basic_auth_and_https(catalog: Callable[..., Catalog], tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki", "rgt-catalog-ca")
    server = ca.issue("catalog", server=True)
    context = ssl.create_default_context(cafile=str(ca.cert))
    good = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    cat = catalog("--catalog-user", "ops", "--catalog-cert", str(server.cert),
                  "--catalog-key", str(server.key), env={"REGISTRAR_CATALOG_PASSWORD": "s3cret"},
                  context=context)
    assert cat.status("/healthz") == 200
    for path in ("/", "/v1/catalog", "/v1/sd/prometheus", "/metrics"):
        assert cat.status(path) == 401
        assert cat.status(path, "Basic " + base64.b64encode(b"ops:nope").decode()) == 401
        assert cat.status(path, good) == 200
    with pytest.raises(OSError):  # plain HTTP gets nowhere
        urllib.request.urlopen(f"http://127.0.0.1:{cat.port}/healthz", timeout=5)
    assert cat.proc.stop() == 0


def test_stale_while_etcd_is_away(catalog: Callable[..., Catalog], etcd_restartable: EtcdServer,
                                  etcd_reader: EtcdReader) -> None:
    cat = catalog()
    etcd_reader.put(f"{cat.prefix}/web/core-01:web-1:8080", instance("web", "v1"))
    wait_until(lambda: cat.json("/v1/catalog")["services"], timeout=5)
    revision = cat.json("/v1/catalog")["revision"]
    etcd_restartable.stop()
    started = time.monotonic()
    answer = cat.json(f"/v1/catalog?index={revision}&wait=20")  # woken by the outage
    assert answer["stale"] is True and answer["stale_seconds"] >= 0
    assert time.monotonic() - started < 10
    assert answer["services"]["web"]["instances"][0]["instance"] == "core-01:web-1:8080"
    metrics = cat.get("/metrics")[1].decode()
    assert "registrar_etcd_up 0.0" in metrics
    etcd_restartable.start(timeout=30)
    wait_until(lambda: cat.json("/v1/catalog")["stale"] is False, timeout=20, ignore=(OSError,))
    assert cat.proc.stop() == 0


def _page_state(browser: Browser) -> dict[str, Any]:
    state: dict[str, Any] = browser.evaluate("""(() => ({
        revision: document.body.getAttribute('data-revision'),
        stale: document.getElementById('stale').getAttribute('data-stale'),
        instances: Object.fromEntries(Array.from(document.querySelectorAll('[data-instance]'))
            .map(e => [e.dataset.instance, e.dataset.state])),
        versions: Array.from(document.querySelectorAll('[data-service] [data-version]'))
            .map(e => e.closest('[data-service]').dataset.service + '/' + e.dataset.version),
        canary: Array.from(document.querySelectorAll('.bar.canary'))
            .map(e => e.dataset.percent),
        maintenance: Array.from(document.querySelectorAll('[data-maintenance]'))
            .map(e => e.dataset.maintenance),
        scripts: document.querySelectorAll('script').length,
    }))()""")
    return state


def test_the_page_in_a_real_browser_updates_itself(
        catalog: Callable[..., Catalog], etcd_reader: EtcdReader,
        etcd_restartable: EtcdServer) -> None:
    cat = catalog()
    put = etcd_reader.put
    put(f"{cat.prefix}/web/core-01:web-1:8080", instance("web", "v1"))
    put(f"{cat.prefix}/web/core-02:web-2:8080", instance("web", "v1", "core-02"))
    put(f"{cat.prefix}/web/core-03:web-3:8080", instance("web", "v2", "core-03"))
    put(f"{cat.prefix}/api/core-01:api-1:80", instance("api", "b7", port=32770))
    # anyone's input: it must show as text, never run
    put(f"{cat.control}/maintenance/node/core-09",
        json.dumps({"reason": "<img src=x onerror=alert(1)><script>x()</script>", "at": AT}))
    wait_until(lambda: len(cat.json("/v1/catalog")["services"]) == 2, timeout=5)
    with Browser(cat.base + "/") as browser:
        browser.wait_for("document.body && document.body.getAttribute('data-revision')")
        before = _page_state(browser)
        assert before["instances"] == {"core-01:web-1:8080": "rotation",
                                       "core-02:web-2:8080": "rotation",
                                       "core-03:web-3:8080": "rotation",
                                       "core-01:api-1:80": "rotation"}
        assert sorted(before["versions"]) == ["api/b7", "web/v1", "web/v2"]
        assert before["scripts"] == 1 and before["canary"] == []
        assert before["maintenance"] == ["node:core-09"]
        assert "<img src=x" in str(browser.evaluate(
            "document.querySelector('[data-maintenance]').textContent"))

        latencies = []
        for n, (key, value, expect) in enumerate([
            (f"{cat.control}/weights/web",
             json.dumps({"version": "v2", "percent": 10, "at": AT}), "canary"),
            (f"{cat.control}/maintenance/instance/web/core-02:web-2:8080",
             json.dumps({"reason": "debug", "at": AT}), "maintenance"),
            (f"{cat.control}/draining/core-01/web-1", json.dumps({"at": AT}), "draining"),
        ]):
            revision = browser.evaluate("document.body.getAttribute('data-revision')")
            started = time.monotonic()
            put(key, value)
            browser.wait_for(f"document.body.getAttribute('data-revision') != '{revision}'",
                             timeout=2.0)
            latencies.append(time.monotonic() - started)
            after = _page_state(browser)
            if expect == "canary":
                assert after["canary"] == ["10"]
            elif expect == "maintenance":
                assert after["instances"]["core-02:web-2:8080"] == "maintenance"
            else:
                assert after["instances"]["core-01:web-1:8080"] == "draining", n
        assert max(latencies) < 2.0, latencies

        etcd_restartable.stop()
        browser.wait_for("document.getElementById('stale').getAttribute('data-stale') == 'true'",
                         timeout=5.0)
        assert _page_state(browser)["instances"]["core-03:web-3:8080"] == "rotation"
        etcd_restartable.start(timeout=30)
        browser.wait_for("document.getElementById('stale').getAttribute('data-stale') == 'false'",
                         timeout=20.0)
    assert cat.proc.stop() == 0
