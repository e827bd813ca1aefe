"""Fault injection (issue 7): the sync under broken IMAP connections, a misbehaving upload
API, SIGKILL at random points, and a ledger that cannot be written.

Real parts only: Dovecot behind a fault proxy, the receiver over HTTP, `imapsync sync`
run as a real process, SQLite on a real (size-limited or read-only) filesystem and a
read-only PostgreSQL. Faults are seeded, so a failure can be replayed; every test is
bounded in time.

Whatever the fault, each test accounts for every message: archived once (the receiver
holds exactly its bytes, once), or recorded failed/skipped with a reason, and never
lost; the ledger then passes `imapsync ledger check` (and, after the crash loop,
`imapsync verify`: the mailbox reconciled with the ledger). With IMAPSYNC_FAULT_REPORT=FILE,
each test appends one JSON line of its numbers to FILE (the table in the closing note).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import API_KEY
from mail import message

from imapsync.receiver import Receiver
from imapsync.testing.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.timeout(180)  # every test bounded in time

FAST_UPLOADS = {"max_attempts": 3, "backoff_factor": 0.01, "backoff_max": 0.05, "timeout": 10}


# ----- helpers ---------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deliver_many(mailbox, n: int, body_bytes: int, tag: str) -> dict[str, bytes]:
    """n messages of about body_bytes each; Message-ID -> raw bytes."""
    out = {}
    for i in range(n):
        msgid = f"<{tag}-{i}-{time.monotonic_ns()}@mailer.example>"
        raw = message(to=mailbox.user, subject=f"{tag} {i}", msgid=msgid,
                      body=(f"{tag} {i} " * (body_bytes // 8 + 1))[:body_bytes])
        mailbox.deliver(raw)
        out[msgid] = raw
    return out


def stored_digests(receiver: Receiver) -> Counter[str]:
    """SHA-256 of each stored upload's bytes (read from disk, not from the metadata)."""
    return Counter(sha256((receiver.store / f"{u['uploadId']}.eml").read_bytes()) for u in receiver.uploads())


def account_for(env, receiver: Receiver, raws: dict[str, bytes], sql=None) -> dict:
    """Where every delivered message ended: archived (and how many extra copies), failed or
    skipped with a reason, or lost. Also: copies the ledger calls uploaded that the
    receiver does not hold (must be none: 'uploaded' only after the acknowledgement)."""
    stored = stored_digests(receiver)
    not_archived = {p["message_id"]: p for p in env.status()["not_archived"]}
    out = {"archived": 0, "duplicates": 0, "failed_with_reason": 0, "lost": 0, "reasons": Counter()}
    for msgid, raw in raws.items():
        copies = stored[sha256(raw)]
        problem = not_archived.get(msgid)
        if copies:
            out["archived"] += 1
            out["duplicates"] += copies - 1
        elif problem and problem["state"] in ("failed", "skipped") and problem["reason"]:
            out["failed_with_reason"] += 1
            out["reasons"][problem["reason"]] += 1
        else:
            out["lost"] += 1
    marked = {r[0] for r in (sql or env.sql)("SELECT message_id FROM messages WHERE state = 'uploaded'")}
    out["uploaded_but_not_stored"] = sum(1 for m in marked if m in raws and not stored[sha256(raws[m])])
    out["reasons"] = dict(out["reasons"])
    return out


def assert_ledger_consistent(env) -> None:
    code, out, err = env.cli("ledger", "check")
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith("ledger consistent"), out


def report(fault: str, **numbers) -> None:
    """One JSON line for the closing note's table, when IMAPSYNC_FAULT_REPORT names a file."""
    path = os.environ.get("IMAPSYNC_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": fault, **numbers}, default=str) + "\n")


# ----- IMAP connection faults (a proxy between imapsync and Dovecot) ------------------------

