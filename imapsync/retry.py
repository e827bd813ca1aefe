"""`imapsync retry`: drive failed messages through the upload path again.

Which: every copy recorded as failed (in its folder's current UIDVALIDITY), or with
`--reason R` only those with that reason, including copies skipped for it (after a
config change, e.g. a new alias, `--reason no_primary_recipient` archives what now
has a vault). How: the sync pass with a Redo selection, under the account's lease,
so planning, dedup, upload and recording are the ones continuous sync uses. A copy
whose UID is gone (expunged, moved, UIDVALIDITY changed) is looked for in its folder
by Message-ID; when found there, its old record takes the new copy's outcome.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from imapsync.backfill import BackfillResult, Job, run_accounts, select_accounts
from imapsync.config import LoadedConfig
from imapsync.errors import ExitCode
from imapsync.ledger import Ledger, State
from imapsync.service import make_sinks
from imapsync.sinks.base import Sink
from imapsync.sync import Redo, Target


@dataclass
class RetryResult(BackfillResult):
    targets: int = 0  # copies selected for a retry
    remaining: int = 0  # of those, still failed (or skipped for the reason) afterwards

    @property
    def exit_code(self) -> int:
        code = super().exit_code
        if code == ExitCode.OK and self.remaining:
            return ExitCode.UPLOAD_FAILED
        return code

    def summary(self) -> str:
        if not self.targets:
            return "nothing to retry"
        return f"{self.targets} to retry, {self.remaining} still not archived; " + super().summary()


def _states(reason: str | None) -> frozenset[State]:
    return frozenset({State.FAILED, State.SKIPPED}) if reason else frozenset({State.FAILED})


def targets(ledger: Ledger, account: str, reason: str | None) -> dict[str, tuple[Target, ...]]:
    """Folder -> the copies to retry in it."""
    rows, _ = ledger.copies_in_states(_states(reason), account, reason)
    out: dict[str, list[Target]] = {}
    for r in rows:
        out.setdefault(r["folder"], []).append(Target(r["uidvalidity"], r["uid"], r["message_id"]))
    return {f: tuple(ts) for f, ts in out.items()}


def retry(loaded: LoadedConfig, ledger: Ledger, *, accounts: list[str] | None = None, reason: str | None = None,
          stop: threading.Event | None = None, lease_wait: float | None = None) -> RetryResult:
    stop = stop or threading.Event()
    result = RetryResult()
    selections: dict[str, Redo] = {}
    for account in select_accounts(loaded, accounts):
        found = targets(ledger, account.name, reason)
        if found:
            selections[account.name] = Redo(found, _states(reason))
            result.targets += sum(len(t) for t in found.values())
    if not selections:
        return result
    sinks: dict[str, Sink] = make_sinks(loaded)
    job = Job(loaded, ledger, selections, "retry", sinks, result.passed, stop,
              lease_wait=loaded.config.backfill.lease_wait if lease_wait is None else lease_wait)
    try:
        run_accounts(job, [a for a in loaded.config.accounts if a.name in selections])
    finally:
        for sink in {id(s): s for s in sinks.values()}.values():
            sink.close()
    result.stopped = stop.is_set()
    result.remaining = sum(sum(len(t) for t in targets(ledger, name, reason).values()) for name in selections)
    return result


__all__ = ["retry", "RetryResult", "targets"]
