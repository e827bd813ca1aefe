"""`imapsync run` as a real process against Dovecot and the receiver over HTTP (issue:
continuous archiving). Every wait polls a condition with a deadline; timings printed
with -s are the measured numbers."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from conftest import API_KEY
from daemon_proc import DaemonProcess, wait_for
from mail import message
from prometheus_client.parser import text_string_to_metric_families

from imapsync.receiver import Receiver
from imapsync.testing.dovecot import Dovecot
from imapsync.testing.imap_proxy import CommandRecorder

#: Schedule settings that make a test fast: no jitter, short backoff, a bounded warm stop.
FAST = {"jitter": 0, "backoff_initial": "0.5s", "backoff_max": "2s", "stop_timeout": "20s"}
#: A dropped IMAP connection is retried once within a pass, quickly; then the daemon backs off.
QUICK_RECONNECT = {"reconnects": 1, "reconnect_backoff": 0.2}


def subjects(receiver: Receiver) -> Counter:
    """How many times each Subject reached the receiver (stored uploads)."""
    out: Counter = Counter()
    for up in receiver.uploads():
        raw = (receiver.store / f"{up['uploadId']}.eml").read_bytes()
        out[next(line[9:].decode() for line in raw.split(b"\r\n") if line.startswith(b"Subject: "))] += 1
    return out


def finished_runs(env, account: str) -> int:
    try:
        return env.sql("SELECT count(*) FROM runs WHERE account = ? AND ended_at IS NOT NULL", account)[0][0]
    except sqlite3.OperationalError:  # the daemon has not created its ledger yet
        return 0


def account_status(env, name: str) -> dict:
    """The account's entry in `imapsync status --json` ({} before its first pass)."""
    return next((a for a in env.status()["accounts"] if a["account"] == name), {})


# ----- Must be shown: new mail within one poll interval, and within 3 s with IDLE -------------

def test_new_mail_is_uploaded_within_one_poll_interval(new_mailbox, receiver, env):
    every = 1.5
    alice = new_mailbox("alice")
    env.write([env.account(alice, schedule={"every": f"{every}s"})], endpoint=receiver.url, schedule=FAST)
    with DaemonProcess(env.path) as daemon:
        wait_for(lambda: finished_runs(env, alice.user.split("@")[0]) >= 1, 20, "the first pass")
        delays = []
        for i in range(3):
            alice.deliver(message(to=alice.user, subject=f"polled {i}"))
            t0 = time.monotonic()
            wait_for(lambda: subjects(receiver)[f"polled {i}"] == 1, 10, f"message {i} uploaded")
            delays.append(time.monotonic() - t0)
        print(f"poll every {every}s: delivered -> uploaded in {', '.join(f'{d:.2f}s' for d in delays)}")
        assert max(delays) <= every + 0.5  # one interval, plus the pass itself
        assert daemon.alive()
    assert daemon.proc.returncode == 0
    assert sorted(subjects(receiver).values()) == [1, 1, 1]