PROXY_FAULTS = {
    Fault.CUT: {"cut_after": 60_000},  # mid-FETCH, inside a body literal
    Fault.STALL: {"stall_after": 60_000},  # no byte for longer than the 1 s timeout
    Fault.TRUNCATE: {"truncate_literal": 10_000},  # a body literal announced as {N}, N/2 bytes, EOF
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("connections", [1, 4], ids=["bodies-inline", "bodies-prefetched"])
@pytest.mark.parametrize("fault", list(PROXY_FAULTS), ids=[f.value for f in PROXY_FAULTS])
def test_imap_fault_on_two_connections_then_every_message_archived_once(fault, connections, new_mailbox, receiver,
                                                                        env, dovecot):
    """Two faults, on the first two connections that carry message bodies: with one connection
    per account that is the only one (and its replacement); with four, the body fetchers.
    24 messages of 20 KB: enough that the pass after the first fault still carries over 60 KB
    on some connection (with 12, the second fault came only when two body fetchers reached
    60 KB before the first one's fault ended the pass: a race)."""
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 24, 20_000, f"proxy-{fault.value}-{connections}")
    with FaultProxy(dovecot.host, dovecot.port, faults=2, **PROXY_FAULTS[fault]) as proxy:
        env.write([env.account(alice, port=proxy.port, timeout=1)], endpoint=receiver.url, upload=FAST_UPLOADS,
                  fetch={"reconnect_backoff": 0.05, "batch_bytes": 50_000, "connections": connections})
        code, out, err = env.sync()
        injected = list(proxy.injected)
    assert [i.kind for i in injected] == [fault, fault], f"{injected}\n{out}\n{err}"
    assert code == 0, out + err
    assert 1 <= err.count("reconnecting") <= 2, err  # two faults in one pass cost one reconnect
    result = account_for(env, receiver, raws)
    report(f"imap {fault.value} x2, {connections} connection(s)", messages=len(raws), **result)
    assert result == {"archived": len(raws), "duplicates": 0, "failed_with_reason": 0, "lost": 0, "reasons": {},
                      "uploaded_but_not_stored": 0}
    assert env.status()["accounts"][0]["counts"]["uploaded"] == len(raws)
    assert_ledger_consistent(env)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed, connections", [(7, 1), (1234, 4), (99991, 4)])
def test_random_imap_faults_from_a_seed_then_every_message_archived_once(seed, connections, new_mailbox, receiver,
                                                                         env, dovecot):
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 20, 15_000, f"random-{seed}")
    with FaultProxy(dovecot.host, dovecot.port, seed=seed, random_faults=6, max_offset=320_000) as proxy:
        env.write([env.account(alice, port=proxy.port, timeout=1)], endpoint=receiver.url, upload=FAST_UPLOADS,
                  fetch={"reconnect_backoff": 0.05, "batch_bytes": 60_000, "reconnects": 10,
                         "connections": connections})
        code, out, err = env.sync()
        injected = list(proxy.injected)
    assert code == 0, f"seed {seed}, faults {injected}: {out}{err}"
    result = account_for(env, receiver, raws)
    report(f"imap random seed={seed}, {connections} connection(s)", messages=len(raws),
           injected=[f"{i.kind.value}@{i.offset}" for i in injected], reconnects=err.count("reconnecting"), **result)
    assert result["archived"] == 20 and result["duplicates"] == 0 and result["lost"] == 0, (seed, injected, result)
    assert result["uploaded_but_not_stored"] == 0
    assert_ledger_consistent(env)


