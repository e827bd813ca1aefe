"""pymap's in-memory IMAP server, run in-process for fast tests and the demo.

Why in-process: starting it takes a few milliseconds (no interpreter start-up,
no port polling), it needs nothing outside the venv, and stopping it is exact.
The asyncio server runs on its own event loop in a daemon thread.

How it is put together (pymap 0.36, read from ``pymap/backend/dict``): pymap's
own ``DictBackend.init`` always creates a demo user (``demouser``/``demopass``),
so instead the dict backend's ``Config`` and ``Login`` are built directly and
exactly the given users are stored. Settings chosen for tests:

* passwords stored and compared in clear text (pymap's default hashing is
  PBKDF2 with 500 000 rounds, ~0.3 s per login);
* ``invalid_user_sleep = 0`` (no 0.3 s delay for unknown users);
* no STARTTLS (``tls_enabled=False``): plain LOGIN is allowed, as pymap allows
  it on loopback anyway; no demo data;
* CPU work runs on the event loop (no extra thread pool to shut down).

Capabilities differ from Dovecot: no CONDSTORE, QRESYNC, ESEARCH, ENABLE or
SPECIAL-USE; UIDs start at 101 and UIDVALIDITY is random.
"""
from __future__ import annotations

import asyncio
import imaplib
import threading
from argparse import Namespace
from collections.abc import Iterable
from datetime import datetime
from typing import Self

from proxyprotocol.reader import ProxyProtocolReader
from pymap.backend.dict import Config, Identity, Login
from pymap.concurrent import Subsystem
from pymap.imap import IMAPServer
from pymap.user import UserMetadata
from pysasl.hashing import Cleartext

from imapsync.testing import Running
from imapsync.testing.dovecot import encode_mutf7

__all__ = ["PymapServer"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class PymapServer(Running):
    """``with PymapServer({"alice": "pw"}) as server:`` -> ``server.host``, ``server.port``."""

    host: str = "127.0.0.1"

    def __init__(self, users: dict[str, str]) -> None:
        self.users: dict[str, str] = dict(users)
        self.port: int = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="pymap-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"pymap did not start within {_START_TIMEOUT} s")
        if self._error is not None or not self.port:
            self.stop()
            raise RuntimeError(f"pymap failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        """Stop listening, drop all connections, end the loop thread; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop, stop_event, thread = self._loop, self._stop_event, self._thread
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:
                pass  # loop already closed
        if thread is not None:
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("pymap server thread did not stop")

    def __repr__(self) -> str:
        return f"PymapServer({self.host}:{self.port}, users={sorted(self.users)})"

    # ---------------------------------------------------------------------- mail

    def append(
        self,
        user: str,
        password: str,
        folder: str,
        raw: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> int | None:
        """APPEND one message as ``user`` (stdlib imaplib), creating ``folder`` if
        missing. Returns the new UID from APPENDUID, if the server sent one.

        Note: imaplib turns bare LF line ends into CRLF before sending.
        """
        if not self.port:
            raise RuntimeError("server not started")
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        try:
            _check(conn.login(user, password), "LOGIN")
            mailbox = encode_mutf7(folder)  # imaplib adds quotes where needed
            if folder.upper() != "INBOX":
                typ, data = conn.list('""', mailbox)
                if typ != "OK" or not [d for d in data if d]:
                    _check(conn.create(mailbox), "CREATE")
            flag_list = "(" + " ".join(flags) + ")" if flags else None
            date = imaplib.Time2Internaldate(internaldate) if internaldate else None
            typ, data = conn.append(mailbox, flag_list, date, raw)
            _check((typ, data), "APPEND")
            return _appenduid(data)
        finally:
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    # ----------------------------------------------------------------- internals

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001 - reported to start(), which re-raises
            self._error = exc
        finally:
            self._ready.set()
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        args = Namespace(debug=False, passlib_cfg=None, proxy_protocol=None, inherited_sockets=None)
        config = Config(
            args,
            host=self.host,
            port=0,
            demo_data=False,
            demo_user="",
            demo_password="",
            tls_enabled=False,
            hash_context=Cleartext(),
            cpu_subsystem=Subsystem.for_asyncio(),
            invalid_user_sleep=0.0,
            reject_dnsbl=False,
        )
        config.apply_context()  # sets pymap's subsystem context variable for this loop
        login = Login(config)
        for name, password in self.users.items():
            metadata = UserMetadata(config, name, password=password)
            await Identity(name, login, None, frozenset()).set(metadata)
        callback = ProxyProtocolReader(config.proxy_protocol).get_callback(IMAPServer(login, config))
        server = await asyncio.start_server(callback, host=self.host, port=0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            # Connections are tasks of this loop; _run cancels them after we return.


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=_STOP_TIMEOUT))


def _check(result: tuple[str, list[object]], what: str) -> None:
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"{what} failed: {typ} {data!r}")


def _appenduid(data: list[object]) -> int | None:
    for item in data:
        if isinstance(item, bytes) and b"APPENDUID" in item.upper():
            words = item.replace(b"]", b" ").split()
            try:
                index = [w.upper() for w in words].index(b"[APPENDUID")
                return int(words[index + 2])
            except (ValueError, IndexError):
                return None
    return None

