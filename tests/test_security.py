"""Security (issue 7): TLS verified by default, STARTTLS never silently downgraded, no
plaintext password to a remote host, secrets in no output, private files, and every
listening socket on loopback unless told otherwise.

Real parts: Dovecot with its self-signed certificate (implicit TLS and STARTTLS),
pymap (a server that offers no STARTTLS), the receiver over HTTP, `imapsync` run as a
real process at DEBUG, the ledger's bytes on disk and the daemon's HTTP endpoint.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import API_KEY, DOMAIN
from daemon_proc import DaemonProcess, free_port, wait_for
from mail import message

from imapsync.receiver import Receiver
from imapsync.testing.imap_proxy import CommandRecorder
from imapsync.testing.pymap_server import PymapServer


pytestmark = pytest.mark.timeout(180)  # every test bounded in time

def _account_status(env) -> dict:
    return env.status()["accounts"][0]


# ----- TLS -------------------------------------------------------------------------------------

def test_implicit_tls_verifies_the_certificate_by_default(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    account = env.account(alice, port=dovecot.ssl_port, tls="implicit")
    env.write([account], endpoint=receiver.url)
    code, out, err = env.sync()
    assert code == 7, out + err  # the self-signed certificate is not trusted
    assert "tls_error" in _account_status(env)["last_error"]
    assert "certificate" in _account_status(env)["last_error"]
    assert receiver.uploads() == []

    env.write([{**account, "ca_file": str(dovecot.cert_path)}], endpoint=receiver.url)
    code, out, err = env.sync()
    assert code == 0 and "1 uploaded" in out, out + err


def test_starttls_is_used_and_verified_when_configured(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        account = env.account(alice, port=proxy.port, tls="starttls")
        env.write([account], endpoint=receiver.url)
        code, out, err = env.sync()
        assert code == 7 and "tls_error" in _account_status(env)["last_error"], out + err
        assert "LOGIN" not in proxy.commands and "AUTHENTICATE" not in proxy.commands

        proxy.clear()
        env.write([{**account, "ca_file": str(dovecot.cert_path)}], endpoint=receiver.url)
        code, out, err = env.sync()
        assert code == 0 and "1 uploaded" in out, out + err
        # STARTTLS came first; everything after it (LOGIN included) was encrypted, unseen by the proxy.
        assert proxy.commands[-1] == "STARTTLS" and "LOGIN" not in proxy.commands, proxy.commands


def test_a_server_without_starttls_is_refused_never_downgraded(env, receiver):
    """pymap offers no STARTTLS: with tls: starttls the password must never be sent."""
    user, password = f"carol@{DOMAIN}", "pymap-secret-pw-71"
    with PymapServer({user: password}) as server, CommandRecorder(server.host, server.port) as proxy:
        server.append(user, password, "INBOX", message(to=user))
        env.monkeypatch.setenv("PYMAP_PW", password)
        env.write([{"name": "carol", "host": "127.0.0.1", "port": proxy.port, "tls": "starttls",
                    "username": user, "password": {"env": "PYMAP_PW"}}], endpoint=receiver.url)
        code, out, err = env.sync()
        sent = list(proxy.commands)
    assert code == 7, out + err
    error = _account_status(env)["last_error"]
    assert "tls_error" in error and "does not offer STARTTLS" in error
    assert "LOGIN" not in sent and "AUTHENTICATE" not in sent, sent
    assert receiver.uploads() == []
    assert password not in out + err + json.dumps(env.status())


@pytest.mark.parametrize("host", ["imap.example.com", "10.1.2.3", "[2001:db8::1]"])
def test_plaintext_to_a_remote_host_is_refused_unless_allow_insecure(env, receiver, host):
    env.monkeypatch.setenv("REMOTE_PW", "remote-secret-pw")
    account = {"name": "remote", "host": host, "tls": "plain", "username": f"x@{DOMAIN}",
               "password": {"env": "REMOTE_PW"}}
    env.write([account], endpoint=receiver.url)
    for command in (["sync"], ["status"]):  # refused before any network I/O, by every command
        code, out, err = env.cli(*command)
        assert code == 2 and "Traceback" not in err, out + err
        assert f"{env.path}: accounts[0].tls: plain sends the password in clear to {host}" in err
    env.write([{**account, "allow_insecure": True}], endpoint=receiver.url)
    code, out, err = env.cli("status")
    assert code == 0, out + err


# ----- secrets ---------------------------------------------------------------------------------

#: `imapsync ARGS` with imapclient's protocol trace (logger imapclient, DEBUG) let through.
TRACE_ON = """
import logging, sys
from imapsync import cli
setup = cli._setup_logging
def with_trace(*args, **kwargs):
    setup(*args, **kwargs)
    logging.getLogger("imapclient").setLevel(logging.DEBUG)
