"""A real browser for the tests: Debian's headless `chromium`, driven over the DevTools protocol.

`--dump-dom` cannot read a page that keeps a request open (a blocking query): its virtual time
waits for every fetch to end, and the page's next one starts at once. So the browser is run
with `--remote-debugging-pipe` (the protocol's JSON messages, NUL-terminated, on fds 3 and 4:
no WebSocket needed), and the test evaluates JavaScript in the page whenever it likes.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("RGT_CHROMIUM", "chromium")


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, url: str, *, width: int = 1280, height: int = 800) -> None:
        self._dir = tempfile.mkdtemp(prefix="rgt-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads commands on fd 3 and writes answers on fd 4 (set in the child).
        self._proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={self._dir}",
             f"--window-size={width},{height}", "--hide-scrollbars", url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self._dir, "chromium.log"), "wb"),  # noqa: SIM115
            pass_fds=(3, 4),
            preexec_fn=lambda: _fds_3_and_4(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session = self._attach(url)

    def _attach(self, url: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.command("Target.getTargets")["targetInfos"]
            pages = [t for t in targets if t["type"] == "page"]
            if pages:
                attached = self.command("Target.attachToTarget",
                                        {"targetId": pages[0]["targetId"], "flatten": True})
                return str(attached["sessionId"])
            time.sleep(0.1)
        raise BrowserError(f"no page for {url} within {timeout:g}s")

    def command(self, method: str, params: dict[str, Any] | None = None,
                session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError("the browser did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("the browser closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = self.command("Runtime.evaluate", {"expression": expression,
                                                    "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Polls until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still false after {timeout:g}s")
            time.sleep(0.02)

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: str | Path) -> None:
        shot = self.command("Page.captureScreenshot", {"format": "png"}, self.session)
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.command("Browser.close", timeout=5.0)
        except (BrowserError, OSError):
            self._proc.kill()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fds_3_and_4(read_fd: int, write_fd: int) -> None:
    """In the child: the command pipe on fd 3, the answer pipe on fd 4 (by way of fds above
    both, so that neither overwrites the other)."""
    high_read, high_write = os.dup(read_fd) + 100, os.dup(write_fd) + 100
    os.dup2(read_fd, high_read)
    os.dup2(write_fd, high_write)
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)
