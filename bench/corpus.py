"""The benchmark corpus: realistic mail, generated deterministically, written as Maildir.

Size mix (issue 6): 70% 2-20 KB text, 25% 50-500 KB with a base64 attachment, 5%
1-5 MB; about 2% of messages also appear in a second folder (the same Message-ID),
and 1% have no Message-ID. Bytes come from one random pool sliced at random offsets,
so generating 2.3 GB costs seconds, not minutes.
"""
from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

FOLDERS = ("INBOX", "Archive", "Projects", "Lists", "Sent")


@dataclass(frozen=True)
class Corpus:
    messages: int
    bytes: int
    copies: int  # deliveries, counting the duplicate copies


def _pool(rng: random.Random, size: int = 12 * 1024 * 1024) -> bytes:
    return base64.encodebytes(rng.randbytes(size * 3 // 4))


def _slice(pool: bytes, rng: random.Random, n: int) -> bytes:
    start = rng.randrange(0, len(pool) - n - 1)
    return pool[start:start + n]


def _size(rng: random.Random) -> tuple[int, bool]:
    r = rng.random()
    if r < 0.70:
        return rng.randint(2_000, 20_000), False
    if r < 0.95:
        return rng.randint(50_000, 500_000), True
    return rng.randint(1_000_000, 5_000_000), True


def make_message(i: int, owner: str, rng: random.Random, pool: bytes, when: datetime) -> bytes:
    size, attachment = _size(rng)
    headers = [
        f"From: Sender {i % 97} <sender{i % 97}@partner{i % 13}.example>",
        f"To: {owner}",
        f"Subject: Benchmark message {i}",
        f"Date: {format_datetime(when)}",
    ]
    if rng.random() >= 0.01:
        headers.append(f"Message-ID: <bench-{i}-{rng.getrandbits(32):08x}@partner{i % 13}.example>")
    headers.append("MIME-Version: 1.0")
    if not attachment:
        headers.append("Content-Type: text/plain; charset=us-ascii")
        body = _slice(pool, rng, size).replace(b"\n", b"\r\n")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + body + b"\r\n"
    boundary = f"=_b{i}"
    text = _slice(pool, rng, 1500).replace(b"\n", b"\r\n")
    blob = _slice(pool, rng, size).replace(b"\n", b"\r\n")
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    return (("\r\n".join(headers) + f"\r\n\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n").encode()
            + text + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a{i}.bin\r\n\r\n".encode()
            + blob + f"\r\n--{boundary}--\r\n".encode())


def seed(dovecot, user: str, messages: int, seed: int = 42) -> Corpus:
    """Deliver `messages` messages over FOLDERS into `user`'s Maildir (plus ~2% copies)."""
    rng = random.Random(seed)
    pool = _pool(rng)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    total = copies = 0
    for i in range(messages):
        folder = FOLDERS[i % len(FOLDERS)]
        when = t0 + timedelta(minutes=37 * i)
        raw = make_message(i, user, rng, pool, when)
        dovecot.deliver(user, raw, folder, internaldate=when)
        total += len(raw)
        copies += 1
        if rng.random() < 0.02:  # the same message filed in a second folder
            dovecot.deliver(user, raw, FOLDERS[(i + 1) % len(FOLDERS)], internaldate=when)
            copies += 1
    return Corpus(messages, total, copies)
