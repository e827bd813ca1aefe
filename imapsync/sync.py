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

What a pass takes is a selection: by default every UID above the folder's cursor
(continuous sync); for a backfill, date windows (UID SEARCH SINCE/BEFORE on INTERNALDATE,
oldest first or newest first) so that a huge folder starts uploading at once; for a
retry, the copies that failed (found again by UID, or by Message-ID when the UID is
gone). Every selection goes through the same planning, dedup, upload and recording,
and the cursor still moves only over a contiguous run of final UIDs from where it was.
A dry run plans from headers alone and writes nothing; an optional progress hook is
told of each folder and of each copy as it is settled.

An account's error (login, connection) ends that account's pass and is recorded;
the other accounts go on. A tenant that refuses the API key or cannot be reached is
closed for the rest of the pass and its messages stay pending for the next.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Protocol

from imapsync import routing
from imapsync.config import Account
from imapsync.errors import SourceError, SourceErrorKind
from imapsync.imap_source import FolderStatus, ImapSource, batches, matches_any
from imapsync.ledger import Acknowledged, FolderRow, Known, Ledger, Sighting, State, now
from imapsync.message import MessageInfo, fingerprint, normalize_message_id
from imapsync.prefetch import BodyPrefetcher
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
    connections: int = 4  # IMAP connections per account: one for headers, the rest fetch bodies ahead
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


class ProgressHook(Protocol):
    """Told what a pass is doing; called from the pass's own thread."""

    def folder(self, name: str) -> None: ...

    def handled(self, state: State | None, size: int) -> None:
        """One copy settled in this run (None: it vanished before it could be read)."""


@dataclass(frozen=True)
class Windows:
    """A backfill's selection: messages by arrival date (INTERNALDATE), in windows of days.

    `since` is inclusive and `before` exclusive, as in IMAP SEARCH SINCE/BEFORE (which
    compare days, not times). Without `since` the walk starts at the first message's
    date, with one more window for anything older; without `before` it ends with a
    window for anything dated after today.
    """

    since: date | None = None
    before: date | None = None
    newest_first: bool = False
    window_days: int = 30
    folders: tuple[str, ...] = ()  # globs: only folders matching one (within the account's own filter)

    def ranges(self, oldest: date | None, today: date) -> list[tuple[date | None, date | None]]:
        """The windows, as (since, before) pairs that never overlap, in walking order."""
        hi = self.before or today + timedelta(days=1)
        lo = self.since or (min(oldest, hi) if oldest else None)
        if lo is None:
            return [(None, self.before)]  # an empty folder: one search says so
        out: list[tuple[date | None, date | None]] = [] if self.since else [(None, lo)]
        step, start = timedelta(days=max(1, self.window_days)), lo
        while start < hi:
            out.append((start, min(start + step, hi)))
            start = min(start + step, hi)
        if self.before is None:
            out.append((hi, None))
        return out[::-1] if self.newest_first else out


@dataclass(frozen=True)
class Target:
    """One copy to handle again: where it was seen, and its Message-ID to find it if moved."""

    uidvalidity: int
    uid: int
    message_id: str | None = None


@dataclass(frozen=True)
class Redo:
    """A retry's selection: these copies again, per folder, when in one of `states`."""

    targets: Mapping[str, tuple[Target, ...]]
    states: frozenset[State] = frozenset({State.FAILED})


