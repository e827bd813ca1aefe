"""The test servers themselves work: Dovecot, the command-recording proxy, pymap.

Everything else in the suite trusts these helpers to tell the truth about a real
IMAP server, so each promise they make is checked here once.
"""
from __future__ import annotations

import itertools
import os
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import require_dovecot
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

import imapsync.testing.dovecot as dovecot_module
from imapsync.testing.dovecot import Dovecot, DovecotError
from imapsync.testing.imap_proxy import CommandRecorder, _CommandParser
from imapsync.testing.pymap_server import PymapServer

_user_numbers = itertools.count(1)


# The session-wide `dovecot` fixture comes from conftest.py.


@pytest.fixture()
def user(dovecot: Dovecot) -> tuple[str, str]:
    """A fresh Dovecot user per test: (name, password)."""
    name = f"user{os.getpid()}x{next(_user_numbers)}"
    password = f"secret-{name}"
    dovecot.add_user(name, password)
    return name, password


def _login(server: Dovecot, user: tuple[str, str]) -> IMAPClient:
    client = IMAPClient(server.host, server.port, ssl=False, timeout=10)
    client.login(*user)
    return client


def _message(n: int) -> bytes:
    return (
        f"From: sender{n}@example.com\r\n"
        f"To: rcpt@example.com\r\n"
        f"Subject: message {n}\r\n"
        f"Message-ID: <{n}.test@example.com>\r\n"
        "\r\n"
        f"Body of message {n}.\r\n"
    ).encode()


# ---------------------------------------------------------------------- Dovecot


@pytest.mark.dovecot
def test_dovecot_plain_and_tls_login(dovecot: Dovecot, user: tuple[str, str]) -> None:
    with _login(dovecot, user) as client:
        caps = client.capabilities()
        assert b"CONDSTORE" in caps and b"SPECIAL-USE" in caps

    context = ssl.create_default_context(cafile=str(dovecot.cert_path))
    for host in (dovecot.host, "localhost"):  # SAN has both IP:127.0.0.1 and DNS:localhost
        with IMAPClient(host, dovecot.ssl_port, ssl=True, ssl_context=context, timeout=10) as tls:
            tls.login(*user)
            assert tls.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 0


@pytest.mark.dovecot
def test_dovecot_new_user_logs_in_at_once_and_bad_password_fails(dovecot: Dovecot) -> None:
    name = f"fresh{os.getpid()}x{next(_user_numbers)}"
    dovecot.add_user(name, "pw1")
    with IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10) as client:
        client.login(name, "pw1")  # no waiting: per-user passwd files
    with (
        IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10) as client,
        pytest.raises(LoginError),
    ):
        client.login(name, "wrong")


@pytest.mark.dovecot
def test_dovecot_deliver_inbox_and_subfolder(dovecot: Dovecot, user: tuple[str, str]) -> None:
    name = user[0]
    when = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    path = dovecot.deliver(name, _message(1), internaldate=when)
    dovecot.deliver(name, _message(2), flags="\\Seen \\Flagged")
    dovecot.deliver(name, _message(3), folder="Projects/Übersicht")

    if os.geteuid() == 0:
        assert path.stat().st_uid == dovecot.mail_uid
    assert path.parent.name == "cur" and ":2," in path.name

    with _login(dovecot, user) as client:
        names = [folder for _flags, _sep, folder in client.list_folders()]
        assert "Projects/Übersicht" in names
        assert client.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 2
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
        assert [fetched[uid][b"BODY[]"] for uid in sorted(fetched)] == [_message(1), _message(2)]
        first, second = (fetched[uid] for uid in sorted(fetched))
        assert first[b"INTERNALDATE"].astimezone(UTC) == when
        assert {b"\\Seen", b"\\Flagged"} <= set(second[b"FLAGS"])

        client.select_folder("Projects/Übersicht", readonly=True)
        (uid,) = client.search("ALL")
        assert client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"] == _message(3)

        # A message delivered while the folder is open shows up on the next NOOP.
        dovecot.deliver(name, _message(4), folder="Projects/Übersicht")
        client.noop()
        assert len(client.search("ALL")) == 2


@pytest.mark.dovecot
def test_dovecot_special_use_folders_exist_only_when_created(
    dovecot: Dovecot, user: tuple[str, str]
) -> None:
    with _login(dovecot, user) as client:
        assert "Trash" not in [f for _fl, _s, f in client.list_folders()]
        dovecot.create_folder(user[0], "Trash")
        dovecot.deliver(user[0], _message(1), folder="Sent")
        listed = {folder: set(flags) for flags, _sep, folder in client.list_folders()}
        assert b"\\Trash" in listed["Trash"]
        assert b"\\Sent" in listed["Sent"]
        dovecot.delete_folder(user[0], "Trash")
        assert "Trash" not in [f for _fl, _s, f in client.list_folders()]


@pytest.mark.dovecot
def test_dovecot_set_uidvalidity(dovecot: Dovecot, user: tuple[str, str]) -> None:
    dovecot.deliver(user[0], _message(1))
    with _login(dovecot, user) as client:
        before = client.folder_status("INBOX", [b"UIDVALIDITY"])[b"UIDVALIDITY"]
        dovecot.set_uidvalidity(user[0], "INBOX", before + 1000)
        # Not selected in this session, so STATUS reports the new value at once.
        assert client.folder_status("INBOX", [b"UIDVALIDITY"])[b"UIDVALIDITY"] == before + 1000
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == [1]  # UIDs are kept
    assert dovecot.status(user[0], "INBOX")["uidvalidity"] == before + 1000


