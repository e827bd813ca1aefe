"""The daemon's optional HTTP endpoint: /healthz, /status and /metrics.

Why: a process that runs for months is watched by something else (systemd, a load
balancer, Prometheus). /healthz answers 200 only while the scheduler is alive and the
ledger can really be written (a row written and rolled back); /status is the same
JSON as `imapsync status --json`; /metrics is the Prometheus text format. It binds to
loopback unless told otherwise, because /status names accounts and folders.
Standard library server, one thread per request, never blocking the daemon.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from imapsync.config import is_loopback

log = logging.getLogger("imapsync.http")

DEFAULT_ADDRESS = "127.0.0.1:9108"


@dataclass(frozen=True)
class Health:
    """What /healthz answers: healthy only if every check passed."""

    checks: dict[str, str]  # name -> "ok" or what is wrong
    healthy: bool

    def as_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.healthy else "unhealthy", "checks": self.checks}


@dataclass(frozen=True)
class Routes:
    """What the server shows; each callable is called per request, from its thread."""

    health: Callable[[], Health]
    status: Callable[[], dict]
    metrics: Callable[[], tuple[bytes, str]]  # (body, content type)


def parse_address(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """'127.0.0.1:9108', '[::1]:9108' or ':9108' (loopback) -> (host, port).

    Raises ValueError with a sentence for a person: a malformed address, or one that is
    not loopback without `allow_remote`.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. {DEFAULT_ADDRESS})")
    host = host.strip("[]") or "127.0.0.1"
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"{host} is not a loopback address: /status names accounts and folders; "
                         "add --http-allow-remote to serve it on other interfaces")
    return host, int(port_text)


class StatusServer:
    """`StatusServer(("127.0.0.1", 9108), routes).start()`; `.stop()` when done."""

    def __init__(self, address: tuple[str, int], routes: Routes):
        self.routes = routes
        server_cls = _V6Server if ":" in address[0] else _Server
        self._server = server_cls(address, _Handler)
        self._server.routes = routes  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def start(self) -> "StatusServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http-status", daemon=True)
        self._thread.start()
        log.info("HTTP status on %s (/healthz, /status, /metrics)", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(), which may hit DNS
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "imapsync"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        routes: Routes = self.server.routes  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                health = routes.health()
                self._json(200 if health.healthy else 503, health.as_json())
            elif path == "/status":
                self._json(200, routes.status())
            elif path == "/metrics":
                body, ctype = routes.metrics()
                self._send(200, body, ctype)
            else:
                self._json(404, {"error": "not_found", "paths": ["/healthz", "/status", "/metrics"]})
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            log.warning("HTTP %s failed: %s: %s", path, type(e).__name__, e)
            self._json(500, {"error": type(e).__name__})

    def _json(self, code: int, data: Any) -> None:
        self._send(code, json.dumps(data, indent=2, sort_keys=True).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("HTTP %s", format % args)
