"""The catalog's HTTP side in-process: its state fed as the followers feed it, no etcd."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from registrar.adapters.etcd_store import KeyEvent
from registrar.catalog.metrics import CatalogMetrics
from registrar.catalog.server import Auth, CatalogServer
from registrar.catalog.state import CatalogState
from registrar.core.layout import Layout
from registrar.core.store import StoredKey

LAYOUT = Layout("/services", "/registrar")
WEB = json.dumps({"service": "web", "host": "10.0.0.5", "port": 32768, "version": "v1",
                  "node": "core-01", "tags": [], "metrics_path": "/metrics"})
AUTH = "Basic " + base64.b64encode(b"ops:s3cret").decode()


class Served:
    def __init__(self, state: CatalogState, server: CatalogServer) -> None:
        self.state = state
        self.base = f"http://127.0.0.1:{server.port}"

    def get(self, path: str, auth: str | None = AUTH) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def served() -> Iterator[Served]:
    state = CatalogState(LAYOUT)
    state.replace("prefix", {"/services/web/core-01:web-1:8080": StoredKey(WEB, 1)}, 10)
    state.replace("control", {}, 10)
    healthy: list[str | None] = [None]
    server = CatalogServer(("127.0.0.1", 0), state, CatalogMetrics(), lambda: healthy[0],
                           Auth("ops", "s3cret"))
    server.start()
    try:
        yield Served(state, server)
    finally:
        state.close()
        server.stop()


def test_basic_auth_on_every_path_but_healthz(served: Served) -> None:
    for path in ("/", "/v1/catalog", "/v1/sd/prometheus", "/metrics", "/nowhere"):
        for auth in (None, "Basic " + base64.b64encode(b"ops:wrong").decode(), "Bearer x"):
            status, headers, _ = served.get(path, auth)
            assert status == 401, (path, auth)
            assert headers["WWW-Authenticate"] == 'Basic realm="registrar catalog"'
    assert served.get("/healthz", None)[:1] == (200,)
    assert served.get("/nowhere")[0] == 404


def test_catalog_and_discovery(served: Served) -> None:
    status, headers, body = served.get("/v1/catalog")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["X-Registrar-Index"] == "10"
    answer = json.loads(body)
    assert answer["revision"] == 10 and answer["stale"] is False
    assert [i["instance"] for i in answer["services"]["web"]["instances"]] == [
        "core-01:web-1:8080"]
    groups = served.json("/v1/sd/prometheus")
    assert groups[0]["targets"] == ["10.0.0.5:32768"]
    assert groups[0]["labels"]["__metrics_path__"] == "/metrics"
    assert served.json("/v1/sd/prometheus?service=api") == []
    assert len(served.json("/v1/sd/prometheus?metrics=true")) == 1


def test_a_blocking_query_answers_at_the_next_revision(served: Served) -> None:
    def put_later() -> None:
        time.sleep(0.3)
        served.state.apply([KeyEvent("/services/web/core-01:web-2:8080", WEB, 11)])

    threading.Thread(target=put_later).start()
    started = time.monotonic()
    answer = served.json("/v1/catalog?index=10")
    assert 0.25 < time.monotonic() - started < 2.0
    assert answer["revision"] == 11 and len(answer["services"]["web"]["instances"]) == 2
    # already past: at once; nothing new: after `wait`
    started = time.monotonic()
    assert served.json("/v1/catalog?index=3")["revision"] == 11
    assert served.json("/v1/catalog?index=11&wait=0.3")["revision"] == 11
    assert 0.3 <= time.monotonic() - started < 2.0
    for bad in ("index=x", "index=-1", "index=1&wait=x", "index=1&wait=9999"):
        assert served.get("/v1/catalog?" + bad)[0] == 400


def test_stale_while_etcd_is_away_and_a_waiting_query_hears_of_it(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from registrar.catalog import state as state_module

    monkeypatch.setattr(state_module, "STALE_WAIT", 0.4)  # 1 s in earnest

    def down_later() -> None:
        time.sleep(0.2)
        served.state.etcd_up(False)

    threading.Thread(target=down_later).start()
    answer = served.json("/v1/catalog?index=10&wait=5")
    assert answer["stale"] is True and answer["stale_seconds"] >= 0
    assert answer["services"]["web"]["instances"]  # the last catalog, still served
    started = time.monotonic()  # already stale when it begins: it waits STALE_WAIT at most
    assert served.json("/v1/catalog?index=10&wait=5")["stale"] is True
    assert 0.35 < time.monotonic() - started < 1.4
    served.state.etcd_up(True)
    assert served.json("/v1/catalog")["stale"] is False


def test_the_page_and_metrics(served: Served) -> None:
    status, headers, body = served.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert "/v1/catalog" in page and "http://" not in page and "https://" not in page
    assert "innerHTML" not in page  # values are set as text only
    served.get("/v1/catalog")
    text = served.get("/metrics")[2].decode()
    assert "registrar_etcd_up" in text
    assert 'registrar_catalog_instances{state="rotation"} 1.0' in text
    assert 'registrar_catalog_requests_total{code="200",path="/v1/catalog"}' in text


def test_both_prefixes_read_at_one_revision_are_both_served() -> None:
    """The control prefix read first, the prefix at the same revision: the second read shows
    (a catalog cached by revision alone kept the first one, empty, for good)."""
    state = CatalogState(LAYOUT)
    state.replace("control", {}, 10)
    assert state.view().catalog.services == {}
    state.replace("prefix", {"/services/web/core-01:web-1:8080": StoredKey(WEB, 1)}, 10)
    assert list(state.view().catalog.services) == ["web"]
    assert b"10.0.0.5" in state.targets(None, False)


def test_the_share_follows_router_reports_as_they_arrive() -> None:
    now = [100.0]
    state = CatalogState(LAYOUT, clock=lambda: now[0])
    state.replace("prefix", {}, 1)

    def report(revision: int, v1: int, v2: int) -> KeyEvent:
        value = json.dumps({"at": "2015-07-20T12:00:00Z",
                            "services": {"web": {"v1": {"2xx": v1}, "v2": {"2xx": v2}}}})
        return KeyEvent("/registrar/routers/lb-1", value, revision)

    state.replace("control", {"/registrar/routers/lb-1": StoredKey(report(1, 500, 0).value or "",
                                                                    7)}, 1)
    assert state.view().catalog.services["web"].share == {}  # one look: no window yet
    now[0] += 10
    state.apply([report(2, 590, 10)])
    assert state.view().catalog.services["web"].share == {"v1": 90.0, "v2": 10.0}
    now[0] += 40  # the first look is out of the window; the second is its start
    state.apply([report(3, 610, 30)])
    assert state.view().catalog.services["web"].share == {"v1": 50.0, "v2": 50.0}
    assert state.stale_seconds() is None and state.loaded
