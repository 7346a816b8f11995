"""Web pages as a person sees them: headless Chromium (Debian's `chromium`), driven over its
DevTools pipe (no driver or websocket package), and local servers to point it at."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The text a person can see, shadow roots included (TensorBoard's dashboards are web
# components, whose text `chromium --dump-dom` leaves out): one text node a line.
VISIBLE_TEXT = r"""(() => {
  const lines = [];
  const collect = (root) => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const parent = node.parentElement;
      if (!parent || ['STYLE', 'SCRIPT', 'TEMPLATE'].includes(parent.tagName)) continue;
      if (!parent.getClientRects().length) continue;
      const text = node.textContent.trim();
      if (text) lines.push(text);
    }
    for (const element of root.querySelectorAll('*')) {
      if (element.shadowRoot) collect(element.shadowRoot);
    }
  };
  collect(document);
  return lines.join('\n');
})()"""


def poll(fetch: Callable[[], T], done: Callable[[T], bool], wait_s: float = 120) -> T:
    """fetch() until done() holds for what it returned, or wait_s have passed: for what a
    server shows after a while. Returns the last result either way; the caller's assertions
    say what was wrong with it."""
    deadline = time.monotonic() + wait_s
    while True:
        result = fetch()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(command: Sequence[str], ready_url: str, log: Path,
           wait_s: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends; wait until `ready_url` answers (the output goes
    to `log`, which a failure quotes)."""
    with log.open("wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=5):
                    break
            except (urllib.error.URLError, OSError) as e:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{command[0]} did not serve {ready_url} ({e}):\n"
                                         f"{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium tab of width x height pixels."""

    def __init__(self, width: int = 1500, height: int = 1000):
        executable = chromium()
        if executable is None:
            raise RuntimeError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="resnet-hpo-chromium-")
        to_chromium, self._commands = os.pipe()
        self._replies, from_chromium = os.pipe()
        # --remote-debugging-pipe: Chromium reads commands on fd 3 and answers on fd 4. The
        # pipe ends move above 9 first, so that the redirections cannot overwrite each other.
        to_chromium, from_chromium = (above_nine(to_chromium), above_nine(from_chromium))
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chromium} 4>&{from_chromium}', "bash", executable,
             "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chromium, from_chromium), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer = b""
        self._last_id = 0
        pages = [t for t in self._send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self._session = self._send("Target.attachToTarget", targetId=pages[0]["targetId"],
                                   flatten=True)["sessionId"]
        self._send("Emulation.setDeviceMetricsOverride", session=True, width=width,
                   height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        os.close(self._commands)
        os.close(self._replies)
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def open(self, url: str) -> None:
        self._send("Page.navigate", session=True, url=url)

    def text(self) -> str:
        result = self._send("Runtime.evaluate", session=True, expression=VISIBLE_TEXT,
                            returnByValue=True)["result"]
        return str(result.get("value", ""))

    def wait_for_text(self, *needles: str, wait_s: float = 90) -> str:
        """The visible text once it shows every needle; the test fails naming the missing
        ones (and the text it saw) after wait_s."""
        text = poll(self.text, lambda text: all(n in text for n in needles), wait_s)
        missing = [n for n in needles if n not in text]
        assert not missing, f"the page never showed {missing}; it showed:\n{text[:3000]}"
        return text

    def screenshot(self, path: Path) -> Path:
        data = self._send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
