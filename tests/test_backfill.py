"""Backfill end to end: Dovecot seeded with years of mail, the receiver over HTTP, a SQLite
ledger, and `imapsync backfill` run as a real process (issue: backfill, progress, status,
verify)."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import date

from conftest import API_KEY
from history import in_window, seed_history, uploaded
from mail import message

from imapsync.receiver import Receiver


def cursor_gaps(env) -> list[tuple]:
    """Folders whose cursor passed a UID without a final copy in the ledger (rule 3: none)."""
    return env.sql("SELECT f.name, f.last_uid, count(s.id) FROM folders f LEFT JOIN sightings s "
                   "ON s.folder_id = f.id AND s.uidvalidity = f.uidvalidity AND s.uid <= f.last_uid "
                   "AND s.state != 'pending' GROUP BY f.id HAVING count(s.id) != f.last_uid")


def test_a_window_uploads_exactly_its_messages_and_a_wider_one_only_the_rest(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    folders = ["INBOX", "Archive", "Archive/2019", "Sent"]
    seeded = seed_history(dovecot, alice.user, 2400, folders, date(2019, 1, 1), date(2024, 12, 31))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url, backfill={"window_days": 60})

    code, out, err = env.cli("backfill", "--since", "2021-01-01", "--before", "2022-07-01")
    assert code == 0, out + err
    first = in_window(seeded, date(2021, 1, 1), date(2022, 7, 1))
    assert 500 < len(first) < 800
    assert sorted(uploaded(receiver)) == sorted(first)
    assert f"{len(first)} uploaded" in out
    # The cursor never passed a message outside the window (rule 3): every UID at or
    # below each folder's cursor (Dovecot numbers them 1..N here) is final in the ledger.
    assert cursor_gaps(env) == []
    assert env.sql("SELECT count(*) FROM folders WHERE last_uid > 0")[0][0] < len(folders)  # mostly held back

    code, out, err = env.cli("backfill", "--since", "2020-01-01", "--newest-first")
    assert code == 0, out + err
    wider = in_window(seeded, date(2020, 1, 1), None)
    assert f"{len(wider - first)} uploaded" in out
    assert sorted(uploaded(receiver)) == sorted(wider)  # each once: nothing of the first window again
    assert receiver.stats["posts"] == len(wider)  # not even asked for a second time
    runs = env.sql("SELECT kind, outcome, uploaded FROM runs ORDER BY id")
    assert runs == [("backfill", "ok", len(first)), ("backfill", "ok", len(wider - first))]

    # A plain sync afterwards archives the rest of history (2019) and nothing twice.
    code, out, err = env.sync()
    assert code == 0, out + err
    assert sorted(uploaded(receiver)) == sorted(s.sha256 for s in seeded)
    assert env.cli("verify")[0] == 0


def test_folder_glob_limits_the_backfill(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    seeded = seed_history(dovecot, alice.user, 60, ["INBOX", "Archive/2020", "Archive/2021", "Sent"],
                          date(2020, 1, 1), date(2021, 12, 31))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    code, out, err = env.cli("backfill", "--folder", "Archive/*")
    assert code == 0, out + err
    assert sorted(uploaded(receiver)) == sorted(s.sha256 for s in seeded if s.folder.startswith("Archive/"))
    assert {n for (n,) in env.sql("SELECT name FROM folders")} == {"Archive/2020", "Archive/2021"}


class CountingReceiver(Receiver):
    """The receiver, also noting the requestId of every upload request it is asked (in order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[str] = []

    def _post(self, raw, key, base, scripted):
        try:
            rid = json.loads(raw).get("requestId")
        except ValueError:
            rid = None
        with self._lock:
            self.asked.append(rid)
        return super()._post(raw, key, base, scripted)


def _ledger(env) -> sqlite3.Connection:
    return sqlite3.connect(env.root / "imapsync.sqlite3")


def test_backfill_killed_again_and_again_finishes_with_nothing_lost_or_uploaded_twice(
        new_mailbox, env, dovecot, tmp_path):
    alice = new_mailbox("alice")
    seeded = seed_history(dovecot, alice.user, 600, ["INBOX", "Archive"], date(2022, 1, 1), date(2024, 12, 31))
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    with CountingReceiver(tmp_path / "store", api_key=API_KEY, latency_ms=15) as rx:
        env.write([env.account(alice, name="alice")], endpoint=rx.url, fetch={"batch_messages": 40},
                  upload={"concurrency": 4, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10},
                  backfill={"window_days": 90, "progress_interval": 0.5})
        cmd = [sys.executable, "-m", "imapsync", "backfill", "--config", str(env.path)]
        kills = []  # per kill: (requests asked before it, copies pending in the ledger after it, acknowledged ids)
        deadline = time.monotonic() + 120
        for _ in range(5):
            asked_before = len(rx.asked)
            target = asked_before + rng.randint(0, 90)  # 0: at once
            with open(tmp_path / "backfill.log", "ab") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=os.environ.copy())
            while proc.poll() is None and len(rx.asked) < target and time.monotonic() < deadline:
                time.sleep(0.002)  # polling the receiver for the kill point, bounded by the deadline
            if proc.poll() is not None:
                break  # finished before this kill point
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            with _ledger(env) as c:
                pending = c.execute("SELECT count(*) FROM messages WHERE state = 'pending'").fetchone()[0]
                acked = {u for (u,) in c.execute("SELECT upload_id FROM deliveries")}
            kills.append((len(rx.asked), pending, acked))
        assert len(kills) >= 3, f"seed {seed}: the backfill finished before it could be killed"

        code = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                              env=os.environ.copy()).returncode
        assert code == 0, (tmp_path / "backfill.log").read_text()[-3000:]

        stored = uploaded(rx)
        assert sorted(set(stored)) == sorted(s.sha256 for s in seeded), f"seed {seed}: a message is missing"
        assert len(stored) == len(seeded), f"seed {seed}: a message was stored twice"
        # A duplicate upload: the same message sent to the API again. Only uploads in
        # flight at a kill (pending in the ledger: started, not yet acknowledged there)
        # may be sent again, and never one the ledger had acknowledged.
        in_flight = sum(p for _, p, _ in kills)
        again = len(rx.asked) - len(seeded)
        assert again <= in_flight, f"seed {seed}: {again} upload(s) sent again, {in_flight} in flight at kills"
        upload_of = {u["requestId"]: u["uploadId"] for u in rx.uploads()}
        for asked_at_kill, _, acked in kills:
            resent = [rid for rid in rx.asked[asked_at_kill:] if upload_of.get(rid) in acked]
            assert resent == [], f"seed {seed}: acknowledged uploads sent again after a kill"
        assert Counter(rx.asked).most_common(1)[0][1] <= 1 + len(kills)
    assert env.cli("verify")[0] == 0
    runs = env.sql("SELECT kind, outcome FROM runs ORDER BY id")
    assert runs[-1] == ("backfill", "ok") and all(k == "backfill" for k, _ in runs)


