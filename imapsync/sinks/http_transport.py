"""HTTP/1.1 keep-alive connections for the upload API, on the standard library's http.client.

Why not urllib3's pool on this hot path: measured against the local receiver (16 threads,
220 KB messages, both steps of an upload), urllib3's connection and response layers cost
1.45 ms of client CPU per upload against 1.0 ms for http.client, which urllib3 itself is
built on, and the upload threads share the interpreter with the sync loop, so that
difference comes straight off the archiving rate.

Idle connections wait in a stack per endpoint: a request takes one (or opens one) and
puts it back after the answer, so there are never more connections than requests at
once, and they outlive the threads that used them (the daemon's passes come and go). An
idle connection the server has closed is noticed before it is reused. Proxies from the
environment (HTTPS_PROXY, NO_PROXY) go through urllib3's ProxyManager (CONNECT, proxy
credentials): that path is rare and not hot.

Failures come out as three kinds, which the sink maps to design rule 6: CannotConnect
(no connection at all: refused, unknown host, TLS or proxy refused), ConnectionLost
(the server closed or reset the connection after the request went out) and TimedOut.
"""
from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    SSLError,
)

#: Bytes per send when a spooled message is streamed from its file.
STREAM_BLOCK = 256 * 1024


class TransportError(Exception):
    """An HTTP request got no answer; `str()` says why in words without secrets."""


class CannotConnect(TransportError):
    pass


class ConnectionLost(TransportError):
    pass


class TimedOut(TransportError):
    pass


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive .get()
    data: bytes


class Transport:
    """Sends requests for one client; thread-safe."""

    def __init__(self, connect_timeout: float, read_timeout: float, *, proxy_pool_size: int = 16,
                 user_agent: str = "imapsync") -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._proxy_pool_size = proxy_pool_size
        self._headers = {"User-Agent": user_agent}
        self._proxies = urllib.request.getproxies()  # read once, not per request
        self._idle: dict[tuple[str, str], deque[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self._proxy_managers: dict[str, urllib3.ProxyManager] = {}
        self._tls: ssl.SSLContext | None = None

    def request(self, method: str, url: str, body: bytes | BinaryIO | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            return self._via_proxy(proxy, method, url, body, headers)
        endpoint = (parts.scheme, parts.netloc)
        conn = self._connection(endpoint)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers={**self._headers, **(headers or {})})
            response = conn.getresponse()
            answer = Answer(response.status, response.headers, response.read())
        except TimeoutError as e:
            self._discard(conn)
            raise TimedOut("timed out") from e
        except (http.client.HTTPException, OSError) as e:
            self._discard(conn)
            raise ConnectionLost("connection failed") from e
        if conn.sock is None:  # the server ended it ("Connection: close")
            self._discard(conn)
        else:
            self._idle[endpoint].append(conn)  # deque append/pop are atomic: no lock
        return answer

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), set()
        for idle in self._idle.values():
            idle.clear()
        for conn in conns:
            conn.close()
        for manager in list(self._proxy_managers.values()):
            manager.clear()

    # -- direct connections, kept open between requests --------------------------------

    def _connection(self, endpoint: tuple[str, str]) -> http.client.HTTPConnection:
        """An idle open connection to `endpoint` that the server has not closed, or a new one."""
        idle = self._idle.get(endpoint)
        if idle is None:
            idle = self._idle.setdefault(endpoint, deque())
        while idle:
            try:
                conn = idle.pop()  # the most recently used: the least likely to have timed out
            except IndexError:
                break  # another thread took the last one
            if conn.sock is not None and not _closed_by_peer(conn.sock):
                return conn
            self._discard(conn)
        scheme, netloc = endpoint
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            conn = http.client.HTTPSConnection(netloc, timeout=self.connect_timeout, context=self._tls,
                                               blocksize=STREAM_BLOCK)
        elif scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=self.connect_timeout, blocksize=STREAM_BLOCK)
        else:
            raise CannotConnect(f"unsupported URL scheme {scheme!r}")
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _connect_error(e) from e
        conn.sock.settimeout(self.read_timeout)
        with self._lock:
            self._open.add(conn)
        return conn

    def _discard(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            self._open.discard(conn)

    # -- through a proxy ---------------------------------------------------------------

    def _via_proxy(self, proxy: str, method: str, url: str, body, headers) -> Answer:
        manager = self._proxy_managers.get(proxy)
        if manager is None:
            manager = self._proxy_managers.setdefault(proxy, urllib3.ProxyManager(
                proxy, num_pools=4, maxsize=self._proxy_pool_size, block=True, retries=False, headers=self._headers,
                timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout)))
        try:
            r = manager.request(method, url, body=body, headers=headers, redirect=False, preload_content=True)
        except (NewConnectionError, SSLError, ProxyError) as e:
            raise CannotConnect("connection failed") from e
        except ProtocolError as e:
            raise ConnectionLost("connection failed") from e
        except HTTPError as e:  # timeouts (connect or read)
            raise TimedOut("timed out") from e
        return Answer(r.status, r.headers, r.data)


def _connect_error(e: BaseException) -> TransportError:
    """Why no connection could be made, in words an administrator can act on."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return CannotConnect(f"connection failed: TLS certificate not trusted ({e.verify_message})")
    if isinstance(e, ssl.SSLError):
        return CannotConnect("connection failed: TLS handshake failed")
    if isinstance(e, TimeoutError):
        return TimedOut("timed out")
    if isinstance(e, ConnectionRefusedError):
        return CannotConnect("connection failed: connection refused")
    if isinstance(e, socket.gaierror):
        return CannotConnect("connection failed: unknown host")
    return CannotConnect("connection failed")


def _closed_by_peer(sock) -> bool:
    """An idle keep-alive socket that is readable has been closed (or spoken to) by the
    server: it must not carry the next request."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
