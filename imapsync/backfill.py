"""Backfill: archive the history of mailboxes, window by window, resumable, with progress.

A backfill is the sync pass (sync.sync_account) given a date selection instead of
"every UID above the cursor": it shares the ledger, the dedup, the sinks and the
cursor rule with continuous sync, so a message archived by one is never uploaded
again by the other. What this module adds around it:

- the account's ledger lease (the same one `imapsync sync` and `imapsync run` take),
  waited for when another worker holds it, so two workers never handle one account
  at once; a lease left by a killed process of this machine is taken over at once;
- a census per account, in its own thread and IMAP connection, that counts the work
  (UID SEARCH SINCE/BEFORE and RFC822.SIZE, never a body) while uploads already run,
  so the progress display has totals, a rate and an ETA;
- accounts in parallel (one upload pool each, the sinks shared);
- a warm stop on the first Ctrl-C or SIGTERM (the batch in hand is finished and
  recorded), an immediate one on the second. A killed backfill loses nothing: the
  ledger holds every acknowledged upload, and the same command continues.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from imapsync.config import Account, LoadedConfig
from imapsync.errors import ExitCode, LedgerError, SourceError
from imapsync.imap_source import ImapSource
from imapsync.lease import AccountLease, holder_gone, worker_name
from imapsync.ledger import FolderRow, Ledger, now
from imapsync.progress import AccountProgress, Phase, Tracker
from imapsync.service import PassResult, connector, make_sinks, settings_of
from imapsync.sinks.base import Sink
from imapsync.sync import AccountResult, Counts, DryRun, Redo, Windows, sync_account
from imapsync.upload_pool import UploadPool

log = logging.getLogger("imapsync.backfill")

#: Exit code of a run ended by Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention).
STOPPED_EXIT = 130


@dataclass
class BackfillResult:
    """A backfill (or retry) over several accounts: the pass result plus what it could not do."""

    passed: PassResult = field(default_factory=PassResult)
    stopped: bool = False
    dry_run: DryRun | None = None

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return STOPPED_EXIT
        code = self.passed.exit_code
        if code == ExitCode.OK and self.passed.busy:
            return ExitCode.ACCOUNT_FAILED
        return int(code)

    def summary(self) -> str:
        if self.dry_run is not None:
            c = self.dry_run.counts
            line = (f"dry run of {len(self.passed.accounts)} account(s): would upload {c['upload']}, "
                    f"skip {c['skip']}, {c['duplicate']} duplicate, {c['already_done']} already archived; "
                    "nothing uploaded, nothing written")
            errors = [r.account for r in self.passed.accounts if r.error]
            return line + (f"; account error: {', '.join(errors)}" if errors else "")
        line = self.passed.summary()
        if self.stopped:
            line += "; stopped: run the same command again to continue"
        return line


# ----- the account's lease -----------------------------------------------------------------

@contextmanager
def account_lease(ledger: Ledger, account: str, purpose: str, seconds: float, wait: float,
                  stop: threading.Event) -> Iterator[AccountLease]:
    """Hold the account's lease for the block, waiting up to `wait` seconds for another
    worker to let it go. `lease.held` is False when it could not be had in time."""
    owner = worker_name(purpose)
    deadline = time.monotonic() + wait
    told = False
    while True:
        with AccountLease(ledger, account, owner, purpose, seconds) as lease:
            if lease.held:
                yield lease
                return
            holder = ledger.lease_holder(account)
            if holder and holder_gone(holder["owner"]):
                log.warning("Account %s: taking over the lease of %s, a process that is gone", account,
                            holder["owner"])
                ledger.release_lease(account, holder["owner"])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                yield lease
                return
            if not told:
                log.warning("Account %s: being synced by %s; waiting up to %.0fs for it", account,
                            lease.holder(), remaining)
                told = True
        stop.wait(min(1.0, remaining))


# ----- the census: counting the work without fetching a body -------------------------------

class Census(threading.Thread):
    """Counts, per folder, the messages of the selection not yet final when the run
    started, and their sizes, over its own connection; feeds the progress totals."""

    def __init__(self, connect: Callable[[], ImapSource], account: Account, ledger: Ledger,
                 cursors: dict[str, FolderRow], selection: Windows, progress: AccountProgress,
                 run_start: datetime, stop: threading.Event):
        super().__init__(name=f"census:{account.name}", daemon=True)
        self.connect, self.account, self.ledger, self.cursors = connect, account, ledger, cursors
        self.selection, self.progress, self.run_start, self.stop = selection, progress, run_start, stop

    def run(self) -> None:
        try:
            with self.connect() as source:
                for folder in source.folders(self.account.folders):
                    if self.stop.is_set():
                        return
                    if self.selection.folders and not _matches(folder.name, self.selection.folders):
                        continue
                    self._count(source, folder.name)
        except (SourceError, LedgerError) as e:
            log.warning("Account %s: could not count the work (%s); progress shows no total", self.account.name, e)
        finally:
            self.progress.counted()

    def _count(self, source: ImapSource, name: str) -> None:
        row = self.cursors.get(name)
        status = source.status(name)
        if row is not None and row.uidvalidity == status.uidvalidity and row.last_uid >= status.uidnext - 1:
            return  # every message is final already (rule 3)
        uidvalidity = source.examine(name)
        last = row.last_uid if row is not None and row.uidvalidity == uidvalidity else 0
        uids = [u for u in source.uids_in_window(name, self.selection.since, self.selection.before) if u > last]
        if row is not None and uids:
            done = self.ledger.final_before(row.id, uidvalidity, uids, self.run_start)
            uids = [u for u in uids if u not in done]
        sizes = source.sizes(uids, name)
        self.progress.add_total(len(sizes), sum(sizes.values()))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    from imapsync.imap_source import matches_any
    return matches_any(name, patterns)


# ----- running accounts -------------------------------------------------------------------

@dataclass
class Job:
    """What every account of one run shares."""

    loaded: LoadedConfig
    ledger: Ledger
    selection: Windows | Redo | dict[str, Redo]  # a dict: one selection per account name
    kind: str
    sinks: dict[str, Sink]
    passed: PassResult
    stop: threading.Event
    tracker: Tracker | None = None
    dry_run: DryRun | None = None
    lease_wait: float = 0.0


def run_accounts(job: Job, accounts: list[Account]) -> None:
    """Each account in its own thread (up to backfill.parallel_accounts at once)."""
    workers = max(1, min(job.loaded.config.backfill.parallel_accounts, len(accounts)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="account") as ex:
        results = list(ex.map(lambda a: _account(job, a), accounts))
    job.passed.accounts.extend(r for r in results if r is not None)


def _account(job: Job, account: Account) -> AccountResult | None:
    progress = job.tracker.account(account.name) if job.tracker is not None else None
    if job.dry_run is not None:  # writes nothing: needs no lease
        return _work(job, account, progress)
    seconds = job.loaded.config.schedule.lease_seconds
    with account_lease(job.ledger, account.name, job.kind, seconds, job.lease_wait, job.stop) as lease:
        if not lease.held:
            holder = lease.holder()
            job.passed.busy[account.name] = holder
            log.error("Account %s: not %s: being synced by %s (try again later, or give --wait SECONDS)",
                      account.name, "backfilled" if job.kind == "backfill" else "retried", holder)
            if progress is not None:
                progress.finish(Phase.BUSY)
            return None
        return _work(job, account, progress)


def _work(job: Job, account: Account, progress: AccountProgress | None) -> AccountResult:
    connect = connector(job.loaded, account)
    selection = job.selection.get(account.name) if isinstance(job.selection, dict) else job.selection
    census = None
    if progress is not None and isinstance(selection, Windows):
        account_id = job.ledger.find_account_id(account.name)
        cursors = job.ledger.folders(account_id) if account_id else {}
        census = Census(connect, account, job.ledger, cursors, selection, progress, now(), job.stop)
        census.start()
    pool = UploadPool(job.sinks, job.passed.gate, job.loaded.config.upload.concurrency)
    result = AccountResult(account.name, Counts())
    try:
        result = sync_account(account, connect, job.ledger, pool, settings_of(job.loaded), kind=job.kind,
                              stop=job.stop, selection=selection, progress=progress, dry_run=job.dry_run)
    finally:
        pool.close()
        if census is not None:
            census.join(timeout=0 if job.stop.is_set() else None)
        if progress is not None:
            progress.finish(Phase.ERROR if result.error else Phase.STOPPED if job.stop.is_set() else Phase.DONE)
    return result


def select_accounts(loaded: LoadedConfig, names: list[str] | None) -> list[Account]:
    return [a for a in loaded.config.accounts if not names or a.name in names]


def backfill(loaded: LoadedConfig, ledger: Ledger, selection: Windows, *, accounts: list[str] | None = None,
             dry_run: bool = False, tracker: Tracker | None = None, stop: threading.Event | None = None,
             lease_wait: float | None = None) -> BackfillResult:
    """Backfill the selected accounts (all by default) over `selection`."""
    stop = stop or threading.Event()
    result = BackfillResult(dry_run=DryRun() if dry_run else None)
    sinks: dict[str, Sink] = {} if dry_run else make_sinks(loaded)
    job = Job(loaded, ledger, selection, "backfill", sinks, result.passed, stop, tracker, result.dry_run,
              loaded.config.backfill.lease_wait if lease_wait is None else lease_wait)
    try:
        run_accounts(job, select_accounts(loaded, accounts))
    finally:
        for sink in {id(s): s for s in sinks.values()}.values():
            sink.close()
    result.stopped = stop.is_set()
    return result


# ----- a warm stop --------------------------------------------------------------------------

@contextmanager
def warm_stop() -> Iterator[threading.Event]:
    """The first SIGINT/SIGTERM sets the event (finish the batch in hand, record it,
    stop); the second ends the process at once, as the default handler would."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame) -> None:
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("Stopping after the current batch (again to stop at once)")
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["backfill", "BackfillResult", "Census", "account_lease", "warm_stop", "run_accounts", "Job",
           "select_accounts", "STOPPED_EXIT"]


def render_dry_run(plan: dict, console) -> None:
    """What a dry run found: per vault, per reason, and the messages it would skip."""
    console.print(f"Dry run: would upload {plan['would_upload']} message(s) "
                  f"({plan['would_upload_bytes']} bytes), skip {plan['would_skip']}, "
                  f"{plan['duplicates']} duplicate(s), {plan['already_done']} already archived.",
                  highlight=False, markup=False)
    for vault, n in plan["vaults"].items():
        console.print(f"  to vault {vault}: {n} message(s)", highlight=False, markup=False)
    for reason, n in plan["reasons"].items():
        console.print(f"  {reason}: {n}", highlight=False, markup=False)
    for entry in plan["skip"][:50]:
        console.print(f"  would skip {entry['account']} {entry['folder']} uid {entry['uid']}: {entry['reason']}  "
                      f"{entry['message_id'] or '(no Message-ID)'}", highlight=False, markup=False, soft_wrap=True)
    if plan["would_skip"] > 50:
        console.print(f"  … {plan['would_skip'] - 50} more skipped (see --json)")
