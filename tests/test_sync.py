"""The core pipeline end to end: Dovecot on loopback, the receiver over HTTP, a SQLite
ledger, and `imapsync sync` run as a real process (issue: core pipeline)."""
from __future__ import annotations

import json
import re

from conftest import DOMAIN
from mail import message

from imapsync.testing.imap_proxy import CommandRecorder


def uploads_by_subject(receiver) -> dict[str, list[dict]]:
    """Each stored upload's metadata, grouped by the Subject of the stored .eml."""
    out: dict[str, list[dict]] = {}
    for up in receiver.uploads():
        raw = (receiver.store / f"{up['uploadId']}.eml").read_bytes()
        subject = next(line[9:].decode() for line in raw.split(b"\r\n") if line.startswith(b"Subject: "))
        out.setdefault(subject, []).append(up)
    return out


def test_first_pass_uploads_everything_once_and_second_pass_only_asks_status(
        new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    m1 = message("Ext <ext@outside.example>", alice.user, "one")
    m2 = message(alice.user, f"bob@{DOMAIN}, carol@other.example", "two", cc=f"dave@{DOMAIN}")
    m3 = message("news@list.example", "list@list.example", "three", extra=[f"Delivered-To: {alice.user}"])
    alice.deliver(m1)
    alice.deliver(m2, "Sent")
    alice.deliver(m3, "Lists/Weekly")
    alice.deliver(message("x@outside.example", alice.user, "in trash"), "Trash")
    alice.deliver(message("x@outside.example", alice.user, "a draft"), "Drafts")
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        env.write([env.account(alice, port=proxy.port)], endpoint=receiver.url)
        code, out, err = env.sync()
        assert code == 0, err
        assert "3 uploaded" in out

        got = uploads_by_subject(receiver)
        assert sorted(got) == ["one", "three", "two"]  # Trash and Drafts are not archived
        assert all(len(v) == 1 for v in got.values())
        assert got["one"][0]["recipients"] == [alice.user]
        assert sorted(got["two"][0]["recipients"]) == sorted([alice.user, f"bob@{DOMAIN}", f"dave@{DOMAIN}"])
        assert got["two"][0]["sender"] == alice.user
        assert got["three"][0]["recipients"] == [alice.user]
        stored = {up["uploadId"]: (receiver.store / f"{up['uploadId']}.eml").read_bytes()
                  for ups in got.values() for up in ups}
        assert sorted(stored.values()) == sorted([m1, m2, m3])  # byte for byte

        proxy.clear()
        code, out, err = env.sync()
        assert code == 0, err
        assert "0 uploaded" in out
        assert len(receiver.uploads()) == 3
        sent = set(proxy.commands)
        # Dovecot has LIST-STATUS: one LIST answers every folder's status, and no STATUS is needed.
        assert sent <= {"CAPABILITY", "LOGIN", "LIST", "STATUS", "LOGOUT"}, proxy.commands
        assert proxy.count("LIST") == 1 and proxy.count("STATUS") == 0, proxy.commands
        assert not sent & {"EXAMINE", "SELECT", "FETCH", "UID FETCH", "UID SEARCH", "SEARCH"}, proxy.commands


def test_message_appended_between_passes_is_the_only_upload(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"old {i}"))
    env.write([env.account(alice)], endpoint=receiver.url)
    assert env.sync()[0] == 0
    alice.deliver(message(to=alice.user, subject="new"))
    code, out, _ = env.sync()
    assert code == 0 and "1 uploaded" in out
    assert sorted(uploads_by_subject(receiver)) == ["new", "old 0", "old 1", "old 2"]


def test_mailbox_is_never_changed(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user), flags="")
    alice.deliver(message(to=alice.user), flags="\\Flagged")
    alice.deliver(message(to=alice.user), "Archive", flags="\\Answered")
    before = {f: alice.flags(f) for f in ("INBOX", "Archive")}
    folders_before = dovecot.doveadm("mailbox", "list", "-u", alice.user)
    with CommandRecorder(dovecot.host, dovecot.port) as proxy:
        env.write([env.account(alice, port=proxy.port)], endpoint=receiver.url)
        assert env.sync()[0] == 0
        assert env.sync()[0] == 0
    assert {f: alice.flags(f) for f in ("INBOX", "Archive")} == before
    assert all("\\Seen" not in flags for f in before.values() for flags in f.values())
    assert dovecot.doveadm("mailbox", "list", "-u", alice.user) == folders_before
    assert len(receiver.uploads()) == 3
    assert not set(proxy.commands) & {"SELECT", "STORE", "UID STORE", "EXPUNGE", "UID EXPUNGE", "MOVE",
                                      "UID MOVE", "COPY", "UID COPY", "APPEND", "DELETE", "CREATE", "RENAME"}
    assert "EXAMINE" in proxy.commands