def test_the_proxy_truncates_a_literal_announced_as_n_to_n_over_2_bytes_then_eof(new_mailbox, dovecot):
    """The fault itself, seen by a raw IMAP client: {N}, then N/2 bytes, then end of file."""
    import re
    import socket

    alice = new_mailbox("alice")
    raw = message(to=alice.user, body="t" * 30_000)
    alice.deliver(raw)
    with FaultProxy(dovecot.host, dovecot.port, truncate_literal=10_000) as proxy, \
            socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        s.sendall(f'a LOGIN "{alice.user}" "{alice.password}"\r\nb EXAMINE INBOX\r\n'
                  "c UID FETCH 1 BODY.PEEK[]\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    m = re.search(rb"BODY\[\] \{(\d+)\}\r\n", data)
    assert m and int(m.group(1)) == len(raw)
    assert data[m.end():] == raw[:len(raw) // 2]
    assert [(i.connection, i.kind) for i in proxy.injected] == [(1, Fault.TRUNCATE)]


# ----- upload API faults (the receiver answers badly) --------------------------------------

POST_MIX = {"ok": 10, 500: 2, 429: 2, "drop": 1, "expire": 1, "lost": 1, "slow": 1}
PUT_MIX = {"ok": 10, 500: 2, "drop": 1, "lost": 1, "slow": 1}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [3, 2026])
def test_upload_api_faults_every_message_uploaded_once_or_failed_with_reason(seed, new_mailbox, env, tmp_path):
    """500s, 429s, dropped connections, slow answers (longer than the client's timeout),
    expired upload slots and lost acknowledgements, in a seeded random order."""
    rng = random.Random(seed)
    posts = rng.choices(list(POST_MIX), weights=list(POST_MIX.values()), k=120)
    puts = rng.choices(list(PUT_MIX), weights=list(PUT_MIX.values()), k=100)
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 40, 2_000, f"api-{seed}")
    with Receiver(tmp_path / "receiver", api_key=API_KEY, retry_after=0, slow_ms=1500) as receiver:
        receiver.script(*posts)
        receiver.script_put(*puts)
        env.write([env.account(alice)], endpoint=receiver.url,
                  upload={**FAST_UPLOADS, "concurrency": 4, "timeout": 1})
        passes = []
        for _ in range(4):  # a tenant closed by dropped connections leaves its messages pending for the next pass
            code, out, err = env.sync()
            passes.append(code)
            assert code in (0, 5), out + err
            assert "Traceback" not in err, err
            if ", 0 pending" in out:
                break
        stats = receiver.stats
        result = account_for(env, receiver, raws)
        assert_ledger_consistent(env)
    consumed = Counter(str(a) for a in posts[:stats["posts"]]) + Counter(f"put {a}" for a in puts[:stats["puts"]])
    report(f"upload API mix seed={seed}", messages=len(raws), passes=len(passes),
           injected={k: v for k, v in sorted(consumed.items()) if "ok" not in k},
           requests=stats["posts"] + stats["puts"], **result)
    assert env.status()["accounts"][0]["counts"]["pending"] == 0
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["uploaded_but_not_stored"] == 0, result
    assert result["archived"] + result["failed_with_reason"] == len(raws)
    assert consumed["drop"] and consumed["expire"] and consumed["slow"] and consumed["put lost"], consumed


def test_a_connection_dropped_after_server_errors_fails_that_message_and_not_the_tenant(new_mailbox, receiver,
                                                                                        env):
    """The endpoint answered (500, 500) and then dropped the connection: it is up, so the
    message fails with its reason and the other messages go on; it used to be taken for
    'cannot reach the endpoint', closing the tenant and leaving everything pending.
    (The first drop is on a kept-alive connection, which libcurl sends again once on a new
    one; the second drop is the third attempt's answer.)"""
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 5, 500, "drop-last")
    receiver.script(500, 500, "drop", "drop")
    env.write([env.account(alice)], endpoint=receiver.url, upload={**FAST_UPLOADS, "concurrency": 1})
    code, out, err = env.sync()
    assert code == 5, out + err
    assert "4 uploaded, 0 duplicate, 0 skipped, 1 failed, 0 pending" in out, out
    assert "cannot reach" not in out + err
    assert [p["reason"] for p in env.status()["not_archived"]] == ["connection_lost"]
    result = account_for(env, receiver, raws)
    report("upload API 500, 500, then a dropped connection", messages=len(raws), **result)
    assert (result["archived"], result["failed_with_reason"], result["lost"]) == (4, 1, 0)


# ----- crash loops: SIGKILL at random points, then completion ---------------------------------

