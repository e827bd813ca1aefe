"""An account's ledger lease held for the length of one piece of work, renewed while it runs.

Why: `imapsync run`, `imapsync sync` and a backfill may point at the same ledger, on one
machine or several. The ledger's `leases` table (one row per account) says which
worker is on an account; whoever does not hold the lease leaves the account alone, so
no message is fetched and uploaded twice at the same time. A lease expires on its own
(a crashed worker does not block an account for ever), so a long pass has it renewed
every third of its length, by one background thread that renews every lease of the
process (a thread per account cost a no-change poll of 100 accounts a tenth of a
second). A lease left by a process of this machine that no longer exists (killed,
stopped cold) is taken over at once instead of waiting for it to expire.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from types import TracebackType

from imapsync import process
from imapsync.errors import LedgerError
from imapsync.ledger import Ledger

log = logging.getLogger("imapsync.lease")

#: A lease taken by `imapsync sync`/`backfill` lasts this long unless renewed.
DEFAULT_SECONDS = 60.0


def worker_name(role: str) -> str:
    """Who holds a lease, as `status` and the logs show it: role@host:pid."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def holder_gone(owner: str) -> bool:
    """True when `owner` (role@host:pid, see `worker_name`) names a process of this machine
    that has ended."""
    _role, _, where = owner.partition("@")
    host, _, pid = where.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and process.gone(int(pid))


class _Renewals:
    """The one thread of a process that renews its leases, each every third of its length."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[AccountLease, float] = {}  # lease -> when to renew it next
        self._renewing: AccountLease | None = None
        self._thread: threading.Thread | None = None

    def add(self, lease: AccountLease) -> None:
        with self._cond:
            self._due[lease] = time.monotonic() + lease.seconds / 3
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-renewals", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, lease: AccountLease) -> None:
        """Renewed no more; returns once a renewal of it under way has ended, so the lease
        can be released without being taken again behind the release."""
        with self._cond:
            self._due.pop(lease, None)
            self._cond.wait_for(lambda: self._renewing is not lease)

    def after_fork(self) -> None:
        """A forked child holds none of its parent's leases, and has no renewal thread."""
        self._cond, self._due, self._renewing, self._thread = threading.Condition(), {}, None, None

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                lease = min(self._due, key=self._due.__getitem__, default=None)
                if lease is None or self._due[lease] > now:
                    self._cond.wait(None if lease is None else self._due[lease] - now)
                    continue
                self._due[lease] = now + lease.seconds / 3
                self._renewing = lease
            keep = False
            try:
                keep = lease.renew()
            finally:
                with self._cond:
                    if not keep:
                        self._due.pop(lease, None)
                    self._renewing = None
                    self._cond.notify_all()


_renewals = _Renewals()
os.register_at_fork(after_in_child=_renewals.after_fork)


class AccountLease:
    """`with AccountLease(ledger, "alice", owner, "daemon") as lease: if lease.held: ...`"""

    def __init__(self, ledger: Ledger, account: str, owner: str, purpose: str,
                 seconds: float = DEFAULT_SECONDS):
        self.ledger, self.account, self.owner, self.purpose = ledger, account, owner, purpose
        self.seconds = seconds
        self.held = False

    def holder(self) -> str:
        """Who holds the account now (for a message when we could not take it)."""
        row = self.ledger.lease_holder(self.account)
        return f"{row['owner']} ({row['purpose']})" if row else "nobody"

    def __enter__(self) -> "AccountLease":
        self.held = self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds)
        if not self.held:
            row = self.ledger.lease_holder(self.account)
            if row is not None and holder_gone(row["owner"]):
                log.info("Account %s: taking over the lease of %s, which is no longer running",
                         self.account, row["owner"])
                self.ledger.release_lease(self.account, row["owner"])
                self.held = self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds)
        if self.held:
            _renewals.add(self)
        return self

    def renew(self) -> bool:
        """Renew the lease now; False when another worker has taken it (it is not ours to renew)."""
        try:
            if not self.ledger.acquire_lease(self.account, self.owner, self.purpose, self.seconds):
                log.error("Account %s: lease taken over by %s", self.account, self.holder())
                return False
        except LedgerError as e:
            log.warning("Account %s: lease not renewed: %s", self.account, e)
        return True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held:
            _renewals.remove(self)
            try:
                self.ledger.release_lease(self.account, self.owner)
            except LedgerError as e:  # it expires on its own
                log.warning("Account %s: lease not released: %s", self.account, e)