def test_same_message_id_in_two_folders_is_uploaded_once(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    raw = message(to=alice.user, subject="twice", msgid="<same-1@mailer.example>")
    alice.deliver(raw)
    alice.deliver(raw, "Archive")
    env.write([env.account(alice)], endpoint=receiver.url)
    code, out, _ = env.sync()
    assert code == 0 and "1 uploaded, 1 duplicate" in out
    assert len(receiver.uploads()) == 1


def test_second_account_uploads_only_the_vault_not_yet_covered(new_mailbox, receiver, env):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    # A list mail to neither of them by address: each copy's vault is its mailbox owner.
    raw = message("news@list.example", "members@list.example", "list mail", msgid="<list-1@list.example>")
    alice.deliver(raw)
    bob.deliver(raw)
    env.write([env.account(alice), env.account(bob)], endpoint=receiver.url)
    code, out, _ = env.sync()
    assert code == 0 and "2 uploaded" in out
    recipients = sorted(up["recipients"] for up in receiver.uploads())  # accounts run side by side
    assert recipients == sorted([[alice.user], [bob.user]])
    assert env.sync()[0] == 0
    assert len(receiver.uploads()) == 2


def test_message_without_message_id_is_keyed_by_fingerprint(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    raw = message("scanner@devices.example", alice.user, "scan", msgid=None)
    alice.deliver(b"Received: from a by b; Mon, 5 Jan 2026 08:00:00 +0000\r\n" + raw)
    env.write([env.account(alice)], endpoint=receiver.url)
    assert env.sync()[0] == 0
    # the same message again, delivered through another hop, in another folder
    alice.deliver(b"Received: from c by d; Mon, 5 Jan 2026 09:00:00 +0000\r\n" + raw, "Archive")
    code, out, _ = env.sync()
    assert code == 0 and "0 uploaded, 1 duplicate" in out
    assert len(receiver.uploads()) == 1
    keys = env.sql("SELECT key, fingerprint FROM messages")
    assert len(keys) == 1 and keys[0][0].startswith("f:") and keys[0][0] == keys[0][1]


def test_uidvalidity_reset_uploads_nothing_again(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    raws = [message(to=alice.user, subject=f"m{i}") for i in range(3)] + [
        message(to=alice.user, subject="no id", msgid=None)]
    for raw in raws:
        alice.deliver(raw, "Projects")
    env.write([env.account(alice)], endpoint=receiver.url)
    assert env.sync()[0] == 0
    old = next(f for f in env.status()["accounts"][0]["folders"] if f["folder"] == "Projects")["uidvalidity"]
    dovecot.delete_folder(alice.user, "Projects")
    dovecot.create_folder(alice.user, "Projects")
    for raw in raws:
        alice.deliver(raw, "Projects")
    code, out, _ = env.sync()
    assert code == 0 and "0 uploaded, 4 duplicate" in out
    assert len(receiver.uploads()) == 4
    folder = next(f for f in env.status()["accounts"][0]["folders"] if f["folder"] == "Projects")
    assert folder["uidvalidity"] != old
    assert folder["counts"]["duplicate"] == 4


def test_no_primary_recipient_is_skipped_with_reason_and_listed(new_mailbox, receiver, env):
    shared = new_mailbox("info", domain="partner.example")
    shared.deliver(message("a@elsewhere.example", shared.user, "outsiders only",
                           msgid="<outsiders@elsewhere.example>"))
    shared.deliver(message("a@elsewhere.example", shared.user, "cc alice", cc=f"alice@{DOMAIN}"))
    env.write([env.account(shared, name="shared")], endpoint=receiver.url)
    code, out, _ = env.sync()
    assert code == 0 and "1 uploaded" in out and "1 skipped" in out
    assert [up["recipients"] for up in receiver.uploads()] == [[f"alice@{DOMAIN}"]]
    problems = env.status()["not_archived"]
    assert [(p["state"], p["reason"], p["message_id"]) for p in problems] == [
        ("skipped", "no_primary_recipient", "<outsiders@elsewhere.example>")]
    code, text, _ = env.cli("status")
    assert "no_primary_recipient" in text and "<outsiders@elsewhere.example>" in text


def test_receiver_errors_are_retried_and_attempts_recorded(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user, subject="flaky", msgid="<flaky@mailer.example>"))
    receiver.script(500, 500)
    env.write([env.account(alice)], endpoint=receiver.url)
    code, out, _ = env.sync()
    assert code == 0 and "1 uploaded" in out
    assert len(receiver.uploads()) == 1
    assert env.sql("SELECT state, attempts FROM messages") == [("uploaded", 3)]


def test_receiver_down_for_a_pass_leaves_everything_pending(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}"))
    url = receiver.url
    receiver.stop()
    env.write([env.account(alice)], endpoint=url)
    code, out, err = env.sync()
    assert code == 5, (out, err)
    assert "0 uploaded" in out and "pending" in out
    assert env.sql("SELECT count(*) FROM messages WHERE state = 'uploaded'") == [(0,)]
    assert env.sql("SELECT count(*) FROM deliveries") == [(0,)]
    assert {p["state"] for p in env.status()["not_archived"]} == {"pending"}

    from imapsync.receiver import Receiver
    port = int(url.rsplit(":", 1)[1])
    with Receiver(receiver.store, api_key=receiver.api_key, port=port) as again:
        code, out, _ = env.sync()
        assert code == 0 and "3 uploaded" in out
        assert len(again.uploads()) == 3
    assert env.status()["not_archived"] == []


def test_wrong_password_on_one_account_does_not_stop_the_other(new_mailbox, receiver, env):
    good, bad = new_mailbox("good"), new_mailbox("bad")
    good.deliver(message(to=good.user, subject="for good"))
    bad.deliver(message(to=bad.user, subject="for bad"))
    bad_account = env.account(bad, name="bad")
    env.monkeypatch.setenv(bad_account["password"]["env"], "definitely-wrong-password")
    env.write([bad_account, env.account(good, name="good")], endpoint=receiver.url)
    code, out, err = env.sync()
    assert code == 7, (out, err)
    assert sorted(uploads_by_subject(receiver)) == ["for good"]
    accounts = {a["account"]: a for a in env.status()["accounts"]}
    assert "auth_failed" in accounts["bad"]["last_error"]
    assert accounts["good"]["last_error"] is None and accounts["good"]["counts"]["uploaded"] == 1
    assert "definitely-wrong-password" not in out + err
    code, text, _ = env.cli("status")
    assert "auth_failed" in text


def test_api_key_refused_exits_2_and_keeps_messages_pending(new_mailbox, receiver, env, monkeypatch):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    env.write([env.account(alice)], endpoint=receiver.url)
    monkeypatch.setenv("IMAPSYNC_TEST_API_KEY", "not-the-key")
    code, out, err = env.sync()
    assert code == 2, (out, err)
    assert "refused the key" in out
    assert "not-the-key" not in out + err
    assert [p["state"] for p in env.status()["not_archived"]] == ["pending"]
    assert receiver.uploads() == []


def test_status_json_reports_cursor_counts_and_last_run(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user))
    alice.deliver(message(to=alice.user))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    env.sync()
    data = env.status()
    acc = data["accounts"][0]
    assert acc["account"] == "alice" and acc["counts"]["uploaded"] == 2
    inbox = next(f for f in acc["folders"] if f["folder"] == "INBOX")
    assert inbox["last_uid"] == 2 and inbox["uidnext"] == 3 and inbox["lag_seconds"] is not None
    assert acc["last_run"]["outcome"] == "ok" and acc["last_run"]["uploaded"] == 2
    assert json.dumps(data).count(alice.password) == 0


def test_sync_with_a_postgresql_ledger(new_mailbox, receiver, env, postgres):
    """The same code and migrations run on PostgreSQL (the multi-worker ledger)."""
    alice = new_mailbox("alice")
    raw = message(to=alice.user, msgid="<pg-1@mailer.example>")
    alice.deliver(raw)
    alice.deliver(raw, "Archive")
    alice.deliver(message(to=alice.user, msgid=None))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url,
              ledger=postgres.create_database("sync_pg"))
    code, out, _ = env.sync()
    assert code == 0 and "2 uploaded, 1 duplicate" in out
    assert env.sync()[1].startswith("1 account(s): 0 uploaded, 0 duplicate")
    assert env.status()["accounts"][0]["counts"]["uploaded"] == 2
    assert len(receiver.uploads()) == 2


