"""Push instead of poll: one IMAP IDLE connection per watched folder, waking its account.

Why: polling every few minutes leaves new mail unarchived for minutes; IDLE (RFC 2177)
lets the server say "new mail" within a second. A watcher does not archive anything
itself: it holds one read-only connection (EXAMINE, then IDLE) and, when the server
announces mail, asks the daemon to run the account's pass now. The account's
scheduled polling goes on regardless, so a server without IDLE, or a watcher that
lost its connection, only makes archiving as slow as the poll interval.

The connection is renewed (DONE, IDLE) every `renew` seconds, before the 29 minutes
after which servers may drop an idle client, which also proves it is still alive. A
lost connection is reopened with backoff (1 s doubling to 5 min); state changes are
logged once, not on every retry. IDLE connections are not counted in the daemon's
connection caps: each watched folder holds one more connection to its server.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum

from imapsync.errors import SourceError, SourceErrorKind
from imapsync.imap_source import ImapSource

log = logging.getLogger("imapsync.idle")

#: Longest wait between reconnection attempts of a watcher.
MAX_RETRY = 300.0
#: How often a watcher looks at its stop flag while idling.
TICK = 1.0


class WatchState(str, Enum):
    STARTING = "starting"
    WATCHING = "watching"
    LOST = "lost"
    UNSUPPORTED = "unsupported"  # the server offers no IDLE: the account is polled only
    STOPPED = "stopped"


class IdleWatcher:
    """Watches one folder of one account; calls `on_new_mail()` when the server announces mail."""

    def __init__(self, account: str, folder: str, connect: Callable[[], ImapSource], *,
                 renew: float, on_new_mail: Callable[[], None]):
        self.account, self.folder = account, folder
        self.connect = connect
        self.renew = renew
        self.on_new_mail = on_new_mail
        self.state = WatchState.STARTING
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"idle:{account}:{folder}", daemon=True)

    def start(self) -> "IdleWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the watcher to end; it closes its connection within about a second."""
        self._halt.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        retry = 1.0
        connected_before = False
        while not self._halt.is_set():
            try:
                with self.connect() as source:
                    if not source.supports_idle():
                        self._set(WatchState.UNSUPPORTED, "the server offers no IDLE; polling only")
                        return
                    source.idle_start(self.folder)
                    self._set(WatchState.WATCHING, "watching for new mail (IDLE)")
                    retry = 1.0
                    if connected_before:  # mail may have come while we were away
                        self.on_new_mail()
                    connected_before = True
                    self._watch(source)
            except SourceError as e:
                if self._halt.is_set():
                    break
                if e.kind == SourceErrorKind.THROTTLED and e.retry_after:
                    retry = max(retry, e.retry_after)
                self._set(WatchState.LOST, f"IDLE connection failed: {e}; retrying with backoff")
                self._halt.wait(retry)
                retry = min(retry * 2, MAX_RETRY)
            except Exception:  # noqa: BLE001 - a watcher must never take the daemon down
                log.exception("Account %s folder %s: IDLE watcher failed", self.account, self.folder,
                              extra={"account": self.account, "folder": self.folder})
                self._halt.wait(MAX_RETRY)
        self._set(WatchState.STOPPED, "IDLE watcher stopped")

    def _watch(self, source: ImapSource) -> None:
        renew_at = time.monotonic() + self.renew
        while not self._halt.is_set():
            left = renew_at - time.monotonic()
            if left <= 0:
                if source.idle_renew(self.folder):
                    self.on_new_mail()
                log.debug("Account %s folder %s: IDLE renewed", self.account, self.folder)
                renew_at = time.monotonic() + self.renew
                continue
            if source.idle_wait(min(TICK, left), self.folder):
                log.debug("Account %s folder %s: new mail announced", self.account, self.folder)
                self.on_new_mail()

    def _set(self, state: WatchState, what: str) -> None:
        """Log a state change once (not every retry)."""
        if state is self.state:
            return
        self.state = state
        level = logging.WARNING if state is WatchState.LOST else logging.INFO
        log.log(level, "Account %s folder %s: %s", self.account, self.folder, what,
                extra={"account": self.account, "folder": self.folder})