def _sync_process(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imapsync", "sync", "--config", str(env.path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.timeout(300)
def test_sigkill_at_random_points_20_times_then_the_archive_is_complete_and_consistent(new_mailbox, env, tmp_path):
    rng = random.Random(20261122)
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 60, 3_000, "crash-start")
    kills: list[dict] = []
    with Receiver(tmp_path / "receiver", api_key=API_KEY, latency_ms=40) as receiver:
        env.write([env.account(alice)], endpoint=receiver.url, upload={**FAST_UPLOADS, "concurrency": 4},
                  fetch={"batch_messages": 10})
        for attempt in range(60):
            if len(kills) == 20:
                break
            raws.update(deliver_many(alice, 4, 3_000, f"crash-{attempt}"))  # mail keeps arriving
            proc = _sync_process(env)
            try:
                puts = receiver.stats["puts"]
                if rng.random() < 0.5:  # at a random time: start-up, login, planning, uploading
                    delay = rng.uniform(0.05, 1.5)
                    when = f"after {delay:.2f}s"
                    try:
                        proc.wait(timeout=delay)  # the kill point (returns early if the pass ends first)
                    except subprocess.TimeoutExpired:
                        pass
                else:  # after a random number of uploads: certainly mid-pass, uploads in flight
                    n = rng.randint(1, 8)
                    when = f"after {n} PUTs"
                    _wait_for(lambda: receiver.stats["puts"] >= puts + n or proc.poll() is not None, 30)
                if proc.poll() is None:
                    in_flight = receiver.stats["in_flight"]
                    proc.send_signal(signal.SIGKILL)
                    kills.append({"when": when, "in_flight": in_flight})
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)
        assert len(kills) == 20, kills
        code, out, err = env.sync()
        assert code == 0, out + err
        assert "0 failed, 0 pending" in out, out
        result = account_for(env, receiver, raws)
        stats = receiver.stats
        assert_ledger_consistent(env)
        data = env.status()
        code, out, err = env.cli("verify")  # the mailbox against the ledger: every message accounted for
        assert code == 0, out + err
    report("SIGKILL x20 then completion", messages=len(raws), kills=len(kills),
           kills_with_uploads_in_flight=sum(1 for k in kills if k["in_flight"]),
           requests_resent_after_kills=stats["posts"] - len(raws), **result)
    assert result == {"archived": len(raws), "duplicates": 0, "failed_with_reason": 0, "lost": 0, "reasons": {},
                      "uploaded_but_not_stored": 0}
    assert data["accounts"][0]["counts"]["uploaded"] == len(raws)
    assert data["not_archived"] == []
    assert any(k["in_flight"] for k in kills), "no kill landed while an upload was in flight"


def test_a_kill_in_the_middle_of_creating_the_ledger_leaves_it_usable(new_mailbox, receiver, env):
    """SQLite runs DDL outside transactions unless told otherwise: a crash mid-migration
    used to leave half a schema ('table accounts already exists' for ever after)."""
    alice = new_mailbox("alice")
    raws = deliver_many(alice, 3, 500, "mid-migration")
    env.write([env.account(alice)], endpoint=receiver.url, upload=FAST_UPLOADS)
    ledger_file = env.root / "imapsync.sqlite3"
    killer = (
        "import os, signal, sys, sqlalchemy as sa\n"
        "from sqlalchemy import event\n"
        "from imapsync import ledger\n"
        "real, created = sa.create_engine, []\n"
        "def create_engine(*a, **k):\n"
        "    engine = real(*a, **k)\n"
        "    @event.listens_for(engine, 'after_cursor_execute')\n"
        "    def kill(conn, cursor, statement, *rest):\n"
        "        if statement.lstrip().upper().startswith('CREATE TABLE'):\n"
        "            created.append(statement)\n"
        "            if len(created) == 3:\n"
        "                os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return engine\n"
        "ledger.sa.create_engine = create_engine\n"
        "ledger.Ledger.open(sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", killer, f"sqlite:///{ledger_file}"], timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    code, out, err = env.sync()
    assert code == 0, out + err
    assert len(receiver.uploads()) == len(raws)
    report("SIGKILL while the ledger is being created", messages=len(raws), **account_for(env, receiver, raws))
    assert_ledger_consistent(env)


# ----- the ledger cannot be written: disk full, read-only ------------------------------------