def test_a_connection_cut_mid_fetch_reconnects_and_finishes(new_mailbox, receiver, env, dovecot):
    from imapsync.testing.fault_proxy import FaultProxy
    alice = new_mailbox("alice")
    raws = [message(to=alice.user, subject=f"m{i}", body="z" * 20_000) for i in range(10)]
    for raw in raws:
        alice.deliver(raw)
    with FaultProxy(dovecot.host, dovecot.port, cut_after=60_000) as proxy:  # inside the body FETCH
        env.write([env.account(alice, port=proxy.port)], endpoint=receiver.url,
                  fetch={"reconnect_backoff": 0.05, "batch_bytes": 50_000, "connections": 1})
        code, out, err = env.sync()
        assert proxy.faults == 1 and proxy.connections == 2
    assert code == 0, out + err
    assert "reconnecting" in err
    stored = sorted((receiver.store / f"{u['uploadId']}.eml").read_bytes() for u in receiver.uploads())
    assert stored == sorted(raws)


def test_a_stalled_server_times_out_and_the_pass_reconnects(new_mailbox, receiver, env, dovecot):
    from imapsync.testing.fault_proxy import FaultProxy
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}", body="w" * 10_000))
    with FaultProxy(dovecot.host, dovecot.port, stall_after=20_000) as proxy:
        env.write([env.account(alice, port=proxy.port, timeout=1)], endpoint=receiver.url,
                  fetch={"reconnect_backoff": 0.05, "connections": 1})
        code, out, err = env.sync()
        assert proxy.faults == 1
    assert code == 0, out + err
    assert len(receiver.uploads()) == 3


