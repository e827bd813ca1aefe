"""`imapsync demo`: the whole pipeline on this machine, with nothing to configure.

Starts a local IMAP server (pymap, in memory) seeded with sample mail for three
mailboxes, and the local Vaultastic receiver, in a temporary directory; writes a
config for them; archives twice (the second pass finds nothing new); and prints the
status table. The sample mail shows each decision the archiver makes: uploads to
the right vaults, a Sent copy and its received copy deduplicated, a message without
Message-ID, and a message with no recipient on the primary domain, skipped with its
reason.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from email.utils import format_datetime, make_msgid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from rich.console import Console

from imapsync import config as config_mod
from imapsync.errors import ExitCode
from imapsync.ledger import Ledger
from imapsync.service import run_pass
from imapsync.status import render, report

DOMAIN = "acme.example"
USERS = {"alice@acme.example": "demo-alice", "bob@acme.example": "demo-bob",
         "info@partner.example": "demo-info"}


def _mail(sender: str, to: str, subject: str, when: datetime, *, msgid: str | None = "auto",
          body: str = "", cc: str | None = None) -> bytes:
    lines = [f"From: {sender}", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    lines += [f"Subject: {subject}", f"Date: {format_datetime(when)}"]
    if msgid:
        lines.append(f"Message-ID: {make_msgid(domain=sender.rpartition('@')[2].rstrip('>')) if msgid == 'auto' else msgid}")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "",
              body or f"This is the demo message '{subject}'.", ""]
    return "\r\n".join(lines).encode()


def sample_mail() -> list[tuple[str, str, bytes]]:
    """(user, folder, raw) for the demo mailboxes."""
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    out: list[tuple[str, str, bytes]] = []
    for i in range(12):
        out.append(("alice@acme.example", "INBOX", _mail(
            f"Customer {i} <customer{i}@client{i % 3}.example>", "Alice <alice@acme.example>",
            f"Order {1000 + i}", t0 + timedelta(hours=i))))
    # Alice writes to Bob: her Sent copy and Bob's INBOX copy are one message.
    shared_id = make_msgid(domain=DOMAIN)
    memo = _mail("Alice <alice@acme.example>", "Bob <bob@acme.example>", "Quarterly plan",
                 t0 + timedelta(days=1), msgid=shared_id, cc="partner@partner.example")
    out.append(("alice@acme.example", "Sent", memo))
    out.append(("bob@acme.example", "INBOX", memo))
    # A mailer that sets no Message-ID: keyed by a fingerprint of the content.
    out.append(("bob@acme.example", "INBOX", _mail("scanner@devices.example", "bob@acme.example",
                                                  "Scanned document", t0 + timedelta(days=2), msgid=None)))
    for i in range(6):
        out.append(("bob@acme.example", "Projects", _mail(
            f"Carol <carol{i}@acme.example>", "bob@acme.example", f"Project note {i}", t0 + timedelta(days=3, hours=i))))
    # Trash is not archived (excluded in the config).
    out.append(("bob@acme.example", "Trash", _mail("spam@junk.example", "bob@acme.example", "Deleted", t0)))
    # A shared mailbox off the primary domain: its mail between outsiders has no vault.
    out.append(("info@partner.example", "INBOX", _mail(
        "someone@elsewhere.example", "info@partner.example", "Enquiry", t0 + timedelta(days=4))))
    out.append(("info@partner.example", "INBOX", _mail(
        "someone@elsewhere.example", "info@partner.example", "Re: Enquiry",
        t0 + timedelta(days=5), cc="Alice <alice@acme.example>")))
    return out


def write_config(directory: Path, imap_port: int, endpoint: str, api_key: str) -> Path:
    data = {
        "ledger": "imapsync.sqlite3",
        "sink": "vaultastic",
        "tenants": [{"domain": DOMAIN, "endpoint": endpoint, "api_key": {"file": "secrets/receiver.key"}}],
        "accounts": [
            {"name": user.split("@")[0], "host": "127.0.0.1", "port": imap_port, "tls": "plain",
             "username": user, "password": {"file": f"secrets/{user.split('@')[0]}.password"},
             "folders": {"exclude": ["Trash"]}}
            for user in USERS
        ],
        "upload": {"max_attempts": 3, "backoff_factor": 0.2},
    }
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    files = {f"{user.split('@')[0]}.password": password for user, password in USERS.items()}
    files["receiver.key"] = api_key
    for name, secret in files.items():
        _write_private(secrets_dir / name, secret + "\n")
    path = directory / "config.yaml"
    _write_private(path, "# Written by `imapsync demo`.\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (0600), also when it exists already."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def run_demo(keep: Path | None, console: Console) -> int:
    try:
        from imapsync.testing.pymap_server import PymapServer
    except ImportError:
        console.print("The demo needs pymap: pip install 'imapsync[demo]'")
        return ExitCode.CONFIG
    from imapsync.receiver import Receiver

    logging.getLogger("imapsync").setLevel(logging.WARNING)  # the demo prints its own summary
    directory = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="imapsync-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_urlsafe(24)
    try:
        with PymapServer(USERS) as imap, Receiver(directory / "receiver", api_key=api_key) as receiver:
            for user, folder, raw in sample_mail():
                imap.append(user, USERS[user], folder, raw)
            console.print(f"IMAP server (pymap) on 127.0.0.1:{imap.port} with {len(sample_mail())} sample "
                          f"messages in {len(USERS)} mailboxes; receiver on {receiver.url}", soft_wrap=True)
            cfg_path = write_config(directory, imap.port, receiver.url, api_key)
            loaded = config_mod.load(cfg_path)
            ledger = Ledger.open(loaded.ledger_url)
            try:
                first = run_pass(loaded, ledger)
                console.print(f"[bold]first pass:[/]  {first.summary()}", highlight=False, soft_wrap=True)
                second = run_pass(loaded, ledger)
                console.print(f"[bold]second pass:[/] {second.summary()}", highlight=False, soft_wrap=True)
                console.print()
                render(report(ledger), console)
            finally:
                ledger.close()
            console.print(f"\nThe receiver stored {len(receiver.uploads())} upload(s) in {directory / 'receiver'}.",
                          soft_wrap=True)
        if keep:
            console.print(f"Config, ledger and uploads kept in {directory}; try "
                          f"`imapsync status --config {directory / 'config.yaml'}`.")
        ok = first.exit_code == ExitCode.OK and second.exit_code == ExitCode.OK and second.totals.uploaded == 0
        return ExitCode.OK if ok else ExitCode.UNEXPECTED
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
