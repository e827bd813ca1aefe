"""A fetched message, parsed once: its dedup key, addresses, date and size (no I/O).

Parsing is deliberately forgiving: mail is often broken, and a message we cannot
parse is still archived byte for byte. Headers are decoded as UTF-8 with
replacement only to read addresses and the Message-ID; the raw bytes are never
changed.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: Headers fetched before any body: enough to key, route and date a message.
ROUTING_HEADERS = ("Message-ID", "Date", "From", "Sender", "Subject", "To", "Cc", "Bcc",
                   "Delivered-To", "X-Original-To")
#: Headers whose addresses decide the vaults (design: "Recipient filtering").
ADDRESS_HEADERS = ("from", "to", "cc", "bcc", "delivered-to", "x-original-to")
#: Headers added in transit; left out of the fingerprint so that copies of one message
#: delivered to different mailboxes still match.
TRACE_HEADERS = frozenset({
    "received", "return-path", "delivered-to", "x-original-to", "x-received",
    "x-delivered-to", "received-spf", "authentication-results", "arc-seal",
    "arc-message-signature", "arc-authentication-results", "x-envelope-to", "envelope-to",
})

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_SPLIT = re.compile(rb"\r?\n")
_WS = re.compile(r"\s+")


def header_block(raw: bytes) -> bytes:
    """The header part of a raw message (everything up to the first empty line)."""
    m = _HEADER_END.search(raw)
    return raw[: m.start()] if m else raw


def parse_headers(block: bytes) -> dict[str, list[str]]:
    """Lower-cased field name -> unfolded values, in order. Tolerates any garbage."""
    fields: dict[str, list[str]] = {}
    name: str | None = None
    value: list[bytes] = []

    def flush() -> None:
        if name is not None:
            text = b" ".join(value).decode("utf-8", "replace").replace("\x00", "")
            fields.setdefault(name, []).append(_WS.sub(" ", text).strip())

    for line in _LINE_SPLIT.split(block):
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line.strip())
            continue
        flush()
        name, sep, rest = line.partition(b":")
        if not sep or not name or b" " in name.strip():
            name, value = None, []
            continue
        name = name.strip().decode("ascii", "replace").lower()
        value = [rest.strip()]
    flush()
    return fields


def normalize_message_id(value: str | None) -> str | None:
    """'<AbC@Example.COM> ' -> 'AbC@example.com'; None if there is nothing usable.

    The local part keeps its case (RFC 5322 treats it as case-sensitive); the domain
    is lower-cased, whitespace and angle brackets are dropped.
    """
    if not value:
        return None
    m = re.search(r"<([^<>]*)>", value)
    text = (m.group(1) if m else value).strip()
    text = _WS.sub("", text)
    if len(text) < 3 or "@" not in text and len(text) < 8:
        return None
    local, at, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}" if at else text


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(_WS.sub(" ", part).strip().encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()


def message_key(normalized_id: str, date: str, sender: str, subject: str) -> str:
    """Design rule 5: the Message-ID plus a short digest of Date, From and Subject."""
    return f"m:{_digest(normalized_id)[:40]}:{_digest(date, sender, subject)[:12]}"


def fingerprint(raw: bytes) -> str:
    """SHA-256 over the raw message minus trace headers: the key of a message without ID."""
    block = header_block(raw)
    body = raw[len(block):]
    h = hashlib.sha256()
    skip = False
    for line in _LINE_SPLIT.split(block):
        if line[:1] in (b" ", b"\t"):
            if not skip:
                h.update(line + b"\n")
            continue
        name = line.partition(b":")[0].strip().lower().decode("ascii", "replace")
        skip = name in TRACE_HEADERS
        if not skip:
            h.update(line + b"\n")
    h.update(body)
    return f"f:{h.hexdigest()}"


def valid_address(addr: str) -> bool:
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain and "." in domain and not re.search(r"[\s<>\"(),;:\\]", addr)
                and "@" not in local)


@dataclass(frozen=True)
class MessageInfo:
    """What routing and the ledger need of one message, from its headers (and size)."""

    size: int
    message_id: str | None  # as found in the header (first one), for display
    normalized_id: str | None
    header_key: str | None  # None: no usable Message-ID, key by fingerprint after fetch
    date: str | None
    sender: str | None  # the From address (real address, not display name)
    addresses: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_headers(cls, block: bytes, size: int) -> "MessageInfo":
        fields = parse_headers(block)
        first = lambda name: (fields.get(name) or [None])[0]  # noqa: E731
        raw_id = first("message-id")
        norm = normalize_message_id(raw_id)
        date, subject = first("date") or "", first("subject") or ""
        from_values = fields.get("from", [])
        key = message_key(norm, date, " ".join(from_values), subject) if norm else None
        return cls(
            size=size,
            message_id=raw_id[:998] if raw_id else None,
            normalized_id=norm,
            header_key=key,
            date=date or None,
            sender=next(iter(addresses_in(from_values)), None),
            addresses=frozenset(addresses_in(
                v for name in ADDRESS_HEADERS for v in fields.get(name, []))),
        )


def addresses_in(values: Iterable[str]) -> list[str]:
    """Real addresses (lower-cased, valid only) from header values; display names ignored."""
    out: dict[str, None] = {}  # ordered and de-duplicated in linear time (10,000 recipients happen)
    for value in values:
        for addr in mailboxes(value or ""):
            addr = addr.lower()
            if addr not in out and valid_address(addr):
                out[addr] = None
    return list(out)


def mailboxes(value: str) -> Iterator[str]:
    """The addr-spec of each mailbox in an address-list header (RFC 5322 3.4), unvalidated.

    The address is the angle-addr when there is one, else the bare text; a display
    name is never read as an address, even an unquoted one that looks like an address
    (`evil@x.com <a@acme.com>` is a@acme.com only). email.utils.getaddresses and the
    email.headerregistry parser both take such a display name for an address, hence
    this small scanner: quotes, nested comments, angle brackets and groups
    (`team: a@x, b@y;`) are honoured; unbalanced garbage yields nothing usable.
    """
    text: list[str] = []  # the current element, outside comments and angle brackets
    angle: list[str] | None = None  # the last angle-addr's content
    current: list[str] | None = None  # the angle-addr being read
    quoted = escaped = False
    depth = 0  # comment nesting
    for ch in value + ",":
        if escaped:  # a quoted-pair: taken literally (dropped inside a comment)
            escaped = False
            if not depth:
                text.append(ch)
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
            text.append(ch)
        elif depth:
            depth += (ch == "(") - (ch == ")")
        elif ch == "(":
            depth = 1
        elif current is not None:
            if ch == ">":
                angle, current = current, None
            else:
                current.append(ch)
        elif ch == "<":
            current = []
        elif ch == '"':
            quoted = True
            text.append(ch)
        elif ch == ":" and angle is None:
            text = []  # a group's display name
        elif ch in ",;":
            addr = "".join(angle) if angle is not None else "".join(text)
            addr = _WS.sub("", addr)
            if addr.startswith("@") and ":" in addr:  # obsolete route: <@a,@b:user@host>
                addr = addr.partition(":")[2]
            if addr:
                yield addr
            text, angle = [], None
        else:
            text.append(ch)
