"""Seeding years of mail fast: Maildir files written straight into Dovecot's store, each
with its arrival date (INTERNALDATE, the file's mtime) and a matching Date header."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from mail import message


@dataclass(frozen=True)
class Seeded:
    folder: str
    day: date
    raw: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def seed_history(server, user: str, count: int, folders: list[str], first: date, last: date,
                 tag: str = "h", body: str = "Archived long ago.") -> list[Seeded]:
    """`count` messages spread over [first, last] and over `folders`, delivered in a
    shuffled date order (so UID order is not date order, as in migrated mailboxes)."""
    span = (last - first).days + 1
    out = []
    for i in range(count):
        day = first + timedelta(days=(i * 7919) % span)  # a prime stride: every day used, order mixed
        when = datetime(day.year, day.month, day.day, 12, 0, tzinfo=timezone.utc)
        folder = folders[i % len(folders)]
        raw = message("someone@outside.example", user, f"{tag} {i} of {day.isoformat()}",
                      msgid=f"<{tag}-{i}@history.example>", when=when, body=body)
        server.deliver(user, raw, folder, internaldate=when)
        out.append(Seeded(folder, day, raw))
    return out


def in_window(seeded: list[Seeded], since: date | None, before: date | None) -> set[str]:
    """sha256 of the seeded messages that arrived in [since, before)."""
    return {s.sha256 for s in seeded if (since is None or s.day >= since) and (before is None or s.day < before)}


def uploaded(receiver) -> list[str]:
    """sha256 of each message the receiver stored (one entry per stored upload)."""
    return [u["sha256"] for u in receiver.uploads()]
