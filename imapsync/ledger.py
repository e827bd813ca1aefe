"""The sync ledger: what was seen where, what was uploaded to which vault, and runs.

The only module that imports SQLAlchemy. The schema is created and changed only by
the Alembic migrations in migrations/ (run at open, so an older ledger upgrades
itself); tables are reflected from the database rather than declared twice. SQLite
(WAL mode) by default, PostgreSQL with the same code for several workers.

Design rules kept here: a message is `pending` before its upload starts and
`uploaded` only after the sink acknowledged it (rule 2); a folder's cursor moves
only when the sync says so, over UIDs that are all final (rule 3); the cursor carries
its UIDVALIDITY (rule 4); coverage per vault decides duplicates (rule 5).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from importlib.resources import files
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from imapsync.errors import LedgerError

TABLES = ("accounts", "folders", "messages", "sightings", "deliveries", "runs", "leases")


class State(str, Enum):
    """Where a message or one copy of it stands. All but PENDING are final."""

    PENDING = "pending"
    UPLOADED = "uploaded"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self is not State.PENDING


@dataclass(frozen=True)
class FolderRow:
    id: int
    name: str
    uidvalidity: int | None
    last_uid: int
    uidnext: int | None


@dataclass(frozen=True)
class Known:
    """A message already in the ledger: its row, state and the vaults it reached."""

    id: int
    state: State
    vaults: frozenset[str]


@dataclass(frozen=True)
class Acknowledged:
    """An upload the sink acknowledged, to be recorded."""

    message_ref: int
    tenant: str
    vaults: tuple[str, ...]
    upload_id: str | None
    attempts: int


@dataclass
class Sighting:
    """One copy of a message at (folder, uidvalidity, uid), with its outcome."""

    uid: int
    size: int
    state: State
    message_ref: int | None = None
    message_id: str | None = None
    reason: str | None = None


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as naive UTC


def _redact(url: str) -> str:
    """A URL for messages: never its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its userinfo
        return url.split("@")[-1]