def test_dry_run_uploads_nothing_and_writes_no_message_state(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    seeded = seed_history(dovecot, alice.user, 30, ["INBOX", "Archive"], date(2023, 1, 1), date(2023, 12, 31))
    twice = message(to=alice.user, subject="in two folders", msgid="<twice@mailer.example>")
    alice.deliver(twice)
    alice.deliver(twice, "Archive")
    alice.deliver(message(to=alice.user, subject="huge", msgid="<huge@mailer.example>", body="x" * 6000))
    alice.deliver(message(to=alice.user, subject="to bob", cc="bob@acme.com", msgid="<cc-bob@mailer.example>"))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url, upload={"max_message_bytes": 5000})

    code, out, err = env.cli("backfill", "--dry-run", "--json")
    assert code == 0, out + err
    plan = json.loads(out[:out.rindex("}") + 1])
    assert plan["would_upload"] == 32 and plan["would_skip"] == 1 and plan["duplicates"] == 1
    assert plan["vaults"] == {alice.user: 32, "bob@acme.com": 1}
    assert [(s["message_id"], s["reason"]) for s in plan["skip"]] == [
        ("<huge@mailer.example>", "too_large")]
    assert [(d["message_id"], d["reason"]) for d in plan["duplicate"]] == [
        ("<twice@mailer.example>", "earlier_copy_in_this_run")]
    cc = next(u for u in plan["upload"] if u["message_id"] == "<cc-bob@mailer.example>")
    assert cc["vaults"] == {"acme.com": sorted([alice.user, "bob@acme.com"])}
    assert "nothing uploaded, nothing written" in out

    assert receiver.uploads() == [] and receiver.stats["posts"] == 0
    for table in ("messages", "sightings", "deliveries", "runs", "folders", "accounts", "leases"):
        assert env.sql(f"SELECT count(*) FROM {table}") == [(0,)], table

    code, text, _ = env.cli("backfill", "--dry-run")
    assert code == 0 and "would upload 32 message(s)" in text and "too_large" in text

    assert env.cli("backfill")[0] == 0  # for real: then a dry run finds everything done
    assert len(receiver.uploads()) == len(seeded) + 2
    before = env.sql("SELECT count(*), max(seen_at) FROM sightings")
    code, out, err = env.cli("backfill", "--dry-run", "--json")
    plan = json.loads(out[:out.rindex("}") + 1])
    assert (plan["would_upload"], plan["would_skip"], plan["already_done"]) == (0, 0, len(seeded) + 4)
    assert env.sql("SELECT count(*), max(seen_at) FROM sightings") == before
    assert env.sql("SELECT count(*) FROM runs") == [(1,)]


