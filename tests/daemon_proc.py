"""`imapsync run` as a real process for tests: start, signal, read its log, ask its HTTP endpoint,
and wait for conditions with a deadline (never a fixed sleep)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """`with DaemonProcess(config_path) as d: ...`; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, config: Path, *args: str, log_format: str = "plain", http: bool = False,
                 log_level: str = "info"):
        self.config = config
        self.http_port = free_port() if http else None
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self.args = ["--log-level", log_level, "--log-format", log_format, "run", "--config", str(config), *args]
        if self.http_port:
            self.args += ["--http", f"127.0.0.1:{self.http_port}"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "imapsync", *self.args], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        # Started: its ledger is created and migrated (a second process creating it at the same
        # moment could be refused with "database is locked").
        wait_for(lambda: ": started with" in self.log or not self.alive(), 30, "the daemon to start")
        assert self.alive(), f"the daemon exited with {self.proc.returncode}:\n{self.log[-3000:]}"
        if self.http_port:
            wait_for(lambda: self._listening(), 20, "the daemon's HTTP endpoint")
        return self

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.kill()
        if exc_type is not None:  # shown by pytest with the failure
            print(f"--- the daemon's log ({self.log_path}) ---\n{self.log[-6000:]}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)  # type: ignore[union-attr]

    def wait_log(self, text: str, timeout: float = 20, count: int = 1) -> None:
        wait_for(lambda: self.log.count(text) >= count, timeout, f"{text!r} in the daemon's log:\n{self.log[-3000:]}")

    # ----- HTTP --------------------------------------------------------------------------

    def _listening(self) -> bool:
        if not self.alive():
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log[-3000:]}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):  # type: ignore[arg-type]
                return True
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) of GET path."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    def get_json(self, path: str) -> tuple[int, dict]:
        code, _, body = self.get(path)
        return code, json.loads(body)


__all__ = ["DaemonProcess", "wait_for", "free_port", "signal"]