@dataclass
class DryRun:
    """What a pass would do, decided from sizes and headers alone; nothing is written.

    Counts are complete; the lists keep the first `limit` entries of each kind, so a
    dry run of a huge mailbox stays bounded in memory.
    """

    limit: int = 10_000
    upload: list[dict] = field(default_factory=list)
    skip: list[dict] = field(default_factory=list)
    duplicate: list[dict] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # upload, skip, duplicate, already_done
    upload_bytes: int = 0
    vaults: Counter[str] = field(default_factory=Counter)  # vault -> messages it would receive
    reasons: Counter[str] = field(default_factory=Counter)  # skip and duplicate reasons
    _covered: dict[str, set[str]] = field(default_factory=dict, repr=False)  # key -> vaults this run would cover
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def decide(self, entry: dict, p: "_Planned", known: Known | None) -> None:
        with self._lock:
            if p.state is not None:
                kind, reason = ("skip", p.reason) if p.state is State.SKIPPED else ("duplicate", "already_archived")
                self._add(kind, dict(entry, reason=reason))
                return
            todo = _missing(p.routes, known)
            if p.key:
                covered = self._covered.setdefault(p.key, set())
                todo = [routing.Route(r.tenant, r.vaults - covered, r.sender) for r in todo if r.vaults - covered]
                for r in todo:
                    covered.update(r.vaults)
            if not todo:
                self._add("duplicate", dict(entry, reason="earlier_copy_in_this_run"))
                return
            vaults = {r.tenant: sorted(r.vaults) for r in todo}
            self._add("upload", dict(entry, vaults=vaults, key_known=p.key is not None))
            self.upload_bytes += p.info.size
            self.vaults.update(v for r in todo for v in r.vaults)

    def already(self, n: int) -> None:
        with self._lock:
            self.counts["already_done"] += n

    def _add(self, kind: str, entry: dict) -> None:
        self.counts[kind] += 1
        if "reason" in entry:
            self.reasons[entry["reason"]] += 1
        bucket: list[dict] = getattr(self, kind)
        if len(bucket) < self.limit:
            bucket.append(entry)

    def as_dict(self) -> dict:
        return {"would_upload": self.counts["upload"], "would_upload_bytes": self.upload_bytes,
                "would_skip": self.counts["skip"], "duplicates": self.counts["duplicate"],
                "already_done": self.counts["already_done"], "reasons": dict(sorted(self.reasons.items())),
                "vaults": dict(sorted(self.vaults.items())), "upload": self.upload, "skip": self.skip,
                "duplicate": self.duplicate, "truncated": any(
                    self.counts[k] > len(getattr(self, k)) for k in ("upload", "skip", "duplicate"))}


@dataclass(frozen=True)
class _Options:
    """What differs between sync, backfill, retry and dry run; the algorithm is the same."""

    account: str = ""
    selection: Windows | Redo | None = None
    progress: ProgressHook | None = None
    dry_run: DryRun | None = None


def sync_account(account: Account, connect: Callable[[], ImapSource], ledger: Ledger,
                 pool: UploadPool, settings: Settings, kind: str = "sync",
                 stop: threading.Event | None = None, *, selection: Windows | Redo | None = None,
                 progress: ProgressHook | None = None, dry_run: DryRun | None = None) -> AccountResult:
    """One pass over every included folder of `account`. Never raises SourceError.

    A dropped connection or a timeout is followed by a new connection (up to
    `settings.reconnects` times, with backoff) and the pass goes on where it was: the
    ledger's cursors make finished folders cost one STATUS. A folder the server refuses
    (NO/BAD) is recorded with its error and the next folder goes on. `stop` set from
    another thread ends the pass after the current batch, with its uploads recorded.

    `selection` replaces "every UID above the cursor" (Windows: a backfill; Redo: a
    retry); `progress` is told of each folder and settled copy; with `dry_run` nothing
    is uploaded and nothing is written to the ledger (not even the run).
    """
    counts = Counts()
    opts = _Options(account.name, selection, progress, dry_run)
    if dry_run is not None:
        run_id, account_id = None, ledger.find_account_id(account.name) or 0
    else:
        run_id, account_id = ledger.start_account_run(kind, account.name, account.host, account.username)
    error: SourceError | None = None
    owner = routing.owner_vault(account.username, account.vault, settings.domains_aliases)
    reconnects = 0
    try:
        while True:
            try:
                _pass(connect, account, account_id, ledger, pool, settings, owner, counts, stop, opts)
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
        if run_id is not None:
            stopped = stop is not None and stop.is_set()
            outcome = ("error" if error else "stopped" if stopped
                       else "partial" if counts.failed or counts.pending else "ok")
            ledger.finish_run(run_id, outcome=outcome, counts=counts.as_dict(), error=str(error) if error else None,
                              account_id=account_id)
    return AccountResult(account.name, counts, error)


