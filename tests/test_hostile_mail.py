"""Hostile and broken mail (issue 7): a corpus generated here (never downloaded) of
malformed messages, delivered to Dovecot and archived by `imapsync sync`.

What must hold for every one of them: no pass crashes; each is uploaded byte for byte
as IMAP serves it (the SHA-256 of the stored upload equals that of Dovecot's
BODY.PEEK[], which is not always the file: Dovecot serves bare LF as CRLF), or it is
skipped with a reason; and routing follows the real address, never a display name.
"""
from __future__ import annotations

import hashlib

import pytest
from conftest import DOMAIN
from imapclient import IMAPClient

pytestmark = pytest.mark.timeout(180)  # every test bounded in time

A = f"a@{DOMAIN}"  # an address on the primary domain that display names try to impersonate
RECIPIENTS = 10_000
ON_DOMAIN = 1_000  # of the 10,000 recipients, these are on the primary domain


def corpus(owner: str) -> dict[str, bytes]:
    """name -> raw message. `owner` is the mailbox's own (primary-domain) address."""
    to = f"To: {owner}\r\n".encode()

    def mail(name: str, headers: bytes = b"", body: bytes = b"Body.\r\n", *, msgid: bool = True) -> bytes:
        ident = f"Message-ID: <hostile-{name}@mailer.example>\r\n".encode() if msgid else b""
        return (b"From: sender@outside.example\r\n" + to + f"Subject: {name}\r\n".encode() + ident
                + headers + b"\r\n" + body)

    many = ", ".join([f"User {i} <u{i}@{DOMAIN}>" for i in range(ON_DOMAIN)]
                     + [f"u{i}@outside.example" for i in range(RECIPIENTS - ON_DOMAIN)])
    return {
        "no_headers": b"No header at all, just a line of text.\r\nAnd another.\r\n",
        "only_headers": b"From: sender@outside.example\r\n" + to + b"Subject: only headers\r\n"
                        b"Message-ID: <hostile-only-headers@mailer.example>\r\n",
        "eight_bit_headers": mail("eight_bit_headers", "X-Name: J\u00f6rg Gr\u00fc\u00dfe \u20ac\r\n".encode()
                                  + b"X-Latin1: Andr\xe9 \xe0 la plage\r\n"),
        "invalid_utf8_headers": mail("invalid_utf8_headers",
                                     b"X-Bad: \xff\xfe\xc3\x28 \xed\xa0\x80 \xf8\x88\x80\x80\x80\r\n"
                                     b"Cc: \xc0\xaf\xe0\x80\xaf <cc@outside.example>\r\n"),
        "rfc2047_garbage": mail("rfc2047_garbage",
                                b"X-Subject: =?utf-8?B?!!!notbase64?= =?unknown-8bit?Q?=ZZ=?= =?utf-8?q?unterminated\r\n"
                                b"Cc: =?utf-8?b?w6nDqQ==?= <cc2@outside.example>, =?x?q?=?= <cc3@outside.example>\r\n"),
        "ten_thousand_recipients": mail("ten_thousand_recipients", f"Cc: {many}\r\n".encode()),
        "megabyte_header_line": mail("megabyte_header_line", b"X-Long: " + b"a" * 1_000_000 + b"\r\n"),
        "megabyte_routing_header": mail("megabyte_routing_header", b"Cc: " + b"b" * 1_000_000 + b"\r\n"),
        "nul_bytes": mail("nul_bytes", b"X-Nul: before\x00after\r\n", b"body\x00with\x00nuls\r\n"),
        "bare_lf": b"From: sender@outside.example\n" + to.replace(b"\r\n", b"\n")
                   + b"Subject: bare_lf\nMessage-ID: <hostile-bare-lf@mailer.example>\n\nLine one.\nLine two.\n",
        "missing_final_crlf": mail("missing_final_crlf", body=b"The last line has no line end."),
        "broken_mime_boundaries": mail(
            "broken_mime_boundaries",
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"declared\"\r\n",
            b"--other\r\nContent-Type: text/plain\r\n\r\npart one\r\n--declared\r\n"
            b"Content-Type: multipart/alternative; boundary=\r\n\r\n--\r\nunterminated nested part\r\n"),
        "duplicate_message_id": mail("duplicate_message_id",
                                     b"Message-ID: <hostile-second-id@mailer.example>\r\n"),
        "message_id_with_spaces": mail("message_id_with_spaces", b"Message-ID: <spaces in the id @ mailer.example>\r\n",
                                       msgid=False),
        "message_id_without_brackets": mail("message_id_without_brackets",
                                            b"Message-ID: hostile-no-brackets@mailer.example\r\n", msgid=False),
        "quoted_display_name_is_a_primary_address": (
            f'From: "{A}" <evil@x.example>\r\n'.encode() + to
            + b"Subject: quoted display name\r\nMessage-ID: <hostile-quoted-display@mailer.example>\r\n\r\nHi.\r\n"),
        "display_name_is_an_address_real_one_primary": (
            f"From: evil@x.example <{A}>\r\n".encode() + to
            + b"Subject: real address primary\r\nMessage-ID: <hostile-real-primary@mailer.example>\r\n\r\nHi.\r\n"),
        "unquoted_display_name_is_a_primary_address": (
            b"From: sender@outside.example\r\n" + to + f"Cc: {A} <evil@x.example>\r\n".encode()
            + b"Subject: unquoted display name\r\nMessage-ID: <hostile-unquoted-display@mailer.example>\r\n\r\nHi.\r\n"),
    }