def test_idle_uploads_new_mail_within_3_seconds_and_renews_idle(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        # Polling once an hour: only IDLE can bring the mail in within seconds.
        env.write([env.account(alice, port=proxy.port, schedule={"every": "1h", "idle": True})],
                  endpoint=receiver.url, schedule={**FAST, "idle_renew": "1s"})
        with DaemonProcess(env.path) as daemon:
            daemon.wait_log("folder INBOX: watching for new mail (IDLE)")
            wait_for(lambda: finished_runs(env, alice.user.split("@")[0]) >= 1, 20, "the first pass")
            wait_for(lambda: proxy.commands.count("IDLE") >= 3, 10, "IDLE renewed twice")  # re-IDLE works
            delays = []
            for i in range(3):
                alice.deliver(message(to=alice.user, subject=f"pushed {i}"))
                t0 = time.monotonic()
                wait_for(lambda: subjects(receiver)[f"pushed {i}"] == 1, 10, f"message {i} uploaded")
                delays.append(time.monotonic() - t0)
            print(f"IDLE: delivered -> uploaded in {', '.join(f'{d:.2f}s' for d in delays)}")
            assert max(delays) <= 3.0
    assert not set(proxy.commands) & {"SELECT", "STORE", "UID STORE", "EXPUNGE", "MOVE", "COPY"}  # read-only
    assert "EXAMINE" in proxy.commands


# ----- Must be shown: the receiver goes away for a while ------------------------------------

def test_receiver_down_for_a_while_nothing_lost_or_doubled(new_mailbox, env, tmp_path):
    alice = new_mailbox("alice")
    store = tmp_path / "store"
    first = Receiver(store, api_key=API_KEY).start()
    port = first._address[1]  # the second receiver comes back where the first one was
    env.write([env.account(alice, schedule={"every": "1s"})], endpoint=first.url, schedule=FAST)
    for i in range(2):
        alice.deliver(message(to=alice.user, subject=f"before {i}"))
    with DaemonProcess(env.path) as daemon:
        wait_for(lambda: len(first.uploads()) == 2, 20, "the first two uploads")
        first.stop()
        for i in range(3):
            alice.deliver(message(to=alice.user, subject=f"during {i}"))
        # The daemon tries, keeps the three pending, and keeps running.
        wait_for(lambda: env.sql("SELECT count(*) FROM sightings WHERE state = 'pending'")[0][0] == 3, 20,
                 "three copies pending while the receiver is down")
        runs_when_down = finished_runs(env, alice.user.split("@")[0])
        wait_for(lambda: finished_runs(env, alice.user.split("@")[0]) >= runs_when_down + 2, 10,
                 "two more passes with the receiver down")
        assert daemon.alive()
        assert "uploads stopped for this pass" in daemon.log
        with Receiver(store, api_key=API_KEY, port=port) as back:
            t0 = time.monotonic()
            wait_for(lambda: len(back.uploads()) == 5, 20, "the pending uploads after the receiver came back")
            print(f"receiver back -> 3 pending uploaded in {time.monotonic() - t0:.2f}s")
            got = subjects(back)
            assert got == Counter({s: 1 for s in ("before 0", "before 1", "during 0", "during 1", "during 2")})
            wait_for(lambda: env.sql("SELECT state, count(*) FROM sightings GROUP BY state") == [("uploaded", 5)],
                     10, "the ledger to record the five uploads")
            assert back.stats["posts"] == 3  # each pending message asked once, none of the others again
    assert daemon.proc.returncode == 0


# ----- Must be shown: Dovecot stops and comes back ---------------------------------------------

def test_dovecot_stopped_and_restarted_daemon_reconnects_and_status_shows_the_error(receiver, env):
    root = Path(tempfile.mkdtemp(prefix="imapsync-dovecot-", dir="/tmp"))
    root.chmod(0o755)
    server = Dovecot(root).start()
    again: Dovecot | None = None
    try:
        user = "dora@acme.com"
        server.add_user(user, "dora-secret-pw")
        env.monkeypatch.setenv("DORA_PW", "dora-secret-pw")
        account = {"name": "dora", "host": "127.0.0.1", "port": server.port, "tls": "plain", "username": user,
                   "password": {"env": "DORA_PW"}, "schedule": {"every": "1s"}}
        env.write([account], endpoint=receiver.url, schedule=FAST, fetch=QUICK_RECONNECT)
        server.deliver(user, message(to=user, subject="first"))
        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: subjects(receiver)["first"] == 1, 20, "the first upload")
            ports = (server.port, server.ssl_port)
            server.stop()
            t0 = time.monotonic()
            down = wait_for(lambda: (s := account_status(env, "dora")).get("last_error") and s["backoff_until"] and s,
                            45, "status to show the connection error")
            print(f"Dovecot down -> status shows the error in {time.monotonic() - t0:.2f}s: {down['last_error']}")
            assert "unreachable" in down["last_error"] and "refused" in down["last_error"].lower()
            assert down["failures"] >= 1
            assert daemon.alive()
            again = Dovecot(root).start(ports=ports)
            again.deliver(user, message(to=user, subject="second"))
            t0 = time.monotonic()
            wait_for(lambda: subjects(receiver)["second"] == 1, 20, "the upload after Dovecot came back")
            print(f"Dovecot back -> new mail uploaded in {time.monotonic() - t0:.2f}s")
            up = wait_for(lambda: (s := account_status(env, "dora"))["last_error"] is None and s, 30,
                          "status to clear the error")
            assert up["failures"] == 0 and up["backoff_until"] is None
            assert "working again" in daemon.log
        assert daemon.proc.returncode == 0
        assert subjects(receiver) == Counter({"first": 1, "second": 1})
    finally:
        for s in (server, again):
            if s is not None:
                s.stop()
        shutil.rmtree(root, ignore_errors=True)


