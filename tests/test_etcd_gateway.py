"""The etcd adapter (`EtcdStore`) against a local stand-in for etcd's JSON gateway: what each
answer of etcd becomes (errors, a lease gone, a stale token, a compacted watch), failover to the
next endpoint, and a watch read line by line and cancelled by closing it."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from registrar.adapters.etcd_store import (
    GATEWAY_WATCH_BODY,
    EtcdStore,
    GatewayError,
    b64,
    diagnose,
)
from registrar.core.layout import _CONTROL_KINDS, Layout
from registrar.core.store import (
    EtcdRefused,
    EtcdUnavailable,
    KeyEvent,
    LeaseNotFound,
    StoredKey,
    WatchCompacted,
)
from registrar.metrics import Metrics
from registrar.settings import EtcdEndpoint, EtcdSettings
from tests.test_http1 import Server, chunked

Answer = Callable[[str, dict[str, Any], dict[str, str]], bytes]


def reply(body: Any, status: int = 200) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(data), data))


def gateway(answer: Answer) -> Callable[[socket.socket, bytes], None]:
    """A handler calling `answer(path, json body, headers)` for each request."""

    def handle(conn: socket.socket, request: bytes) -> None:
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        conn.sendall(answer(lines[0].split()[1], json.loads(body or b"{}"), headers))

    return handle


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def store_for(servers: list[Server], answer: Answer, *, down_first: bool = False,
              user: str | None = None) -> EtcdStore:
    server = Server(gateway(answer))
    servers.append(server)
    endpoints = [EtcdEndpoint("127.0.0.1", server.address.port, False)]
    if down_first:
        with socket.socket() as unused:  # a port nobody listens on
            unused.bind(("127.0.0.1", 0))
            endpoints.insert(0, EtcdEndpoint("127.0.0.1", unused.getsockname()[1], False))
    return EtcdStore(EtcdSettings(tuple(endpoints), user=user,
                                  password="pw" if user else None, timeout=1.0), Metrics())


HEADER = {"revision": "9", "member_id": "1"}


def test_keys_and_values_are_base64_and_ids_strings_both_ways(servers: list[Server]) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def answer(path: str, body: dict[str, Any], _: dict[str, str]) -> bytes:
        seen.append((path, body))
        if path == "/v3/lease/grant":
            return reply({"header": HEADER, "ID": "9007199254740993", "TTL": "5"})
        if path == "/v3/kv/range":
            return reply({"header": HEADER, "kvs": [
                {"key": b64("/s/web/a"), "value": base64.b64encode(b"\xffok").decode(),
                 "lease": "9007199254740993"}], "count": "1"})
        return reply({"header": HEADER})

    store = store_for(servers, answer, down_first=True)
    lease = store.grant(5)
    assert lease == 9007199254740993  # past 2**53: kept exact as a string
    store.put("/s/web/é", "v", lease)
    assert store.list_prefix("/s") == (
        {"/s/web/a": StoredKey("\ufffdok", 9007199254740993)}, 9)
    assert seen[1] == ("/v3/kv/put", {"key": b64("/s/web/é"), "value": b64("v"),
                                      "lease": "9007199254740993"})
    assert seen[2][1] == {"key": b64("/s/"), "range_end": b64("/s0")}
    assert store.up is True


def test_etcd_answers_become_the_project_errors_with_etcd_s_message(
    servers: list[Server],
) -> None:
    def answer(path: str, body: dict[str, Any], _: dict[str, str]) -> bytes:
        if path == "/v3/lease/keepalive":  # a lease gone: 200 without a TTL
            return chunked(json.dumps({"result": {"header": HEADER, "ID": body["ID"]}}).encode())
        if path == "/v3/lease/revoke":
            return reply({"error": "etcdserver: requested lease not found", "code": 5}, 404)
        if path == "/v3/kv/deleterange":
            return reply({"error": "etcdserver: permission denied", "code": 7}, 403)
        return reply({"error": "etcdserver: mvcc: database space exceeded", "code": 8}, 429)

    store = store_for(servers, answer)
    with pytest.raises(LeaseNotFound):
        store.keepalive(7)
    store.revoke(7)  # already gone: nothing to do
    with pytest.raises(EtcdRefused, match="database space exceeded") as full:
        store.put("/k", "v")
    assert full.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(EtcdRefused, match=r"lacks a permission.*permission denied") as denied:
        store.delete("/k")
    assert denied.value.code == "PERMISSION_DENIED"
    assert store.up is True  # etcd answered


def test_no_endpoint_answering_is_unavailable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    store = EtcdStore(EtcdSettings((EtcdEndpoint("127.0.0.1", port, False),), timeout=0.5))
    with pytest.raises(EtcdUnavailable, match="ConnectionRefusedError"):
        store.grant(5)
    assert store.up is False


def test_a_request_waits_request_timeout_for_its_answer(servers: list[Server]) -> None:
    """An answer later than the request timeout is a timeout; a longer `request_timeout` (a
    one-shot command's later attempt) waits for it."""
    def slow(conn: socket.socket, _request: bytes) -> None:
        time.sleep(0.3)
        with contextlib.suppress(OSError):
            conn.sendall(reply({"header": HEADER, "ID": "7", "TTL": "5"}))

    server = Server(slow)
    servers.append(server)
    store = EtcdStore(EtcdSettings((EtcdEndpoint("127.0.0.1", server.address.port, False),),
                                   timeout=0.15))
    with pytest.raises(EtcdUnavailable, match="timed out"):
        store.grant(5)
    store.request_timeout = 1.0
    assert store.grant(5) == 7
    store.close()


def test_a_stale_token_is_renewed_and_the_request_sent_once_more(servers: list[Server]) -> None:
    tokens = iter(["t1", "t2"])
    used: list[str] = []

    def answer(path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
        if path == "/v3/auth/authenticate":
            assert body == {"name": "u", "password": "pw"}
            return reply({"header": HEADER, "token": next(tokens)})
        used.append(headers.get("authorization", ""))
        if headers.get("authorization") == "t1":
            return reply({"error": "etcdserver: invalid auth token", "code": 16}, 401)
        return reply({"header": HEADER})

    store = store_for(servers, answer, user="u")
    store.put("/k", "v")
    assert used == ["t1", "t2"]  # the bare token, no "Bearer"; renewed once
    assert store.up is True


@pytest.mark.parametrize("serializable", [False, True])
def test_read_prefixes_in_one_transaction(servers: list[Server], serializable: bool) -> None:
    def answer(path: str, body: dict[str, Any], _: dict[str, str]) -> bytes:
        assert path == "/v3/kv/txn"
        ranges = [op["request_range"] for op in body["success"]]
        assert [r["key"] for r in ranges] == [b64("/a/"), b64("/b/"), b64("/c/")]
        # etcd skips the round to the leader only when every range of the txn asks it to
        assert [r.get("serializable", False) for r in ranges] == [serializable] * 3
        return reply({"header": HEADER, "succeeded": True, "responses": [
            {"response_range": {"header": HEADER,
                                "kvs": [{"key": b64("/a/x"), "value": b64("1")}]}},
            {"response_range": {"header": HEADER}},
            {"response_range": {"header": HEADER,
                                "kvs": [{"key": b64("/c/y"), "value": b64("2")}]}},
        ]})

    store = store_for(servers, answer)
    assert store.list_prefixes(["/a", "/b", "/c"], serializable=serializable) == (
        [{"/a/x": StoredKey("1", 0)}, {}, {"/c/y": StoredKey("2", 0)}], 9)


def watch_answer(*messages: dict[str, Any], hold: threading.Event | None = None) -> Answer:
    def answer(path: str, body: dict[str, Any], _: dict[str, str]) -> bytes:
        assert path == "/v3/watch" and body["create_request"]["start_revision"] == "5"
        lines = [json.dumps({"result": {"header": HEADER, **m}}).encode() + b"\n"
                 for m in messages]
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        # the first two messages in one chunk, the last split across two
        pieces = [b"".join(lines[:2]), *lines[2:]]
        if len(pieces[-1]) > 4:
            pieces[-1:] = [pieces[-1][:4], pieces[-1][4:]]
        data = head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        if hold is not None:
            hold.wait(5)  # the stream stays open (and silent) until the test lets go
        return data

    return answer


def test_a_watch_reads_events_line_by_line_and_a_cancel_ends_it(servers: list[Server]) -> None:
    put = {"kv": {"key": b64("/p/a"), "value": b64("1"), "mod_revision": "6"}}
    delete = {"type": "DELETE", "kv": {"key": b64("/p/b"), "mod_revision": "7"}}
    store = store_for(servers, watch_answer({"created": True}, {"events": [put]},
                                            {"events": [delete]}))
    watch = store.watch_prefix("/p", 5)
    assert watch.get(2) == [KeyEvent("/p/a", "1", 6)]
    assert watch.get(2) == [KeyEvent("/p/b", None, 7)]
    watch.cancel()
    assert watch.get(0.3) == []  # our own cancel: no error
    assert store.up is True


def test_a_compacted_watch_and_a_refused_one(servers: list[Server]) -> None:
    compacted = store_for(servers, watch_answer(
        {"created": True}, {"canceled": True, "compact_revision": "8"}))
    watch = compacted.watch_prefix("/p", 5)
    with pytest.raises(WatchCompacted) as gone:
        watch.get(2)
    assert gone.value.revision == 8
    watch.cancel()

    refused = store_for(servers, watch_answer(
        {"created": True, "canceled": True, "cancel_reason": "etcdserver: permission denied"}))
    with pytest.raises(EtcdUnavailable, match=r"refused the watch on /p/ \(permission denied"):
        refused.watch_prefix("/p", 5)


def test_a_watch_whose_stream_ends_says_so_and_etcd_is_down(servers: list[Server]) -> None:
    created = json.dumps({"result": {"header": HEADER, "created": True}}).encode() + b"\n"

    def created_then_gone(conn: socket.socket, _: bytes) -> None:
        conn.sendall(chunked(created)[:-len(b"0\r\nGrpc-Trailer-Content-Type: "
                                            b"application/grpc\r\n\r\n")])
        conn.shutdown(socket.SHUT_RDWR)  # etcd gone in the middle of the stream

    server = Server(created_then_gone)
    servers.append(server)
    store = EtcdStore(EtcdSettings((EtcdEndpoint("127.0.0.1", server.address.port, False),),
                                   timeout=1.0))
    downs: list[bool] = []
    store.add_listener(downs.append)
    watch = store.watch_prefix("/p", 5)
    with pytest.raises(EtcdUnavailable, match="watch ended"):
        watch.get(2)
    assert store.up is False and downs == [True, False]


def line(result: dict[str, Any]) -> bytes:
    """One message of a watch stream, as the gateway writes it."""
    return json.dumps({"result": {"header": HEADER, **result}}).encode() + b"\n"


def streaming(servers: list[Server], stream: bytes) -> tuple[Server, threading.Event]:
    """A gateway that answers a watch with `stream` (one chunk), then holds the connection
    until the event is set."""
    release = threading.Event()

    def answer(conn: socket.socket, _: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(stream), stream))
        release.wait(5)

    server = Server(answer)
    servers.append(server)
    return server, release


def test_events_that_come_among_the_created_answers_are_not_lost(servers: list[Server]) -> None:
    """Several watches on one stream: the first, created, replays its events (from its start
    revision) before etcd answers the creation of the next one. They are delivered."""
    put = {"kv": {"key": b64("/p/a"), "value": b64("1"), "mod_revision": "6"}}
    server, release = streaming(servers, line({"created": True, "watch_id": "0"})
                                + line({"events": [put]})
                                + line({"created": True, "watch_id": "1"}))
    store = EtcdStore(EtcdSettings((EtcdEndpoint("127.0.0.1", server.address.port, False),)))
    watch = store.watch_prefixes(("/p", "/q"), 5)
    try:
        assert watch.get(2) == [KeyEvent("/p/a", "1", 6)]
        assert watch.get(0.2) == []
    finally:
        release.set()
        watch.cancel()


@pytest.mark.parametrize(("error", "words", "lasting"), [
    (GatewayError(3, "etcdserver: authentication failed, invalid user ID or password"),
     ["etcd refused user 'u'", "--etcd-user"], True),
    (GatewayError(7, "etcdserver: permission denied"), ["lacks a permission"], False),
    (GatewayError(2, "HTTP 400: CommonName of client sending a request against gateway will be "
                     "ignored and not used as expected"), ["Common Name", "--etcd-user"], True),
    (ConnectionResetError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
     ["not trusted", "--etcd-ca"], True),
    (ConnectionRefusedError(111, "Connection refused"), ["ConnectionRefusedError"], False),
])
def test_diagnose_names_the_flag_to_check_and_keeps_etcd_s_words(
    error: BaseException, words: list[str], lasting: bool,
) -> None:
    settings = EtcdSettings((EtcdEndpoint("e", 2379, True),), user="u", password="secret")
    line, is_lasting = diagnose(error, settings)
    assert all(word in line for word in words), line
    assert (str(error.args[-1]) if isinstance(error, OSError) else str(error)) in line
    assert is_lasting is lasting and "secret" not in line


@pytest.mark.parametrize("control", ["/registrar", "/" + "c" * 50])
def test_the_control_entries_watch_fits_in_the_gateway_s_first_read(
    control: str, servers: list[Server],
) -> None:
    """etcd's gateway loses a watch creation past the first 512 bytes of the body now and then
    (GATEWAY_WATCH_BODY): the agents' watch of the control entries takes two ranges, which
    cover every rule and no other kind of entry, and its body stays within, even with a long
    --control-prefix (50 characters) and a revision in the billions (four prefixes under
    /registrar took 543)."""
    layout = Layout("/services", control)
    ranges = layout.rules_ranges
    assert len(ranges) == 2
    for kind in _CONTROL_KINDS:
        key = f"{control}/{kind}/web"
        assert any(start <= key < end for start, end in ranges) == (
            f"{control}/{kind}" in layout.rules), kind
    assert not any(start <= f"{control}/draining" < end for start, end in ranges)  # no "/"

    server, release = streaming(servers, line({"created": True, "watch_id": "0"})
                                + line({"created": True, "watch_id": "1"}))
    store = EtcdStore(EtcdSettings((EtcdEndpoint("127.0.0.1", server.address.port, False),)))
    watch = store.watch_ranges(ranges, 9_999_999_999)
    try:
        body = server.requests[0].partition(b"\r\n\r\n")[2]
        assert len(body.splitlines()) == 2 and len(body) <= GATEWAY_WATCH_BODY
    finally:
        release.set()
        watch.cancel()