def test_a_cut_on_a_body_fetch_connection_is_recovered(new_mailbox, receiver, env, dovecot):
    """With several connections per account, bodies come over the extra ones: cut one."""
    from imapsync.testing.fault_proxy import FaultProxy
    alice = new_mailbox("alice")
    raws = [message(to=alice.user, subject=f"m{i}", body="q" * 20_000) for i in range(12)]
    for raw in raws:
        alice.deliver(raw)
    # The header connection moves a few KB; each body connection passes 60 KB within two batches.
    with FaultProxy(dovecot.host, dovecot.port, cut_after=60_000, faulty_connections=4) as proxy:
        env.write([env.account(alice, port=proxy.port)], endpoint=receiver.url,
                  fetch={"reconnect_backoff": 0.05, "batch_bytes": 50_000, "connections": 4})
        code, out, err = env.sync()
        assert proxy.faults >= 1 and proxy.connections > 4
    assert code == 0, out + err
    stored = sorted((receiver.store / f"{u['uploadId']}.eml").read_bytes() for u in receiver.uploads())
    assert stored == sorted(raws)


def test_list_status_gives_each_folder_the_status_that_status_gives(new_mailbox, env, monkeypatch):
    """The poll reads every folder's STATUS from one LIST-STATUS answer (its own fast reading
    for the usual shapes, imapclient's parser otherwise): awkward names must come out as
    the names and numbers that LIST and STATUS give one folder at a time."""
    from imapsync.config import Account, FolderFilter
    from imapsync.imap_source import ImapSource

    alice = new_mailbox("alice")
    names = ["Plain", "With space", 'Quote"d', "Entwürfe", "日本語", "2024", "Back\\slash", "a/b c"]
    for i, name in enumerate(names):
        for j in range(i + 1):
            alice.deliver(message("x@outside.example", alice.user, f"{name} {j}"), name)
    account = Account.model_validate(dict(env.account(alice), password="unused"))
    with ImapSource(account, alice.password) as fast, ImapSource(account, alice.password) as plain:
        listed = {f.name for f in fast.folders(FolderFilter())}
        assert set(names) | {"INBOX"} <= listed
        assert fast._listed, "Dovecot offers LIST-STATUS: the statuses come with the list"
        for name in names:
            got, want = fast.status(name), plain.status(name)  # plain: a STATUS command of its own
            assert got == want and got.messages == names.index(name) + 1, (name, got, want)
        # The general parser (used for literals) reads the same answer the same way.
        fast_reading = fast._list_status()
        import imapsync.imap_source as source_module
        monkeypatch.setattr(source_module, "_simple_lines", lambda lines, pattern: None)
        assert fast._list_status() == fast_reading


