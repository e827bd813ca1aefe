"""HTTP/1.1 for the upload API, on libcurl (pycurl).

Why libcurl: the upload threads share the interpreter with the sync loop, so the time an
upload holds the interpreter lock comes straight off the archiving rate. libcurl sends,
receives and parses in C with the lock released. Measured against the local receiver (16
threads, 220 KB messages, both steps of an upload), an upload cost 0.6 ms of client CPU on
pycurl, against 1.1 ms for this sink on http.client (whose header parsing through
email.parser was a quarter of it) and 2.6 ms on urllib3's pool. Response headers never
reach Python: the one the API needs, Retry-After (seconds or an HTTP date), is read by
libcurl itself (CURLINFO_RETRY_AFTER), which spares a callback into the interpreter for
each header line, about a dozen per upload.

Handles, each with its keep-alive connection, wait in a stack: a request takes one (or
makes one) and puts it back after the answer, so there are never more connections than
requests at once, and they outlive the threads that used them (the daemon's passes come
and go). libcurl checks an idle connection before reusing it, and a request whose reused
connection ends before any answer (the race of keep-alive) is sent once more on a new
connection; the API's request ids make that safe, and it costs no attempt.

Proxies are the environment's as Python reads them (HTTPS_PROXY, HTTP_PROXY, NO_PROXY),
and certificates are checked against the trust store Python's ssl module uses
(SSL_CERT_FILE and SSL_CERT_DIR included). Only http and https URLs are followed: an
upload URL comes from the server.

Failures come out as three kinds, which the sink maps to design rule 6: CannotConnect
(no connection at all: refused, unknown host, TLS or proxy refused), ConnectionLost
(the server closed or reset the connection after the request went out) and TimedOut.
"""
from __future__ import annotations

import errno
import io
import os
import ssl
import threading
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

import pycurl

#: A request may take the read timeout plus the time to send its body at this rate (bytes/s):
#: libcurl limits a whole request, and a large message on a slow link must not be cut.
SLOWEST_BODY_RATE = 100_000


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
    data: bytes
    retry_after: float | None = None  # seconds, from a Retry-After header (delta or HTTP date)


