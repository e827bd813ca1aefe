"""A byte-transparent TCP proxy that records the IMAP commands a client sends.

Why: the archiver promises to be read-only (EXAMINE, never SELECT/STORE/EXPUNGE)
and to be economical (one STATUS per unchanged folder, no FETCH when nothing is
new). Server state alone cannot prove what was *not* sent; a recording of the
client's command stream can. The proxy sits between the client and any IMAP
server (plain TCP only), forwards every byte unchanged, and parses the
client-to-server stream just enough to name each command.

Parsing rules: a command line is ``TAG SP NAME [SP ARGS]``; ``UID`` is joined to
the next word (``UID FETCH``). A line ending in a literal marker ``{N}``, ``{N+}``
(or ``~{N}`` for BINARY literals) is followed by N bytes of literal data and then
by the rest of the same command, none of which is a new command. Lines without a
space (AUTHENTICATE responses, IDLE's ``DONE``, ``*`` cancels) are not commands.
After STARTTLS or COMPRESS the stream is opaque and recording stops for that
connection (the bytes are still forwarded).

Commands are recorded *before* the bytes are forwarded, so when the client has
read the server's response to a command, that command is already in ``commands``.
"""
from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from typing import Self

from imapsync.testing import Running

__all__ = ["CommandRecorder"]

_LITERAL = re.compile(rb"~?\{(\d+)\+?\}\r?\n\Z")
_OPAQUE_AFTER = {"STARTTLS", "COMPRESS"}
_BUFSIZE = 65536


class _CommandParser:
    """Incremental parser of one client-to-server byte stream."""

    def __init__(self, record: Callable[[str], None]) -> None:
        self._record = record
        self._buf = bytearray()
        self._literal_left = 0  # bytes of literal data still to skip
        self._in_command = False  # the next line continues a command (after a literal)
        self.opaque = False

    def feed(self, data: bytes) -> None:
        if self.opaque:
            return
        pos = 0
        while pos < len(data) and not self.opaque:
            if self._literal_left:
                take = min(self._literal_left, len(data) - pos)
                self._literal_left -= take
                pos += take
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._buf += data[pos:]
                return
            self._buf += data[pos : newline + 1]
            pos = newline + 1
            line, self._buf = bytes(self._buf), bytearray()
            self._line(line)

    def _line(self, line: bytes) -> None:
        continuing = self._in_command
        literal = _LITERAL.search(line)
        if literal:
            self._literal_left = int(literal.group(1))
            self._in_command = True
        else:
            self._in_command = False
        if continuing:
            return
        words = line.rstrip(b"\r\n").split(b" ", 3)
        if len(words) < 2 or not words[0] or not words[1]:
            return  # not "TAG NAME": a SASL response, DONE, or "*"
        name = words[1].decode("ascii", "replace").upper()
        if name == "UID" and len(words) > 2:
            name = "UID " + words[2].decode("ascii", "replace").upper()
        self._record(name)
        if name in _OPAQUE_AFTER:
            self.opaque = True


class CommandRecorder(Running):
    """``with CommandRecorder(host, port) as proxy:`` connect clients to
    ``(proxy.host, proxy.port)``; read ``proxy.commands`` / ``proxy.count(name)``.
    """

    host: str = "127.0.0.1"

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port: int = 0
        self.connections: int = 0
        self._commands: list[str] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ public

    def start(self) -> Self:
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.settimeout(0.2)  # the accept loop re-checks _stopping this often
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "imap-proxy-accept")
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            _close(sock)
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)

    @property
    def commands(self) -> list[str]:
        """A snapshot of the recorded command names, in order."""
        with self._lock:
            return list(self._commands)

    def clear(self) -> None:
        with self._lock:
            self._commands.clear()

    def count(self, name: str) -> int:
        name = " ".join(name.upper().split())
        with self._lock:
            return sum(1 for command in self._commands if command == name)

    def __repr__(self) -> str:
        return f"CommandRecorder({self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]})"

    # ---------------------------------------------------------------- internals

    def _record(self, name: str) -> None:
        with self._lock:
            self._commands.append(name)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            self._sockets.add(sock)
            return True

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=10.0)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            if not (self._track(client) and self._track(server)):
                _close(client)
                _close(server)
                return
            self.connections += 1
            parser = _CommandParser(self._record)
            pair = _Pair()
            self._spawn(self._pump, "imap-proxy-c2s", client, server, parser, pair)
            self._spawn(self._pump, "imap-proxy-s2c", server, client, None, pair)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        parser: _CommandParser | None,
        pair: _Pair,
    ) -> None:
        try:
            while True:
                data = src.recv(_BUFSIZE)
                if not data:
                    break
                if parser is not None:
                    parser.feed(data)  # record first, so the reply cannot overtake it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Half-close towards dst so it sees EOF; once both directions are done
            # (or one failed hard), close both sockets.
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if pair.finish():
                for sock in (src, dst):
                    with self._lock:
                        self._sockets.discard(sock)
                    _close(sock)


class _Pair:
    """Counts the two pumps of one proxied connection; the last one closes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 2

    def finish(self) -> bool:
        """Mark one direction finished; True for the second (last) one."""
        with self._lock:
            self._running -= 1
            return self._running == 0


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
