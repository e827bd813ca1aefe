"""An account's ledger lease held for the length of one piece of work, renewed while it runs.

Why: `imapsync run`, `imapsync sync` and a backfill may point at the same ledger, on one
machine or several. The ledger's `leases` table (one row per account) says which
worker is on an account; whoever does not hold the lease leaves the account alone, so
no message is fetched and uploaded twice at the same time. A lease expires on its own
(a crashed worker does not block an account for ever), so a long pass renews it in a
background thread, every third of its length. A lease left by a process of this machine
that no longer exists (killed, stopped cold) is taken over at once instead of waiting
for it to expire.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from types import TracebackType

from imapsync.errors import LedgerError
from imapsync.ledger import Ledger

log = logging.getLogger("imapsync.lease")

#: A lease taken by `imapsync sync`/`backfill` lasts this long unless renewed.
DEFAULT_SECONDS = 60.0


def worker_name(role: str) -> str:
    """Who holds a lease, as `status` and the logs show it: role@host:pid."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def _dead_here(owner: str) -> bool:
    """True when `owner` (role@host:pid) names a process of this machine that has ended."""
    _role, _, where = owner.partition("@")
    host, _, pid = where.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class AccountLease:
    """`with AccountLease(ledger, "alice", owner, "daemon") as lease: if lease.held: ...`"""

    def __init__(self, ledger: Ledger, account: str, owner: str, purpose: str,
                 seconds: float = DEFAULT_SECONDS):
        self.ledger, self.account, self.owner, self.purpose = ledger, account, owner, purpose
        self.seconds = seconds
        self.held = False
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> str:
        """Who holds the account now (for a message when we could not take it)."""
        row = self.ledger.lease_holder(self.account)
        return f"{row['owner']} ({row['purpose']})" if row else "nobody"

    def __enter__(self) -> "AccountLease":
        self.held = self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds)
        if not self.held:
            row = self.ledger.lease_holder(self.account)
            if row is not None and _dead_here(row["owner"]):
                log.info("Account %s: taking over the lease of %s, which is no longer running",
                         self.account, row["owner"])
                self.ledger.release_lease(self.account, row["owner"])
                self.held = self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds)
        if self.held:
            self._renewer = threading.Thread(target=self._renew, name=f"lease:{self.account}", daemon=True)
            self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                if not self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds):
                    log.error("Account %s: lease taken over by %s", self.account, self.holder())
                    return
            except LedgerError as e:
                log.warning("Account %s: lease not renewed: %s", self.account, e)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.held:
            try:
                self.ledger.release_lease(self.account, self.owner)
            except LedgerError as e:  # it expires on its own
                log.warning("Account %s: lease not released: %s", self.account, e)