def _pass(connect: Callable[[], ImapSource], account: Account, account_id: int, ledger: Ledger,
          pool: UploadPool, settings: Settings, owner: str | None, counts: Counts,
          stop: threading.Event | None, opts: _Options = _Options()) -> None:
    fetcher = BodyPrefetcher(connect, settings.connections - 1)
    with connect() as source, contextlib.closing(fetcher):
        known = ledger.folders(account_id)
        for folder in source.folders(account.folders):
            if stop is not None and stop.is_set():
                return
            if not _selected(folder.name, opts.selection):
                continue
            if opts.dry_run is not None:  # a dry run creates no folder row either
                row = known.get(folder.name) or FolderRow(0, folder.name, None, 0, None)
            else:
                row = known.get(folder.name) or ledger.folder(account_id, folder.name)
            folder_pass = _FolderPass(source, row, ledger, pool, settings, owner, counts, stop, opts)
            folder_pass.fetcher = fetcher
            try:
                folder_pass.run()
            except SourceError as e:
                if opts.dry_run is None:
                    ledger.update_folder(row.id, last_error=str(e))
                if e.kind != SourceErrorKind.PROTOCOL:
                    raise
                log.error("Folder %s of %s: %s", folder.name, account.name, e)  # the others go on
            finally:
                folder_pass.settle()  # every upload started is recorded, whatever happened


def _selected(folder: str, selection: Windows | Redo | None) -> bool:
    if isinstance(selection, Windows) and selection.folders:
        return matches_any(folder, selection.folders)
    if isinstance(selection, Redo):
        return folder in selection.targets
    return True


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