# ----- Must be shown: SIGTERM during uploads ---------------------------------------------------

def test_sigterm_during_uploads_is_a_warm_stop_and_the_next_start_finishes_without_duplicates(
        new_mailbox, env, tmp_path):
    n = 24
    alice = new_mailbox("alice")
    for i in range(n):
        alice.deliver(message(to=alice.user, subject=f"m{i}"))
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=150) as slow:
        env.write([env.account(alice, schedule={"every": "1s"})], endpoint=slow.url,
                  schedule={**FAST, "stop_timeout": "10s"}, fetch={"batch_messages": 4},
                  upload={"concurrency": 2, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10})
        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: 2 <= len(slow.uploads()), 30, "uploads under way")
            t0 = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(timeout=15)
            took = time.monotonic() - t0
        print(f"SIGTERM -> exit {code} in {took:.2f}s with {len(slow.uploads())}/{n} uploaded")
        assert code == 0 and took < 10
        assert "stopped (warm)" in daemon.log
        # Consistent: what the ledger calls uploaded is exactly what the receiver acknowledged.
        acknowledged = {u["uploadId"] for u in slow.uploads()}
        assert 0 < len(acknowledged) < n
        assert {r[0] for r in env.sql("SELECT upload_id FROM messages WHERE state = 'uploaded'")} == acknowledged
        assert env.sql("SELECT count(*) FROM messages WHERE state = 'pending'")[0][0] == 0  # nothing left in flight
        assert env.sql("SELECT outcome FROM runs ORDER BY id DESC LIMIT 1") == [("stopped",)]
        posts_before = slow.stats["posts"]

        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: len(slow.uploads()) == n, 60, "the rest uploaded by the next start")
        assert daemon.proc.returncode == 0
        assert subjects(slow) == Counter({f"m{i}": 1 for i in range(n)})
        # Each message was asked for exactly once: none acknowledged before the stop was sent again.
        assert posts_before == len(acknowledged) and slow.stats["posts"] == n


def test_second_signal_stops_cold_and_nothing_is_lost(new_mailbox, env, tmp_path):
    n = 12
    alice = new_mailbox("alice")
    for i in range(n):
        alice.deliver(message(to=alice.user, subject=f"c{i}"))
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=1000) as slow:
        env.write([env.account(alice, schedule={"every": "1s"})], endpoint=slow.url, schedule=FAST,
                  fetch={"batch_messages": 12},
                  upload={"concurrency": 2, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10})
        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: slow.stats["in_flight"] >= 1, 30, "uploads in flight")
            daemon.signal(signal.SIGTERM)
            daemon.wait_log("warm stop")
            t0 = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(timeout=10)
            print(f"second SIGTERM -> exit {code} in {time.monotonic() - t0:.2f}s")
        assert code == 128 + signal.SIGTERM
        assert "stopping at once (cold stop)" in daemon.log
        assert len(slow.uploads()) < n
        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: len(slow.uploads()) == n, 60, "everything uploaded by the next start")
        assert subjects(slow) == Counter({f"c{i}": 1 for i in range(n)})  # stored once each


# ----- Must be shown: /metrics and /healthz -----------------------------------------------------

