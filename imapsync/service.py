"""Wires a loaded config into ledger, sinks and IMAP sources, and runs passes.

This is where configuration becomes objects; the sync algorithm itself (sync.py)
never reads the config file, and the CLI only turns the outcome into words.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imapsync.config import Account, LoadedConfig
from imapsync.errors import ExitCode
from imapsync.imap_source import ImapSource
from imapsync.lease import AccountLease, worker_name
from imapsync.ledger import Ledger
from imapsync.sinks.base import Outcome, Sink
from imapsync.sinks.directory import DirectorySink
from imapsync.sinks.vaultastic import RetryPolicy, VaultasticSink
from imapsync.sync import AccountResult, Counts, Settings, sync_account
from imapsync.upload_pool import TenantGate, UploadPool

log = logging.getLogger("imapsync")


def make_sinks(loaded: LoadedConfig) -> dict[str, Sink]:
    """One sink per tenant (primary domain)."""
    cfg = loaded.config
    if cfg.sink == "vaultastic-sdk":
        from imapsync.sinks.sdk import make_sdk_sinks
        return make_sdk_sinks(loaded)
    if cfg.sink == "directory":
        shared = DirectorySink(loaded.directory)  # type: ignore[arg-type]
        return {t.domain: shared for t in cfg.tenants}
    up = cfg.upload
    policy = RetryPolicy(max_attempts=up.max_attempts, backoff_factor=up.backoff_factor,
                         backoff_max=up.backoff_max, budget_seconds=up.budget_seconds)
    return {
        t.domain: VaultasticSink(t.domain, t.endpoint or "", loaded.api_key(t).get_secret_value(),  # type: ignore[union-attr]
                                 retry=policy, timeout=up.timeout,
                                 rate=up.rate, burst=up.burst)
        for t in cfg.tenants
    }


def settings_of(loaded: LoadedConfig) -> Settings:
    cfg = loaded.config
    return Settings(
        domains_aliases={t.domain: dict(t.aliases) for t in cfg.tenants},
        max_message_bytes=cfg.upload.max_message_bytes,
        batch_bytes=cfg.fetch.batch_bytes,
        batch_messages=cfg.fetch.batch_messages,
        spool_bytes=cfg.upload.spool_bytes,
        connections=cfg.fetch.connections,
        reconnects=cfg.fetch.reconnects,
        reconnect_backoff=cfg.fetch.reconnect_backoff,
    )


def connector(loaded: LoadedConfig, account: Account):
    def connect() -> ImapSource:
        return ImapSource(account, loaded.password(account).get_secret_value(),
                          loaded.resolve_path(account.ca_file))
    return connect


@dataclass
class PassResult:
    """The outcome of one pass over several accounts, and the exit code it means."""

    accounts: list[AccountResult] = field(default_factory=list)
    gate: TenantGate = field(default_factory=TenantGate)
    busy: dict[str, str] = field(default_factory=dict)  # account -> the worker holding its lease

    @property
    def totals(self) -> Counts:
        total = Counts()
        for r in self.accounts:
            total.merge(r.counts)
        return total

    @property
    def exit_code(self) -> ExitCode:
        if any(r.outcome is Outcome.FORBIDDEN for r in self.gate.closed.values()):
            return ExitCode.CONFIG
        if any(r.error for r in self.accounts):
            return ExitCode.ACCOUNT_FAILED
        t = self.totals
        if t.failed or t.pending:
            return ExitCode.UPLOAD_FAILED
        return ExitCode.OK

    def summary(self) -> str:
        t = self.totals
        failed_accounts = [r.account for r in self.accounts if r.error]
        line = (f"{len(self.accounts)} account(s): {t.uploaded} uploaded, {t.duplicate} duplicate, "
                f"{t.skipped} skipped, {t.failed} failed, {t.pending} pending")
        if failed_accounts:
            line += f"; account error: {', '.join(failed_accounts)}"
        for tenant, r in sorted(self.gate.closed.items()):
            line += f"; tenant {tenant}: {r.detail}"
        for name, holder in sorted(self.busy.items()):
            line += f"; {name} skipped: being synced by {holder}"
        return line


#: Below this many accounts per process, one process does the pass (forking costs more).
ACCOUNTS_PER_PROCESS = 16
_forked: tuple[LoadedConfig, Ledger, str] | None = None  # what the pass's child processes inherit


def run_pass_spread(loaded: LoadedConfig, ledger: Ledger, account_names: list[str] | None = None,
                    kind: str = "sync") -> PassResult:
    """`run_pass` over many accounts, spread over processes (`fetch.processes`, 0 = one per CPU).

    One process is bound by one core: a no-change poll of many accounts spends its time
    in Python (IMAP answers, ledger statements), not waiting. Each child gets an equal
    share of the accounts and runs them as `run_pass` does, under their leases; the
    results come back and are added up. Children are forked, so they start without
    importing anything again, and they end with the parent if it is killed.
    """
    global _forked
    accounts = [a.name for a in loaded.config.accounts if not account_names or a.name in account_names]
    wanted = loaded.config.fetch.processes or os.cpu_count() or 1
    n = min(wanted, len(accounts) // ACCOUNTS_PER_PROCESS)
    if n < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return run_pass(loaded, ledger, account_names, kind)
    log.info("Syncing %d accounts over %d processes", len(accounts), n)
    _forked = (loaded, ledger, kind)
    try:
        with multiprocessing.get_context("fork").Pool(n, initializer=_child_start) as pool:
            parts = pool.map(_child_pass, [accounts[i::n] for i in range(n)])
    finally:
        _forked = None
    result = PassResult()
    for done, closed, busy in parts:
        result.accounts.extend(done)
        result.gate.closed.update(closed)
        result.busy.update(busy)
    return result


def _child_start() -> None:
    _die_with_parent()
    _forked[1].after_fork()  # type: ignore[index]


def _child_pass(names: list[str]) -> tuple[list[AccountResult], dict, dict[str, str]]:
    loaded, ledger, kind = _forked  # type: ignore[misc]
    result = run_pass(loaded, ledger, names, kind)
    return result.accounts, dict(result.gate.closed), result.busy


def _die_with_parent() -> None:
    """Linux: end this child when its parent ends (even by SIGKILL), so no orphan uploads on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def run_pass(loaded: LoadedConfig, ledger: Ledger, account_names: list[str] | None = None,
             kind: str = "sync") -> PassResult:
    """One pass over the selected accounts (all by default), several accounts at a time.

    Each account is synced under its ledger lease; an account another worker (e.g.
    `imapsync run`) is syncing is left to it and listed in `busy`.
    """
    accounts = [a for a in loaded.config.accounts if not account_names or a.name in account_names]
    sinks = make_sinks(loaded)
    settings = settings_of(loaded)
    result = PassResult()
    owner = worker_name(kind)

    def one(account: Account) -> AccountResult | None:
        with AccountLease(ledger, account.name, owner, kind) as lease:
            if not lease.held:
                result.busy[account.name] = lease.holder()
                log.warning("Account %s: skipped, being synced by %s", account.name, result.busy[account.name])
                return None
            pool = UploadPool(sinks, result.gate, loaded.config.upload.concurrency)  # one owner thread each
            try:
                return sync_account(account, connector(loaded, account), ledger, pool, settings, kind=kind)
            finally:
                pool.close()

    # Accounts run side by side: a pass over many accounts waits on round trips, not CPU.
    # Uploads stay bounded per tenant by the sink's connection pool.
    try:
        workers = max(1, min(loaded.config.fetch.parallel_accounts, len(accounts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="account") as executor:
            result.accounts.extend(r for r in executor.map(one, accounts) if r is not None)
    finally:
        for sink in {id(s): s for s in sinks.values()}.values():  # a shared sink closes once
            sink.close()
    return result