class Transport:
    """Sends requests for one client; thread-safe (a handle serves one request at a time)."""

    def __init__(self, connect_timeout: float, read_timeout: float, *, user_agent: str = "imapsync") -> None:
        self._connect_ms = max(1, round(connect_timeout * 1000))
        self._read_timeout = read_timeout
        self._user_agent = user_agent
        self._proxies = urllib.request.getproxies()  # read once, not per request
        trust = ssl.get_default_verify_paths()
        self._cafile, self._capath = trust.cafile, trust.capath
        self._idle: deque[pycurl.Curl] = deque()
        self._lock = threading.Lock()
        self._handles: set[pycurl.Curl] = set()  # every handle not closed yet
        self._closed = False

    def request(self, method: str, url: str, body: bytes | BinaryIO | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        handle = self._take()
        data = io.BytesIO()
        try:
            self._prepare(handle, method, url, body, headers or {}, data)
            handle.perform()
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            retry_after = handle.getinfo(pycurl.RETRY_AFTER)
        except pycurl.error as e:
            failure = _failure(e.args[0], e.args[1] if len(e.args) > 1 else "", handle)
            self._discard(handle)
            raise failure from None
        except BaseException:
            self._discard(handle)
            raise
        self._give_back(handle)
        return Answer(status, data.getvalue(), float(retry_after) if retry_after > 0 else None)

    def close(self) -> None:
        """Closes every idle connection now, and each busy one when its request ends."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
        for handle in idle:
            self._discard(handle)

    # -- handles -----------------------------------------------------------------------

    def _take(self) -> pycurl.Curl:
        try:
            return self._idle.pop()  # the most recently used: the least likely to have timed out
        except IndexError:
            handle = pycurl.Curl()
            with self._lock:
                self._handles.add(handle)
            return handle

    def _give_back(self, handle: pycurl.Curl) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(handle)
                return
        self._discard(handle)

    def _discard(self, handle: pycurl.Curl) -> None:
        with self._lock:
            self._handles.discard(handle)
        handle.close()

    def _prepare(self, h: pycurl.Curl, method: str, url: str, body, headers: dict[str, str],
                 data: io.BytesIO) -> None:
        h.reset()  # options from the last request go; the connection stays
        h.setopt(pycurl.NOSIGNAL, 1)
        h.setopt(pycurl.URL, url)
        h.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        h.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        h.setopt(pycurl.CONNECTTIMEOUT_MS, self._connect_ms)
        h.setopt(pycurl.WRITEFUNCTION, data.write)
        h.setopt(pycurl.PROXY, self._proxy_for(url))
        if self._cafile:
            h.setopt(pycurl.CAINFO, self._cafile)
        if self._capath:
            h.setopt(pycurl.CAPATH, self._capath)
        size = next((value for name, value in headers.items() if name.lower() == "content-length"), None)
        lines = [f"{name}: {value}" for name, value in headers.items() if name.lower() != "content-length"]
        h.setopt(pycurl.HTTPHEADER, [f"User-Agent: {self._user_agent}", *lines, "Expect:"])
        streamed = body is not None and not isinstance(body, (bytes, bytearray))
        if method == "GET" and body is None:
            length = 0
            h.setopt(pycurl.HTTPGET, 1)
        elif streamed:  # a spooled message, read from its file; rewound if libcurl sends it again
            start = body.tell()

            def rewind(offset: int, _origin: int) -> int:
                body.seek(start + offset)
                return pycurl.SEEKFUNC_OK

            h.setopt(pycurl.UPLOAD, 1)
            h.setopt(pycurl.READFUNCTION, body.read)
            h.setopt(pycurl.SEEKFUNCTION, rewind)
            length = int(size) if size else os.fstat(body.fileno()).st_size - start
            h.setopt(pycurl.INFILESIZE_LARGE, length)
        else:
            length = len(body or b"")
            h.setopt(pycurl.POSTFIELDSIZE_LARGE, length)
            h.setopt(pycurl.POSTFIELDS, bytes(body or b""))
        h.setopt(pycurl.TIMEOUT_MS, round((self._read_timeout + length / SLOWEST_BODY_RATE) * 1000))
        if method not in ("GET", "PUT" if streamed else "POST"):
            h.setopt(pycurl.CUSTOMREQUEST, method)

    def _proxy_for(self, url: str) -> str:
        """The environment's proxy for this URL, or "" (direct, whatever libcurl would read)."""
        if not self._proxies:  # the usual case: no URL parsing on every request
            return ""
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass_environment(parts.hostname or "", self._proxies):
            return proxy
        return ""


_CANNOT_CONNECT = {
    pycurl.E_COULDNT_RESOLVE_HOST: "unknown host",
    pycurl.E_COULDNT_RESOLVE_PROXY: "unknown proxy host",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
    pycurl.E_UNSUPPORTED_PROTOCOL: "unsupported URL scheme",
    pycurl.E_URL_MALFORMAT: "malformed URL",
    pycurl.E_SSL_CACERT_BADFILE: "the trusted certificates could not be read",
}


def _failure(code: int, message: str, handle: pycurl.Curl) -> TransportError:
    """Why a request got no answer, in words an administrator can act on (libcurl's own
    messages name hosts and ports, which is fine, but never headers or bodies)."""
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return TimedOut("timed out")
    if code == pycurl.E_COULDNT_CONNECT:
        number = handle.getinfo(pycurl.OS_ERRNO)
        why = "connection refused" if number == errno.ECONNREFUSED else (
            os.strerror(number).lower() if number else "")
        return CannotConnect(f"connection failed: {why}" if why else "connection failed")
    if code == pycurl.E_PEER_FAILED_VERIFICATION:
        why = message.split("SSL certificate problem:", 1)[-1].strip() if "problem:" in message else ""
        return CannotConnect(f"connection failed: TLS certificate not trusted ({why})" if why
                             else "connection failed: TLS certificate not trusted")
    if code in _CANNOT_CONNECT:
        return CannotConnect(f"connection failed: {_CANNOT_CONNECT[code]}")
    if "CONNECT tunnel failed" in message:
        return CannotConnect("connection failed: the proxy refused the tunnel")
    return ConnectionLost("connection failed")
