"""`imapsync doctor`: check a setup before trusting it to run for months.

What it checks, each as one row of a table: the config (parsed, secrets resolved: a
config problem is reported like everywhere else, one line each, exit 2); the ledger
(opened, migrated, a row written and rolled back); each account's IMAP server (TLS,
login, folders listed, IDLE offered when the account watches folders); each tenant's
endpoint (GET /v1/health) and API key (an empty upload request, which can never
upload anything: the key is checked before the body, so 400 = accepted, 401/403 =
refused). The vendor SDK sink has no call that checks a key without uploading; that
row says so and is not counted as a failure. Read-only on every mailbox.

Exit code, in the order of `sync`: 2 when an API key is refused, 7 when an account
cannot be read, 5 when an endpoint cannot be reached, 1 when the ledger cannot be
written, else 0.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from rich.console import Console
from rich.table import Table

from imapsync.config import Account, LoadedConfig, Tenant
from imapsync.errors import ExitCode, LedgerError, SourceError
from imapsync.imap_source import ImapSource

#: An IMAP check waits at most this long for a server, whatever the account's timeout.
CHECK_TIMEOUT = 15.0
#: Failure codes in the order the first one present wins (as for `sync`).
_PRECEDENCE = (ExitCode.CONFIG, ExitCode.ACCOUNT_FAILED, ExitCode.UPLOAD_FAILED, ExitCode.UNEXPECTED)


class Result(str, Enum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "not checked"


@dataclass(frozen=True)
class Check:
    """One row: what was checked, on what, with which result and why."""

    what: str
    target: str
    result: Result
    detail: str
    failure: ExitCode = ExitCode.UNEXPECTED  # the exit code a FAIL of this row means


def run_checks(loaded: LoadedConfig) -> list[Check]:
    """Every check, the slow network ones concurrently; in a stable order."""
    rows = [Check("config", str(loaded.path), Result.OK,
                  f"{len(loaded.config.accounts)} account(s), {len(loaded.config.tenants)} tenant(s), "
                  f"sink {loaded.config.sink}")]
    rows.append(_ledger(loaded))
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="doctor") as pool:
        imap = list(pool.map(lambda a: _imap(loaded, a), loaded.config.accounts))
        tenants = list(pool.map(lambda t: _tenant(loaded, t), loaded.config.tenants))
    return rows + imap + [row for group in tenants for row in group]


def exit_code(rows: list[Check]) -> ExitCode:
    failed = {r.failure for r in rows if r.result is Result.FAIL}
    return next((code for code in _PRECEDENCE if code in failed), ExitCode.OK)


def render(rows: list[Check], console: Console) -> None:
    table = Table(box=None, pad_edge=False, padding=(0, 2))
    for col in ("check", "target", "result", "detail"):
        table.add_column(col, overflow="fold", no_wrap=col in ("check", "result"))
    for r in rows:
        style = {"OK": "green", "FAIL": "red"}.get(r.result.value, "yellow")
        table.add_row(r.what, r.target, f"[{style}]{r.result.value}[/]", r.detail)
    console.print(table)
    failed = sum(r.result is Result.FAIL for r in rows)
    console.print("All checks passed." if not failed else f"{failed} check(s) failed.", highlight=False)


# ----- the checks ----------------------------------------------------------------------

def _ledger(loaded: LoadedConfig) -> Check:
    from imapsync.ledger import Ledger

    try:
        ledger = Ledger.open(loaded.ledger_url)
    except LedgerError as e:
        return Check("ledger", e.url or "ledger", Result.FAIL, e.detail)
    try:
        ledger.check_writable()
        return Check("ledger", ledger.url, Result.OK, "opened, schema up to date, writable")
    except LedgerError as e:
        return Check("ledger", ledger.url, Result.FAIL, f"not writable: {e.detail}")
    finally:
        ledger.close()


def _imap(loaded: LoadedConfig, account: Account) -> Check:
    target = f"{account.name} ({account.host}:{account.effective_port})"
    quick = account.model_copy(update={"timeout": min(account.timeout, CHECK_TIMEOUT)})
    idle = account.schedule.idle if account.schedule.idle is not None else loaded.config.schedule.idle
    try:
        with ImapSource(quick, loaded.password(account).get_secret_value(),
                        loaded.resolve_path(account.ca_file)) as source:
            folders = source.folders(account.folders)
            detail = f"logged in; {len(folders)} folder(s) to archive"
            if idle:
                detail += "; IDLE offered" if source.supports_idle() else "; no IDLE: polled only"
    except SourceError as e:
        return Check("imap", target, Result.FAIL, str(e), ExitCode.ACCOUNT_FAILED)
    return Check("imap", target, Result.OK, detail)


def _tenant(loaded: LoadedConfig, tenant: Tenant) -> list[Check]:
    sink = loaded.config.sink
    if sink == "directory":
        return [_directory(loaded, tenant)]
    from imapsync.sinks.vaultastic import VaultasticSink

    key = loaded.api_key(tenant)
    client = VaultasticSink(tenant.domain, tenant.endpoint or "", key.get_secret_value() if key else "",
                            timeout=CHECK_TIMEOUT)
    target = f"{tenant.domain} ({tenant.endpoint})"
    try:
        healthy = client.health()
        rows = [Check("endpoint", target, Result.OK if healthy else Result.FAIL,
                      "GET /v1/health answered 200" if healthy else "GET /v1/health failed or did not answer 200",
                      ExitCode.UPLOAD_FAILED)]
        if sink == "vaultastic-sdk":
            rows.append(Check("api key", target, Result.SKIP,
                              "the vendor SDK has no call that checks a key without uploading a mail"))
            return rows
        accepted, why = client.check_key()
        result = Result.OK if accepted else Result.FAIL
        rows.append(Check("api key", target, result, why,
                          ExitCode.CONFIG if accepted is False else ExitCode.UPLOAD_FAILED))
        return rows
    finally:
        client.close()


def _directory(loaded: LoadedConfig, tenant: Tenant) -> Check:
    directory = loaded.directory
    target = f"{tenant.domain} ({directory})"
    try:
        assert directory is not None
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".doctor-")
        os.close(fd)
        os.unlink(name)
    except (OSError, AssertionError) as e:
        return Check("directory", target, Result.FAIL, f"not writable: {getattr(e, 'strerror', e)}",
                     ExitCode.UPLOAD_FAILED)
    return Check("directory", target, Result.OK, "writable")
