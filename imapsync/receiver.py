"""A local stand-in for the Vaultastic Mail Upload API, served over real HTTP on loopback.

Why it exists: the vendor documents an SDK but not its wire format, so this project
models the API as a two-step presigned upload (see docs: ``vaultastic-api.md``):
``POST /v1/uploads`` asks for a slot, ``PUT /v1/put/{token}`` sends the raw message.
Tests, benchmarks and the demo need something that speaks exactly that model over real
sockets (keep-alive, concurrency, latency, injected faults), and that keeps what it
receives on disk so a run can be checked byte for byte. An administrator can also point
a configuration at it before pointing it at the real endpoint.

What it stores: each completed upload as ``STORE/<uploadId>.eml`` (the exact bytes) plus
one JSON line in ``STORE/uploads.jsonl``, both mode 0600. On start the jsonl is read back,
so a restarted receiver on the same store still answers 200 "complete" for a known requestId.

Step 1 checks, in order: scripted answer, random fault (500 / 429), API key (missing or
wrong -> always 403 ``forbidden``), JSON shape (400 ``bad_request``), addresses
(400 ``invalid_recipient``), a recipient on primaryDomain (422), size (413), then
idempotency: a completed requestId -> 200, a granted one -> 201 with the same uploadId
and a fresh uploadUrl, the same requestId with another size/sha256 -> 409 ``conflict``.
Step 2 needs no key (the token is the credential); checks: scripted answer, token
(403 ``expired``), Content-Type message/rfc822 (400 ``bad_request``), size and sha256
(400 ``digest_mismatch``). A repeated PUT on a completed token answers 200 again.

Scripted answers (``script``, ``script_put``), one per request in arrival order: an HTTP
status, or ``drop`` (close without answering), ``lost`` (do the work, then close without
answering), ``expire`` (step 1: grant a slot that has expired by its PUT),
``invalid_recipient`` / ``bad_request`` (step 1), ``ok`` (answer normally, no random
fault) and ``slow`` (answer normally after ``slow_ms``, so a client's timeout may fire).

Standard library only. Run it with ``python -m imapsync.receiver --store DIR``.
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import hmac
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

MAX_SIZE = 50 * 1024 * 1024
EXPIRES_IN = 900
API_KEY_ENV = "IMAPSYNC_RECEIVER_API_KEY"
_MAX_HEAD = 64 * 1024  # request line and headers
_IDLE_TIMEOUT = 120  # seconds a keep-alive connection may wait for its next request, or a body stall
_MAX_JSON = 1024 * 1024
_HEX = frozenset("0123456789abcdef")
# Bodies of scripted integer answers; other statuses get {"error": "<reason_phrase>"}.
_POST_BODIES: dict[int, dict[str, str]] = {
    400: {"error": "bad_request", "detail": "scripted"}, 401: {"error": "forbidden"},
    403: {"error": "forbidden"}, 413: {"error": "too_large"},
    422: {"error": "no_primary_recipient"}, 429: {"error": "throttled"},
    500: {"error": "internal_error"}}
_PUT_BODIES: dict[int, dict[str, str]] = {403: {"error": "expired"}, 500: {"error": "internal_error"}}
# "ok": answer normally (no random fault); "slow": answer normally after slow_ms.
_POST_WORDS = frozenset({"drop", "lost", "invalid_recipient", "bad_request", "expire", "ok", "slow"})
_PUT_WORDS = frozenset({"drop", "lost", "ok", "slow"})
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
DROP = None  # a reply status of None means: close the connection without answering

Reply = tuple[int | None, dict[str, Any], dict[str, str]]


def _bad(detail: str) -> Reply:
    return 400, {"error": "bad_request", "detail": detail}, {}


def _canned(status: int, bodies: dict[int, dict[str, str]]) -> dict[str, str]:
    return dict(bodies.get(status) or {"error": HTTPStatus(status).phrase.lower().replace(" ", "_")})


def _is_address(value: object) -> bool:
    # value.split() != [value]: it has whitespace (or is empty), found without a loop per character
    if not isinstance(value, str) or value.count("@") != 1 or value.split() != [value]:
        return False
    local, domain = value.split("@")
    return bool(local) and bool(domain)


def _check(body: Any, max_size: int) -> Reply | dict[str, Any]:
    """Validate a step-1 body: the cleaned request, or the error reply."""
    if not isinstance(body, dict):
        return _bad("body must be a JSON object")
    for key in ("requestId", "primaryDomain", "sha256"):
        if not isinstance(body.get(key), str) or not body[key]:
            return _bad(f"{key} must be a non-empty string")
    recipients, size, sender = body.get("recipients"), body.get("size"), body.get("sender")
    if not isinstance(recipients, list):
        return _bad("recipients must be a list")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return _bad("size must be a non-negative integer")
    sha = body["sha256"].lower()
    if len(sha) != 64 or not set(sha) <= _HEX:
        return _bad("sha256 must be 64 hex digits")
    if sender is not None and not isinstance(sender, str):
        return _bad("sender must be a string")
    for who in [*recipients, *([sender] if sender is not None else [])]:
        if not _is_address(who):
            return 400, {"error": "invalid_recipient", "detail": f"not an address: {who!r}"}, {}
    domain = body["primaryDomain"].lower()
    if not any(r.rsplit("@", 1)[1].lower() == domain for r in recipients):
        return 422, {"error": "no_primary_recipient"}, {}
    if size > max_size:
        return 413, {"error": "too_large"}, {}
    return {"requestId": body["requestId"], "primaryDomain": body["primaryDomain"],
            "recipients": list(recipients), "sender": sender, "size": size, "sha256": sha}


@dataclass
class _Slot:
    upload_id: str
    request: dict[str, Any]  # requestId, primaryDomain, recipients, sender, size, sha256
    complete: bool = False
    storing: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one PUT stores it


@dataclass
class _Token:
    slot: _Slot
    expires_at: float
    expire_once: bool = False


class Receiver:
    """The upload API on loopback; thread-safe; ``with Receiver(store) as r: ...``."""

    def __init__(self, store: Path, *, api_key: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, latency_ms: int = 0, fail_rate: float = 0.0,
                 throttle_rate: float = 0.0, retry_after: int = 1, seed: int | None = None,
                 max_size: int = MAX_SIZE, expires_in: int = EXPIRES_IN,
                 verbose: bool = False, slow_ms: int = 2000) -> None:
        if not (0.0 <= fail_rate <= 1.0 and 0.0 <= throttle_rate <= 1.0
                and fail_rate + throttle_rate <= 1.0):
            raise ValueError("fail_rate and throttle_rate must be in [0, 1] and sum to <= 1")
        if latency_ms < 0 or retry_after < 0 or max_size < 0:
            raise ValueError("latency_ms, retry_after and max_size must be >= 0")
        self.store, self.api_key, self.host, self.port = Path(store), api_key, host, port
        self.latency_ms, self.fail_rate, self.throttle_rate = latency_ms, fail_rate, throttle_rate
        self.retry_after, self.max_size, self.expires_in = retry_after, max_size, expires_in
        self.verbose = verbose
        self.slow_ms = slow_ms
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._scripts: dict[str, deque[int | str]] = {"post": deque(), "put": deque()}
        self._slots: dict[str, _Slot] = {}
        self._tokens: dict[str, _Token] = {}
        self._uploads: list[dict[str, Any]] = []
        self._counts = {"posts": 0, "puts": 0, "peak_in_flight": 0, "in_flight": 0, "drops": 0,
                        "connections": 0}
        self._answers: Counter[int] = Counter()
        self._journal: Any = None  # uploads.jsonl, open for appending while serving
        self._server: _Server | None = None
        self._address: tuple[str, int] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Receiver:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        self.store.mkdir(parents=True, exist_ok=True)
        self._load()
        # Unbuffered append: each line is one write, on disk (for readers) before the answer.
        self._journal = open(_private(self.store / "uploads.jsonl", os.O_APPEND), "ab", buffering=0)  # noqa: SIM115
        try:
            server = _Server(self, (self.host, self.port))
        except BaseException:
            self._journal.close()
            raise
        self._address = (self.host, server.server_address[1])
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            self._journal.close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._address is None:
            raise RuntimeError("receiver not started")
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- scripting and inspection ----------------------------------------------------
    def script(self, *answers: int | str) -> None:
        """Queue answers for the next step-1 requests (see module docstring)."""
        self._queue("post", answers, _POST_WORDS)

    def script_put(self, *answers: int | str) -> None:
        """Queue answers for the next step-2 PUTs: an HTTP status, "drop", "lost", "ok" or "slow"."""
        self._queue("put", answers, _PUT_WORDS)

    def _queue(self, step: str, answers: tuple[int | str, ...], words: frozenset[str]) -> None:
        for a in answers:
            ok = a in words if isinstance(a, str) else (
                isinstance(a, int) and not isinstance(a, bool) and 400 <= a <= 599)
            if not ok:
                raise ValueError(f"unknown scripted answer {a!r}")
        with self._lock:
            self._scripts[step].extend(answers)

    def uploads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(u) for u in self._uploads]

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "answers": Counter(self._answers)}

    # -- state -----------------------------------------------------------------------
    def _load(self) -> None:
        slots: dict[str, _Slot] = {}
        uploads: list[dict[str, Any]] = []
        path = self.store / "uploads.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    meta = json.loads(line)
                    rid, uid = meta["requestId"], meta["uploadId"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash, or junk: not an upload
                if rid not in slots:
                    request = {k: meta.get(k) for k in
                               ("requestId", "primaryDomain", "recipients", "sender", "size", "sha256")}
                    slots[rid] = _Slot(uid, request, complete=True)
                    uploads.append(meta)
        with self._lock:
            self._slots, self._tokens, self._uploads = slots, {}, uploads

    def _enter(self, kind: str) -> None:
        with self._lock:
            c = self._counts
            c[kind] += 1
            c["in_flight"] += 1
            c["peak_in_flight"] = max(c["peak_in_flight"], c["in_flight"])

    def _accepted(self) -> None:
        with self._lock:
            self._counts["connections"] += 1

    def _leave(self, dropped: bool = False) -> None:
        with self._lock:
            self._counts["in_flight"] -= 1
            self._counts["drops"] += dropped

    def _next(self, step: str) -> int | str | None:
        with self._lock:
            queue = self._scripts[step]
            return queue.popleft() if queue else None

    # -- step 1 ----------------------------------------------------------------------
    def _post(self, raw: bytes, key: str | None, base: str, scripted: int | str | None) -> Reply:
        """Step 1, after any latency or scripted slowness has passed."""
        if isinstance(scripted, int):
            extra = {"Retry-After": str(self.retry_after)} if scripted == 429 else {}
            return scripted, _canned(scripted, _POST_BODIES), extra
        if scripted == "drop":
            return DROP, {}, {}
        if scripted in ("invalid_recipient", "bad_request"):
            return 400, {"error": scripted, "detail": "scripted"}, {}
        if scripted is None and (self.fail_rate or self.throttle_rate):
            with self._lock:
                r = self._rng.random()
            if r < self.fail_rate:
                return 500, {"error": "internal_error"}, {}
            if r < self.fail_rate + self.throttle_rate:
                return 429, {"error": "throttled"}, {"Retry-After": str(self.retry_after)}
        if self.api_key is not None and not hmac.compare_digest(
                (key or "").encode("utf-8", "replace"), self.api_key.encode("utf-8", "replace")):
            return 403, {"error": "forbidden"}, {}
        try:
            checked = _check(json.loads(raw), self.max_size)
        except ValueError:
            return _bad("body is not valid JSON")
        if isinstance(checked, tuple):
            return checked
        reply = self._grant(checked, base, expire_once=scripted == "expire")
        return (DROP, {}, {}) if scripted == "lost" else reply

    def _grant(self, req: dict[str, Any], base: str, expire_once: bool) -> Reply:
        with self._lock:
            slot = self._slots.get(req["requestId"])
            if slot is not None and (slot.request["size"], slot.request["sha256"]) != (
                    req["size"], req["sha256"]):
                return 409, {"error": "conflict",
                             "detail": "requestId already used with another size/sha256"}, {}
            if slot is not None and slot.complete:
                return 200, {"uploadId": slot.upload_id, "status": "complete"}, {}
            if slot is None:
                slot = self._slots[req["requestId"]] = _Slot(str(uuid.uuid4()), req)
            token = os.urandom(16).hex()
            self._tokens[token] = _Token(slot, time.monotonic() + self.expires_in, expire_once)
        return 201, {"uploadId": slot.upload_id, "uploadUrl": f"{base}/v1/put/{token}",
                     "expiresIn": self.expires_in}, {}

    # -- step 2 ----------------------------------------------------------------------
    def _put(self, token: str, ctype: str, body: _Incoming, scripted: int | str | None) -> Reply:
        """Step 2 with the whole body received, after any latency or scripted slowness."""
        if scripted == "drop":
            return DROP, {}, {}
        if isinstance(scripted, int):
            if scripted == 403:
                with self._lock:
                    self._tokens.pop(token, None)
            return scripted, _canned(scripted, _PUT_BODIES), {}
        body.file.close()
        reply = self._complete(token, ctype, body.size, body.hash.hexdigest(), body.path)
        return (DROP, {}, {}) if scripted == "lost" else reply

    def _complete(self, token: str, ctype: str, size: int, sha: str, tmp: str) -> Reply:
        with self._lock:
            entry = self._tokens.get(token)
            if entry is not None and (entry.expire_once or time.monotonic() > entry.expires_at):
                del self._tokens[token]
                entry = None
            if entry is None:
                return 403, {"error": "expired"}, {}
            if ctype != "message/rfc822":
                return _bad("Content-Type must be message/rfc822")
            slot = entry.slot
            if (size, sha) != (slot.request["size"], slot.request["sha256"]):
                return 400, {"error": "digest_mismatch"}, {}
        # The file work happens outside the receiver's lock, so that concurrent uploads
        # are stored in parallel; the slot's own lock keeps one message stored once.
        with slot.storing:
            if not slot.complete:
                os.replace(tmp, self.store / f"{slot.upload_id}.eml")
                meta = {"uploadId": slot.upload_id, **slot.request,
                        "receivedAt": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
                line = (json.dumps(meta) + "\n").encode()
                with self._journal_lock:
                    self._journal.write(line)
                with self._lock:
                    slot.complete = True
                    self._uploads.append(meta)
        return 200, {"uploadId": slot.upload_id, "status": "complete"}, {"ETag": f'"{sha}"'}


class _Incoming:
    """A PUT body on its way to the store: written to a temporary file and hashed as it
    arrives, so a large message is never held (or copied) whole in memory."""

    def __init__(self, store: Path) -> None:
        self.path = os.path.join(store, f".incoming-{os.urandom(8).hex()}.part")
        self.file = open(_private(self.path, os.O_EXCL), "wb")  # noqa: SIM115 - closed by discard()
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: memoryview) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def discard(self) -> None:
        """Whatever happened, no .part file stays behind (a stored one was renamed)."""
        self.file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Server:
    """HTTP/1.1 with keep-alive on one asyncio loop in a background thread.

    Latency and scripted slowness are awaited, so a slow upload holds no thread however
    many clients wait. Each connection is a ``_Connection`` protocol rather than asyncio
    streams: a PUT body goes from the socket buffer straight to its temporary file and
    its hash, with no copies in between. Measured with 16 clients and 220 KB messages
    (medians, 2 noisy cores): ~0.95 ms of CPU per upload with the store on tmpfs, down from
    ~1.4 ms with asyncio streams; ~1.5 ms, down from ~1.9 ms, on an ext4 disk where creating
    each file alone costs up to 0.4 ms. Most of the rest is sha256 (~0.2 ms) and the kernel.
    """

    def __init__(self, receiver: Receiver, address: tuple[str, int]) -> None:
        self.receiver = receiver
        self.loop = asyncio.new_event_loop()
        self.connections: set[_Connection] = set()
        self._date = (0, "")
        self.server = self.loop.run_until_complete(self.loop.create_server(
            lambda: _Connection(self), address[0], address[1], backlog=128, reuse_address=True))
        self.server_address = self.server.sockets[0].getsockname()[:2]
        self.loop.call_soon(self._sweep)
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"receiver:{self.server_address[1]}",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop listening, end every connection (idle keep-alives too) and the loop."""
        async def shut() -> None:
            self.server.close()
            for c in list(self.connections):
                c.transport.abort()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def _sweep(self) -> None:
        """End connections that waited too long for a request or for body bytes: one timer
        a second for all of them, rather than one started and cancelled per read."""
        now = self.loop.time()
        for conn in self.connections:
            if now > conn.deadline:
                conn._fail(TimeoutError("idle"))
        self.loop.call_later(1, self._sweep)

    async def _serve(self, conn: _Connection) -> None:
        try:
            while await self._one_request(conn):
                pass
        except (ConnectionError, TimeoutError):
            pass  # the client went away (or stalled, or sent an endless header): nothing to answer
        except Exception:  # noqa: BLE001 - a real bug: show it, drop this connection, serve the others
            traceback.print_exc()
        finally:
            conn.transport.abort()

    async def _one_request(self, conn: _Connection) -> bool:
        """Read and answer one request; False when the connection is to be closed."""
        head = await conn.read_head()
        if head is None:
            return False  # closed between requests: the normal end of keep-alive
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            await self._send(conn, lines[0], _bad("malformed request line"), close=True)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        path = target.split("?")[0]
        rx = self.receiver
        if method == "GET" and path == "/v1/health":
            return await self._send(conn, lines[0], (200, {"status": "ok"}, {}), close=not keep)
        if method == "POST" and path == "/v1/uploads":
            step = "post"
        elif method == "PUT" and path.startswith("/v1/put/"):
            step = "put"
        else:
            return await self._send(conn, lines[0], (404, {"error": "not_found"}, {}), close=True)
        rx._enter(step + "s")
        counted = [True]
        try:
            if rx.latency_ms:  # the time one upload takes, half on each of its two requests
                await asyncio.sleep(rx.latency_ms / 2000)
            length = _length(headers.get("content-length"))
            limit = _MAX_JSON if step == "post" else rx.max_size
            if length is None or length > limit:  # the body stays unread: do not reuse
                reply = (413, {"error": "too_large"}, {}) if step == "put" and length else _bad(
                    "a JSON body with Content-Length (<= 1 MiB) is required" if step == "post"
                    else "Content-Length is required")
                return await self._send(conn, lines[0], reply, close=True, counted=counted)
            if step == "post":
                body = bytearray()
                await conn.read_body(length, body.extend)
                scripted = await self._scripted(step)
                host = rx.host in ("0.0.0.0", "::") and headers.get("host")
                reply = rx._post(bytes(body), headers.get("x-api-key"), f"http://{host}" if host else rx.url,
                                 scripted)
            else:
                incoming = _Incoming(rx.store)
                try:
                    await conn.read_body(length, incoming.write)
                    scripted = await self._scripted(step)
                    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
                    reply = rx._put(path[len("/v1/put/"):], ctype, incoming, scripted)
                finally:
                    incoming.discard()
            return await self._send(conn, lines[0], reply, close=not keep, counted=counted)
        finally:
            if counted[0]:  # the client went away mid-body
                rx._leave(dropped=True)

    async def _scripted(self, step: str) -> int | str | None:
        """The next scripted answer, once its body is in; "slow" is waited out here."""
        rx = self.receiver
        scripted = rx._next(step)
        if scripted == "slow":
            await asyncio.sleep(rx.slow_ms / 1000)
        return scripted

    async def _send(self, conn: _Connection, request_line: str, reply: Reply, close: bool,
                    counted: list[bool] | None = None) -> bool:
        """Answer (or drop the connection); in-flight ends as the answer is handed over."""
        rx = self.receiver
        status, body, headers = reply
        if counted is not None:
            counted[0] = False
            rx._leave(dropped=status is None)
        if rx.verbose:  # the request line only: never headers, so never the key
            line = re.sub(r"/v1/put/[^\s\"']+", "/v1/put/<token>", request_line)
            sys.stderr.write(f"receiver: {conn.peer} \"{line}\" {status or 'dropped'}\n")
        if status is None:
            return False
        with rx._lock:
            rx._answers[status] += 1
        data = json.dumps(body).encode()
        now = int(time.time())
        if self._date[0] != now:  # formatting the date is a good part of building a reply
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        head = (f"HTTP/1.1 {status} {_PHRASES[status]}\r\nServer: imapsync-receiver/1\r\n"
                f"Date: {self._date[1]}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n")
        for k, v in headers.items():
            head += f"{k}: {v}\r\n"
        if close:
            head += "Connection: close\r\n"
        conn.transport.write((head + "\r\n").encode("latin-1") + data)
        await conn.drained()
        return not close