class Ledger:
    """A handle on the ledger database. Thread-safe: each call uses its own connection."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = _redact(url)
        self._turn = self._new_turn()
        meta = sa.MetaData()
        meta.reflect(engine, only=TABLES)
        self.t = meta.tables
        self.q = _Prepared(self.t, engine.dialect.name)

    # ----- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> "Ledger":
        """Open (creating if needed, with 0600 permissions) and migrate to the newest schema."""
        try:
            u = sa.engine.make_url(url)
            if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
                path = Path(u.database)
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            engine = sa.create_engine(url, pool_pre_ping=u.get_backend_name() != "sqlite")
            if u.get_backend_name() == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            migrate(engine)
            return cls(engine, url)
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), _redact(url)) from None
        except OSError as e:
            raise LedgerError(f"cannot create the ledger file: {e.strerror}", _redact(url)) from None

    def close(self) -> None:
        self.engine.dispose()

    def after_fork(self) -> None:
        """In a forked child: new connections (the parent's stay the parent's), and a turn
        no thread of the parent can be holding."""
        self.engine.dispose(close=False)
        self._turn = self._new_turn()

    def _new_turn(self):
        """SQLite has one writer: this process's transactions take turns (see `tx`)."""
        return threading.RLock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction; library errors become LedgerError.

        On SQLite, the transactions of one process take turns on a lock: SQLite has one
        writer at a time, and a writer that finds the file locked sleeps in its busy
        handler for 1, 2, 5, 10... ms, which made a no-change poll of 100 accounts,
        8 at a time, spend most of its time asleep. Other processes still meet the
        busy timeout; PostgreSQL needs no such turn-taking.
        """
        try:
            with self._turn, self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), self.url) from None

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Reads only, without waiting for the turn: under WAL a reader neither waits for
        the writer nor holds it up, so accounts synced side by side read at once."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), self.url) from None

    # ----- accounts and folders ----------------------------------------------------

    def account_id(self, name: str, host: str, username: str) -> int:
        with self.tx() as c:
            return self._account_id(c, name, host, username)

    def _account_id(self, c: Connection, name: str, host: str, username: str) -> int:
        a = self.t["accounts"]
        row = c.execute(self.q.account_by_name, {"b_name": name}).first()
        if row is None:
            return c.execute(a.insert().values(name=name, host=host, username=username)).inserted_primary_key[0]
        if (row.host, row.username) != (host, username):
            c.execute(a.update().where(a.c.id == row.id).values(host=host, username=username))
        return row.id

    def folders(self, account_id: int) -> dict[str, FolderRow]:
        with self.read() as c:
            rows = c.execute(self.q.folders_of, {"b_account_id": account_id}).all()
        return {r.name: FolderRow(r.id, r.name, r.uidvalidity, r.last_uid, r.uidnext) for r in rows}

    def folder(self, account_id: int, name: str) -> FolderRow:
        existing = self.folders(account_id).get(name)
        if existing:
            return existing
        f = self.t["folders"]
        with self.tx() as c:
            fid = c.execute(f.insert().values(account_id=account_id, name=name, last_uid=0)).inserted_primary_key[0]
        return FolderRow(fid, name, None, 0, None)

    def update_folder(self, folder_id: int, **values) -> None:
        """Set cursor fields (uidvalidity, last_uid, uidnext, last_error, last_sync_at)."""
        f = self.t["folders"]
        with self.tx() as c:
            c.execute(f.update().where(f.c.id == folder_id).values(**values))

    # ----- messages -------------------------------------------------------------------

    def lookup(self, keys: Iterable[str]) -> dict[str, Known]:
        """Known messages among `keys`, with the vaults each already reached."""
        keys = list(set(keys))
        if not keys:
            return {}
        m, d = self.t["messages"], self.t["deliveries"]
        out: dict[str, Known] = {}
        with self.tx() as c:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows = c.execute(sa.select(m.c.id, m.c.key, m.c.state).where(m.c.key.in_(chunk))).all()
                ids = {r.id: r for r in rows}
                vaults: dict[int, set[str]] = {r.id: set() for r in rows}
                if ids:
                    for ref, vault in c.execute(sa.select(d.c.message_ref, d.c.vault)
                                                .where(d.c.message_ref.in_(list(ids)))):
                        vaults[ref].add(vault)
                for r in rows:
                    out[r.key] = Known(r.id, State(r.state), frozenset(vaults[r.id]))
        return out

    def sightings(self, folder_id: int, uidvalidity: int, uids: Iterable[int]) -> dict[int, State]:
        s = self.t["sightings"]
        uids = list(uids)
        out: dict[int, State] = {}
        with self.tx() as c:
            for i in range(0, len(uids), 500):
                q = sa.select(s.c.uid, s.c.state).where(
                    s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity,
                    s.c.uid.in_(uids[i:i + 500]))
                out.update({r.uid: State(r.state) for r in c.execute(q)})
        return out

    def ensure_message(self, c: Connection, key: str, *, message_id: str | None, fingerprint: str | None,
                       size: int, date: str | None, state: State, reason: str | None = None,
                       overwrite: bool = True) -> int:
        """Insert the message row if new; if known and `overwrite`, set its state. Returns its id."""
        m = self.t["messages"]
        row = c.execute(sa.select(m.c.id).where(m.c.key == key)).first()
        if row is not None:
            if overwrite:
                c.execute(m.update().where(m.c.id == row.id).values(state=state.value))
            return row.id
        _insert_ignoring_conflicts(c, m, [dict(
            key=key, message_id=message_id, fingerprint=fingerprint, size=size, date=date,
            state=state.value, reason=reason, attempts=0, first_seen_at=now())])
        return self._ids(c, [key])[key]

    def pending_messages(self, c: Connection, items: list[dict]) -> dict[str, int]:
        """Make these messages pending (rule 2), inserting the new ones; key -> row id.

        `items` are dicts with key, message_id, fingerprint, size and date.
        """
        m = self.t["messages"]
        keys = list(dict.fromkeys(i["key"] for i in items))
        ids = self._ids(c, keys)
        if ids:
            c.execute(m.update().where(m.c.id.in_(list(ids.values()))).values(state=State.PENDING.value))
        ts = now()
        new, seen = [], set(ids)
        for i in items:
            if i["key"] not in seen:
                seen.add(i["key"])
                new.append(dict(i, state=State.PENDING.value, attempts=0, first_seen_at=ts))
        if new:
            _insert_ignoring_conflicts(c, m, new)  # another account may add the same message meanwhile
            ids.update(self._ids(c, [n["key"] for n in new]))
        return ids

    def _ids(self, c: Connection, keys: list[str]) -> dict[str, int]:
        m = self.t["messages"]
        out: dict[str, int] = {}
        for i in range(0, len(keys), 500):
            out.update({r.key: r.id for r in c.execute(sa.select(m.c.key, m.c.id).where(m.c.key.in_(keys[i:i + 500])))})
        return out

    def record_sightings(self, c: Connection, folder_id: int, uidvalidity: int,
                         sightings: Iterable[Sighting]) -> None:
        """Insert or update the copies at these UIDs: one statement for all new rows."""
        s = self.t["sightings"]
        sightings = list(sightings)
        if not sightings:
            return
        existing: dict[int, int] = {}
        uids = [x.uid for x in sightings]
        for i in range(0, len(uids), 500):
            existing.update({r.uid: r.id for r in c.execute(sa.select(s.c.uid, s.c.id).where(
                s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity, s.c.uid.in_(uids[i:i + 500])))})
        ts = now()
        rows = [dict(folder_id=folder_id, uidvalidity=uidvalidity, uid=x.uid, message_ref=x.message_ref,
                     message_id=x.message_id, size=x.size, state=x.state.value, reason=x.reason, seen_at=ts)
                for x in sightings]
        new = [r for r in rows if r["uid"] not in existing]
        if new:
            c.execute(s.insert(), new)
        changed = [dict(r, b_id=existing[r["uid"]]) for r in rows if r["uid"] in existing]
        if changed:
            c.execute(s.update().where(s.c.id == sa.bindparam("b_id")).values(
                message_ref=sa.bindparam("message_ref"), message_id=sa.bindparam("message_id"),
                size=sa.bindparam("size"), state=sa.bindparam("state"), reason=sa.bindparam("reason"),
                seen_at=sa.bindparam("seen_at")), changed)

    def settle_sightings(self, c: Connection, folder_id: int, uidvalidity: int,
                         sightings: Iterable[Sighting]) -> None:
        """Copies recorded as pending got their outcome: one UPDATE per (state, reason)
        rather than one per copy. A copy without its pending row is written in full."""
        s = self.t["sightings"]
        groups: dict[tuple[str, str | None], list[Sighting]] = {}
        for x in sightings:
            groups.setdefault((x.state.value, x.reason), []).append(x)
        ts = now()
        for (state, reason), group in groups.items():
            for chunk in _chunks(group):
                done = c.execute(s.update().where(
                    s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity,
                    s.c.uid.in_([x.uid for x in chunk])).values(state=state, reason=reason, seen_at=ts)).rowcount
                if done != len({x.uid for x in chunk}):
                    self.record_sightings(c, folder_id, uidvalidity, chunk)

    def record_upload(self, c: Connection, message_ref: int, *, tenant: str, vaults: Iterable[str],
                      upload_id: str | None, attempts: int) -> None:
        """The sink acknowledged: the vaults are covered and the message is uploaded."""
        self.record_uploads(c, [Acknowledged(message_ref, tenant, tuple(vaults), upload_id, attempts)])

    def record_uploads(self, c: Connection, acks: list["Acknowledged"]) -> None:
        """Several acknowledgements in a few statements (deliveries, then message states)."""
        if not acks:
            return
        m, d = self.t["messages"], self.t["deliveries"]
        ts = now()
        refs = sorted({a.message_ref for a in acks})
        have: set[tuple[int, str]] = set()
        for i in range(0, len(refs), 500):
            have.update((r.message_ref, r.vault) for r in c.execute(
                sa.select(d.c.message_ref, d.c.vault).where(d.c.message_ref.in_(refs[i:i + 500]))))
        rows = []
        for a in acks:
            for vault in sorted(set(a.vaults)):
                if (a.message_ref, vault) not in have:
                    have.add((a.message_ref, vault))
                    rows.append(dict(message_ref=a.message_ref, vault=vault, tenant=a.tenant,
                                     upload_id=a.upload_id, delivered_at=ts))
        if rows:
            _insert_ignoring_conflicts(c, d, rows)
        c.execute(m.update().where(m.c.id == sa.bindparam("b_id")).values(
            state=State.UPLOADED.value, reason=None, last_error=None, uploaded_at=ts,
            upload_id=sa.bindparam("b_upload_id"), attempts=m.c.attempts + sa.bindparam("b_attempts")),
            [dict(b_id=a.message_ref, b_upload_id=a.upload_id, b_attempts=a.attempts) for a in acks])

    def record_failure(self, c: Connection, message_ref: int, *, state: State, reason: str,
                       error: str | None, attempts: int) -> None:
        m = self.t["messages"]
        c.execute(m.update().where(m.c.id == message_ref).values(
            state=state.value, reason=reason, last_error=error, attempts=m.c.attempts + attempts))

    # ----- leases: one worker (sync, backfill, daemon) per account at a time ------------

    def acquire_lease(self, account: str, owner: str, purpose: str, seconds: float) -> bool:
        """Take the account's lease if it is free, expired or already ours; True on success.

        One statement on SQLite and PostgreSQL alike: an INSERT that, when the account
        already has a lease, takes it over only if it is expired or our own.
        """
        from datetime import timedelta

        ts = now()
        with self.tx() as c:
            return c.execute(self.q.lease_take, {"b_account": account, "b_owner": owner, "b_purpose": purpose,
                                                 "b_now": ts, "b_expires_at": ts + timedelta(seconds=seconds)}
                             ).first() is not None  # a row comes back when it was inserted or taken over

    def release_lease(self, account: str, owner: str) -> None:
        with self.tx() as c:
            c.execute(self.q.lease_release, {"b_account": account, "b_owner": owner})

    def lease_holder(self, account: str) -> dict | None:
        le = self.t["leases"]
        with self.tx() as c:
            row = c.execute(sa.select(le).where(le.c.account == account, le.c.expires_at >= now())).mappings().first()
        return dict(row) if row else None

    # ----- runs -----------------------------------------------------------------------

    def start_run(self, kind: str, account: str) -> int:
        with self.tx() as c:
            return self._start_run(c, kind, account)

    def _start_run(self, c: Connection, kind: str, account: str) -> int:
        return c.execute(self.q.run_start, {"kind": kind, "account": account,
                                            "started_at": now()}).inserted_primary_key[0]

    def start_account_run(self, kind: str, name: str, host: str, username: str) -> tuple[int, int]:
        """(run id, account id), one transaction: a no-change poll of many accounts is
        mostly ledger transactions, and each one waits for its turn on the writer."""
        with self.tx() as c:
            return self._start_run(c, kind, name), self._account_id(c, name, host, username)

    def finish_run(self, run_id: int, *, outcome: str, counts: dict[str, int], error: str | None,
                   account_id: int | None = None) -> None:
        """End the run; with `account_id`, note in the same transaction the account's last
        success, or its error."""
        ts = now()
        with self.tx() as c:
            c.execute(self.q.run_finish, {"b_id": run_id, "b_ended_at": ts, "b_outcome": outcome, "b_error": error,
                                          **{f"b_{k}": counts.get(k, 0) for k in _RUN_COUNTS}})
            if account_id is not None and error is None:
                c.execute(self.q.account_ok, {"b_id": account_id, "b_at": ts})
            elif account_id is not None:
                c.execute(self.q.account_error, {"b_id": account_id, "b_error": error, "b_at": ts})

    # ----- status (read only) ---------------------------------------------------------

    def status(self, account: str | None = None) -> list[dict]:
        """Per account: its state, last run and per-folder cursors and counts by state."""
        a, f, s, r = (self.t[n] for n in ("accounts", "folders", "sightings", "runs"))
        with self.tx() as c:
            accounts = c.execute(sa.select(a).where(a.c.name == account) if account
                                 else sa.select(a).order_by(a.c.name)).mappings().all()
            out = []
            for acc in accounts:
                folders = c.execute(sa.select(f).where(f.c.account_id == acc["id"]).order_by(f.c.name)).mappings().all()
                counts: dict[int, dict[str, int]] = {}
                q = (sa.select(s.c.folder_id, s.c.state, sa.func.count())
                     .select_from(s.join(f, s.c.folder_id == f.c.id))
                     .where(f.c.account_id == acc["id"], s.c.uidvalidity == f.c.uidvalidity)
                     .group_by(s.c.folder_id, s.c.state))
                for fid, state, n in c.execute(q):
                    counts.setdefault(fid, {})[state] = n
                last_run = c.execute(sa.select(r).where(r.c.account == acc["name"])
                                     .order_by(r.c.started_at.desc(), r.c.id.desc()).limit(1)).mappings().first()
                out.append({
                    "account": acc["name"], "host": acc["host"], "username": acc["username"],
                    "last_error": acc["last_error"], "last_error_at": _iso(acc["last_error_at"]),
                    "last_success_at": _iso(acc["last_success_at"]),
                    "last_run": _run(last_run) if last_run else None,
                    "folders": [{
                        "folder": fo["name"], "uidvalidity": fo["uidvalidity"], "last_uid": fo["last_uid"],
                        "uidnext": fo["uidnext"], "last_sync_at": _iso(fo["last_sync_at"]),
                        "last_error": fo["last_error"],
                        "counts": {st.value: counts.get(fo["id"], {}).get(st.value, 0) for st in State},
                    } for fo in folders],
                })
        return out

    def problems(self, account: str | None = None, limit: int = 1000) -> list[dict]:
        """Copies that were skipped or failed, or are still pending, with their reasons."""
        a, f, s, m = (self.t[n] for n in ("accounts", "folders", "sightings", "messages"))
        q = (sa.select(a.c.name.label("account"), f.c.name.label("folder"), s.c.uidvalidity, s.c.uid,
                       s.c.message_id, s.c.size, s.c.state, s.c.reason, m.c.attempts, m.c.last_error,
                       m.c.date)
             .select_from(s.join(f, s.c.folder_id == f.c.id).join(a, f.c.account_id == a.c.id)
                          .outerjoin(m, s.c.message_ref == m.c.id))
             .where(s.c.state.in_([State.SKIPPED.value, State.FAILED.value, State.PENDING.value]),
                    s.c.uidvalidity == f.c.uidvalidity)
             .order_by(a.c.name, f.c.name, s.c.uid).limit(limit))
        if account:
            q = q.where(a.c.name == account)
        with self.tx() as c:
            return [dict(row) for row in c.execute(q).mappings()]


    # ----- account backoff and health (the daemon) -------------------------------------

    def back_off(self, account: str, delay_for: Callable[[int], float]) -> tuple[int, datetime]:
        """Count one more failure of `account` and set when it may be tried again.

        `delay_for(failures)` gives the seconds to wait after that many failures in a
        row. Returns (failures, backoff_until) as stored (naive UTC).
        """
        from datetime import timedelta

        a = self.t["accounts"]
        with self.tx() as c:
            row = c.execute(sa.select(a.c.failures).where(a.c.name == account)).first()
            failures = (row.failures if row else 0) + 1
            until = now() + timedelta(seconds=delay_for(failures))
            c.execute(a.update().where(a.c.name == account).values(failures=failures, backoff_until=until))
        return failures, until

    def clear_backoff(self, account: str) -> None:
        """The account worked: no failures in a row, no waiting."""
        a = self.t["accounts"]
        with self.tx() as c:
            c.execute(a.update().where(a.c.name == account, sa.or_(a.c.failures != 0, a.c.backoff_until.is_not(None)))
                      .values(failures=0, backoff_until=None))

    def backoffs(self) -> dict[str, tuple[int, datetime | None]]:
        """Per account name: (failures in a row, backing off until), for accounts that failed."""
        a = self.t["accounts"]
        with self.tx() as c:
            rows = c.execute(sa.select(a.c.name, a.c.failures, a.c.backoff_until).where(a.c.failures > 0)).all()
        return {r.name: (r.failures, r.backoff_until) for r in rows}

    def check_writable(self) -> None:
        """Write a row and roll it back: raises LedgerError when the ledger cannot be written."""
        le = self.t["leases"]
        ts = now()
        try:
            with self.engine.connect() as c:
                tx = c.begin()
                try:
                    c.execute(le.insert().values(account=f"~healthz-{os.getpid()}-{id(ts)}", owner="healthz",
                                                 purpose="healthz", acquired_at=ts, expires_at=ts))
                finally:
                    tx.rollback()
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), self.url) from None

    # ----- backfill, retry, verify and the status queries (read mostly) ----------------

    def find_account_id(self, name: str) -> int | None:
        """The account's row id, without creating it (for a dry run)."""
        a = self.t["accounts"]
        with self.tx() as c:
            return c.execute(sa.select(a.c.id).where(a.c.name == name)).scalar()

    def final_before(self, folder_id: int, uidvalidity: int, uids: list[int], before: datetime) -> set[int]:
        """Which of `uids` were already final before `before` (a run's start): what a
        backfill's count of work leaves out."""
        s = self.t["sightings"]
        final = [st.value for st in State if st.final]
        out: set[int] = set()
        with self.tx() as c:
            for i in range(0, len(uids), 500):
                out.update(c.execute(sa.select(s.c.uid).where(
                    s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity, s.c.uid.in_(uids[i:i + 500]),
                    s.c.state.in_(final), s.c.seen_at < before)).scalars())
        return out

    def set_sighting_state(self, folder_id: int, uidvalidity: int, uid: int, state: State, reason: str | None) -> None:
        """Settle one copy's row (a retry found the message again under another UID)."""
        s = self.t["sightings"]
        with self.tx() as c:
            c.execute(s.update().where(s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity, s.c.uid == uid)
                      .values(state=state.value, reason=reason[:64] if reason else None, seen_at=now()))

    def copies(self, folder_id: int, uidvalidity: int, uids: list[int]) -> dict[int, dict]:
        """What the ledger holds for each copy at these UIDs: the copy's state and reason,
        and its message's key, Message-ID and state (for `verify`)."""
        s, m = self.t["sightings"], self.t["messages"]
        out: dict[int, dict] = {}
        with self.tx() as c:
            for i in range(0, len(uids), 500):
                q = (sa.select(s.c.uid, s.c.state, s.c.reason, s.c.message_id, s.c.message_ref,
                               m.c.key, m.c.state.label("message_state"))
                     .select_from(s.outerjoin(m, s.c.message_ref == m.c.id))
                     .where(s.c.folder_id == folder_id, s.c.uidvalidity == uidvalidity, s.c.uid.in_(uids[i:i + 500])))
                out.update({r["uid"]: dict(r) for r in c.execute(q).mappings()})
        return out

    def _copies_query(self, account: str | None, states: Iterable[State], reason: str | None):
        a, f, s, m = (self.t[n] for n in ("accounts", "folders", "sightings", "messages"))
        q = (sa.select(a.c.name.label("account"), f.c.name.label("folder"), s.c.folder_id, s.c.uidvalidity,
                       s.c.uid, s.c.message_id, s.c.size, m.c.date, s.c.state,
                       sa.func.coalesce(s.c.reason, m.c.reason).label("reason"), m.c.attempts, m.c.last_error,
                       s.c.seen_at)
             .select_from(s.join(f, s.c.folder_id == f.c.id).join(a, f.c.account_id == a.c.id)
                          .outerjoin(m, s.c.message_ref == m.c.id))
             .where(s.c.state.in_([st.value for st in states]), s.c.uidvalidity == f.c.uidvalidity))
        if account:
            q = q.where(a.c.name == account)
        if reason:
            q = q.where(sa.func.coalesce(s.c.reason, m.c.reason) == reason)
        return q

    def copies_in_states(self, states: Iterable[State], account: str | None = None, reason: str | None = None,
                         limit: int | None = None) -> tuple[list[dict], int]:
        """Copies (in their folder's current UIDVALIDITY) in these states, by account,
        folder and UID, with the message's date, attempts and last error; and how many
        there are in all (the list stops at `limit`)."""
        states = list(states)
        q = self._copies_query(account, states, reason)
        with self.tx() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(q.subquery())).scalar() or 0
            rows = q.order_by(sa.literal_column("account"), sa.literal_column("folder"), self.t["sightings"].c.uid)
            if limit is not None:
                rows = rows.limit(limit)
            out = [dict(r) for r in c.execute(rows).mappings()]
        for r in out:
            r["seen_at"] = _iso(r["seen_at"])
        return out, total

    def runs(self, account: str | None = None, kind: str | None = None, limit: int = 50) -> list[dict]:
        """The newest runs first: kind, account, start, end, duration, outcome, counts."""
        r = self.t["runs"]
        q = sa.select(r).order_by(r.c.started_at.desc(), r.c.id.desc()).limit(limit)
        if account:
            q = q.where(r.c.account == account)
        if kind:
            q = q.where(r.c.kind == kind)
        with self.tx() as c:
            rows = c.execute(q).mappings().all()
        out = []
        for row in rows:
            run = {"account": row["account"], **_run(row)}
            end = row["ended_at"]
            run["duration_seconds"] = round((end - row["started_at"]).total_seconds(), 3) if end else None
            out.append(run)
        return out

    def messages_by_id(self, message_ids: Iterable[str], key_range: tuple[str, str] | None = None) -> list[dict]:
        """Messages whose Message-ID is one of `message_ids` (as found in the header), or
        whose key lies in `key_range`; each with where it was seen and which vaults it
        reached, and when."""
        a, f, s, m, d = (self.t[n] for n in ("accounts", "folders", "sightings", "messages", "deliveries"))
        ids = sorted(set(message_ids))
        with self.tx() as c:
            found = {r["id"]: dict(r) for r in c.execute(sa.select(m).where(m.c.message_id.in_(ids))).mappings()}
            if key_range:
                found.update({r["id"]: dict(r) for r in c.execute(sa.select(m).where(
                    m.c.key >= key_range[0], m.c.key <= key_range[1])).mappings()})
            out = []
            for ref in sorted(found):
                row = found[ref]
                seen = c.execute(
                    sa.select(a.c.name.label("account"), f.c.name.label("folder"), s.c.uidvalidity, s.c.uid,
                              s.c.state, s.c.reason, s.c.seen_at)
                    .select_from(s.join(f, s.c.folder_id == f.c.id).join(a, f.c.account_id == a.c.id))
                    .where(s.c.message_ref == ref).order_by(a.c.name, f.c.name, s.c.uid)).mappings().all()
                reached = c.execute(sa.select(d.c.vault, d.c.tenant, d.c.upload_id, d.c.delivered_at)
                                    .where(d.c.message_ref == ref).order_by(d.c.vault)).mappings().all()
                out.append({
                    "key": row["key"], "message_id": row["message_id"], "state": row["state"],
                    "reason": row["reason"], "size": row["size"], "date": row["date"], "attempts": row["attempts"],
                    "last_error": row["last_error"], "first_seen_at": _iso(row["first_seen_at"]),
                    "uploaded_at": _iso(row["uploaded_at"]), "upload_id": row["upload_id"],
                    "sightings": [dict(x, seen_at=_iso(x["seen_at"])) for x in seen],
                    "deliveries": [dict(x, delivered_at=_iso(x["delivered_at"])) for x in reached],
                })
        return out

    def tenant_totals(self) -> list[dict]:
        """Per tenant: messages uploaded to it, vaults reached, deliveries, last upload.

        One scan of the covering index ix_deliveries_tenant (about 0.5 s per million
        deliveries on SQLite; bench/status_bench.py)."""
        d = self.t["deliveries"]
        with self.tx() as c:
            rows = c.execute(sa.select(d.c.tenant, sa.func.count(sa.distinct(d.c.message_ref)).label("messages"),
                                       sa.func.count(sa.distinct(d.c.vault)).label("vaults"),
                                       sa.func.count().label("deliveries"), sa.func.max(d.c.delivered_at).label("last"))
                             .group_by(d.c.tenant).order_by(d.c.tenant)).mappings().all()
        return [{"tenant": r["tenant"], "messages": r["messages"], "vaults": r["vaults"],
                 "deliveries": r["deliveries"], "last_upload_at": _iso(r["last"])} for r in rows]


    # ----- integrity (read only; the checks and their wording are in ledger_check.py) ---

    def dangling_references(self, limit: int = 20) -> list[tuple[str, str, int, list[dict]]]:
        """Rows whose foreign key points at no row, for every foreign key of the schema.

        (table.column, referred table, how many rows, the first `limit` rows' keys).
        """
        out = []
        with self.tx() as c:
            for name in TABLES:
                table = self.t[name]
                keys = list(table.primary_key.columns)
                for fk in sorted(table.foreign_keys, key=lambda k: k.parent.name):
                    col, target = fk.parent, fk.column
                    where = sa.and_(col.is_not(None), ~sa.exists().where(target == col))
                    n = c.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one()
                    if n:
                        cols = [k for k in keys if k.name != col.name] + [col]
                        rows = c.execute(sa.select(*cols).where(where).limit(limit)).mappings().all()
                        out.append((f"{name}.{col.name}", target.table.name, n, [dict(r) for r in rows]))
        return out

    def messages_without_copy_or_delivery(self, limit: int = 20) -> tuple[int, list[dict]]:
        """Message rows that no copy refers to and that reached no vault (orphans)."""
        m, s, d = self.t["messages"], self.t["sightings"], self.t["deliveries"]
        where = sa.and_(~sa.exists().where(s.c.message_ref == m.c.id), ~sa.exists().where(d.c.message_ref == m.c.id))
        return self._count_and_rows(sa.select(m.c.id, m.c.key, m.c.message_id, m.c.state), m, where, limit)

    def copies_at_or_below_cursor(self, states: Iterable[str], limit: int = 20) -> tuple[int, list[dict]]:
        """Copies in one of `states` at or below their folder's cursor (same UIDVALIDITY)."""
        f, s = self.t["folders"], self.t["sightings"]
        where = sa.and_(s.c.state.in_(list(states)), s.c.uidvalidity == f.c.uidvalidity, s.c.uid <= f.c.last_uid)
        return self._copies(where, limit)

    def archived_copies_without_delivery(self, limit: int = 20) -> tuple[int, list[dict]]:
        """Copies recorded uploaded or duplicate whose message is unknown or reached no vault."""
        s, d = self.t["sightings"], self.t["deliveries"]
        where = sa.and_(s.c.state.in_([State.UPLOADED.value, State.DUPLICATE.value]),
                        sa.or_(s.c.message_ref.is_(None), ~sa.exists().where(d.c.message_ref == s.c.message_ref)))
        return self._copies(where, limit)

    def copies_without_reason(self, states: Iterable[str], limit: int = 20) -> tuple[int, list[dict]]:
        """Copies in one of `states` (skipped, failed) that carry no reason."""
        s = self.t["sightings"]
        return self._copies(sa.and_(s.c.state.in_(list(states)), sa.or_(s.c.reason.is_(None), s.c.reason == "")),
                            limit)

    def uploaded_messages_without_delivery(self, limit: int = 20) -> tuple[int, list[dict]]:
        """Messages marked uploaded that reached no vault."""
        m, d = self.t["messages"], self.t["deliveries"]
        where = sa.and_(m.c.state == State.UPLOADED.value, ~sa.exists().where(d.c.message_ref == m.c.id))
        return self._count_and_rows(sa.select(m.c.id, m.c.key, m.c.message_id, m.c.state), m, where, limit)

    def unknown_states(self, known: Iterable[str], limit: int = 20) -> list[tuple[str, int, list[dict]]]:
        """Message and copy rows whose state is not one of `known`: (table, count, rows)."""
        out = []
        for name in ("messages", "sightings"):
            t = self.t[name]
            n, rows = self._count_and_rows(sa.select(t.c.id, t.c.state), t, t.c.state.not_in(list(known)), limit)
            if n:
                out.append((name, n, rows))
        return out

    def _copies(self, where, limit: int) -> tuple[int, list[dict]]:
        a, f, s = self.t["accounts"], self.t["folders"], self.t["sightings"]
        joined = s.join(f, s.c.folder_id == f.c.id).join(a, f.c.account_id == a.c.id)
        q = (sa.select(a.c.name.label("account"), f.c.name.label("folder"), f.c.uidvalidity.label("folder_uidvalidity"),
                       f.c.last_uid, s.c.uidvalidity, s.c.uid, s.c.state, s.c.reason, s.c.message_ref, s.c.message_id)
             .select_from(joined).where(where).order_by(a.c.name, f.c.name, s.c.uid))
        with self.tx() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(joined).where(where)).scalar_one()
            rows = [dict(r) for r in c.execute(q.limit(limit)).mappings()] if n else []
        return n, rows

    def _count_and_rows(self, select, table, where, limit: int) -> tuple[int, list[dict]]:
        with self.tx() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one()
            rows = [dict(r) for r in c.execute(select.where(where).order_by(table.c.id).limit(limit)).mappings()] \
                if n else []
        return n, rows

    def table_sizes(self) -> dict[str, int]:
        """Rows per table (for a one-line summary of what a check covered)."""
        with self.tx() as c:
            return {name: c.execute(sa.select(sa.func.count()).select_from(self.t[name])).scalar_one()
                    for name in ("accounts", "folders", "messages", "sightings", "deliveries")}


