"""The ledger on a real SQLite file: migrations, permissions, dedup bookkeeping."""
from __future__ import annotations

import sqlite3

from imapsync.ledger import Ledger, Sighting, State


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
    assert set(ledger.t) == {"accounts", "folders", "messages", "sightings", "deliveries", "runs"}


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
    assert set(ledger.t) == {"accounts", "folders", "messages", "sightings", "deliveries", "runs"}
    run = ledger.start_run("sync", "a")
    ledger.finish_run(run, outcome="ok", counts={"uploaded": 2}, error=None)
    acc = ledger.account_id("a", "h", "u")
    assert ledger.status()[0]["last_run"]["uploaded"] == 2 and ledger.account_id("a", "h", "u") == acc