#: For `verify`: is a known message's coverage enough for these routes?
uncovered_routes = _missing


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
                 settings: Settings, owner: str | None, counts: Counts, stop: threading.Event | None = None,
                 opts: _Options = _Options()):
        self.source, self.row, self.ledger, self.pool = source, row, ledger, pool
        self.settings, self.owner, self.counts, self.stop = settings, owner, counts, stop
        self.opts, self.dry, self.progress = opts, opts.dry_run, opts.progress
        self.name = row.name
        self.uidvalidity = 0
        self.final: dict[int, bool] = {}
        self.in_flight: Counter[str] = Counter()  # message key -> uploads running
        self.results: list[Done] = []  # answered uploads not yet written to the ledger
        self.fetcher = BodyPrefetcher(lambda: source, 0)  # inline unless the pass gives a shared one

    def run(self) -> None:
        if self.progress is not None:
            self.progress.folder(self.name)
        status = self.source.status(self.name)
        selection = self.opts.selection
        if _unchanged(self.row, status) and not isinstance(selection, Redo) \
                and not (self.dry is not None and selection is not None):
            return  # nothing new: STATUS was enough (every UID up to the cursor is final, rule 3)
        self.uidvalidity = self.source.examine(self.name)
        last_uid = self.row.last_uid
        if self.row.uidvalidity != self.uidvalidity:
            if self.row.uidvalidity is not None:
                log.warning("Folder %s: UIDVALIDITY changed %s -> %s; scanning again from the start "
                            "(known messages are not uploaded again)", self.name, self.row.uidvalidity,
                            self.uidvalidity)
            last_uid = 0
            if self.dry is None:
                self.ledger.update_folder(self.row.id, uidvalidity=self.uidvalidity, last_uid=0)
        if isinstance(selection, Windows):
            self._run_windows(selection, status, last_uid)
        elif isinstance(selection, Redo):
            self._run_redo(selection, status, last_uid)
        else:
            self._run_new(status, last_uid)

    def _run_new(self, status: FolderStatus, last_uid: int) -> None:
        """Continuous sync: every UID above the cursor; the cursor follows each batch."""
        uids = self.source.uids_after(last_uid, self.name)
        handled, finished = self._work(uids, after_batch=lambda: self._advance(uids, last_uid, None))
        self.settle()
        self._advance(uids, last_uid, status.uidnext if finished else None)
        if handled and finished:
            log.info("Folder %s: %d new message(s) handled", self.name, handled)

    def _run_windows(self, selection: Windows, status: FolderStatus, last_uid: int) -> None:
        """Backfill: one date window at a time, so uploads start after the first small SEARCH.

        UIDs at or below the cursor are final already (rule 3) and are not searched for
        again. The cursor is moved at the end, from the ledger, over the contiguous run
        of final UIDs above it: a window never moves it past a UID it did not handle.
        """
        oldest = None if selection.since or not status.messages else self.source.first_date(self.name)
        handled, finished = 0, True
        for since, before in selection.ranges(oldest, date.today()):
            found = self.source.uids_in_window(self.name, since, before)
            uids = [u for u in found if u > last_uid]
            if self.dry is not None and len(uids) < len(found):
                self.dry.already(len(found) - len(uids))  # at or below the cursor: final (rule 3)
            if selection.newest_first:
                uids.reverse()
            n, finished = self._work(uids)
            handled += n
            if not finished:
                break
        self.settle()
        if self.dry is None:
            self._advance_checked(last_uid, status.uidnext)
        if handled:
            log.info("Folder %s: %d message(s) handled%s", self.name, handled, "" if finished else " (stopped)")

    def _run_redo(self, selection: Redo, status: FolderStatus, last_uid: int) -> None:
        """Retry: the target copies again by UID; a copy whose UID is gone is looked for by
        its Message-ID, and the old sighting takes the outcome of the copy found."""
        targets = selection.targets.get(self.name, ())
        current = [t for t in targets if t.uidvalidity == self.uidvalidity]
        present = set(self.source.present([t.uid for t in current], self.name))
        uids = set(present)
        moved: dict[int, list[Target]] = {}
        for t in targets:
            if t.uidvalidity == self.uidvalidity and t.uid in present:
                continue
            found = self._find_by_message_id(t.message_id) if t.message_id else []
            if not found:
                log.warning("Folder %s: uid %d (%s) is gone and was not found by Message-ID", self.name, t.uid,
                            t.message_id or "no Message-ID")
                self.counts.add(State.FAILED)
                continue
            uids.update(found)
            moved.setdefault(found[0], []).append(t)
        self._work(sorted(uids), redo=selection.states)
        self.settle()
        states = self.ledger.sightings(self.row.id, self.uidvalidity, list(moved))
        for uid, olds in moved.items():
            state = states.get(uid)
            if state is not None and state.final and state not in selection.states:
                for t in olds:
                    self.ledger.set_sighting_state(self.row.id, t.uidvalidity, t.uid, state, f"found_again_uid_{uid}")
        self._advance_checked(last_uid, status.uidnext)

    def _find_by_message_id(self, message_id: str) -> list[int]:
        """UIDs in this folder whose Message-ID is exactly `message_id` (SEARCH HEADER
        matches substrings, so the candidates' headers are read to be sure)."""
        wanted = normalize_message_id(message_id)
        candidates = self.source.uids_by_message_id(message_id, self.name)
        return [h.uid for h in self.source.fetch_headers(candidates, self.name)
                if wanted and MessageInfo.from_headers(h.header, h.size).normalized_id == wanted] if candidates else []

    def _work(self, uids: list[int], redo: frozenset[State] = frozenset(),
              after_batch: Callable[[], None] | None = None) -> tuple[int, bool]:
        """Handle the copies at `uids`, in order, that are not final yet (or final in a
        `redo` state). Copies made final by an interrupted pass are not redone. Returns
        (copies taken on, False if stopped before the end)."""
        done = self.ledger.sightings(self.row.id, self.uidvalidity, uids) if self.row.id else {}
        todo = [u for u in uids if not (u in done and done[u].final and done[u] not in redo)]
        if len(todo) < len(uids):
            taken = set(todo)
            self.final.update({u: True for u in uids if u not in taken})
            if self.dry is not None:
                self.dry.already(len(uids) - len(todo))
        for i in range(0, len(todo), self.settings.batch_messages):
            if self.stop is not None and self.stop.is_set():
                return i, False
            self._handle(self._plan(todo[i:i + self.settings.batch_messages]))
            self._record(self.pool.collect())
            self._flush()
            if after_batch is not None:
                after_batch()
        return len(todo), True

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
            self._settled(uid, None, 0)
        # Copies of messages whose upload is still running are decided when it has settled.
        self._settle_keys({p.key for p in planned if p.key})
        known = self.ledger.lookup(p.key for p in planned if p.key and p.state is None)
        for p in planned:
            if p.state is None and p.key in known and not _missing(p.routes, known[p.key]):
                p.state, p.ref = State.DUPLICATE, known[p.key].id
        return planned

    # ----- acting ---------------------------------------------------------------------

    def _handle(self, planned: list[_Planned]) -> None:
        if self.dry is not None:
            self._dry_run(planned)
            return
        self._record_decided([p for p in planned if p.state is not None])
        wanted = {p.uid: p for p in planned if p.state is None}
        sizes = [(uid, p.info.size) for uid, p in wanted.items()]
        fetched = self.fetcher.bodies(self.source, self.name, self.uidvalidity,
                                      batches(sizes, self.settings.batch_bytes, self.settings.batch_messages))
        for uid_batch, bodies in fetched:
            items: list[tuple[_Planned, bytes]] = []
            for uid in uid_batch:
                raw = bodies.pop(uid, None)
                if raw is None:  # expunged between the header and body fetch
                    self._settled(uid, None, 0)
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
                self._settled(p.uid, p.state, p.info.size)
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
            self._settled(p.uid, State.DUPLICATE, p.info.size)
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

    def _dry_run(self, planned: list[_Planned]) -> None:
        """Say what would happen to each copy; fetch no body and write nothing."""
        known = self.ledger.lookup(p.key for p in planned if p.key and p.state is None)
        for p in planned:
            entry = {"account": self.opts.account, "folder": self.name, "uid": p.uid,
                     "message_id": p.info.message_id, "date": p.info.date, "size": p.info.size}
            self.dry.decide(entry, p, known.get(p.key) if p.key else None)  # type: ignore[union-attr]
            self._settled(p.uid, p.state or State.UPLOADED, p.info.size)

    def _settled(self, uid: int, state: State | None, size: int) -> None:
        """A copy reached its state in this run (None: it vanished before it could be read)."""
        self.final[uid] = state is None or state.final
        if self.progress is not None:
            self.progress.handled(state, size)

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
            self.ledger.settle_sightings(c, self.row.id, self.uidvalidity,
                                         [self._settle_copy(c, copy) for copy in settled])

    def _settle_copy(self, c, copy: _Copy) -> Sighting:
        """Every route of this copy has answered: its final (or pending) state."""
        state = min(copy.states, key=_PRECEDENCE.index)
        p = copy.p
        if state is State.PENDING:
            self.ledger.record_failure(c, copy.ref, state=State.PENDING, reason=copy.reason or "tenant_unavailable",
                                       error=copy.detail, attempts=0)
        self.counts.add(state, copy.payload.size)
        self._settled(p.uid, state, p.info.size)
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
        if self.dry is None:
            self.ledger.update_folder(self.row.id, **values)

    def _advance_checked(self, last_uid: int, uidnext: int) -> None:
        """After a selection (windows, retry): move the cursor over the contiguous run of
        UIDs above it that the ledger holds as final, and no further (rule 3)."""
        uids = self.source.uids_after(last_uid, self.name)
        states = self.ledger.sightings(self.row.id, self.uidvalidity, uids)
        self.final.update({u: True for u, st in states.items() if st.final})
        self._advance(uids, last_uid, uidnext)


__all__ = ["sync_account", "Settings", "TenantGate", "AccountResult", "Counts", "Windows", "Redo", "Target",
           "DryRun", "ProgressHook"]