def test_metrics_parse_as_prometheus_text_and_count_what_the_receiver_received(new_mailbox, receiver, env):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"a{i}"))
    bob.deliver(message(to=bob.user, subject="b0", body="x" * 5000))
    raw = message(to=alice.user, subject="twice", msgid="<twice@mailer.example>")
    alice.deliver(raw)
    alice.deliver(raw, "Archive")  # a duplicate: counted, not uploaded
    env.write([env.account(alice, schedule={"every": "1s"}), env.account(bob, schedule={"every": "1s"})],
              endpoint=receiver.url, schedule=FAST)
    with DaemonProcess(env.path, http=True) as daemon:
        wait_for(lambda: len(receiver.uploads()) == 5, 20, "five uploads")
        alice.deliver(message(to=alice.user, subject="later"))
        wait_for(lambda: len(receiver.uploads()) == 6, 20, "the later upload")

        def samples() -> dict:
            code, ctype, body = daemon.get("/metrics")
            assert code == 200 and ctype.startswith("text/plain")
            out: dict = {}
            for family in text_string_to_metric_families(body):  # raises if it is not Prometheus text
                for s in family.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            return out

        def total(values: dict, name: str, **labels) -> float:
            return sum(v for (n, ls), v in values.items()
                       if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))

        received_bytes = sum((receiver.store / f"{u['uploadId']}.eml").stat().st_size for u in receiver.uploads())
        m = wait_for(lambda: (v := samples()) and total(v, "imapsync_messages_total", state="uploaded") == 6 and v,
                     10, "the metrics to count six uploads")
        assert total(m, "imapsync_messages_total", state="duplicate") == 1
        assert total(m, "imapsync_uploaded_bytes_total") == received_bytes
        assert total(m, "imapsync_upload_duration_seconds_count", outcome="uploaded") == len(receiver.uploads())
        assert total(m, "imapsync_messages_total", account=bob.user.split("@")[0], state="uploaded") == 1
        assert total(m, "imapsync_last_success_timestamp_seconds", account=bob.user.split("@")[0]) > time.time() - 60
        assert total(m, "imapsync_errors_total") == 0
        print(f"/metrics: 6 uploads, {received_bytes} bytes, histogram sum "
              f"{total(m, 'imapsync_upload_duration_seconds_sum'):.3f}s")

        code, status = daemon.get_json("/status")
        assert code == 200
        cli = env.status()
        for data in (status, cli):  # the same JSON as `imapsync status --json`
            for a in data["accounts"]:
                a.pop("folders"), a.pop("last_run"), a.pop("last_success_at")
        assert status == cli


def test_healthz_turns_unhealthy_when_the_ledger_cannot_be_written(new_mailbox, receiver, env, postgres):
    """The ledger is PostgreSQL: as root, chmod does not stop SQLite writes, but a database set to
    default_transaction_read_only (and its sessions ended, so the new ones get it) refuses
    every write for real."""
    name = f"healthz{time.monotonic_ns()}"
    url = postgres.create_database(name)
    admin = f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    alice = new_mailbox("alice")
    env.write([env.account(alice, schedule={"every": "1s"})], endpoint=receiver.url, schedule=FAST, ledger=url)

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    with DaemonProcess(env.path, http=True) as daemon:
        assert daemon.get_json("/healthz") == (200, {"status": "ok", "checks": {"scheduler": "ok", "ledger": "ok"}})
        read_only(True)
        t0 = time.monotonic()
        code, health = wait_for(lambda: (r := daemon.get_json("/healthz"))[0] == 503 and r, 10, "/healthz to fail")
        print(f"ledger read-only -> /healthz 503 in {time.monotonic() - t0:.2f}s: {health}")
        assert health["status"] == "unhealthy" and health["checks"]["scheduler"] == "ok"
        assert "read-only" in health["checks"]["ledger"]
        alice.deliver(message(to=alice.user, subject="while read-only"))
        daemon.wait_log("read-only transaction")  # passes fail on the ledger; the daemon lives on
        assert daemon.alive()
        read_only(False)
        wait_for(lambda: daemon.get_json("/healthz")[0] == 200, 10, "/healthz to recover")
        wait_for(lambda: subjects(receiver)["while read-only"] == 1, 20, "the upload once writable again")
    assert daemon.proc.returncode == 0