@pytest.mark.dovecot
def test_dovecot_flags_reads_flags_and_examine_changes_nothing(
    dovecot: Dovecot, user: tuple[str, str]
) -> None:
    dovecot.deliver(user[0], _message(1))
    dovecot.deliver(user[0], _message(2), flags="\\Seen \\Answered")
    dovecot.deliver(user[0], _message(3), flags="FS")  # Maildir letters work too
    before = dovecot.flags(user[0], "INBOX")
    assert before == {1: set(), 2: {"\\Seen", "\\Answered"}, 3: {"\\Seen", "\\Flagged"}}
    with _login(dovecot, user) as client:
        client.select_folder("INBOX", readonly=True)
        client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"])
    assert dovecot.flags(user[0], "INBOX") == before


@pytest.mark.dovecot
def test_dovecot_stop_leaves_nothing_behind() -> None:
    require_dovecot()
    server = Dovecot().start()
    root = server.root
    assert server._proc is not None
    master = server._proc.pid
    children = _children(master)
    assert children, "a running Dovecot master has service processes"
    server.stop()
    server.stop()  # idempotent
    assert not _alive(master) and not [pid for pid in children if _alive(pid)]
    assert not root.exists()


@pytest.mark.dovecot
def test_dovecot_failed_start_reports_the_log_and_stop_is_safe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_dovecot()
    squatters = [socket.socket() for _ in range(2)]  # the ports Dovecot is given are taken
    for squatter in squatters:
        squatter.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    taken = [s.getsockname()[1] for s in squatters]
    monkeypatch.setattr(dovecot_module, "_free_ports", lambda host, count: taken)
    server = Dovecot()
    try:
        with pytest.raises(DovecotError) as failure:
            server.start()
    finally:
        for squatter in squatters:
            squatter.close()
    assert "Address already in use" in str(failure.value)  # the log tail is included
    server.stop()
    server.stop()
    assert not server.root.exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------- the proxy


@pytest.mark.dovecot
def test_command_recorder_sees_the_session(dovecot: Dovecot, user: tuple[str, str]) -> None:
    dovecot.deliver(user[0], _message(1))
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        with IMAPClient(proxy.host, proxy.port, ssl=False, timeout=10) as client:
            client.login(*user)
            client.folder_status("INBOX", [b"MESSAGES"])
            client.select_folder("INBOX", readonly=True)
            uids = client.search("ALL")
            body = client.fetch(uids, ["BODY.PEEK[]"])[uids[0]][b"BODY[]"]
            client.append("INBOX", _message(2))  # sent as a literal
            client.noop()
        assert body == _message(1)
        commands = proxy.commands
        for name in ("LOGIN", "STATUS", "EXAMINE", "UID SEARCH", "UID FETCH", "APPEND", "NOOP"):
            assert name in commands, (name, commands)
        assert proxy.count("uid fetch") == 1 and proxy.count("SELECT") == 0
        assert not [c for c in commands if c.startswith(("FROM:", "TO:", "SUBJECT:"))]
        proxy.clear()
        assert proxy.commands == []


def test_command_parser_skips_literals_and_non_commands() -> None:
    seen: list[str] = []
    parser = _CommandParser(seen.append)
    stream = (
        b"a1 LOGIN {4}\r\nuser {6+}\r\nse cr3\r\n"
        b"a2 uid fetch 1:* (FLAGS)\r\n"
        b"a3 APPEND INBOX (\\Seen) {22}\r\nA1 SELECT fake\r\nx: y\r\n\r\n"
        b"a4 IDLE\r\nDONE\r\n"
        b"a5 AUTHENTICATE PLAIN\r\nAHUAcA==\r\n"
        b"a6 UID SEARCH ALL\r\n"
    )
    for i in range(len(stream)):  # one byte at a time: no chunk boundary matters
        parser.feed(stream[i : i + 1])
    assert seen == ["LOGIN", "UID FETCH", "APPEND", "IDLE", "AUTHENTICATE", "UID SEARCH"]


# ------------------------------------------------------------------------ pymap


def test_pymap_server_login_and_append() -> None:
    with PymapServer({"alice": "pw-a", "bob": "pw-b"}) as server:
        uid = server.append("alice", "pw-a", "Archive/2024", _message(1), flags=["\\Seen"])
        server.append("alice", "pw-a", "INBOX", _message(2))
        with IMAPClient(server.host, server.port, ssl=False, timeout=10) as client:
            client.login("alice", "pw-a")
            client.select_folder("Archive/2024", readonly=True)
            fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"])
            assert list(fetched) == [uid]
            assert fetched[uid][b"BODY[]"] == _message(1)
            assert b"\\Seen" in fetched[uid][b"FLAGS"]
            assert client.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 1
        with (
            IMAPClient(server.host, server.port, ssl=False, timeout=10) as client,
            pytest.raises(LoginError),
        ):
            client.login("demouser", "demopass")  # only the given users exist


def test_dovecot_in_performance_mode_runs_with_reused_processes() -> None:
    """The benchmark's server: Dovecot's high-performance mode (login and imap processes
    serve many connections); Dovecot itself must read the setting, and logins work."""
    import subprocess

    require_dovecot()
    with Dovecot(performance=True) as server:
        server.add_user("perf@acme.com", "pw")
        for _ in range(3):
            with IMAPClient(server.host, port=server.port, ssl=False) as client:
                client.login("perf@acme.com", "pw")
        doveconf = dovecot_module._find_binary("doveconf")
        assert doveconf is not None
        shown = subprocess.run([doveconf, "-c", str(server.conf_path), "-n"], capture_output=True,
                               text=True, check=True).stdout
        imap = shown[shown.index("service imap {"):]
        assert "service_count = 0" in imap[:imap.index("}")]
