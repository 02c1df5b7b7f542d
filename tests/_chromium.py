"""Headless Chromium for the browser tests, with the standard library only: find it (or install
the Debian package when we may), and drive it over the DevTools protocol on a pipe.

With ``--remote-debugging-pipe`` Chromium reads commands on its fd 3 and writes responses and
events on its fd 4, each message JSON followed by a NUL byte. No websocket client is needed.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT_S = 600


def _find() -> str | None:
    override = os.environ.get("SINKINTERP_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else shutil.which(override)
    for name in CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def find_or_install_chromium() -> tuple[str | None, str]:
    """(path to a Chromium binary, "") or (None, why there is none).

    Looks on PATH (or at ``$SINKINTERP_CHROMIUM``); when absent, installs the Debian ``chromium``
    package if we are root or have passwordless sudo, then looks again.
    """
    if found := _find():
        return found, ""
    if os.environ.get("SINKINTERP_CHROMIUM"):
        return None, f"SINKINTERP_CHROMIUM={os.environ['SINKINTERP_CHROMIUM']} is not an executable"
    if not shutil.which("apt-get"):
        return None, "no chromium on PATH and no apt-get to install it with"
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return None, "no chromium on PATH, and installing it needs root or passwordless sudo"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(prefix + command, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(command)}` took more than {INSTALL_TIMEOUT_S} s"
        if done.returncode != 0:
            return None, f"`{' '.join(command)}` failed ({done.returncode}): {_tail(done.stderr or done.stdout)}"
    if found := _find():
        return found, ""
    return None, "apt-get installed chromium but no chromium binary is on PATH"


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process driven over ``--remote-debugging-pipe``.

    ``send`` waits (with a timeout, so a hung browser fails instead of hanging) for the answer to
    one command; every event that arrives meanwhile is appended to ``events`` as
    ``(session_id, method, params)``. Leaving the context kills Chromium (its own process group,
    helpers included) and deletes its profile.
    """

    def __init__(self, binary: str, *, timeout: float = 20.0):
        self.binary, self.timeout = binary, timeout
        self.events: list[tuple[str | None, str, dict]] = []
        self._next_id = 0
        self._buffer = b""
        self._process: subprocess.Popen | None = None
        self._stderr = None  # a file, not a pipe: a full pipe nobody reads would block Chromium
        self._profile: str | None = None

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="sinkinterp-chromium-")
        to_child_r, self._to_child = os.pipe()   # Chromium reads commands on its fd 3
        self._from_child, from_child_w = os.pipe()  # and writes answers on its fd 4

        def wire_pipes():
            # Copies first, so neither dup2 can clobber the other's source when a pipe end is fd 3 or 4.
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", f"--user-data-dir={self._profile}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--mute-audio", "about:blank"]
        try:
            self._stderr = tempfile.TemporaryFile()
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=self._stderr, pass_fds=(3, 4),  # kept open after preexec_fn
                                             preexec_fn=wire_pipes, start_new_session=True)
        except BaseException:
            self._cleanup()
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._process is not None:
            try:  # the whole process group this Browser started: Chromium and its helper processes
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        for fd in ("_to_child", "_from_child"):
            if getattr(self, fd, None) is not None:
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass
                setattr(self, fd, None)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return _tail(self._stderr.read().decode(errors="replace"))

    def _write(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_child, data):]
        except BrokenPipeError:
            raise BrowserError(f"Chromium is gone: {self._stderr_tail()}") from None

    def _record(self, message: dict) -> None:
        """Keeps an event; dismisses a JavaScript dialog at once, since an open one blocks its page."""
        if "method" not in message:
            return  # the answer to a command nobody waits for (a dialog dismissal)
        session = message.get("sessionId")
        self.events.append((session, message["method"], message.get("params", {})))
        if message["method"] == "Page.javascriptDialogOpening":
            self._next_id += 1
            self._write({"id": self._next_id, "method": "Page.handleJavaScriptDialog",
                         "params": {"accept": False}, "sessionId": session})

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no message from Chromium within {self.timeout} s")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium closed the DevTools pipe: {self._stderr_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout: float | None = None) -> dict:
        """The result of one DevTools command (in a target's session when ``session_id`` is given)."""
        self._next_id += 1
        command_id = self._next_id
        message: dict = {"id": command_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        self._write(message)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == command_id:
                if "error" in answer:
                    raise BrowserError(f"{method} failed: {answer['error']}")
                return answer.get("result", {})
            self._record(answer)

    def open_page(self, url: str, *, width: int = 1200, height: int = 900, init_script: str = "") -> Page:
        """A new tab with the Runtime, Page and Log domains on, navigated to ``url`` and loaded;
        ``init_script`` runs in the page before any of its own scripts."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Page", "Log"):
            self.send(f"{domain}.enable", session_id=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session_id=session)
        if init_script:
            self.send("Page.addScriptToEvaluateOnNewDocument", {"source": init_script}, session_id=session)
        page = Page(self, session, target)
        page.mark = len(self.events)  # events from about:blank before the navigation are not this page's
        navigated = self.send("Page.navigate", {"url": url}, session_id=session)
        if navigated.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {navigated['errorText']}")
        page.wait_for("Page.loadEventFired")
        return page


class Page:
    """One attached tab: evaluate JavaScript, take screenshots, read the errors it reported."""

    def __init__(self, browser: Browser, session_id: str, target_id: str):
        self.browser, self.session_id, self.target_id, self.mark = browser, session_id, target_id, 0

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target_id})

    def events(self, method: str) -> list[dict]:
        return [params for sid, name, params in self.browser.events[self.mark:]
                if sid == self.session_id and name == method]

    def wait_for(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.browser.timeout)
        while True:
            if found := self.events(method):
                return found[0]
            self.browser._record(self.browser._read_message(deadline))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (JSON-serialisable values only); raises on a throw."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session_id=self.session_id)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 10.0, interval: float = 0.05,
                   stop_on_error: bool = False):
        """Polls ``expression`` until it is truthy; returns its value, or the last falsy one at the
        timeout (or, with ``stop_on_error``, as soon as the page has reported an error)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline or (stop_on_error and self.errors()):
                return value
            time.sleep(interval)

    def screenshot(self) -> bytes:
        data = self.browser.send("Page.captureScreenshot", {"format": "png"}, session_id=self.session_id)["data"]
        return base64.b64decode(data)

    def errors(self) -> list[str]:
        """JavaScript exceptions, console.error calls and error log entries this page produced."""
        found = [f"exception: {e['exceptionDetails'].get('exception', {}).get('description') or e['exceptionDetails'].get('text')}"
                 for e in self.events("Runtime.exceptionThrown")]
        found += [f"console.error: {' '.join(str(a.get('value', a.get('description', ''))) for a in e['args'])}"
                  for e in self.events("Runtime.consoleAPICalled") if e["type"] == "error"]
        found += [f"log {e['entry']['source']}: {e['entry']['text']}"
                  for e in self.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        return found

    def dialogs(self) -> list[str]:
        return [f"{e['type']}: {e['message']}" for e in self.events("Page.javascriptDialogOpening")]