def test_an_account_busy_elsewhere_is_waited_for_then_backfilled(new_mailbox, receiver, env, dovecot):
    from imapsync.ledger import Ledger

    alice = new_mailbox("alice")
    seed_history(dovecot, alice.user, 5, ["INBOX"], date(2023, 1, 1), date(2023, 1, 31))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    ledger = Ledger.open(f"sqlite:///{env.root / 'imapsync.sqlite3'}")
    try:
        assert ledger.acquire_lease("alice", "daemon@elsewhere:1", "daemon", 300)
        code, out, err = env.cli("backfill", "--wait", "0")
        assert code == 7, out + err
        assert "being synced by daemon@elsewhere:1" in err and receiver.uploads() == []

        proc = subprocess.Popen([sys.executable, "-m", "imapsync", "backfill", "--wait", "60", "--config",
                                 str(env.path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        lines = []
        for line in proc.stderr:  # blocks until the backfill says it waits (bounded by its --wait)
            lines.append(line)
            if "waiting up to" in line:
                break
        assert any("daemon@elsewhere:1" in x for x in lines)
        ledger.release_lease("alice", "daemon@elsewhere:1")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert len(receiver.uploads()) == 5
        assert ledger.lease_holder("alice") is None  # released at the end
    finally:
        ledger.close()


def test_ctrl_c_finishes_the_batch_in_hand_and_the_same_command_continues(new_mailbox, env, dovecot, tmp_path):
    alice = new_mailbox("alice")
    seeded = seed_history(dovecot, alice.user, 300, ["INBOX"], date(2023, 1, 1), date(2023, 12, 31))
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=20) as rx:
        env.write([env.account(alice, name="alice")], endpoint=rx.url, fetch={"batch_messages": 20},
                  upload={"concurrency": 2, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10})
        proc = subprocess.Popen([sys.executable, "-m", "imapsync", "backfill", "--config", str(env.path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=os.environ.copy())
        deadline = time.monotonic() + 60
        while len(rx.uploads()) < 30 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # polling the receiver for the moment to press Ctrl-C
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "stopped: run the same command again to continue" in out
        assert env.sql("SELECT count(*) FROM messages WHERE state = 'pending'") == [(0,)]  # all recorded
        done = len(rx.uploads())
        assert 30 <= done < len(seeded)
        assert env.sql("SELECT kind, outcome, uploaded FROM runs") == [("backfill", "stopped", done)]

        code, out, err = env.cli("backfill")
        assert code == 0, out + err
        assert f"{len(seeded) - done} uploaded" in out
        assert sorted(uploaded(rx)) == sorted(s.sha256 for s in seeded)
        assert rx.stats["posts"] == len(seeded)  # a warm stop leaves nothing to send twice


def test_backfill_and_verify_with_a_postgresql_ledger(new_mailbox, receiver, env, dovecot, postgres):
    alice = new_mailbox("alice")
    seeded = seed_history(dovecot, alice.user, 40, ["INBOX", "Archive"], date(2022, 1, 1), date(2023, 12, 31))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url, ledger=postgres.create_database("bf_pg"))
    code, out, err = env.cli("backfill", "--before", "2023-01-01")
    assert code == 0, out + err
    assert sorted(uploaded(receiver)) == sorted(in_window(seeded, None, date(2023, 1, 1)))
    assert env.cli("verify")[0] == 8  # 2023 is not archived yet
    assert env.cli("backfill")[0] == 0
    assert sorted(uploaded(receiver)) == sorted(s.sha256 for s in seeded)
    assert env.cli("verify")[0] == 0


def test_an_empty_folder_is_no_error(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    dovecot.create_folder(alice.user, "Empty")
    alice.deliver(message(to=alice.user, subject="one"))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    code, out, err = env.cli("backfill")
    assert code == 0 and "1 uploaded" in out, out + err
    assert env.sql("SELECT name, last_error FROM folders ORDER BY name") == [("Empty", None), ("INBOX", None)]