class _Connection(asyncio.BufferedProtocol):
    """One client connection: the socket reads into one fixed buffer.

    Request heads are parsed from that buffer; body bytes are handed to a sink (a file
    and a hash for a PUT) as soon as they arrive. While no one reads (latency, a request
    being answered), the buffer fills up and then the socket is paused.
    """

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buf = bytearray(256 * 1024)  # more than _MAX_HEAD
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # buffered, unread bytes: buf[start:end]
        self.sink: Any = None  # while a body is read: where its bytes go
        self.remaining = 0  # body bytes the sink still expects
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.eof = self.paused = False
        self.deadline = math.inf  # while reading: when _Server._sweep gives up on this client
        self.writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        self.transport: Any = None
        self.peer = "?"

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = (transport.get_extra_info("peername") or ("?",))[0]
        self.server.connections.add(self)
        self.server.receiver._accepted()
        self.task = self.server.loop.create_task(self.server._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.remaining:
            take = min(nbytes, self.remaining)
            try:
                self.sink(self.view[self.end:self.end + take])
            except Exception as exc:  # noqa: BLE001 - a full disk, say: the reading task raises it
                self.sink = _discard
                self._fail(exc)
                return
            self.remaining -= take
            if nbytes > take:  # the start of a next request
                self.start, self.end = self.end + take, self.end + nbytes
        else:
            self.end += nbytes
        if not self.remaining:
            self._wake()
        if self.end == len(self.buf):
            if self.start:  # make room at the end: move the unread bytes to the front
                self.buf[:self.end - self.start] = self.view[self.start:self.end]
                self.start, self.end = 0, self.end - self.start
            else:
                self.transport.pause_reading()
                self.paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep the transport open: an answer may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._fail(ConnectionResetError("connection lost"))
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.server.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- for the serving task --------------------------------------------------------
    async def read_head(self) -> str | None:
        """The request line and headers (latin-1), or None at a clean end of the connection."""
        self.deadline = self.server.loop.time() + _IDLE_TIMEOUT
        try:
            searched = 0  # unread bytes already searched (the buffer may move its unread bytes)
            while True:
                i = self.buf.find(b"\r\n\r\n", self.start + searched, self.end)
                if i >= 0:
                    head = self.buf[self.start:i].decode("latin-1")
                    self._consumed(i + 4)
                    return head
                if self.end - self.start > _MAX_HEAD:
                    raise ConnectionError("request head too long")
                searched = max(0, self.end - self.start - 3)
                if self.error is not None:
                    raise self.error
                if self.eof:
                    if self.start == self.end:
                        return None
                    raise ConnectionError("connection closed mid-head")
                await self._wait()
        finally:
            self.deadline = math.inf

    async def read_body(self, length: int, sink: Any) -> None:
        """Hand the next ``length`` bytes to ``sink``, as they arrive."""
        take = min(length, self.end - self.start)
        if take:
            sink(self.view[self.start:self.start + take])
        self._consumed(self.start + take)
        if take == length:
            return
        self.sink, self.remaining = sink, length - take
        self.deadline = self.server.loop.time() + _IDLE_TIMEOUT
        try:
            while True:
                if self.error is not None:
                    raise self.error
                if not self.remaining:
                    return
                if self.eof:
                    raise ConnectionError("connection closed mid-body")
                await self._wait()
        finally:
            self.deadline = math.inf
            self.sink, self.remaining = None, 0

    async def drained(self) -> None:
        if self.writable is not None:
            await self.writable

    def _consumed(self, upto: int) -> None:
        self.start = upto
        if self.start == self.end:
            self.start = self.end = 0
        if self.paused:
            if self.start:
                self.buf[:self.end - self.start] = self.view[self.start:self.end]
                self.start, self.end = 0, self.end - self.start
            if self.end < len(self.buf):  # room again (an empty body consumed nothing)
                self.paused = False
                self.transport.resume_reading()

    async def _wait(self) -> None:
        self.waiter = self.server.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()


def _private(path: str | Path, flags: int) -> int:
    """A file descriptor for writing a file only its owner may read: what it receives is mail."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)


def _discard(chunk: memoryview) -> None:
    pass


def _length(value: str | None) -> int | None:
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if n >= 0 else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imapsync.receiver",
                                description="Serve the Vaultastic upload API model locally.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--store", type=Path, required=True, help="directory for .eml + uploads.jsonl")
    p.add_argument("--api-key", help=f"required x-api-key (or set {API_KEY_ENV})")
    p.add_argument("--latency-ms", type=int, default=0,
                   help="added time per upload, half on each of its two requests (default 0)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="probability of 500 per step 1")
    p.add_argument("--throttle-rate", type=float, default=0.0, help="probability of 429 per step 1")
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-size", type=int, default=MAX_SIZE)
    p.add_argument("--verbose", action="store_true", help="log one line per request to stderr")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    args = p.parse_args(argv)
    if not args.allow_remote and not _is_loopback(args.host):
        print(f"receiver: refusing non-loopback host {args.host!r} without --allow-remote",
              file=sys.stderr)
        return 2
    try:
        receiver = Receiver(args.store, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                            host=args.host, port=args.port, latency_ms=args.latency_ms,
                            fail_rate=args.fail_rate, throttle_rate=args.throttle_rate,
                            retry_after=args.retry_after, seed=args.seed,
                            max_size=args.max_size, verbose=args.verbose).start()
    except (OSError, ValueError) as exc:
        print(f"receiver: cannot start: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: done.set())
    try:
        print(f"receiver listening on {receiver.url}, storing in {args.store}", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        receiver.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