cli._setup_logging = with_trace
sys.exit(cli.main(sys.argv[1:]))
"""


def _ledger_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.glob("imapsync.sqlite3*")))


def _leaks(secrets: dict[str, str], **places: str | bytes) -> list[str]:
    """'where: which secret' for every secret found anywhere (as text or UTF-8 bytes)."""
    out = []
    for where, text in places.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        out += [f"{where}: {name}" for name, secret in secrets.items() if secret.encode() in data]
    return out


@pytest.mark.timeout(180)
def test_no_secret_in_any_output_the_ledger_status_metrics_or_the_archive(new_mailbox, receiver, env, tmp_path):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    alice.deliver(message(to=alice.user, subject="one"))
    alice.deliver(message(to=alice.user, subject="two"), "Archive")
    wrong_pw, wrong_key = "wrong-imap-pw-4b1d9c", "wrong-api-key-8e2f70"
    secrets = {"imap password": alice.password, "bob's password": bob.password, "API key": API_KEY,
               "wrong imap password": wrong_pw, "wrong API key": wrong_key}
    bad = env.account(bob, name="bob")
    env.monkeypatch.setenv(bad["password"]["env"], wrong_pw)
    env.write([env.account(alice, name="alice"), bad], endpoint=receiver.url,
              schedule={"every": "1s", "jitter": 0})
    outputs: dict[str, str | bytes] = {}

    def run(*args: str) -> None:
        code, out, err = env.cli("--log-level", "debug", *args)
        outputs[f"{' '.join(args)} (exit {code}) stdout"] = out
        outputs[f"{' '.join(args)} (exit {code}) stderr"] = err

    # With the IMAP protocol trace switched on as well (imapsync keeps it off; an administrator
    # debugging a server might not): alice archived, bob's login refused.
    done = subprocess.run([sys.executable, "-c", TRACE_ON, "--log-level", "debug", "sync", "--config", str(env.path)],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    outputs["sync with IMAP trace stdout"], outputs["sync with IMAP trace stderr"] = done.stdout, done.stderr
    assert done.returncode == 7, done.stdout + done.stderr
    assert "LOGIN **REDACTED**" in done.stderr and "DEBUG" in done.stderr  # the trace really ran
    run("sync")
    for args in (["status"], ["status", "--json"], ["ledger", "check"], ["verify"], ["doctor"]):
        run(*args)
    env.monkeypatch.setenv("IMAPSYNC_TEST_API_KEY", wrong_key)  # the API refuses this key: error paths
    alice.deliver(message(to=alice.user, subject="three"))
    run("sync")
    run("doctor")
    env.monkeypatch.setenv("IMAPSYNC_TEST_API_KEY", API_KEY)

    port = free_port()  # the daemon and its HTTP endpoint: log, /status, /metrics, /healthz
    with DaemonProcess(env.path, "--http", f"127.0.0.1:{port}", log_level="debug") as daemon:
        daemon.http_port = port
        wait_for(daemon._listening, 20, "the daemon's HTTP endpoint")
        wait_for(lambda: len(receiver.uploads()) >= 3, 30, "the daemon to archive the third message")
        for path in ("/status", "/metrics", "/healthz"):
            outputs[f"GET {path}"] = daemon.get(path)[2]
    outputs["daemon log"] = daemon.log
    outputs["ledger file"] = _ledger_bytes(env.root)
    outputs["receiver uploads.jsonl"] = (receiver.store / "uploads.jsonl").read_bytes()
    outputs["receiver .eml files"] = b"".join(p.read_bytes() for p in receiver.store.glob("*.eml"))
    outputs["config file"] = env.path.read_bytes()  # secrets are given by {env: ...}

    assert len(receiver.uploads()) == 3
    assert "auth_failed" in outputs["status (exit 0) stdout"] and "refused the key" in "".join(
        v for k, v in outputs.items() if isinstance(v, str) and k.startswith("sync (exit 2)"))
    assert _leaks(secrets, **outputs) == []


def test_ledger_url_password_never_shown(env, receiver, postgres):
    """A PostgreSQL ledger URL with a password: errors name the ledger without it."""
    secret = "ledger-secret-pw-93c1"
    url = postgres.create_database("secret_url").replace("postgres@", f"postgres:{secret}@")
    env.write([], endpoint=receiver.url, ledger=url.rsplit("/", 1)[0] + "/no_such_database")
    texts = []
    for args in (["sync"], ["status", "--json"], ["ledger", "check"], ["doctor"]):
        code, out, err = env.cli("--log-level", "debug", *args)
        texts.append(out + err)
        assert code != 0 and "no_such_database" in out + err and "Traceback" not in err, out + err
    env.write([], endpoint=receiver.url, ledger=url)  # trust authentication: the password is ignored
    code, out, err = env.cli("--log-level", "debug", "status", "--json")
    texts.append(out + err)
    assert code == 0, out + err
    assert [t for t in texts if secret in t] == []


# ----- files: created private; a readable secret is warned about --------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_demo_config_secrets_and_ledger_are_private_even_with_a_permissive_umask(tmp_path):
    keep = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "imapsync", "demo", "--keep", str(keep)], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.umask(0), env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    assert _mode(keep / "config.yaml") == 0o600
    assert _mode(keep / "secrets") == 0o700
    secret_files = sorted((keep / "secrets").iterdir())
    assert secret_files and all(_mode(p) == 0o600 for p in secret_files), {p.name: oct(_mode(p)) for p in secret_files}
    ledger_files = sorted(keep.glob("imapsync.sqlite3*"))
    assert ledger_files and all(_mode(p) == 0o600 for p in ledger_files), {p.name: oct(_mode(p)) for p in ledger_files}


def test_sync_creates_its_ledger_private_even_with_a_permissive_umask(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    env.write([env.account(alice)], endpoint=receiver.url)
    done = subprocess.run([sys.executable, "-m", "imapsync", "sync", "--config", str(env.path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.umask(0), env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    ledger_files = sorted(env.root.glob("imapsync.sqlite3*"))
    assert ledger_files and all(_mode(p) == 0o600 for p in ledger_files), {p.name: oct(_mode(p)) for p in ledger_files}


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "chmod 600" in line]


def test_a_world_readable_config_with_an_inline_secret_is_warned_about(env, receiver, new_mailbox):
    alice = new_mailbox("alice")
    inline = {**env.account(alice), "password": alice.password}
    env.write([inline], endpoint=receiver.url)
    env.path.chmod(0o644)
    code, out, err = env.cli("status")
    assert code == 0, out + err
    warned = _warnings(err)
    assert len(warned) == 1, err
    assert str(env.path) in warned[0] and "accounts[0].password" in warned[0] and "{env: NAME}" in warned[0]
    assert alice.password not in out + err

    env.path.chmod(0o600)  # private: no warning
    assert _warnings(env.cli("status")[2]) == []
    env.write([env.account(alice)], endpoint=receiver.url)  # secrets from the environment: no warning
    env.path.chmod(0o644)
    assert _warnings(env.cli("status")[2]) == []
    data = yaml.safe_load(env.path.read_text())
    data["tenants"][0]["api_key"] = API_KEY  # an inline API key is a secret too
    env.path.write_text(yaml.safe_dump(data))
    warned = _warnings(env.cli("status")[2])
    assert len(warned) == 1 and "tenants[0].api_key" in warned[0] and API_KEY not in warned[0]


# ----- listening sockets: loopback unless told otherwise -------------------------------------

def _listening_on(port: int) -> set[str]:
    """The local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    out = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            out.add(socket.inet_ntop(family, raw))
    return out