# ----- Must be shown: one wrong password among three accounts -----------------------------------

def test_wrong_password_among_three_accounts_the_other_two_keep_archiving_on_schedule(new_mailbox, receiver, env):
    alice, bob, carol = new_mailbox("alice"), new_mailbox("bob"), new_mailbox("carol")
    wrong = env.account(bob, schedule={"every": "1s"})
    env.monkeypatch.setenv(wrong["password"]["env"], "not-the-password")
    env.write([env.account(alice, schedule={"every": "1s"}), wrong, env.account(carol, schedule={"every": "1s"})],
              endpoint=receiver.url, schedule=FAST)
    bad = bob.user.split("@")[0]
    with DaemonProcess(env.path, log_format="json") as daemon:
        wait_for(lambda: all(finished_runs(env, b.user.split("@")[0]) >= 1 for b in (alice, carol)), 20,
                 "the first passes of the good accounts")
        delays = []
        for i in range(3):
            alice.deliver(message(to=alice.user, subject=f"alice {i}"))
            carol.deliver(message(to=carol.user, subject=f"carol {i}"))
            bob.deliver(message(to=bob.user, subject=f"bob {i}"))
            t0 = time.monotonic()
            wait_for(lambda: subjects(receiver)[f"alice {i}"] == subjects(receiver)[f"carol {i}"] == 1, 10,
                     f"round {i} of the good accounts")
            delays.append(time.monotonic() - t0)
        print(f"good accounts beside a bad one: delivered -> uploaded in {', '.join(f'{d:.2f}s' for d in delays)}")
        assert max(delays) <= 1.0 + 1.5  # their interval, plus a pass (a failed login costs Dovecot 0.5 s)
        st = account_status(env, bad)
        assert st["last_error"] == "auth_failed: login refused: wrong username or password"
        assert st["failures"] >= 1 and st["backoff_until"]
        assert daemon.alive()
    assert not any(s.startswith("bob") for s in subjects(receiver))
    lines = [json.loads(line) for line in daemon.log.splitlines() if line.strip()]  # every line is JSON
    assert any(r.get("account") == bad and "backing off" in r["message"] for r in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    for secret in (alice.password, bob.password, carol.password, "not-the-password", API_KEY):
        assert secret not in daemon.log


# ----- more of the issue: throttling, reload, leases, caps, --http ----------------------------

class ThrottlingImapServer:
    """A real IMAP listener that answers every LOGIN as Microsoft 365 does when it throttles."""

    ANSWER = b"NO [UNAVAILABLE] Request is throttled. Suggested Backoff Time: 120000 milliseconds"

    def __init__(self):
        import socket
        import threading

        self.logins = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn) -> None:
        with conn, conn.makefile("rb") as rf:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 IDLE] throttling test server ready\r\n")
            for line in rf:
                tag, _, rest = line.decode().strip().partition(" ")
                command = rest.split(" ")[0].upper()
                if command == "CAPABILITY":
                    conn.sendall(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag.encode() + b" OK done\r\n")
                elif command == "LOGIN":
                    self.logins += 1
                    conn.sendall(tag.encode() + b" " + self.ANSWER + b"\r\n")
                elif command == "LOGOUT":
                    conn.sendall(b"* BYE bye\r\n" + tag.encode() + b" OK done\r\n")
                    return
                else:
                    conn.sendall(tag.encode() + b" BAD unknown\r\n")

    def close(self) -> None:
        self._sock.close()


