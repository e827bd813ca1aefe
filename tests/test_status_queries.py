"""`status --failed`, `--runs`, `--message` and the line per tenant, run as real processes
on a SQLite ledger whose contents the test wrote itself (so the JSON must be exactly
them); then the same on a ledger filled by a real sync, and `retry` on what failed."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from conftest import DOMAIN
from mail import message

from imapsync.ledger import Ledger, Sighting, State
from imapsync.message import message_key

DATE = "Mon, 05 Jan 2026 08:00:00 +0000"
UP_KEY = message_key("up@mailer.example", DATE, "carol@outside.example", "hello")  # as a sync computes it


def cli_json(env, *args: str):
    code, out, err = env.cli("status", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def recent(iso: str | None) -> bool:
    return iso is not None and abs(datetime.now(timezone.utc) - datetime.fromisoformat(iso)) < timedelta(minutes=5)


@pytest.fixture
def known(env, ledger_url):
    """A ledger (SQLite, then PostgreSQL) with exactly: one message uploaded to two vaults
    (seen in INBOX and, as a duplicate, in Archive), one failed after 5 attempts, one
    skipped; and two runs."""
    env.write([], endpoint="http://127.0.0.1:9", ledger=ledger_url)
    ledger = Ledger.open(ledger_url)
    try:
        acc = ledger.account_id("alice", "imap.acme.com", "alice@acme.com")
        inbox, archive = ledger.folder(acc, "INBOX"), ledger.folder(acc, "Archive")
        ledger.update_folder(inbox.id, uidvalidity=100, last_uid=3)
        ledger.update_folder(archive.id, uidvalidity=200, last_uid=1)
        with ledger.tx() as c:
            up = ledger.ensure_message(c, UP_KEY, message_id="<up@mailer.example>", fingerprint=None, size=1234,
                                       date=DATE, state=State.PENDING)
            ledger.record_upload(c, up, tenant=DOMAIN, vaults=["alice@acme.com", "bob@acme.com"],
                                 upload_id="U-1", attempts=1)
            bad = ledger.ensure_message(c, "m:bad", message_id="<bad@mailer.example>", fingerprint=None, size=99,
                                        date=DATE, state=State.PENDING)
            ledger.record_failure(c, bad, state=State.FAILED, reason="s3_upload_failed",
                                  error="HTTP 503 after 5 attempts", attempts=5)
            skip = ledger.ensure_message(c, "m:skip", message_id="<skip@mailer.example>", fingerprint=None, size=55,
                                         date=None, state=State.SKIPPED, reason="no_primary_recipient")
            ledger.record_sightings(c, inbox.id, 100, [
                Sighting(1, 1234, State.UPLOADED, up, "<up@mailer.example>"),
                Sighting(2, 99, State.FAILED, bad, "<bad@mailer.example>", "s3_upload_failed"),
                Sighting(3, 55, State.SKIPPED, skip, "<skip@mailer.example>", "no_primary_recipient")])
            ledger.record_sightings(c, archive.id, 200, [Sighting(1, 1234, State.DUPLICATE, up, "<up@mailer.example>")])
        first = ledger.start_run("sync", "alice")
        ledger.finish_run(first, outcome="partial", error=None,
                          counts={"uploaded": 1, "failed": 1, "skipped": 1, "bytes": 1234})
        second = ledger.start_run("backfill", "alice")
        ledger.finish_run(second, outcome="ok", error=None, counts={"duplicate": 1})
    finally:
        ledger.close()
    return env


def test_failed_lists_exactly_the_failed_and_skipped_copies(known):
    data = cli_json(known, "--failed")
    seen = [row.pop("seen_at") for row in data["failed"]]
    assert all(recent(s) for s in seen)
    assert data == {"total": 2, "truncated": False, "failed": [
        {"account": "alice", "folder": "INBOX", "uidvalidity": 100, "uid": 2, "message_id": "<bad@mailer.example>",
         "size": 99, "date": DATE, "state": "failed", "reason": "s3_upload_failed", "attempts": 5,
         "last_error": "HTTP 503 after 5 attempts"},
        {"account": "alice", "folder": "INBOX", "uidvalidity": 100, "uid": 3, "message_id": "<skip@mailer.example>",
         "size": 55, "date": None, "state": "skipped", "reason": "no_primary_recipient", "attempts": 0,
         "last_error": None}]}
    only = cli_json(known, "--failed", "--reason", "no_primary_recipient")
    assert [(r["uid"], r["reason"]) for r in only["failed"]] == [(3, "no_primary_recipient")]
    assert cli_json(known, "--failed", "--account", "nobody") == {"failed": [], "total": 0, "truncated": False}
    limited = cli_json(known, "--failed", "--limit", "1")
    assert (len(limited["failed"]), limited["total"], limited["truncated"]) == (1, 2, True)
    code, text, _ = known.cli("status", "--failed")
    assert code == 0 and "<bad@mailer.example>" in text and "HTTP 503 after 5 attempts" in text


def test_runs_lists_the_runs_newest_first_with_counts_and_duration(known):
    runs = cli_json(known, "--runs")["runs"]
    for r in runs:
        assert recent(r.pop("started_at")) and recent(r.pop("ended_at"))
        assert 0 <= r.pop("duration_seconds") < 60
        r.pop("id")
    assert runs == [
        {"account": "alice", "kind": "backfill", "outcome": "ok", "error": None, "uploaded": 0, "duplicate": 1,
         "skipped": 0, "failed": 0, "pending": 0, "bytes": 0},
        {"account": "alice", "kind": "sync", "outcome": "partial", "error": None, "uploaded": 1, "duplicate": 0,
         "skipped": 1, "failed": 1, "pending": 0, "bytes": 1234}]
    assert len(cli_json(known, "--runs", "--limit", "1")["runs"]) == 1
    code, text, _ = known.cli("status", "--runs")
    assert code == 0 and "backfill" in text and "partial" in text


def test_message_shows_where_it_was_seen_and_which_vaults_it_reached(known):
    for query in ("<up@mailer.example>", "up@mailer.example", "up@MAILER.example"):
        data = cli_json(known, "--message", query)
        assert data["query"] == query
        [m] = data["messages"]
        assert recent(m.pop("first_seen_at")) and recent(m.pop("uploaded_at"))
        for x in m["sightings"]:
            assert recent(x.pop("seen_at"))
        for x in m["deliveries"]:
            assert recent(x.pop("delivered_at"))
        assert m == {
            "key": UP_KEY, "message_id": "<up@mailer.example>", "state": "uploaded", "reason": None, "size": 1234,
            "date": DATE, "attempts": 1, "last_error": None, "upload_id": "U-1",
            "sightings": [
                {"account": "alice", "folder": "Archive", "uidvalidity": 200, "uid": 1, "state": "duplicate",
                 "reason": None},
                {"account": "alice", "folder": "INBOX", "uidvalidity": 100, "uid": 1, "state": "uploaded",
                 "reason": None}],
            "deliveries": [
                {"vault": "alice@acme.com", "tenant": DOMAIN, "upload_id": "U-1"},
                {"vault": "bob@acme.com", "tenant": DOMAIN, "upload_id": "U-1"}]}
    assert cli_json(known, "--message", "<nothing@mailer.example>")["messages"] == []
    code, text, _ = known.cli("status", "--message", "<bad@mailer.example>")
    assert code == 0 and "failed (s3_upload_failed)" in text and "reached no vault" in text


def test_summary_has_a_line_per_tenant(known):
    tenants = cli_json(known)["tenants"]
    assert recent(tenants[0].pop("last_upload_at"))
    assert tenants == [{"tenant": DOMAIN, "messages": 1, "vaults": 2, "deliveries": 2}]
    code, text, _ = known.cli("status")
    assert code == 0 and f"tenant {DOMAIN}: 1 messages archived in 2 vault(s), 2 deliveries" in text
    assert known.cli("status", "--failed", "--runs")[0] == 2  # one query at a time


def test_a_real_failure_is_listed_then_retried_through_the_same_upload_path(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}", msgid=f"<real-{i}@mailer.example>"))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url, upload={"concurrency": 1})
    receiver.script("invalid_recipient")  # the API refuses the first upload for good
    code, out, _ = env.sync()
    assert code == 5 and "2 uploaded" in out and "1 failed" in out
    [row] = cli_json(env, "--failed")["failed"]
    assert (row["account"], row["folder"], row["state"], row["reason"], row["attempts"]) == (
        "alice", "INBOX", "failed", "invalid_recipient", 1)
    [m] = cli_json(env, "--message", row["message_id"])["messages"]
    assert m["state"] == "failed" and m["deliveries"] == []

    code, out, err = env.cli("retry", "--reason", "invalid_recipient")
    assert code == 0, out + err
    assert "1 to retry, 0 still not archived" in out and "1 uploaded" in out
    assert cli_json(env, "--failed")["failed"] == []
    [m] = cli_json(env, "--message", row["message_id"])["messages"]
    assert m["state"] == "uploaded" and [d["vault"] for d in m["deliveries"]] == [alice.user]
    assert len(receiver.uploads()) == 3
    assert [r["kind"] for r in cli_json(env, "--runs")["runs"]] == ["retry", "sync"]
    code, out, _ = env.cli("retry")
    assert code == 0 and "nothing to retry" in out


def test_retry_finds_a_message_whose_uid_is_gone_by_message_id(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    raw = message(to=alice.user, subject="moved", msgid="<moved@mailer.example>")
    alice.deliver(raw, "Projects")
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    receiver.script("invalid_recipient")
    assert env.sync()[0] == 5
    dovecot.delete_folder(alice.user, "Projects")  # the folder is rebuilt: new UIDVALIDITY, new UIDs
    dovecot.create_folder(alice.user, "Projects")
    alice.deliver(message(to=alice.user, subject="other", msgid="<removed@mailer.example>"), "Projects")  # a decoy
    alice.deliver(raw, "Projects")
    code, out, err = env.cli("retry")
    assert code == 0, out + err
    assert [u["sha256"] for u in receiver.uploads()] == [hashlib.sha256(raw).hexdigest()]
    [m] = cli_json(env, "--message", "<moved@mailer.example>")["messages"]
    assert m["state"] == "uploaded"
    assert sorted((s["uid"], s["state"], s["reason"]) for s in m["sightings"]) == [
        (1, "uploaded", "found_again_uid_2"), (2, "uploaded", None)]
    assert cli_json(env, "--failed")["failed"] == []
