"""Builders of test mail: small RFC 5322 messages with exactly the headers a test needs."""
from __future__ import annotations

import itertools
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

_counter = itertools.count(1)
_T0 = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)


def message(sender: str = "someone@outside.example", to: str = "alice@acme.com", subject: str | None = None,
            *, msgid: str | None | bool = True, cc: str | None = None, extra: list[str] | None = None,
            body: str = "Hello.", when: datetime | None = None) -> bytes:
    """A CRLF message; msgid=True makes a unique Message-ID, a string sets it, None omits it."""
    n = next(_counter)
    subject = subject if subject is not None else f"Test message {n}"
    headers = list(extra or [])
    headers += [f"From: {sender}", f"To: {to}"]
    if cc:
        headers.append(f"Cc: {cc}")
    headers += [f"Subject: {subject}", f"Date: {format_datetime(when or _T0 + timedelta(minutes=n))}"]
    if msgid is True:
        headers.append(f"Message-ID: <test-{n}-{id(headers)}@mailer.example>")
    elif msgid:
        headers.append(f"Message-ID: {msgid}")
    return ("\r\n".join(headers + ["", body, ""])).encode()
