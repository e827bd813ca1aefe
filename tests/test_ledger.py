"""The ledger on a real SQLite file: migrations, permissions, dedup bookkeeping."""
from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from daemon_proc import wait_for

from imapsync.lease import AccountLease
from imapsync.ledger import Ledger, Sighting, State, now


def test_new_ledger_is_migrated_private_and_reopens(tmp_path):
    path = tmp_path / "l.sqlite3"
    Ledger.open(f"sqlite:///{path}").close()
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        [(version,)] = c.execute("SELECT version_num FROM alembic_version").fetchall()
    ledger = Ledger.open(f"sqlite:///{path}")  # a second open is a no-op upgrade
    assert ledger.status() == []
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [(version,)]


def test_an_unversioned_empty_file_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite3"
    sqlite3.connect(path).close()  # e.g. created by an older tool: no tables yet
    ledger = Ledger.open(f"sqlite:///{path}")
    assert set(ledger.t) == {"accounts", "folders", "messages", "sightings", "deliveries", "runs", "leases"}


def test_coverage_and_sightings(ledger_url):
    ledger = Ledger.open(ledger_url)
    acc = ledger.account_id("a", "imap.example", "a@acme.com")
    folder = ledger.folder(acc, "INBOX")
    with ledger.tx() as c:
        ref = ledger.ensure_message(c, "m:1", message_id="<1@x>", fingerprint=None, size=10, date=None,
                                    state=State.PENDING)
        ledger.record_sightings(c, folder.id, 7, [Sighting(1, 10, State.PENDING, ref, "<1@x>")])
    assert ledger.lookup(["m:1"])["m:1"].state is State.PENDING
    with ledger.tx() as c:
        ledger.record_upload(c, ref, tenant="acme.com", vaults={"a@acme.com"}, upload_id="u1", attempts=2)
        ledger.record_sightings(c, folder.id, 7, [Sighting(1, 10, State.UPLOADED, ref, "<1@x>")])
    known = ledger.lookup(["m:1", "m:unknown"])
    assert list(known) == ["m:1"] and known["m:1"].vaults == {"a@acme.com"} and known["m:1"].state is State.UPLOADED
    assert ledger.sightings(folder.id, 7, [1, 2]) == {1: State.UPLOADED}


def test_migrations_are_idempotent_on_every_backend(ledger_url):
    Ledger.open(ledger_url).close()
    ledger = Ledger.open(ledger_url)
    assert set(ledger.t) == {"accounts", "folders", "messages", "sightings", "deliveries", "runs", "leases"}
    run = ledger.start_run("sync", "a")
    ledger.finish_run(run, outcome="ok", counts={"uploaded": 2}, error=None)
    acc = ledger.account_id("a", "h", "u")
    assert ledger.status()[0]["last_run"]["uploaded"] == 2 and ledger.account_id("a", "h", "u") == acc


def test_the_head_revision_known_to_the_ledger_is_the_newest_migration(tmp_path):
    """Opening skips Alembic when the ledger is at HEAD_REVISION: a new migration must move it."""
    from importlib.resources import files

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from imapsync.ledger import HEAD_REVISION, at_head

    cfg = Config()
    cfg.set_main_option("script_location", str(files("imapsync.migrations")))
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD_REVISION]
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    assert at_head(ledger.engine)


def test_processes_creating_the_same_new_ledger_at_once_all_open_it(tmp_path):
    """Four workers started together on a ledger that does not exist yet: one creates and
    migrates it, the others wait their turn and find it ready (no "database is locked")."""
    import subprocess
    import sys

    for trial in range(4):
        url = f"sqlite:///{tmp_path / f'new{trial}.sqlite3'}"
        code = f"from imapsync.ledger import Ledger; Ledger.open({url!r}).close()"
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), (trial, [e[-300:] for e in errors if e])
        assert Ledger.open(url).table_sizes()["accounts"] == 0


def test_leases_give_each_account_to_one_worker(ledger_url):
    a, b = Ledger.open(ledger_url), Ledger.open(ledger_url)  # two workers, one ledger
    assert a.acquire_lease("acc", "worker-a", "sync", 60)
    assert not b.acquire_lease("acc", "worker-b", "backfill", 60)
    assert a.acquire_lease("acc", "worker-a", "sync", 60)  # renewal by the holder
    assert b.lease_holder("acc")["owner"] == "worker-a"
    a.release_lease("acc", "worker-a")
    assert b.acquire_lease("acc", "worker-b", "backfill", 60)
    assert not a.acquire_lease("acc", "worker-a", "sync", 60)


def test_held_leases_are_renewed_until_released(ledger_url):
    """One thread renews every lease of the process: past their first expiry they are
    still held, and once released no renewal takes them again."""
    a, b = Ledger.open(ledger_url), Ledger.open(ledger_url)
    with AccountLease(a, "acc", "worker-a", "sync", seconds=1.2) as one, \
            AccountLease(a, "acc2", "worker-a", "sync", seconds=1.2) as two:
        assert one.held and two.held
        first = {n: _utc(a.lease_holder(n)["expires_at"]) for n in ("acc", "acc2")}
        wait_for(lambda: now() > max(first.values()), 5, "the first expiry to pass")
        assert not b.acquire_lease("acc", "worker-b", "backfill", 60)
        assert not b.acquire_lease("acc2", "worker-b", "backfill", 60)
        assert all(_utc(a.lease_holder(n)["expires_at"]) > first[n] for n in first)
    released = now()
    assert a.lease_holder("acc") is None and a.lease_holder("acc2") is None
    wait_for(lambda: (now() - released).total_seconds() > 0.8, 5, "two renewal periods")
    assert a.lease_holder("acc") is None and a.lease_holder("acc2") is None


def _utc(ts: datetime) -> datetime:
    """A timestamp as the ledger's naive UTC (PostgreSQL hands them back with a zone)."""
    return ts.astimezone(timezone.utc).replace(tzinfo=None) if ts.tzinfo else ts


def test_an_expired_lease_is_taken_over(ledger_url):
    a, b = Ledger.open(ledger_url), Ledger.open(ledger_url)
    assert a.acquire_lease("acc", "worker-a", "sync", -1)  # already expired: a crashed worker
    assert b.acquire_lease("acc", "worker-b", "sync", 60)
    assert b.lease_holder("acc")["owner"] == "worker-b"


def test_a_ledger_from_an_older_version_upgrades_itself_and_keeps_its_data(ledger_url):
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config
    from importlib.resources import files

    engine = sa.create_engine(ledger_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(files("imapsync.migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")  # the first released schema
        conn.execute(sa.text("INSERT INTO accounts (name, host, username) VALUES ('old', 'h', 'u')"))
    engine.dispose()
    ledger = Ledger.open(ledger_url)
    assert "leases" in ledger.t
    assert [a["account"] for a in ledger.status()] == ["old"]
    with ledger.tx() as c:
        from alembic.script import ScriptDirectory
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head != "0001"