def test_a_throttling_server_is_left_alone_as_long_as_it_asks(new_mailbox, receiver, env):
    server = ThrottlingImapServer()
    try:
        alice = new_mailbox("alice")
        throttled = env.account(alice, name="throttled", port=server.port, schedule={"every": "1s"})
        env.write([throttled, env.account(alice, name="steady", schedule={"every": "1s"})], endpoint=receiver.url,
                  schedule={**FAST, "backoff_initial": "1s"})
        with DaemonProcess(env.path) as daemon:
            st = wait_for(lambda: (s := account_status(env, "throttled")).get("backoff_until") and s, 45,
                          "status to show the throttled account's backoff")
            assert st["last_error"].startswith("throttled:") and "Suggested Backoff Time" in st["last_error"]
            from datetime import datetime
            wait = datetime.fromisoformat(st["backoff_until"]) - datetime.fromisoformat(st["last_error_at"])
            assert 119 <= wait.total_seconds() <= 121  # the server's 120 s, not our 1 s backoff
            runs = finished_runs(env, "steady")
            wait_for(lambda: finished_runs(env, "steady") >= runs + 3, 30, "three more passes of the other account")
            assert server.logins == 1  # not asked again while it said to wait
            assert daemon.alive()
    finally:
        server.close()


def test_sighup_reloads_the_config_without_dropping_work_in_flight(new_mailbox, env, tmp_path):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    n = 10
    for i in range(n):
        alice.deliver(message(to=alice.user, subject=f"a{i}"))
    bob.deliver(message(to=bob.user, subject="bob added by reload"))
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=600) as slow:  # alice's pass: ~6 s
        upload = {"concurrency": 1, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10}
        first = env.account(alice, schedule={"every": "1h"})
        second = env.account(bob, schedule={"every": "1s"})  # its password is in the daemon's environment
        env.write([first], endpoint=slow.url, schedule=FAST, fetch={"batch_messages": 2}, upload=upload)
        with DaemonProcess(env.path) as daemon:
            wait_for(lambda: len(slow.uploads()) >= 1, 20, "alice's pass under way")
            env.path.write_text("accounts: [")  # a broken config is refused, the old one kept
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("Reload refused")
            env.write([first, second], endpoint=slow.url, schedule=FAST, fetch={"batch_messages": 2}, upload=upload)
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("config reloaded: 2 account(s)")
            assert len(slow.uploads()) < n  # alice's pass was still running at the reload
            wait_for(lambda: len(slow.uploads()) == n + 1, 30, "alice's pass and bob's")
            wait_for(lambda: finished_runs(env, alice.user.split("@")[0]) == 1, 10, "alice's pass to end")
        assert daemon.proc.returncode == 0
        assert subjects(slow) == Counter({**{f"a{i}": 1 for i in range(n)}, "bob added by reload": 1})
        outcomes = env.sql("SELECT outcome FROM runs WHERE account = ?", alice.user.split("@")[0])
        assert outcomes == [("ok",)]  # the in-flight pass finished, not cut


def test_sync_leaves_an_account_the_daemon_is_working_on(new_mailbox, env, tmp_path):
    alice = new_mailbox("alice")
    n = 12
    for i in range(n):
        alice.deliver(message(to=alice.user, subject=f"l{i}"))
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=600) as slow:  # the daemon's pass: ~7 s
        env.write([env.account(alice, schedule={"every": "1h"})], endpoint=slow.url, schedule=FAST,
                  fetch={"batch_messages": 2},
                  upload={"concurrency": 1, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10})
        with DaemonProcess(env.path):
            wait_for(lambda: len(slow.uploads()) >= 1, 20, "the daemon's pass under way")
            code, out, err = env.sync()
            assert code == 0, err
            assert "skipped: being synced by daemon@" in out
            wait_for(lambda: len(slow.uploads()) == n, 30, "the daemon's pass to finish")
        assert slow.stats["posts"] == n  # the sync asked for nothing
        holder = env.sql("SELECT count(*) FROM leases")[0][0]
        assert holder == 0  # released at the stop


