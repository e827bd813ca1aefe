"""One pass over one account: the core algorithm, a function of a source, a ledger and sinks.

For each folder: STATUS first, and an unchanged folder (same UIDVALIDITY, cursor at
UIDNEXT-1) costs nothing more. Otherwise EXAMINE, UID SEARCH above the cursor, fetch
sizes and routing headers, and plan each message: skip (with a reason), duplicate
(every vault already covered) or upload (to the vaults not yet covered). Only the
messages to upload have their bodies fetched, in batches bounded in bytes. Each is
written to the ledger as pending before its upload starts (rule 2) and as uploaded
after the acknowledgement; uploads run concurrently in a bounded pool, and their
results are written from this thread, one transaction per batch of results. The
cursor moves over UIDs that are all final (rule 3).

An account's error (login, connection) ends that account's pass and is recorded;
the other accounts go on. A tenant that refuses the API key or cannot be reached is
closed for the rest of the pass and its messages stay pending for the next.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from imapsync import routing
from imapsync.config import Account
from imapsync.errors import SourceError, SourceErrorKind
from imapsync.imap_source import FolderStatus, ImapSource, batches
from imapsync.ledger import Acknowledged, FolderRow, Known, Ledger, Sighting, State, now
from imapsync.message import MessageInfo, fingerprint
from imapsync.sinks.base import Outcome, Payload, UploadRequest, UploadResult
from imapsync.upload_pool import Done, Job, TenantGate, UploadPool

log = logging.getLogger("imapsync.sync")

#: Copy state when several tenants disagree: the least settled wins.
_PRECEDENCE = [State.PENDING, State.FAILED, State.SKIPPED, State.UPLOADED, State.DUPLICATE]
#: Upload results written to the ledger in one transaction (design: batched commits).
RECORD_BATCH = 200
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
    spool_bytes: int = 4 * 1024 * 1024
    reconnects: int = 3  # new connections after a drop or timeout, within one pass
    reconnect_backoff: float = 1.0  # seconds before the first; doubles each time


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
    ref: int | None = None  # ledger row of the message


@dataclass
class _Copy:
    """A copy whose uploads are in flight: settled when every route has answered."""

    p: _Planned
    ref: int
    payload: Payload
    waiting: int
    states: list[State] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None


def sync_account(account: Account, connect: Callable[[], ImapSource], ledger: Ledger,
                 pool: UploadPool, settings: Settings, kind: str = "sync",
                 stop: threading.Event | None = None) -> AccountResult:
    """One pass over every included folder of `account`. Never raises SourceError.

    A dropped connection or a timeout is followed by a new connection (up to
    `settings.reconnects` times, with backoff) and the pass goes on where it was: the
    ledger's cursors make finished folders cost one STATUS. A folder the server refuses
    (NO/BAD) is recorded with its error and the next folder goes on. `stop` set from
    another thread ends the pass after the current batch, with its uploads recorded.
    """
    counts = Counts()
    run_id = ledger.start_run(kind, account.name)
    account_id = ledger.account_id(account.name, account.host, account.username)
    error: SourceError | None = None
    owner = routing.owner_vault(account.username, account.vault, settings.domains_aliases)
    reconnects = 0
    try:
        while True:
            try:
                _pass(connect, account, account_id, ledger, pool, settings, owner, counts, stop)
                break
            except SourceError as e:
                if e.kind not in SourceErrorKind.RECONNECTABLE or reconnects >= settings.reconnects \
                        or (stop is not None and stop.is_set()):
                    raise
                reconnects += 1
                delay = settings.reconnect_backoff * 2 ** (reconnects - 1)
                log.warning("Account %s: %s; reconnecting in %.1fs (%d/%d)", account.name, e, delay,
                            reconnects, settings.reconnects)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
    except SourceError as e:
        error = e
        log.error("Account %s: %s", account.name, e)
    finally:
        ledger.set_account_result(account_id, str(error) if error else None)
        stopped = stop is not None and stop.is_set()
        outcome = ("error" if error else "stopped" if stopped
                   else "partial" if counts.failed or counts.pending else "ok")
        ledger.finish_run(run_id, outcome=outcome, counts=counts.as_dict(), error=str(error) if error else None)
    return AccountResult(account.name, counts, error)


def _pass(connect: Callable[[], ImapSource], account: Account, account_id: int, ledger: Ledger,
          pool: UploadPool, settings: Settings, owner: str | None, counts: Counts,
          stop: threading.Event | None) -> None:
    with connect() as source:
        known = ledger.folders(account_id)
        for folder in source.folders(account.folders):
            if stop is not None and stop.is_set():
                return
            row = known.get(folder.name) or ledger.folder(account_id, folder.name)
            folder_pass = _FolderPass(source, row, ledger, pool, settings, owner, counts, stop)
            try:
                folder_pass.run()
            except SourceError as e:
                ledger.update_folder(row.id, last_error=str(e))
                if e.kind != SourceErrorKind.PROTOCOL:
                    raise
                log.error("Folder %s of %s: %s", folder.name, account.name, e)  # the others go on
            finally:
                folder_pass.settle()  # every upload started is recorded, whatever happened


def _unchanged(row: FolderRow, status: FolderStatus) -> bool:
    return row.uidvalidity == status.uidvalidity and row.last_uid >= status.uidnext - 1


def _missing(routes: list[routing.Route], known: Known | None) -> list[routing.Route]:
    """The routes narrowed to vaults the earlier uploads did not cover (rule 5)."""
    covered = known.vaults if known else frozenset()
    out = []
    for r in routes:
        rest = r.vaults - covered
        if rest:
            out.append(routing.Route(r.tenant, frozenset(rest), r.sender))
    return out


def _state_of(result: UploadResult) -> State:
    if result.outcome is Outcome.UPLOADED:
        return State.UPLOADED
    if result.outcome is Outcome.PERMANENT:
        return State.SKIPPED if result.reason in _SKIP_REASONS else State.FAILED
    if result.outcome is Outcome.FAILED:
        return State.FAILED
    return State.PENDING  # FORBIDDEN / UNREACHABLE: redone on the next pass


class _FolderPass:
    """One folder's pass: plan from headers, fetch what must go, upload, move the cursor."""

    def __init__(self, source: ImapSource, row: FolderRow, ledger: Ledger, pool: UploadPool,
                 settings: Settings, owner: str | None, counts: Counts, stop: threading.Event | None = None):
        self.source, self.row, self.ledger, self.pool = source, row, ledger, pool
        self.settings, self.owner, self.counts, self.stop = settings, owner, counts, stop
        self.name = row.name
        self.uidvalidity = 0
        self.final: dict[int, bool] = {}
        self.in_flight: Counter[str] = Counter()  # message key -> uploads running
        self.results: list[Done] = []  # answered uploads not yet written to the ledger

    def run(self) -> None:
        status = self.source.status(self.name)
        if _unchanged(self.row, status):
            return  # nothing new: STATUS was enough
        self.uidvalidity = self.source.examine(self.name)
        last_uid = self.row.last_uid
        if self.row.uidvalidity != self.uidvalidity:
            if self.row.uidvalidity is not None:
                log.warning("Folder %s: UIDVALIDITY changed %s -> %s; scanning again from the start "
                            "(known messages are not uploaded again)", self.name, self.row.uidvalidity,
                            self.uidvalidity)
            last_uid = 0
            self.ledger.update_folder(self.row.id, uidvalidity=self.uidvalidity, last_uid=0)
        uids = self.source.uids_after(last_uid, self.name)
        done = self.ledger.sightings(self.row.id, self.uidvalidity, uids)  # final copies from an interrupted pass
        todo = [u for u in uids if not (u in done and done[u].final)]
        self.final = {u: True for u in uids if u not in todo}
        for i in range(0, len(todo), self.settings.batch_messages):
            if self.stop is not None and self.stop.is_set():
                self.settle()
                self._advance(uids, last_uid, None)
                return
            self._handle(self._plan(todo[i:i + self.settings.batch_messages]))
            self._record(self.pool.collect())
            self._flush()
            self._advance(uids, last_uid, None)
        self.settle()
        self._advance(uids, last_uid, status.uidnext)
        if todo:
            log.info("Folder %s: %d new message(s) handled", self.name, len(todo))

    # ----- planning from headers --------------------------------------------------

    def _plan(self, uids: list[int]) -> list[_Planned]:
        """Decide from sizes and headers alone what each copy needs."""
        planned = []
        for h in self.source.fetch_headers(uids, self.name):
            info = MessageInfo.from_headers(h.header, h.size)
            rts = routing.routes(info.addresses, info.sender, self.owner, self.settings.domains_aliases)
            p = _Planned(h.uid, info, rts, info.header_key)
            if not rts:
                p.state, p.reason = State.SKIPPED, routing.NO_PRIMARY_RECIPIENT
            elif h.size > self.settings.max_message_bytes:
                p.state, p.reason = State.SKIPPED, "too_large"
            planned.append(p)
        for uid in set(uids) - {p.uid for p in planned}:  # expunged meanwhile: nothing to archive
            self.final[uid] = True
        # Copies of messages whose upload is still running are decided when it has settled.
        self._settle_keys({p.key for p in planned if p.key})
        known = self.ledger.lookup(p.key for p in planned if p.key and p.state is None)
        for p in planned:
            if p.state is None and p.key in known and not _missing(p.routes, known[p.key]):
                p.state, p.ref = State.DUPLICATE, known[p.key].id
        return planned

    # ----- acting ---------------------------------------------------------------------

    def _handle(self, planned: list[_Planned]) -> None:
        self._record_decided([p for p in planned if p.state is not None])
        wanted = {p.uid: p for p in planned if p.state is None}
        sizes = [(uid, p.info.size) for uid, p in wanted.items()]
        for uid_batch in batches(sizes, self.settings.batch_bytes, self.settings.batch_messages):
            bodies = self.source.fetch_bodies(uid_batch, self.name)
            items: list[tuple[_Planned, bytes]] = []
            for uid in uid_batch:
                raw = bodies.pop(uid, None)
                if raw is None:  # expunged between the header and body fetch
                    self.final[uid] = True
                    continue
                p = wanted[uid]
                if p.key is None:
                    p.key = fingerprint(raw)
                items.append((p, raw))
            # The first copy of each key goes now; a later copy of the same message is
            # decided once the first has its answer (rule 5: upload only what is not covered).
            firsts: dict[str, tuple[_Planned, bytes]] = {}
            later: list[tuple[_Planned, bytes]] = []
            for p, raw in items:
                if p.key in firsts:
                    later.append((p, raw))
                else:
                    firsts[p.key] = (p, raw)  # type: ignore[index]
            self._start(list(firsts.values()))
            for item in later:
                self._start([item])

    def _record_decided(self, decided: list[_Planned]) -> None:
        if not decided:
            return
        with self.ledger.tx() as c:
            sightings = []
            for p in decided:
                ref = p.ref
                if p.key and ref is None:  # a skipped copy with a Message-ID: keep its row for status
                    ref = self.ledger.ensure_message(c, p.key, message_id=p.info.message_id, fingerprint=None,
                                                     size=p.info.size, date=p.info.date, state=p.state,
                                                     reason=p.reason, overwrite=False)
                sightings.append(Sighting(p.uid, p.info.size, p.state, ref, p.info.message_id, p.reason))
                self.counts.add(p.state)
                self.final[p.uid] = True
            self.ledger.record_sightings(c, self.row.id, self.uidvalidity, sightings)

    def _start(self, items: list[tuple[_Planned, bytes]]) -> None:
        """Duplicates are recorded; the rest are made pending (rule 2), then submitted."""
        self._settle_keys({p.key for p, _ in items if p.key})
        known = self.ledger.lookup(p.key for p, _ in items if p.key)
        uploads: list[tuple[_Planned, bytes, list[routing.Route]]] = []
        sightings = []
        for p, raw in items:
            todo = _missing(p.routes, known.get(p.key))
            if todo:
                uploads.append((p, raw, todo))
                continue
            p.ref = known[p.key].id
            sightings.append(Sighting(p.uid, p.info.size, State.DUPLICATE, p.ref, p.info.message_id))
            self.counts.add(State.DUPLICATE)
            self.final[p.uid] = True
        with self.ledger.tx() as c:
            ids = self.ledger.pending_messages(c, [
                dict(key=p.key, message_id=p.info.message_id, size=len(raw), date=p.info.date,
                     fingerprint=p.key if p.key.startswith("f:") else None)  # type: ignore[union-attr]
                for p, raw, _ in uploads])
            for p, _raw, _todo in uploads:
                p.ref = ids[p.key]  # type: ignore[index]
                sightings.append(Sighting(p.uid, p.info.size, State.PENDING, p.ref, p.info.message_id))
            self.ledger.record_sightings(c, self.row.id, self.uidvalidity, sightings)
        for p, raw, todo in uploads:
            payload = Payload(raw) if len(raw) <= self.settings.spool_bytes else Payload.spooled(raw)
            copy = _Copy(p, p.ref, payload, waiting=len(todo))  # type: ignore[arg-type]
            for route in todo:
                self.in_flight[p.key] += 1  # type: ignore[index]
                self._record(self.pool.collect())  # keep results flowing while submitting
                self.pool.submit(Job(UploadRequest(p.key, route.tenant, tuple(sorted(route.vaults)),  # type: ignore[arg-type]
                                                   route.sender, payload), copy))

    # ----- results ----------------------------------------------------------------------

    def settle(self) -> None:
        """Wait for every upload of this folder and record it."""
        while self.in_flight:
            self._record(self.pool.collect(block=True))
        self._flush()

    def _settle_keys(self, keys: Iterable[str]) -> None:
        keys = set(keys)
        while keys & set(+self.in_flight):
            self._record(self.pool.collect(block=True))
        self._flush()

    def _record(self, dones: list[Done]) -> None:
        """Take upload results; they are written in batches (one transaction each)."""
        for d in dones:
            self.in_flight[d.job.request.key] -= 1
            if self.in_flight[d.job.request.key] <= 0:
                del self.in_flight[d.job.request.key]
        self.results.extend(dones)
        if len(self.results) >= RECORD_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered results: acknowledgements in bulk, then settled copies."""
        dones, self.results = self.results, []
        if not dones:
            return
        acks: list[Acknowledged] = []
        settled: list[_Copy] = []
        with self.ledger.tx() as c:
            for d in dones:
                copy: _Copy = d.job.owner
                req, result = d.job.request, d.result
                state = _state_of(result)
                if state is State.UPLOADED:
                    acks.append(Acknowledged(copy.ref, req.tenant, req.vaults, result.upload_id, result.attempts))
                else:
                    self.ledger.record_failure(c, copy.ref, state=state, reason=result.reason or "error",
                                               error=result.detail, attempts=result.attempts)
                    copy.reason, copy.detail = result.reason, result.detail
                    if result.outcome not in (Outcome.FORBIDDEN, Outcome.UNREACHABLE) or result.attempts:
                        log.warning("Message %s in %s: %s for %s: %s", copy.p.info.message_id or copy.p.key,
                                    self.name, result.reason, req.tenant, result.detail)
                copy.states.append(state)
                copy.waiting -= 1
                if copy.waiting == 0:
                    settled.append(copy)
            self.ledger.record_uploads(c, acks)
            self.ledger.record_sightings(c, self.row.id, self.uidvalidity,
                                         [self._settle_copy(c, copy) for copy in settled])

    def _settle_copy(self, c, copy: _Copy) -> Sighting:
        """Every route of this copy has answered: its final (or pending) state."""
        state = min(copy.states, key=_PRECEDENCE.index)
        p = copy.p
        if state is State.PENDING:
            self.ledger.record_failure(c, copy.ref, state=State.PENDING, reason=copy.reason or "tenant_unavailable",
                                       error=copy.detail, attempts=0)
        self.counts.add(state, copy.payload.size)
        self.final[p.uid] = state.final
        copy.payload.discard()
        return Sighting(p.uid, p.info.size, state, copy.ref, p.info.message_id,
                        None if state is State.UPLOADED else copy.reason)

    # ----- cursor -------------------------------------------------------------------------

    def _advance(self, uids: list[int], last_uid: int, uidnext: int | None) -> None:
        """Move the cursor over the leading run of final UIDs (rule 3)."""
        cursor = last_uid
        complete = True
        for uid in uids:
            if not self.final.get(uid):
                complete = False
                break
            cursor = uid
        values: dict = {"last_uid": cursor, "last_sync_at": now(), "last_error": None}
        if uidnext is not None:
            values["uidnext"] = uidnext
            if complete:
                values["last_uid"] = max(cursor, uidnext - 1)
        self.ledger.update_folder(self.row.id, **values)


__all__ = ["sync_account", "Settings", "TenantGate", "AccountResult", "Counts"]