def test_many_accounts_are_spread_over_processes_and_their_results_added_up(new_mailbox, receiver, env):
    """`sync` with many accounts forks `fetch.processes` children, each with a share of the
    accounts: every message is uploaded once, a wrong password still names its account
    (exit 7), and each account has its run in the ledger."""
    mailboxes = [new_mailbox(f"many{i}-") for i in range(33)]
    for i, box in enumerate(mailboxes):
        box.deliver(message("x@outside.example", box.user, f"many {i}"))
    accounts = [env.account(box) for box in mailboxes]
    accounts[7]["password"] = {"env": "NO_SUCH_PASSWORD"}
    env.monkeypatch.setenv("NO_SUCH_PASSWORD", "wrong")
    env.write(accounts, endpoint=receiver.url, fetch={"processes": 2})
    code, out, err = env.sync()
    assert code == 7, (out, err)
    assert "33 account(s): 32 uploaded" in out and f"account error: {accounts[7]['name']}" in out, out
    assert sorted(uploads_by_subject(receiver)) == sorted(f"many {i}" for i in range(33) if i != 7)
    assert "33 accounts over 2 processes" in err, err
    assert len(env.sql("SELECT id FROM runs")) == 33  # one run per account, written by the children
    code, out, err = env.sync()  # nothing new: the second pass uploads nothing
    assert "0 uploaded" in out and len(receiver.uploads()) == 32


def _awkward_messages(user: str) -> list[bytes]:
    return [
        message("x@outside.example", user, "plain"),
        b"X-Note: none of the routing headers\r\n\r\nso the header section fetched is empty\r\n",
        f'From: "UID 7 RFC822.SIZE 9 {{12}}" <x@outside.example>\r\nTo: {user}\r\n\r\n'.encode(),  # no body
        f"From: =?utf-8?q?J=C3=BCrgen?= <j@outside.example>\r\nTo: {user}\r\nCc: J\xfcrgen <j@x.example>\r\n"
        f"Subject: 8-bit\r\n\r\nbody\r\n".encode("latin-1"),
        message("x@outside.example", user, "long", body="line\r\n" * 20000),
    ]


def test_headers_and_bodies_read_fast_are_what_imapclient_reads(new_mailbox, env, monkeypatch):
    """Headers and bodies are read off the connection directly (imapclient's general parser
    was a sixth of a backfill's sync thread): on Dovecot and on pymap they must come out as
    imapclient's parser reads the same answers. A message the fast reading does not find
    is asked again through imapclient, so an answer in a shape it does not know (forced
    here) costs a round trip, never a message."""
    from imapsync.config import Account
    from imapsync.testing.pymap_server import PymapServer

    alice = new_mailbox("alice")
    user, password = f"bob@{DOMAIN}", "pymap-pw-3"
    for raw in _awkward_messages(alice.user):
        alice.deliver(raw, "INBOX")
    with PymapServer({user: password}) as server:
        for raw in _awkward_messages(user):
            server.append(user, password, "INBOX", raw)
        pymap_account = {"name": "p", "host": server.host, "port": server.port, "tls": "plain", "username": user}
        for account, pw in ((dict(env.account(alice)), alice.password), (pymap_account, password)):
            _read_both_ways(Account.model_validate(dict(account, password="unused")), pw, monkeypatch)


def _read_both_ways(account, password: str, monkeypatch) -> None:
    import imapsync.imap_source as source_module
    from imapsync.imap_source import HEADER_ITEM, ImapSource

    with ImapSource(account, password) as source:
        source.examine("INBOX")
        uids = source.uids_after(0, "INBOX")
        assert len(uids) == 5, (account.name, uids)
        general = source.client.fetch(uids, ["RFC822.SIZE", HEADER_ITEM, "BODY.PEEK[]"])
        want = [(u, general[u][b"RFC822.SIZE"],
                 next((v for k, v in general[u].items() if k.startswith(b"BODY[HEADER")), b"") or b"")
                for u in uids]
        gone = max(uids) + 100  # no such message: expunged before the fetch, say
        assert [(h.uid, h.size, h.header) for h in source.fetch_headers(uids + [gone], "INBOX")] == want, account.name
        assert source.fetch_bodies(uids, "INBOX") == {u: general[u][b"BODY[]"] for u in uids}, account.name
        assert want[1][2].strip() == b"" and b"J\xfcrgen" in want[3][2], account.name
        with monkeypatch.context() as m:  # every answer in a shape the fast reading does not know
            m.setattr(source_module, "_FETCH_LITERAL", re.compile(rb"(?!)"))
            assert [(h.uid, h.size, h.header) for h in source.fetch_headers(uids, "INBOX")] == want, account.name