def test_per_host_cap_keeps_passes_to_one_server_apart(new_mailbox, receiver, env):
    boxes = [new_mailbox(n) for n in ("alice", "bob", "carol")]
    for b in boxes:
        b.deliver(message(to=b.user))
    # Each pass may open 2 connections; 3 per server leave room for one pass at a time.
    env.write([env.account(b, schedule={"every": "1s"}) for b in boxes], endpoint=receiver.url,
              schedule={**FAST, "max_connections": 10, "max_connections_per_host": 3}, fetch={"connections": 2})
    names = [b.user.split("@")[0] for b in boxes]
    with DaemonProcess(env.path):
        wait_for(lambda: all(finished_runs(env, n) >= 3 for n in names), 30, "three passes of each account")
    runs = sorted(env.sql("SELECT started_at, ended_at FROM runs WHERE ended_at IS NOT NULL"))
    for (s1, e1), (s2, _e2) in zip(runs, runs[1:]):
        assert e1 <= s2, f"passes overlap: {s1}..{e1} and {s2}"
    assert len(receiver.uploads()) == 3


@pytest.mark.parametrize("address, problem", [
    ("0.0.0.0:9108", "is not a loopback address"),
    ("localhost", "is not HOST:PORT"),
])
def test_http_endpoint_refuses_a_non_loopback_or_malformed_address(env, receiver, address, problem):
    env.write([], endpoint=receiver.url)
    code, _out, err = env.cli("run", "--http", address)
    assert code == 2 and problem in err and "Traceback" not in err


def test_run_reports_config_problems_with_file_and_key(env, receiver, new_mailbox):
    alice = new_mailbox("alice")
    env.write([env.account(alice, schedule={"every": "often", "cron": "61 * * * *"})], endpoint=receiver.url,
              schedule={"idle_renew": "45m"})
    code, _out, err = env.cli("run")
    assert code == 2 and "Traceback" not in err
    assert f"{env.path}: accounts[0].schedule.every: not a duration: 'often'" in err
    assert f"{env.path}: accounts[0].schedule.cron: not a crontab expression" in err
    assert f"{env.path}: schedule.idle_renew: must be at most 29m" in err


class NoIdleProxy:
    """A TCP proxy that hides IDLE from the server's capabilities (a server without push)."""

    def __init__(self, upstream: tuple[str, int]):
        import socket
        import threading

        self.upstream = upstream
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst, hide in ((client, server, False), (server, client, True)):
                self._threading.Thread(target=self._pipe, args=(src, dst, hide), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, hide: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data.replace(b" IDLE", b"") if hide else data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()


def test_a_server_without_idle_is_polled(new_mailbox, receiver, env, dovecot):
    proxy = NoIdleProxy((dovecot.host, dovecot.port))
    try:
        alice = new_mailbox("alice")
        every = 1.5
        env.write([env.account(alice, port=proxy.port, schedule={"every": f"{every}s", "idle": ["INBOX"]})],
                  endpoint=receiver.url, schedule=FAST)
        with DaemonProcess(env.path) as daemon:
            daemon.wait_log("folder INBOX: the server offers no IDLE; polling only")
            wait_for(lambda: finished_runs(env, alice.user.split("@")[0]) >= 1, 20, "the first pass")
            alice.deliver(message(to=alice.user, subject="polled, not pushed"))
            t0 = time.monotonic()
            wait_for(lambda: subjects(receiver)["polled, not pushed"] == 1, 10, "the upload")
            assert time.monotonic() - t0 <= every + 0.5
    finally:
        proxy.close()


@pytest.mark.parametrize("answer, retry_after", [
    ("b'[UNAVAILABLE] Request is throttled. Suggested Backoff Time: 92415 milliseconds'", 92.415),
    ("select failed: [THROTTLED] Account is temporarily throttled", None),
    ("* BYE Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)", None),
])
def test_server_answers_that_mean_come_back_later_are_recognised(answer, retry_after):
    from imapclient.exceptions import IMAPClientError

    from imapsync.imap_source import _translate

    err = _translate(IMAPClientError(answer), "logging in")
    assert err.kind == "throttled" and err.retry_after == retry_after
    assert "the server asked to come back later" in str(err)
    assert _translate(IMAPClientError("b'[AUTHENTICATIONFAILED] Authentication failed.'"), "x").kind != "throttled"
