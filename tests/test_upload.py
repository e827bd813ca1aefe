"""Uploads under load and failure: bounded concurrency, throttling, every answer of the
API's table shown in `status`, several primary domains, large messages (issue: upload)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import API_KEY, DOMAIN
from mail import message

from imapsync.receiver import Receiver
from imapsync.sinks.base import Outcome, UploadRequest
from imapsync.sinks.vaultastic import RetryPolicy, VaultasticSink


def test_uploads_reach_the_configured_concurrency_and_never_exceed_it(new_mailbox, env, tmp_path):
    alice = new_mailbox("alice")
    for i in range(48):
        alice.deliver(message(to=alice.user, subject=f"m{i}"))
    with Receiver(tmp_path / "slow", api_key=API_KEY, latency_ms=250) as slow:
        env.write([env.account(alice)], endpoint=slow.url,
                  upload={"concurrency": 16, "max_attempts": 3, "backoff_factor": 0.01})
        code, out, err = env.sync()
        assert code == 0, err
        assert slow.stats["peak_in_flight"] == 16
        assert len(slow.uploads()) == 48


def test_a_429_pauses_the_whole_tenant_and_nothing_is_lost_or_doubled(tmp_path):
    with Receiver(tmp_path / "r", api_key=API_KEY, retry_after=1) as r:
        sink = VaultasticSink(DOMAIN, r.url, API_KEY, retry=RetryPolicy(max_attempts=4, backoff_factor=0.01))
        r.script(429)
        requests = [UploadRequest.of(f"m:{i}", DOMAIN, [f"u{i}@{DOMAIN}"], None, message(subject=f"s{i}"))
                    for i in range(24)]
        results = [None] * len(requests)
        gate = threading.Barrier(8)

        def worker(k: int) -> None:
            gate.wait()
            for i in range(k, len(requests), 8):
                results[i] = sink.upload(requests[i])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(res.outcome is Outcome.UPLOADED for res in results)
        assert sorted(u["requestId"] for u in r.uploads()) == sorted(q.request_id for q in requests)
        # The other threads were held back by the pause, not only the throttled request.
        assert sink.bucket.waited >= 1.0
        sink.close()


def test_random_throttling_and_errors_still_deliver_every_message_once(new_mailbox, env, tmp_path):
    alice = new_mailbox("alice")
    raws = [message(to=alice.user, subject=f"m{i}") for i in range(30)]
    for raw in raws:
        alice.deliver(raw)
    with Receiver(tmp_path / "flaky", api_key=API_KEY, throttle_rate=0.2, fail_rate=0.1, retry_after=0,
                  seed=7) as flaky:
        env.write([env.account(alice)], endpoint=flaky.url,
                  upload={"concurrency": 8, "max_attempts": 10, "backoff_factor": 0.01, "backoff_max": 0.05})
        code, out, err = env.sync()
        assert code == 0, out + err
        assert flaky.stats["answers"][429] > 0 and flaky.stats["answers"][500] > 0
        stored = [(flaky.store / f"{u['uploadId']}.eml").read_bytes() for u in flaky.uploads()]
        assert sorted(stored) == sorted(raws)  # each exactly once, byte for byte


@pytest.mark.parametrize("answers,state,reason", [
    (["invalid_recipient"], "failed", "invalid_recipient"),
    (["bad_request"], "failed", "bad_request"),
    ([413], "skipped", "too_large"),
    ([422], "skipped", "no_primary_recipient"),
    ([500, 500, 500], "failed", "server_error"),
    ([429, 429, 429], "failed", "throttled"),
    ([403], "pending", "forbidden"),
])
def test_each_api_answer_is_recorded_with_its_reason(new_mailbox, receiver, env, answers, state, reason):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user, msgid="<the-one@mailer.example>"))
    receiver.retry_after = 0
    receiver.script(*answers)
    env.write([env.account(alice)], endpoint=receiver.url)
    code, out, err = env.sync()
    assert code == {"failed": 5, "skipped": 0, "pending": 2}[state], out + err
    [row] = env.status()["not_archived"]
    assert (row["state"], row["reason"], row["message_id"]) == (state, reason, "<the-one@mailer.example>")
    assert reason in env.cli("status")[1]
    assert receiver.uploads() == []


def test_put_failures_are_recorded_as_s3_upload_failed(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    receiver.script_put(500, 500, 500)
    env.write([env.account(alice)], endpoint=receiver.url)
    assert env.sync()[0] == 5
    [row] = env.status()["not_archived"]
    assert (row["state"], row["reason"], row["attempts"]) == ("failed", "s3_upload_failed", 3)


def test_a_failed_message_does_not_block_its_folder(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}"))
    receiver.script("invalid_recipient")  # the first slot request fails for good
    env.write([env.account(alice)], endpoint=receiver.url, upload={"concurrency": 1, "max_attempts": 2,
                                                                  "backoff_factor": 0.01})
    code, out, _ = env.sync()
    assert code == 5 and "2 uploaded" in out and "1 failed" in out
    inbox = env.status()["accounts"][0]["folders"][0]
    assert inbox["last_uid"] == 3  # the cursor passed the failed message: it is final, with its reason


def test_several_primary_domains_each_get_their_own_vaults(new_mailbox, env, tmp_path):
    alice = new_mailbox("alice")
    raw = message("Carol <carol@beta.org>", f"{alice.user}, A.Smith@{DOMAIN}, dan@beta.org, eve@else.net",
                  "two tenants")
    alice.deliver(raw)
    env.monkeypatch.setenv("BETA_KEY", "beta-key-123")
    with Receiver(tmp_path / "acme", api_key=API_KEY) as acme, \
            Receiver(tmp_path / "beta", api_key="beta-key-123") as beta:
        env.write([env.account(alice)], endpoint=acme.url)
        import yaml
        cfg = yaml.safe_load(env.path.read_text())
        cfg["tenants"][0]["aliases"] = {f"a.smith@{DOMAIN}": f"alice@{DOMAIN}"}
        cfg["tenants"].append({"domain": "beta.org", "endpoint": beta.url, "api_key": {"env": "BETA_KEY"}})
        env.path.write_text(yaml.safe_dump(cfg))
        code, out, err = env.sync()
        assert code == 0, out + err
        [a], [b] = acme.uploads(), beta.uploads()
        assert sorted(a["recipients"]) == sorted([alice.user, f"alice@{DOMAIN}"])
        assert sorted(b["recipients"]) == ["carol@beta.org", "dan@beta.org"] and b["sender"] == "carol@beta.org"
        assert a["sha256"] == b["sha256"] == hashlib.sha256(raw).hexdigest()
        assert "1 uploaded" in out  # one copy, delivered to both tenants
        assert env.sync()[1].startswith("1 account(s): 0 uploaded")


def _big_message_and_spool_folder(new_mailbox, env, tmp_path):
    """A mailbox with one message over 64 KiB, and TMPDIR (where it is spooled) a folder of its own."""
    alice = new_mailbox("alice")
    big = message(to=alice.user, subject="big", body="x" * 300_000 + "\r\nend")
    alice.deliver(big)
    spool = tmp_path / "spool"
    spool.mkdir()
    env.monkeypatch.setenv("TMPDIR", str(spool))
    return alice, big, spool


def test_large_messages_are_spooled_and_streamed_byte_exact(new_mailbox, receiver, env, tmp_path):
    alice, big, spool = _big_message_and_spool_folder(new_mailbox, env, tmp_path)
    env.write([env.account(alice)], endpoint=receiver.url, upload={"spool_bytes": "64KiB"})
    assert env.sync()[0] == 0
    [up] = receiver.uploads()
    assert (receiver.store / f"{up['uploadId']}.eml").read_bytes() == big
    assert list(spool.iterdir()) == []  # the spool file is gone once the upload settled


def test_spool_files_of_a_killed_sync_are_swept_at_the_next_start_and_the_message_archived(new_mailbox, env,
                                                                                             tmp_path):
    """A sync killed while a large (spooled) message is being uploaded leaves its 0600 copy
    in the temporary folder; the next start removes it, and only files of processes that
    are gone, and its pass archives the message."""
    alice, big, spool = _big_message_and_spool_folder(new_mailbox, env, tmp_path)
    namespace = os.stat("/proc/self/ns/pid").st_ino
    live = spool / f"imapsync-{os.getpid()}-{namespace}-inuse.eml"  # a running process's: this test's
    elsewhere = spool / f"imapsync-999999999-{namespace + 1}-other.eml"  # another PID namespace's (container)
    unrelated = spool / "imapsync-notes.eml"
    kept = [live, elsewhere, unrelated]
    for keep in kept:
        keep.write_bytes(b"keep me")
    with Receiver(tmp_path / "r", api_key=API_KEY, latency_ms=120_000) as receiver:
        env.write([env.account(alice)], endpoint=receiver.url,
                  upload={"spool_bytes": "64KiB", "timeout": 300, "max_attempts": 1})
        proc = subprocess.Popen([sys.executable, "-m", "imapsync", "sync", "--config", str(env.path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while receiver.stats["in_flight"] == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert receiver.stats["in_flight"] == 1, "the upload never started"
        finally:
            proc.kill()
            proc.wait(timeout=30)
        [left] = [p for p in spool.iterdir() if p not in kept]
        assert left.read_bytes() == big and left.stat().st_mode & 0o777 == 0o600
        receiver.latency_ms = 0
        code, out, err = env.sync()
        assert code == 0, out + err
        assert f"Removed 1 spooled message file(s) from {spool}" in err
        assert sorted(spool.iterdir()) == sorted(kept)
        [up] = receiver.uploads()
        assert (receiver.store / f"{up['uploadId']}.eml").read_bytes() == big


#: A process that dies the moment the directory sink has written its partial file, before
#: the rename: the worst moment for a crash.
_DIES_BEFORE_THE_RENAME = """
import os, sys
from pathlib import Path
from imapsync.sinks.base import UploadRequest
from imapsync.sinks.directory import DirectorySink
os.replace = lambda src, dst: os._exit(9)
DirectorySink(Path(sys.argv[1])).upload(UploadRequest.of("k", sys.argv[2], [sys.argv[3]], None, b"half a message"))
"""


def test_partial_files_of_a_killed_directory_sink_are_swept_and_the_message_written_again(new_mailbox, env,
                                                                                            tmp_path):
    alice = new_mailbox("alice")
    raw = message(to=alice.user, subject="kept safe")
    alice.deliver(raw)
    out = tmp_path / "out"
    died = subprocess.run([sys.executable, "-c", _DIES_BEFORE_THE_RENAME, str(out), DOMAIN, alice.user], check=False)
    assert died.returncode == 9
    partial = out / DOMAIN / ".partial"
    [left] = list(partial.iterdir())
    assert left.read_bytes() == b"half a message" and not list((out / DOMAIN).glob("*.eml"))
    namespace = os.stat("/proc/self/ns/pid").st_ino
    live = partial / f"imapsync-{os.getpid()}-{namespace}-1.part"  # a running process's: this test's
    elsewhere = partial / f"imapsync-999999999-{namespace + 1}-1.part"  # another PID namespace's
    for keep in (live, elsewhere):
        keep.write_bytes(b"keep me")
    env.write([env.account(alice)], endpoint=None, sink="directory", directory=str(out),
              tenants=[{"domain": DOMAIN}])
    code, out_text, err = env.sync()
    assert code == 0, out_text + err
    assert f"Removed 1 partially written message file(s) from {partial}" in err
    assert sorted(partial.iterdir()) == sorted([live, elsewhere])
    [archived] = list((out / DOMAIN).glob("*.eml"))
    assert archived.read_bytes() == raw


def test_messages_over_the_size_limit_are_skipped_without_fetching_the_body(new_mailbox, receiver, env, dovecot):
    from imapsync.testing.imap_proxy import CommandRecorder
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user, subject="huge", body="y" * 200_000, msgid="<huge@mailer.example>"))
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        env.write([env.account(alice, port=proxy.port)], endpoint=receiver.url,
                  upload={"max_message_bytes": "100KB"})
        code, out, _ = env.sync()
    assert code == 0 and "1 skipped" in out
    assert proxy.count("UID FETCH") == 1  # headers and size only: no body fetch
    [row] = env.status()["not_archived"]
    assert (row["state"], row["reason"]) == ("skipped", "too_large")
    assert receiver.uploads() == []
