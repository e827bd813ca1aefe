"""`imapsync verify` against Dovecot and a ledger filled by real syncs: complete means every
message in the mailbox is accounted for; anything else is listed and exits non-zero."""
from __future__ import annotations

import json

from mail import message


def verify_json(env, *args: str) -> tuple[int, dict]:
    code, out, err = env.cli("verify", "--json", *args)
    assert code in (0, 5, 7, 8), err
    return code, json.loads(out)


def test_a_message_appended_after_the_last_sync_is_unaccounted_until_the_next_sync(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    for i in range(5):
        alice.deliver(message(to=alice.user, subject=f"in {i}"))
    alice.deliver(message(to=alice.user, subject="kept"), "Archive")
    alice.deliver(message("x@outside.example", alice.user, "bin"), "Trash")  # excluded: not expected
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    assert env.sync()[0] == 0

    code, text, _ = env.cli("verify")
    assert code == 0, text
    assert "6 messages: 6 by UID, 0 by key, 0 failed, 0 unaccounted: complete" in text

    late = message(to=alice.user, subject="late", msgid="<late@mailer.example>")
    alice.deliver(late)
    code, data = verify_json(env)
    assert code == 8
    assert data["complete"] is False
    assert data["totals"] == {"messages": 7, "by_uid": 6, "by_key": 0, "failed": 0, "unaccounted": 1}
    [missing] = data["unaccounted"]
    assert (missing["account"], missing["folder"], missing["uid"], missing["message_id"], missing["why"]) == (
        "alice", "INBOX", 6, "<late@mailer.example>", "not_in_ledger")
    assert missing["size"] == len(late)
    inbox = next(f for f in data["folders"] if f["folder"] == "INBOX")
    assert (inbox["messages"], inbox["by_uid"], inbox["unaccounted"]) == (6, 5, 1)
    code, text, _ = env.cli("verify")
    assert code == 8 and "<late@mailer.example>" in text and "NOT complete" in text

    assert env.sync()[0] == 0
    code, data = verify_json(env)
    assert code == 0 and data["complete"] and data["unaccounted"] == []
    assert verify_json(env, "--folder", "Archive")[1]["totals"]["messages"] == 1


def test_after_a_uidvalidity_change_messages_are_accounted_for_by_key(new_mailbox, receiver, env, dovecot):
    alice = new_mailbox("alice")
    for i in range(3):
        alice.deliver(message(to=alice.user, subject=f"m{i}"), "Projects")
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    assert env.sync()[0] == 0
    dovecot.set_uidvalidity(alice.user, "Projects", 4242)  # same messages, the old UIDs mean nothing now
    code, data = verify_json(env, "--folder", "Projects")
    assert code == 0, data
    assert data["totals"] == {"messages": 3, "by_uid": 0, "by_key": 3, "failed": 0, "unaccounted": 0}


def test_a_failed_message_is_listed_with_its_reason_and_exits_5(new_mailbox, receiver, env):
    alice = new_mailbox("alice")
    alice.deliver(message(to=alice.user, subject="refused", msgid="<refused@mailer.example>"))
    env.write([env.account(alice, name="alice")], endpoint=receiver.url)
    receiver.script("invalid_recipient")
    assert env.sync()[0] == 5
    code, data = verify_json(env)
    assert code == 5
    assert [(c["message_id"], c["why"]) for c in data["failed"]] == [
        ("<refused@mailer.example>", "failed: invalid_recipient")]
    assert data["unaccounted"] == []
