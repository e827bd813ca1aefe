"""A TCP proxy that breaks IMAP connections on purpose, for fault-injection tests.

Between the client and the real server, it forwards bytes unchanged, except on the
connections told to fail. A fault acts on the server-to-client stream:

- `cut`: close the connection once the server has sent `at` bytes (mid-FETCH, mid-literal);
- `stall`: stop forwarding after `at` bytes and hold the connection open, silent (the
  client must time out);
- `truncate`: in the first literal (`{N}` then N bytes) of at least `min_literal` bytes
  that starts after byte `at`, forward the announcement and only N/2 of its bytes, then
  close: a literal announced as {N} but cut short by EOF.

Fixed faults: `cut_after=`, `stall_after=` or `truncate_literal=` (the minimum literal
size) on the first `faulty_connections` connections; or, with `faults=K`, on the first K
connections whose stream reaches the fault (whichever they are: with several connections
per account, the ones that carry message bodies). Random faults: `seed=` and
`random_faults=K` give each of the first K connections a fault of a random kind at a
random offset up to `max_offset`, the same for the same seed. `injected` lists what was
actually done (connection number, kind, byte offset), for the test's report.
"""
from __future__ import annotations

import random
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

_LITERAL_END = re.compile(rb"\{(\d+)\}\r?\n\Z")
_TAIL = 64  # bytes of an unfinished line kept to spot a literal announcement across reads


class Fault(str, Enum):
    CUT = "cut"
    STALL = "stall"
    TRUNCATE = "truncate"


@dataclass(frozen=True)
class Planned:
    """The fault one connection gets: its kind, where, and (truncate) the smallest literal."""

    kind: Fault
    at: int
    min_literal: int = 1


@dataclass(frozen=True)
class Injected:
    connection: int  # 1 for the first connection
    kind: Fault
    offset: int  # bytes of the server's stream forwarded before the fault


class _Literals:
    """Finds the literals in a server-to-client IMAP stream, across reads."""

    def __init__(self) -> None:
        self.tail = b""
        self.left = 0  # bytes of the current literal still to pass

    def feed(self, data: bytes, offset: int) -> Iterator[tuple[int, int]]:
        """(start offset, size) of each literal announced in `data`, which starts at `offset`."""
        pos = 0
        while pos < len(data):
            if self.left:
                take = min(self.left, len(data) - pos)
                self.left -= take
                pos += take
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.tail = (self.tail + data[pos:])[-_TAIL:]
                return
            line_end = (self.tail + data[pos:nl + 1])[-_TAIL:]
            self.tail = b""
            pos = nl + 1
            m = _LITERAL_END.search(line_end)
            if m:
                self.left = int(m.group(1))
                yield offset + pos, self.left


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, cut_after: int | None = None,
                 stall_after: int | None = None, truncate_literal: int | None = None,
                 faulty_connections: int = 1, faults: int | None = None, seed: int | None = None,
                 random_faults: int = 0, max_offset: int = 200_000, kinds: Sequence[Fault] = tuple(Fault)):
        self.upstream = (upstream_host, upstream_port)
        fixed = (Planned(Fault.CUT, cut_after) if cut_after is not None
                 else Planned(Fault.STALL, stall_after) if stall_after is not None
                 else Planned(Fault.TRUNCATE, 0, truncate_literal) if truncate_literal is not None else None)
        self._budget = faults  # None: no limit (each planned connection faults when it gets there)
        self._every = fixed if faults is not None else None  # with a budget: any connection may fault
        self.plan: list[Planned] = [fixed] * faulty_connections if fixed is not None and faults is None else []
        if random_faults:
            rng = random.Random(seed)
            self.plan += [Planned(rng.choice(list(kinds)), rng.randint(1, max_offset))
                          for _ in range(random_faults)]
        self.connections = 0
        self.injected: list[Injected] = []
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def faults(self) -> int:
        """How many faults were injected so far."""
        with self._lock:
            return len(self.injected)

    def start(self) -> "FaultProxy":
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()  # type: ignore[union-attr]
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets += [client, server]
            plan = self.plan[number - 1] if number <= len(self.plan) else self._every
            threading.Thread(target=self._pipe, args=(client, server, None, number), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, plan, number), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, plan: Planned | None, number: int) -> None:
        sent = 0
        target = plan.at if plan is not None and plan.kind is not Fault.TRUNCATE else None
        literals = _Literals() if plan is not None and plan.kind is Fault.TRUNCATE else None
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if literals is not None and target is None:
                    for start, size in literals.feed(data, sent):
                        if start >= plan.at and size >= plan.min_literal:  # type: ignore[union-attr]
                            target = start + size // 2
                            break
                if target is not None and sent + len(data) > target and self._take():
                    dst.sendall(data[: target - sent])
                    with self._lock:
                        self.injected.append(Injected(number, plan.kind, target))  # type: ignore[union-attr]
                    if plan.kind is Fault.STALL:  # type: ignore[union-attr]
                        self._stopping.wait()  # hold the connection open, silent
                    break
                elif target is not None and sent + len(data) > target:
                    target = literals = None  # the fault budget is spent: forward as is
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            shut_down(src, dst)
            src.close()
            dst.close()

    def _take(self) -> bool:
        """One fault from the budget (always, without a budget)."""
        with self._lock:
            if self._budget is None:
                return True
            if self._budget > 0:
                self._budget -= 1
                return True
            return False

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def shut_down(*socks: socket.socket) -> None:
    """End both directions of each socket (a forwarding thread's peer then sees EOF),
    ignoring sockets already gone."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
