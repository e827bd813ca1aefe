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

import os
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
        meta = sa.MetaData()
        meta.reflect(engine, only=TABLES)
        self.t = meta.tables

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

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction; library errors become LedgerError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), self.url) from None

    # ----- accounts and folders ----------------------------------------------------

    def account_id(self, name: str, host: str, username: str) -> int:
        a = self.t["accounts"]
        with self.tx() as c:
            row = c.execute(sa.select(a.c.id, a.c.host, a.c.username).where(a.c.name == name)).first()
            if row is None:
                return c.execute(a.insert().values(name=name, host=host, username=username)).inserted_primary_key[0]
            if (row.host, row.username) != (host, username):
                c.execute(a.update().where(a.c.id == row.id).values(host=host, username=username))
            return row.id

    def set_account_result(self, account_id: int, error: str | None) -> None:
        a = self.t["accounts"]
        values = ({"last_error": None, "last_success_at": now()} if error is None
                  else {"last_error": error, "last_error_at": now()})
        with self.tx() as c:
            c.execute(a.update().where(a.c.id == account_id).values(**values))

    def folders(self, account_id: int) -> dict[str, FolderRow]:
        f = self.t["folders"]
        with self.tx() as c:
            rows = c.execute(sa.select(f.c.id, f.c.name, f.c.uidvalidity, f.c.last_uid, f.c.uidnext)
                             .where(f.c.account_id == account_id)).all()
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
        return c.execute(m.insert().values(
            key=key, message_id=message_id, fingerprint=fingerprint, size=size, date=date,
            state=state.value, reason=reason, attempts=0, first_seen_at=now())).inserted_primary_key[0]

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
            c.execute(m.insert(), new)
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
            c.execute(d.insert(), rows)
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

        Works on SQLite and PostgreSQL alike: an INSERT races on the primary key, and an
        UPDATE takes over only a lease that is expired or our own.
        """
        from datetime import timedelta
        from sqlalchemy.exc import IntegrityError

        le = self.t["leases"]
        ts = now()
        values = {"owner": owner, "purpose": purpose, "acquired_at": ts, "expires_at": ts + timedelta(seconds=seconds)}
        try:
            with self.engine.begin() as c:
                taken = c.execute(le.update().where(
                    le.c.account == account, sa.or_(le.c.owner == owner, le.c.expires_at < ts)).values(**values))
                if taken.rowcount:
                    return True
                if c.execute(sa.select(le.c.account).where(le.c.account == account)).first():
                    return False
                c.execute(le.insert().values(account=account, **values))
                return True
        except IntegrityError:
            return False  # another worker inserted it first
        except SQLAlchemyError as e:
            raise LedgerError(_short(e), self.url) from None

    def release_lease(self, account: str, owner: str) -> None:
        le = self.t["leases"]
        with self.tx() as c:
            c.execute(le.delete().where(le.c.account == account, le.c.owner == owner))

    def lease_holder(self, account: str) -> dict | None:
        le = self.t["leases"]
        with self.tx() as c:
            row = c.execute(sa.select(le).where(le.c.account == account, le.c.expires_at >= now())).mappings().first()
        return dict(row) if row else None

    # ----- runs -----------------------------------------------------------------------

    def start_run(self, kind: str, account: str) -> int:
        r = self.t["runs"]
        with self.tx() as c:
            return c.execute(r.insert().values(kind=kind, account=account, started_at=now())).inserted_primary_key[0]

    def finish_run(self, run_id: int, *, outcome: str, counts: dict[str, int], error: str | None) -> None:
        r = self.t["runs"]
        with self.tx() as c:
            c.execute(r.update().where(r.c.id == run_id).values(
                ended_at=now(), outcome=outcome, error=error,
                **{k: counts.get(k, 0) for k in ("uploaded", "duplicate", "skipped", "failed", "pending", "bytes")}))

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


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(files("imapsync.migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _short(e: SQLAlchemyError) -> str:
    """The driver's own words, without SQL text or parameters (which could hold data)."""
    orig = getattr(e, "orig", None)
    text = str(orig) if orig is not None else type(e).__name__
    return text.splitlines()[0][:300]
