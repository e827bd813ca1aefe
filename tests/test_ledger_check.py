"""`imapsync ledger check` (issue 7): silent on a consistent ledger, one line per problem
on a damaged one. The damage is done with SQL on a real ledger written by a real sync."""
from __future__ import annotations

import sqlite3

import pytest
from mail import message

pytestmark = pytest.mark.timeout(120)  # every test bounded in time


def _damage(env, *statements: str) -> None:
    with sqlite3.connect(env.root / "imapsync.sqlite3") as c:
        c.execute("PRAGMA foreign_keys = OFF")  # what a bug or a hand edit could do
        for sql in statements:
            c.execute(sql)


def test_consistent_ledger_exits_0_with_one_summary_line(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}"))
    alice.deliver(message("a@elsewhere.example", "b@elsewhere.example", "list mail"), "Lists")
    shared = new_mailbox("info", domain="partner.example")  # no owner vault: skipped with its reason
    shared.deliver(message("a@elsewhere.example", shared.user, "no vault"))
    env.write([env.account(alice), env.account(shared, name="shared")], endpoint=receiver.url)
    assert env.sync()[0] == 0
    code, out, err = env.cli("ledger", "check")
    assert code == 0, out + err
    assert out.splitlines() == ["ledger consistent: 2 accounts, 3 folders, 5 messages, 5 copies, 4 deliveries checked"]


def test_every_kind_of_damage_is_one_line_and_exit_1(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(5):
        alice.deliver(message(to=alice.user, subject=f"m{i}", msgid=f"<m{i}@mailer.example>"))
    env.write([env.account(alice)], endpoint=receiver.url)
    assert env.sync()[0] == 0
    _damage(env,
            # a copy of m0 made pending again, below its folder's cursor: never redone
            "UPDATE sightings SET state = 'pending' WHERE message_id = '<m0@mailer.example>'",
            # m1 uploaded, but the vault it reached is gone
            "DELETE FROM deliveries WHERE message_ref = (SELECT id FROM messages WHERE message_id = '<m1@mailer.example>')",
            # m2 failed without a reason
            "UPDATE sightings SET state = 'failed', reason = NULL WHERE message_id = '<m2@mailer.example>'",
            # m3's copy points at a folder that does not exist
            "UPDATE sightings SET folder_id = 999 WHERE message_id = '<m3@mailer.example>'",
            # a message no copy refers to and no vault received
            "INSERT INTO messages (key, message_id, size, state, attempts, first_seen_at) "
            "VALUES ('m:orphan', '<orphan@mailer.example>', 1, 'pending', 0, '2026-01-01 00:00:00')",
            # a state the ledger does not know
            "UPDATE messages SET state = 'archived?' WHERE message_id = '<m4@mailer.example>'")
    code, out, err = env.cli("ledger", "check")
    assert code == 1, out + err
    lines = out.splitlines()
    checks = sorted(line.split(":")[0] for line in lines[:-1])
    assert checks == ["archived_without_delivery", "cursor_past_unfinished", "dangling_reference", "no_reason",
                      "orphan_message", "unknown_state", "uploaded_without_delivery"], out
    assert lines[-1].startswith("ledger inconsistent: 7 problem(s)")
    assert any("sightings.folder_id = 999 but no such row in folders" in line for line in lines)
    assert any(line.startswith("cursor_past_unfinished: ") and " uid 1: copy is pending" in line for line in lines)
    assert "Traceback" not in err