def served(dovecot, user: str, password: str) -> dict[int, bytes]:
    """UID -> the bytes Dovecot serves for BODY.PEEK[] (what the archiver must store)."""
    with IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=30) as client:
        client.login(user, password)
        client.select_folder("INBOX", readonly=True)
        uids = client.search(["ALL"])
        return {uid: item[b"BODY[]"] for uid, item in client.fetch(uids, ["BODY.PEEK[]"]).items()}


def stored(receiver) -> dict[str, list[dict]]:
    """SHA-256 of each stored upload's bytes -> its metadata."""
    out: dict[str, list[dict]] = {}
    for up in receiver.uploads():
        digest = hashlib.sha256((receiver.store / f"{up['uploadId']}.eml").read_bytes()).hexdigest()
        out.setdefault(digest, []).append(up)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ledger_kind", ["sqlite", "postgresql"])
def test_hostile_corpus_never_crashes_a_pass_and_is_archived_byte_for_byte(ledger_kind, new_mailbox, receiver,
                                                                          env, dovecot, request):
    alice = new_mailbox("alice")
    mails = corpus(alice.user)
    for raw in mails.values():
        alice.deliver(raw)
    names = list(mails)  # UIDs follow the delivery order
    extra = {}
    if ledger_kind == "postgresql":
        extra["ledger"] = request.getfixturevalue("postgres").create_database(f"hostile{alice.user.split('@')[0]}")
    env.write([env.account(alice)], endpoint=receiver.url, **extra)
    code, out, err = env.sync()
    assert code == 0, out + err
    assert "Traceback" not in err
    assert f"{len(mails)} uploaded" in out, out

    by_uid = served(dovecot, alice.user, alice.password)
    assert sorted(by_uid) == list(range(1, len(mails) + 1))
    uploads = stored(receiver)
    for uid, raw in by_uid.items():
        digest = hashlib.sha256(raw).hexdigest()
        assert len(uploads.get(digest, [])) == 1, f"{names[uid - 1]}: not stored exactly once as served"
    assert len(receiver.uploads()) == len(mails)
    assert env.status()["not_archived"] == []
    # What Dovecot itself changes (so "as fetched" is the right promise, not "as delivered"):
    assert by_uid[names.index("bare_lf") + 1] == mails["bare_lf"].replace(b"\n", b"\r\n")
    assert by_uid[names.index("missing_final_crlf") + 1] == mails["missing_final_crlf"]

    def upload_of(name: str) -> dict:
        return uploads[hashlib.sha256(by_uid[names.index(name) + 1]).hexdigest()][0]

    # Routing follows the real address, never the display name.
    assert upload_of("quoted_display_name_is_a_primary_address")["recipients"] == [alice.user]
    assert upload_of("quoted_display_name_is_a_primary_address")["sender"] is None
    assert upload_of("unquoted_display_name_is_a_primary_address")["recipients"] == [alice.user]
    real = upload_of("display_name_is_an_address_real_one_primary")
    assert sorted(real["recipients"]) == sorted([A, alice.user]) and real["sender"] == A
    many = upload_of("ten_thousand_recipients")["recipients"]
    assert sorted(many) == sorted([f"u{i}@{DOMAIN}" for i in range(ON_DOMAIN)] + [alice.user])
    assert upload_of("no_headers")["recipients"] == [alice.user]

    code, out, err = env.sync()  # and a second pass finds nothing new: every copy is final
    assert code == 0 and "0 uploaded" in out, out + err
    code, out, err = env.cli("ledger", "check")
    assert code == 0, out + err


def test_hostile_mail_without_a_primary_recipient_is_skipped_with_its_reason(new_mailbox, receiver, env):
    """A mailbox off the primary domain (no owner vault): what has no real primary-domain
    address is skipped with the reason, including mail whose display names pretend to be one."""
    shared = new_mailbox("info", domain="partner.example")
    skipped = {
        "no_headers": b"No header at all.\r\n",
        "quoted": f'From: "{A}" <evil@x.example>\r\nTo: {shared.user}\r\nSubject: q\r\n'
                  f"Message-ID: <skip-quoted@x.example>\r\n\r\nHi.\r\n".encode(),
        "unquoted": f"From: evil@x.example\r\nTo: {A} <{shared.user}>\r\nSubject: u\r\n"
                    f"Message-ID: <skip-unquoted@x.example>\r\n\r\nHi.\r\n".encode(),
    }
    archived = f"From: evil@x.example <{A}>\r\nTo: {shared.user}\r\nSubject: r\r\n" \
               f"Message-ID: <keep-real@x.example>\r\n\r\nHi.\r\n".encode()
    for raw in [*skipped.values(), archived]:
        shared.deliver(raw)
    env.write([env.account(shared, name="shared")], endpoint=receiver.url)
    code, out, err = env.sync()
    assert code == 0, out + err
    assert "1 uploaded" in out and "3 skipped" in out, out
    assert [(u["recipients"], u["sender"]) for u in receiver.uploads()] == [([A], A)]
    problems = env.status()["not_archived"]
    assert [(p["uid"], p["state"], p["reason"]) for p in problems] == [
        (1, "skipped", "no_primary_recipient"), (2, "skipped", "no_primary_recipient"),
        (3, "skipped", "no_primary_recipient")]