_RUN_COUNTS = ("uploaded", "duplicate", "skipped", "failed", "pending", "bytes")


class _Prepared:
    """Statements every pass runs for every account, built once: a no-change poll of many
    accounts spent more CPU building SQLAlchemy statements than in SQLite."""

    def __init__(self, t, dialect: str) -> None:
        a, f, le, r = t["accounts"], t["folders"], t["leases"], t["runs"]
        p = sa.bindparam
        self.account_by_name = sa.select(a.c.id, a.c.host, a.c.username).where(a.c.name == p("b_name"))
        self.account_ok = a.update().where(a.c.id == p("b_id")).values(last_error=None, last_success_at=p("b_at"))
        self.account_error = a.update().where(a.c.id == p("b_id")).values(
            last_error=p("b_error"), last_error_at=p("b_at"))
        self.folders_of = sa.select(f.c.id, f.c.name, f.c.uidvalidity, f.c.last_uid, f.c.uidnext).where(
            f.c.account_id == p("b_account_id"))
        lease = _dialect_insert(dialect)(le).values(account=p("b_account"), owner=p("b_owner"), purpose=p("b_purpose"),
                                                    acquired_at=p("b_now"), expires_at=p("b_expires_at"))
        new = lease.excluded
        self.lease_take = lease.on_conflict_do_update(
            index_elements=[le.c.account],
            set_={"owner": new.owner, "purpose": new.purpose, "acquired_at": new.acquired_at,
                  "expires_at": new.expires_at},
            where=sa.or_(le.c.owner == new.owner, le.c.expires_at < new.acquired_at)).returning(le.c.account)
        self.lease_release = le.delete().where(le.c.account == p("b_account"), le.c.owner == p("b_owner"))
        self.run_start = r.insert()
        self.run_finish = r.update().where(r.c.id == p("b_id")).values(
            ended_at=p("b_ended_at"), outcome=p("b_outcome"), error=p("b_error"),
            **{k: p(f"b_{k}") for k in _RUN_COUNTS})