def test_the_receiver_listens_on_loopback_by_default(tmp_path):
    with Receiver(tmp_path / "store") as r:
        port = int(r.url.rsplit(":", 1)[1])
        assert _listening_on(port) == {"127.0.0.1"}

    proc = subprocess.Popen([sys.executable, "-m", "imapsync", "receiver", "--store", str(tmp_path / "cli")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "receiver listening on http://127.0.0.1:PORT, ..."
        m = re.search(r"http://([^:/]+):(\d+)", line)
        assert m and m.group(1) == "127.0.0.1", line
        assert _listening_on(int(m.group(2))) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    done = subprocess.run([sys.executable, "-m", "imapsync", "receiver", "--store", str(tmp_path / "x"),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing non-loopback host" in done.stderr


@pytest.mark.timeout(120)
def test_the_status_endpoint_listens_on_loopback_when_no_host_is_given(env, receiver):
    env.write([], endpoint=receiver.url)
    port = free_port()
    with DaemonProcess(env.path, "--http", f":{port}") as daemon:
        daemon.http_port = port
        wait_for(daemon._listening, 20, "the daemon's HTTP endpoint")
        assert _listening_on(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
            assert r.status == 200
    code, _out, err = env.cli("run", "--http", f"0.0.0.0:{port}")
    assert code == 2 and "is not a loopback address" in err
