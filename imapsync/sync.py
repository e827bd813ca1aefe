"""One pass over one account: the core algorithm, a function of a source, a ledger and sinks.

For each folder: STATUS first, and an unchanged folder (same UIDVALIDITY, cursor at
UIDNEXT-1) costs nothing more. Otherwise EXAMINE, UID SEARCH above the cursor, fetch
sizes and routing headers, and plan each message: skip (with a reason), duplicate
(every vault already covered) or upload (to the vaults not yet covered). Only the
messages to upload have their bodies fetched, in batches bounded in bytes. Each is
written to the ledger as pending before its upload and as uploaded after the
acknowledgement (rule 2); the cursor moves over UIDs that are all final (rule 3).

An account's error (login, connection) ends that account's pass and is recorded;
the other accounts go on. A tenant that refuses the API key or cannot be reached is
closed for the rest of the pass and its messages stay pending for the next.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imapsync import routing
from imapsync.config import Account
from imapsync.errors import LedgerError, SourceError
from imapsync.imap_source import FolderStatus, ImapSource, batches
from imapsync.ledger import FolderRow, Known, Ledger, Sighting, State, now
from imapsync.message import MessageInfo, fingerprint
from imapsync.sinks.base import Outcome, Sink, UploadRequest, UploadResult

log = logging.getLogger("imapsync.sync")

#: Copy state when several tenants disagree: the least settled wins.
_PRECEDENCE = [State.PENDING, State.FAILED, State.SKIPPED, State.UPLOADED, State.DUPLICATE]
#: Permanent answers that mean "not archivable", as opposed to "failed".
_SKIP_REASONS = {"no_primary_recipient", "too_large"}


@dataclass
class Counts:
    uploaded: int = 0
    duplicate: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    bytes: int = 0

    def add(self, state: State, size: int = 0) -> None:
        setattr(self, state.value, getattr(self, state.value) + 1)
        if state is State.UPLOADED:
            self.bytes += size

    def merge(self, other: "Counts") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Settings:
    """What the algorithm needs of the config, nothing else."""

    domains_aliases: Mapping[str, Mapping[str, str]]  # primary domain -> {alias: primary}
    max_message_bytes: int
    batch_bytes: int
    batch_messages: int


@dataclass
class TenantGate:
    """Tenants closed for the rest of this pass (key refused, endpoint unreachable)."""

    closed: dict[str, UploadResult] = field(default_factory=dict)

    def close(self, tenant: str, result: UploadResult) -> None:
        if tenant not in self.closed:
            log.error("Tenant %s: uploads stopped for this pass: %s", tenant, result.detail)
            self.closed[tenant] = result


@dataclass
class AccountResult:
    account: str
    counts: Counts
    error: SourceError | None = None


@dataclass
class _Planned:
    """One new copy and what must happen to it."""

    uid: int
    info: MessageInfo
    routes: list[routing.Route]
    key: str | None
    state: State | None = None  # decided without a body (skipped / duplicate)
    reason: str | None = None
    ref: int | None = None  # ledger row of the known message it duplicates


def sync_account(account: Account, connect: Callable[[], ImapSource], ledger: Ledger,
                 sinks: Mapping[str, Sink], settings: Settings, gate: TenantGate,
                 kind: str = "sync") -> AccountResult:
    """One pass over every included folder of `account`. Never raises SourceError."""
    counts = Counts()
    run_id = ledger.start_run(kind, account.name)
    account_id = ledger.account_id(account.name, account.host, account.username)
    error: SourceError | None = None
    source: ImapSource | None = None
    try:
        source = connect()
        known = ledger.folders(account_id)
        owner = routing.owner_vault(account.username, account.vault, settings.domains_aliases)
        for folder in source.folders(account.folders):
            row = known.get(folder.name) or ledger.folder(account_id, folder.name)
            try:
                _sync_folder(source, row, ledger, sinks, settings, gate, owner, counts)
            except SourceError as e:
                ledger.update_folder(row.id, last_error=str(e))
                raise
    except SourceError as e:
        error = e
        log.error("Account %s: %s", account.name, e)
    finally:
        if source is not None:
            source.close()
        ledger.set_account_result(account_id, str(error) if error else None)
        outcome = "error" if error else ("partial" if counts.failed or counts.pending else "ok")
        ledger.finish_run(run_id, outcome=outcome, counts=counts.as_dict(), error=str(error) if error else None)
    return AccountResult(account.name, counts, error)


def _unchanged(row: FolderRow, status: FolderStatus) -> bool:
    return row.uidvalidity == status.uidvalidity and row.last_uid >= status.uidnext - 1


def _sync_folder(source: ImapSource, row: FolderRow, ledger: Ledger, sinks: Mapping[str, Sink],
                 settings: Settings, gate: TenantGate, owner: str | None, counts: Counts) -> None:
    name = row.name
    status = source.status(name)
    if _unchanged(row, status):
        return  # nothing new: STATUS was enough
    uidvalidity = source.examine(name)
    last_uid = row.last_uid
    if row.uidvalidity != uidvalidity:
        if row.uidvalidity is not None:
            log.warning("Folder %s: UIDVALIDITY changed %s -> %s; scanning again from the start "
                        "(known messages are not uploaded again)", name, row.uidvalidity, uidvalidity)
        last_uid = 0
        ledger.update_folder(row.id, uidvalidity=uidvalidity, last_uid=0)
    uids = source.uids_after(last_uid, name)
    done = ledger.sightings(row.id, uidvalidity, uids)  # final copies from an interrupted pass
    todo = [u for u in uids if not (u in done and done[u].final)]
    final: dict[int, bool] = {u: True for u in uids if u not in todo}
    for chunk in _chunks(todo, settings.batch_messages):
        planned = _plan(source, name, chunk, ledger, settings, owner)
        _act(source, name, row.id, uidvalidity, planned, ledger, sinks, settings, gate, counts, final)
        _advance(ledger, row.id, uids, final, last_uid, None)
    _advance(ledger, row.id, uids, final, last_uid, status.uidnext)
    log.info("Folder %s: %d new message(s) handled", name, len(todo))


def _advance(ledger: Ledger, folder_id: int, uids: list[int], final: dict[int, bool],
             last_uid: int, uidnext: int | None) -> None:
    """Move the cursor over the leading run of final UIDs (rule 3)."""
    cursor = last_uid
    complete = True
    for uid in uids:
        if not final.get(uid):
            complete = False
            break
        cursor = uid
    values: dict = {"last_uid": cursor, "last_sync_at": now(), "last_error": None}
    if uidnext is not None:
        values["uidnext"] = uidnext
        if complete:
            values["last_uid"] = max(cursor, uidnext - 1)
    ledger.update_folder(folder_id, **values)


def _plan(source: ImapSource, folder: str, uids: list[int], ledger: Ledger,
          settings: Settings, owner: str | None) -> list[_Planned]:
    """Decide from sizes and headers alone what each copy needs."""
    planned = []
    for h in source.fetch_headers(uids, folder):
        info = MessageInfo.from_headers(h.header, h.size)
        rts = routing.routes(info.addresses, info.sender, owner, settings.domains_aliases)
        p = _Planned(h.uid, info, rts, info.header_key)
        if not rts:
            p.state, p.reason = State.SKIPPED, routing.NO_PRIMARY_RECIPIENT
        elif h.size > settings.max_message_bytes:
            p.state, p.reason = State.SKIPPED, "too_large"
        planned.append(p)
    known = ledger.lookup(p.key for p in planned if p.key and p.state is None)
    for p in planned:
        if p.state is None and p.key in known and not _missing(p.routes, known[p.key]):
            p.state, p.ref = State.DUPLICATE, known[p.key].id
    return planned


def _missing(routes: list[routing.Route], known: Known | None) -> list[routing.Route]:
    """The routes narrowed to vaults the earlier uploads did not cover (rule 5)."""
    covered = known.vaults if known else frozenset()
    out = []
    for r in routes:
        rest = r.vaults - covered
        if rest:
            out.append(routing.Route(r.tenant, frozenset(rest), r.sender))
    return out


def _act(source: ImapSource, folder: str, folder_id: int, uidvalidity: int, planned: list[_Planned],
         ledger: Ledger, sinks: Mapping[str, Sink], settings: Settings, gate: TenantGate,
         counts: Counts, final: dict[int, bool]) -> None:
    decided = [p for p in planned if p.state is not None]
    if decided:
        with ledger.tx() as c:
            sightings = []
            for p in decided:
                # A skipped copy with a Message-ID gets a message row (for status); a
                # duplicate points at the row it duplicates.
                ref = p.ref
                if p.key and ref is None:
                    ref = ledger.ensure_message(c, p.key, message_id=p.info.message_id, fingerprint=None,
                                                size=p.info.size, date=p.info.date, state=p.state,
                                                reason=p.reason, overwrite=False)
                sightings.append(Sighting(p.uid, p.info.size, p.state, ref, p.info.message_id, p.reason))
                counts.add(p.state)
                final[p.uid] = True
            ledger.record_sightings(c, folder_id, uidvalidity, sightings)
    wanted = [p for p in planned if p.state is None]
    sizes = [(p.uid, p.info.size) for p in wanted]
    by_uid = {p.uid: p for p in wanted}
    for uid_batch in batches(sizes, settings.batch_bytes, settings.batch_messages):
        bodies = source.fetch_bodies(uid_batch, folder)
        for uid in uid_batch:
            p = by_uid[uid]
            raw = bodies.get(uid)
            if raw is None:  # expunged between the header and body fetch: nothing to archive
                final[uid] = True
                continue
            final[uid] = _deliver(p, raw, folder_id, uidvalidity, ledger, sinks, gate, counts)


def _deliver(p: _Planned, raw: bytes, folder_id: int, uidvalidity: int, ledger: Ledger,
             sinks: Mapping[str, Sink], gate: TenantGate, counts: Counts) -> bool:
    """Upload one copy to the vaults not yet covered; return whether it reached a final state."""
    fp = None
    if p.key is None:
        fp = fingerprint(raw)
        p.key = fp
    known = ledger.lookup([p.key]).get(p.key)
    todo = _missing(p.routes, known)
    if not todo:
        with ledger.tx() as c:
            ledger.record_sightings(c, folder_id, uidvalidity, [
                Sighting(p.uid, p.info.size, State.DUPLICATE, known.id if known else None, p.info.message_id)])
        counts.add(State.DUPLICATE)
        return True
    # Rule 2: pending in the ledger before anything leaves.
    with ledger.tx() as c:
        ref = ledger.ensure_message(c, p.key, message_id=p.info.message_id, fingerprint=fp,
                                    size=len(raw), date=p.info.date, state=State.PENDING)
        ledger.record_sightings(c, folder_id, uidvalidity, [
            Sighting(p.uid, p.info.size, State.PENDING, ref, p.info.message_id)])
    states: list[State] = []
    reason = detail = None
    for route in todo:
        if route.tenant in gate.closed:
            states.append(State.PENDING)
            continue
        result = sinks[route.tenant].upload(UploadRequest(p.key, route.tenant, tuple(sorted(route.vaults)),
                                                          route.sender, raw))
        state = _state_of(result)
        if result.outcome in (Outcome.FORBIDDEN, Outcome.UNREACHABLE):
            gate.close(route.tenant, result)
        with ledger.tx() as c:
            if state is State.UPLOADED:
                ledger.record_upload(c, ref, tenant=route.tenant, vaults=route.vaults,
                                     upload_id=result.upload_id, attempts=result.attempts)
            else:
                ledger.record_failure(c, ref, state=state, reason=result.reason or "error",
                                      error=result.detail, attempts=result.attempts)
        if state is not State.UPLOADED:
            reason, detail = result.reason, result.detail
            log.warning("Message %s: %s to %s: %s", p.info.message_id or p.key, state.value, route.tenant, detail)
        states.append(state)
    copy_state = min(states, key=_PRECEDENCE.index)
    with ledger.tx() as c:
        if copy_state is State.PENDING:
            ledger.record_failure(c, ref, state=State.PENDING, reason=reason or "tenant_unavailable",
                                  error=detail, attempts=0)
        ledger.record_sightings(c, folder_id, uidvalidity, [
            Sighting(p.uid, p.info.size, copy_state, ref, p.info.message_id,
                     None if copy_state is State.UPLOADED else reason)])
    counts.add(copy_state, len(raw))
    return copy_state.final


def _state_of(result: UploadResult) -> State:
    if result.outcome is Outcome.UPLOADED:
        return State.UPLOADED
    if result.outcome is Outcome.PERMANENT:
        return State.SKIPPED if result.reason in _SKIP_REASONS else State.FAILED
    if result.outcome is Outcome.FAILED:
        return State.FAILED
    return State.PENDING  # FORBIDDEN / UNREACHABLE: redone on the next pass


def _chunks(items: list[int], n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


__all__ = ["sync_account", "Settings", "TenantGate", "AccountResult", "Counts", "LedgerError"]