def _dialect_insert(dialect: str):
    """The INSERT of SQLite or PostgreSQL, which both know ON CONFLICT."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _insert_ignoring_conflicts(c: Connection, table: sa.Table, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: accounts synced side by side (or several
    workers) may add the same message or delivery at the same moment; both mean the same."""
    c.execute(_dialect_insert(c.dialect.name)(table).on_conflict_do_nothing(), rows)


def _chunks(items: list, size: int = 400) -> Iterator[list]:
    """Slices small enough for one statement's parameters (SQLite allows 32,766)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _iso(ts: datetime | None) -> str | None:
    return ts.replace(tzinfo=timezone.utc).isoformat(timespec="seconds") if ts else None


def _run(row) -> dict:
    return {"id": row["id"], "kind": row["kind"], "started_at": _iso(row["started_at"]),
            "ended_at": _iso(row["ended_at"]), "outcome": row["outcome"], "error": row["error"],
            **{k: row[k] for k in ("uploaded", "duplicate", "skipped", "failed", "pending", "bytes")}}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


#: The newest migration in migrations/versions (a test holds the two together).
HEAD_REVISION = "0003"


def at_head(engine: Engine) -> bool:
    """The ledger is at HEAD_REVISION already: read without importing Alembic, whose
    import costs a third of a second on every start of a short `sync --once`."""
    with engine.connect() as c:
        if not sa.inspect(c).has_table("alembic_version"):
            return False
        return c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD_REVISION]


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already)."""
    if at_head(engine):
        return
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(files("imapsync.migrations")))
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction; begin one ourselves, so that a crash
            # or a full disk mid-migration leaves the old schema, never half of the new one.
            # IMMEDIATE takes the write lock at once: processes creating the same new ledger
            # wait their turn (busy timeout) and the later ones find it migrated, instead of
            # failing with "database is locked" when a read lock could not be upgraded.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _short(e: SQLAlchemyError) -> str:
    """The driver's own words, without SQL text or parameters (which could hold data)."""
    orig = getattr(e, "orig", None)
    text = str(orig) if orig is not None else type(e).__name__
    return text.splitlines()[0][:300]
