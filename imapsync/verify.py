"""`imapsync verify`: reconcile each mailbox with the ledger, the proof an auditor asks for.

For every message present now in every included folder, the ledger must account for
it in a final state:

- by UID: the copy at (folder, UIDVALIDITY, UID) is recorded uploaded, duplicate or
  skipped (with its reason), and the message recorded there is the one at that UID
  (same key, computed again from the headers);
- by key: no such copy is recorded (e.g. after a UIDVALIDITY change not yet synced,
  or a copy moved between folders), but its message is archived and every vault it
  is routed to now is covered.

Anything else is unaccounted (not in the ledger, or still pending) and listed; a
copy recorded as failed is listed apart, with its reason. Only headers and sizes are
fetched (EXAMINE, BODY.PEEK[HEADER.FIELDS]); the mailbox and the ledger are only read.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from imapsync import routing
from imapsync.config import Account, LoadedConfig
from imapsync.errors import ExitCode, SourceError
from imapsync.imap_source import ImapSource, matches_any
from imapsync.ledger import Ledger, State
from imapsync.message import MessageInfo
from imapsync.service import connector, settings_of
from imapsync.sync import Settings, uncovered_routes

log = logging.getLogger("imapsync.verify")

_ACCOUNTED = {State.UPLOADED.value, State.DUPLICATE.value, State.SKIPPED.value}


@dataclass
class Copy:
    """One message in a mailbox that the ledger does not account for (or holds as failed)."""

    account: str
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    date: str | None
    size: int
    why: str  # not_in_ledger | pending | other_message_at_uid | failed: REASON


@dataclass
class FolderCheck:
    account: str
    folder: str
    uidvalidity: int
    messages: int = 0
    by_uid: int = 0
    by_key: int = 0
    failed: int = 0
    unaccounted: int = 0


@dataclass
class Report:
    folders: list[FolderCheck] = field(default_factory=list)
    unaccounted: list[Copy] = field(default_factory=list)
    failed: list[Copy] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # account -> why it could not be read

    @property
    def complete(self) -> bool:
        return not self.unaccounted and not self.failed and not self.errors

    @property
    def exit_code(self) -> ExitCode:
        if self.unaccounted:
            return ExitCode.INCOMPLETE
        if self.errors:
            return ExitCode.ACCOUNT_FAILED
        if self.failed:
            return ExitCode.UPLOAD_FAILED
        return ExitCode.OK

    def totals(self) -> dict[str, int]:
        keys = ("messages", "by_uid", "by_key", "failed", "unaccounted")
        return {k: sum(getattr(f, k) for f in self.folders) for k in keys}

    def as_dict(self) -> dict:
        return {"complete": self.complete, "totals": self.totals(),
                "folders": [asdict(f) for f in self.folders],
                "unaccounted": [asdict(c) for c in self.unaccounted],
                "failed": [asdict(c) for c in self.failed],
                "errors": [{"account": a, "error": e} for a, e in sorted(self.errors.items())]}


def verify(loaded: LoadedConfig, ledger: Ledger, accounts: list[str] | None = None,
           folders: tuple[str, ...] = ()) -> Report:
    """Reconcile the selected accounts (all by default), folders matching `folders` globs."""
    report = Report()
    settings = settings_of(loaded)
    for account in loaded.config.accounts:
        if accounts and account.name not in accounts:
            continue
        try:
            with connector(loaded, account)() as source:
                _account(source, account, ledger, settings, folders, report)
        except SourceError as e:
            report.errors[account.name] = str(e)
            log.error("Account %s: %s", account.name, e)
    return report


def _account(source: ImapSource, account: Account, ledger: Ledger, settings: Settings,
             folders: tuple[str, ...], report: Report) -> None:
    owner = routing.owner_vault(account.username, account.vault, settings.domains_aliases)
    account_id = ledger.find_account_id(account.name)
    rows = ledger.folders(account_id) if account_id else {}
    for folder in source.folders(account.folders):
        if folders and not matches_any(folder.name, folders):
            continue
        uidvalidity = source.examine(folder.name)
        check = FolderCheck(account.name, folder.name, uidvalidity)
        report.folders.append(check)
        uids = source.uids_after(0, folder.name)
        row = rows.get(folder.name)
        copies = ledger.copies(row.id, uidvalidity, uids) if row else {}
        for i in range(0, len(uids), settings.batch_messages):
            infos = {h.uid: MessageInfo.from_headers(h.header, h.size)
                     for h in source.fetch_headers(uids[i:i + settings.batch_messages], folder.name)}
            _check(check, infos, copies, ledger, settings, owner, report)


def _check(check: FolderCheck, infos: dict[int, MessageInfo], copies: dict[int, dict], ledger: Ledger,
           settings: Settings, owner: str | None, report: Report) -> None:
    """Account for one batch of messages: by UID, else by key, else list them."""
    by_key = ledger.lookup(info.header_key for uid, info in infos.items()
                           if info.header_key and copies.get(uid, {}).get("state") not in _ACCOUNTED)
    for uid, info in infos.items():
        check.messages += 1
        copy = copies.get(uid)
        if copy is not None and copy["state"] in _ACCOUNTED:
            if info.header_key and copy["key"] and copy["key"].startswith("m:") and copy["key"] != info.header_key:
                check.unaccounted += 1
                report.unaccounted.append(_listed(check, uid, info, "other_message_at_uid"))
            else:
                check.by_uid += 1
        elif copy is not None and copy["state"] == State.FAILED.value:
            check.failed += 1
            report.failed.append(_listed(check, uid, info, f"failed: {copy['reason'] or 'no reason recorded'}"))
        elif _archived_by_key(info, by_key, settings, owner):
            check.by_key += 1
        else:
            check.unaccounted += 1
            report.unaccounted.append(_listed(check, uid, info, "pending" if copy is not None else "not_in_ledger"))


def _archived_by_key(info: MessageInfo, known: dict, settings: Settings, owner: str | None) -> bool:
    """The message (by key) is archived and covers every vault it is routed to now."""
    k = known.get(info.header_key) if info.header_key else None
    if k is None or k.state not in (State.UPLOADED, State.DUPLICATE):
        return False
    routes = routing.routes(info.addresses, info.sender, owner, settings.domains_aliases)
    return bool(routes) and not uncovered_routes(routes, k)


def _listed(check: FolderCheck, uid: int, info: MessageInfo, why: str) -> Copy:
    return Copy(check.account, check.folder, check.uidvalidity, uid, info.message_id, info.date, info.size, why)


def render(report: Report, console) -> None:
    """Counts per folder, then every unaccounted and failed message."""
    for f in report.folders:
        mark = "ok" if not f.unaccounted and not f.failed else "INCOMPLETE"
        console.print(f"{f.account} {f.folder} (uidvalidity {f.uidvalidity}): {f.messages} messages, "
                      f"{f.by_uid} by UID, {f.by_key} by key, {f.failed} failed, {f.unaccounted} unaccounted  {mark}",
                      highlight=False, markup=False, soft_wrap=True)
    for account, error in sorted(report.errors.items()):
        console.print(f"{account}: not verified: {error}", highlight=False, markup=False, soft_wrap=True)
    for title, copies in (("Unaccounted", report.unaccounted), ("Failed", report.failed)):
        if copies:
            console.print(f"\n{title} ({len(copies)}):", highlight=False)
            for c in copies:
                console.print(f"  {c.account} {c.folder} uid {c.uid}: {c.why}  {c.message_id or '(no Message-ID)'}"
                              f"  {c.date or ''}  {c.size} bytes", highlight=False, markup=False, soft_wrap=True)
    t = report.totals()
    verdict = "complete" if report.complete else "NOT complete"
    console.print(f"\n{t['messages']} messages: {t['by_uid']} by UID, {t['by_key']} by key, {t['failed']} failed, "
                  f"{t['unaccounted']} unaccounted: {verdict}", highlight=False, markup=False)


__all__ = ["verify", "render", "Report", "FolderCheck", "Copy"]