@pytest.fixture
def small_fs():
    """A tmpfs of fixed size (needs root); unmounted afterwards, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    path = Path(tempfile.mkdtemp(prefix="imapsync-smallfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
        path.rmdir()


def _fill(fs: Path, leave: int) -> Path:
    """Fill the filesystem up to `leave` bytes free; returns the filler file."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass
    return filler


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.timeout(180)
def test_ledger_disk_full_mid_pass_is_a_clear_error_and_nothing_is_marked_done_that_was_not(
        small_fs, new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    # One upload at a time (two queued): answers are recorded as the pass goes, so the disk
    # fills after some of them, whatever the speed of the uploads against the fetching.
    env.write([env.account(alice)], endpoint=receiver.url, upload={**FAST_UPLOADS, "concurrency": 1},
              fetch={"batch_messages": 5}, ledger=str(small_fs / "imapsync.sqlite3"))
    assert env.sync()[0] == 0  # the ledger exists, with its schema
    raws = deliver_many(alice, 150, 1_000, "disk-full")
    filler = _fill(small_fs, leave=400 * 1024)
    code, out, err = env.sync()
    line = _one_error_line(err)
    assert code == 1, out + err
    assert "ledger" in line and "full" in line, line
    uploads_before = len(receiver.uploads())
    stored = stored_digests(receiver)
    marked = env_sql(small_fs, "SELECT message_id FROM messages WHERE state = 'uploaded'")
    assert all(stored[sha256(raws[m])] == 1 for (m,) in marked), "uploaded in the ledger but not in the archive"
    assert 0 < len(marked) < len(raws), "the disk must fill up mid-pass, after some messages were recorded"

    filler.unlink()
    code, out, err = env.sync()
    assert code == 0, out + err
    result = account_for(env, receiver, raws, sql=lambda q: env_sql(small_fs, q))
    report("ledger disk full mid-pass, then space freed", messages=len(raws),
           marked_uploaded_when_full=len(marked), stored_when_full=uploads_before, **result)
    assert result == {"archived": len(raws), "duplicates": 0, "failed_with_reason": 0, "lost": 0, "reasons": {},
                      "uploaded_but_not_stored": 0}
    assert_ledger_consistent(env)


@pytest.mark.timeout(120)
def test_ledger_on_a_read_only_filesystem_is_a_clear_error_and_nothing_is_uploaded(small_fs, new_mailbox,
                                                                                  receiver, env):
    alice = new_mailbox("alice")
    env.write([env.account(alice)], endpoint=receiver.url, upload=FAST_UPLOADS,
              ledger=str(small_fs / "imapsync.sqlite3"))
    first = deliver_many(alice, 3, 500, "before-ro")
    assert env.sync()[0] == 0
    later = deliver_many(alice, 3, 500, "while-ro")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True, timeout=30)
    try:
        code, out, err = env.sync()
        line = _one_error_line(err)
        assert code == 1, out + err
        assert "ledger" in line and ("read" in line or "open" in line), line
        assert len(receiver.uploads()) == len(first)  # nothing sent that could not be recorded
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True, timeout=30)
    code, out, err = env.sync()
    assert code == 0 and "3 uploaded" in out, out + err
    result = account_for(env, receiver, {**first, **later}, sql=lambda q: env_sql(small_fs, q))
    report("ledger read-only (SQLite on a read-only filesystem)", messages=len(first) + len(later), **result)
    assert result["archived"] == 6 and result["duplicates"] == 0 and result["lost"] == 0
    assert_ledger_consistent(env)


@pytest.mark.timeout(120)
def test_read_only_postgresql_ledger_is_a_clear_error_and_nothing_is_uploaded(postgres, new_mailbox, receiver, env):
    import psycopg

    alice = new_mailbox("alice")
    url = postgres.create_database("readonly_ledger")
    env.write([env.account(alice)], endpoint=receiver.url, upload=FAST_UPLOADS, ledger=url)
    first = deliver_many(alice, 2, 500, "pg-before-ro")
    assert env.sync()[0] == 0
    later = deliver_many(alice, 2, 500, "pg-while-ro")
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="postgres",
                         autocommit=True) as admin:
        admin.execute("ALTER DATABASE readonly_ledger SET default_transaction_read_only = on")
        try:
            code, out, err = env.sync()
            line = _one_error_line(err)
            assert code == 1, out + err
            assert "read-only transaction" in line, line
            assert len(receiver.uploads()) == len(first)
        finally:
            admin.execute("ALTER DATABASE readonly_ledger RESET default_transaction_read_only")
    code, out, err = env.sync()
    assert code == 0 and "2 uploaded" in out, out + err
    def pg_sql(query: str) -> list[tuple]:
        with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="readonly_ledger") as c:
            return c.execute(query).fetchall()

    result = account_for(env, receiver, {**first, **later}, sql=pg_sql)
    report("ledger read-only (PostgreSQL default_transaction_read_only)", messages=len(first) + len(later), **result)
    assert result["archived"] == 4 and result["duplicates"] == 0 and result["lost"] == 0
    code, out, err = env.cli("ledger", "check")
    assert code == 0, out + err


def env_sql(fs: Path, query: str) -> list[tuple]:
    """Read the ledger on the small filesystem (read-only: it may be full)."""
    import sqlite3

    with sqlite3.connect(f"file:{fs / 'imapsync.sqlite3'}?mode=ro", uri=True) as c:
        return c.execute(query).fetchall()
