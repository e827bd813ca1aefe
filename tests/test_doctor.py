"""`imapsync doctor` run as a real process against Dovecot and the receiver (issue: continuous
archiving, deployment)."""
from __future__ import annotations

from conftest import API_KEY
from daemon_proc import free_port

from imapsync.receiver import Receiver


def rows(out: str) -> dict[str, list[str]]:
    """Result words per check name, from the printed table (one line per row)."""
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in ("config", "ledger", "imap", "endpoint", "api", "directory"):
            got.setdefault(words[0], []).append(next(w for w in ("OK", "FAIL", "not checked")
                                                     if f" {w} " in f" {line} "))
    return got


def test_doctor_passes_on_a_working_setup(new_mailbox, receiver, env):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    env.write([env.account(alice), env.account(bob, schedule={"idle": True})], endpoint=receiver.url)
    code, out, err = env.cli("doctor")
    assert code == 0, out + err
    assert rows(out) == {"config": ["OK"], "ledger": ["OK"], "imap": ["OK", "OK"], "endpoint": ["OK"], "api": ["OK"]}
    flat = " ".join(out.split())
    assert "IDLE offered" in flat and "key accepted" in flat
    assert "All checks passed." in out
    assert len(receiver.uploads()) == 0  # the key check uploads nothing


def test_doctor_names_each_failure_and_exits_non_zero(new_mailbox, env, tmp_path):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    wrong = env.account(bob)
    env.monkeypatch.setenv(wrong["password"]["env"], "not-bobs-password")
    closed = env.account(alice, name="nowhere", port=free_port())  # nothing listens there
    with Receiver(tmp_path / "store", api_key="another-key") as refusing:
        env.write([env.account(alice), wrong, closed], endpoint=refusing.url)
        code, out, err = env.cli("doctor")
    assert code == 2, out + err  # a refused API key wins, as for `sync`
    assert rows(out) == {"config": ["OK"], "ledger": ["OK"], "imap": ["OK", "FAIL", "FAIL"],
                         "endpoint": ["OK"], "api": ["FAIL"]}
    flat = " ".join(out.split())  # a long detail wraps onto the next line of its column
    assert "auth_failed: login refused: wrong username or password" in flat
    assert "Connection refused" in flat
    assert "the API refused the key (HTTP 403)" in flat
    assert "3 check(s) failed." in flat
    for secret in (API_KEY, "not-bobs-password", alice.password):
        assert secret not in out + err


def test_doctor_exit_code_for_an_unreachable_endpoint(new_mailbox, env):
    alice = new_mailbox("alice")
    env.write([env.account(alice)], endpoint=f"http://127.0.0.1:{free_port()}")
    code, out, _err = env.cli("doctor")
    assert code == 5
    assert rows(out)["endpoint"] == ["FAIL"] and rows(out)["imap"] == ["OK"]


def test_doctor_reports_config_problems_like_every_command(env, receiver):
    env.write([{"name": "x", "host": "imap.example.com", "tls": "plain", "username": "u", "password": "p"}],
              endpoint=receiver.url)
    code, out, err = env.cli("doctor")
    assert code == 2 and "Traceback" not in err
    assert f"{env.path}: accounts[0].tls: plain sends the password in clear" in err
