"""A TCP proxy that breaks IMAP connections on purpose, for fault-injection tests.

Between the client and the real server, it forwards bytes unchanged, except on the
connections told to fail: `cut_after` closes a connection once the server has sent
that many bytes (mid-FETCH, mid-literal); `stall_after` stops forwarding the server's
bytes after that many, holding the connection open (the client must time out).
`faulty_connections` says how many connections, counted from the first, get the fault.
"""
from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, cut_after: int | None = None,
                 stall_after: int | None = None, faulty_connections: int = 1):
        self.upstream = (upstream_host, upstream_port)
        self.cut_after = cut_after
        self.stall_after = stall_after
        self.faulty_connections = faulty_connections
        self.connections = 0
        self.faults = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.host = "127.0.0.1"
        self.port = 0

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
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
                faulty = self.connections <= self.faulty_connections
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, None, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client,
                                                      self.cut_after if faulty else None,
                                                      self.stall_after if faulty else None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cut_after: int | None, stall_after: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                limit = cut_after if cut_after is not None else stall_after
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    with self._lock:
                        self.faults += 1
                    if stall_after is not None:
                        self._stopping.wait()  # hold the connection open, silent
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

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
