"""Read-only access to one IMAP account: the only module that imports imapclient.

Every folder is opened with EXAMINE and every body fetched with BODY.PEEK[], so the
mailbox is never changed (design rule 1); no STORE, EXPUNGE, MOVE or COPY is ever
sent. Library and socket errors are translated into SourceError with a kind the
sync loop and `status` understand; no message text here ever holds the password.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import imapclient
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from imapclient.imap_utf7 import decode as decode_utf7
from imapclient.imapclient import as_pairs
from imapclient.response_parser import parse_response
from imapclient.util import chunk

from imapsync.config import Account, FolderFilter, TlsMode
from imapsync.errors import SourceError, SourceErrorKind
from imapsync.message import ROUTING_HEADERS

#: Seconds a folder status from LIST-STATUS stands in for a STATUS command.
LISTED_STATUS_TTL = 30.0
HEADER_ITEM = "BODY.PEEK[HEADER.FIELDS (" + " ".join(h.upper() for h in ROUTING_HEADERS) + ")]"


@dataclass(frozen=True)
class FolderInfo:
    name: str
    flags: frozenset[str]


@dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    messages: int


@dataclass(frozen=True)
class HeaderFetch:
    uid: int
    size: int
    header: bytes


@functools.lru_cache(maxsize=32)
def _ssl_context_for(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """One context per trust setting: loading the system CA store costs ~50 ms each time."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ssl_context(account: Account, ca_file: Path | None) -> ssl.SSLContext:
    return _ssl_context_for(account.verify_certificate, str(ca_file) if ca_file else None)


#: Answers by which a server asks a client to come back later: RFC 5530's [UNAVAILABLE],
#: the widespread [THROTTLED], Microsoft 365's wording, Dovecot's connection limit.
_THROTTLE_RE = re.compile(r"\[(THROTTLED|UNAVAILABLE)\]|request is throttled|server unavailable|"
                          r"suggested backoff time|maximum number of connections", re.IGNORECASE)
_BACKOFF_RE = re.compile(r"suggested backoff time:?\s*(\d+(?:\.\d+)?)\s*(milliseconds|ms|seconds|s)?",
                         re.IGNORECASE)


def throttling(text: str) -> SourceError | None:
    """A THROTTLED SourceError when a server's answer asks us to wait, with how long if it said."""
    if not _THROTTLE_RE.search(text):
        return None
    retry_after = None
    m = _BACKOFF_RE.search(text)
    if m:
        unit = (m.group(2) or "milliseconds").lower()
        retry_after = float(m.group(1)) / (1000 if unit in ("milliseconds", "ms") else 1)
    detail = "the server asked to come back later"
    if retry_after is not None:
        detail += f" (in {retry_after:.0f}s)"
    return SourceError(SourceErrorKind.THROTTLED, f"{detail}: {_clean(text)[:200]}", retry_after=retry_after)


def _clean(text: str) -> str:
    """imaplib puts the server's words in a bytes repr: show them as text."""
    m = re.fullmatch(r"b(['\"])(.*)\1", text.strip(), re.DOTALL)
    return m.group(2) if m else text


def _translate(e: BaseException, what: str) -> SourceError:
    """Map a library or socket error to a SourceError (never including credentials)."""
    if isinstance(e, IMAPClientError):  # LOGIN's NO echoes the server's words, never our arguments
        throttled = throttling(str(e))
        if throttled is not None:
            return throttled
    if isinstance(e, LoginError):
        return SourceError(SourceErrorKind.AUTH, "login refused: wrong username or password")
    if isinstance(e, ssl.SSLCertVerificationError):
        return SourceError(SourceErrorKind.TLS, f"certificate not trusted: {e.verify_message}")
    if isinstance(e, ssl.SSLError):
        return SourceError(SourceErrorKind.TLS, f"TLS failed: {e.reason or e}")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return SourceError(SourceErrorKind.TIMEOUT, f"no answer in time while {what}")
    if isinstance(e, IMAPClientAbortError):  # the connection broke (EOF, reset, BYE)
        return SourceError(SourceErrorKind.UNREACHABLE, f"connection lost while {what}: {str(e)[:200]}")
    if isinstance(e, (ConnectionError, socket.gaierror, OSError)) and not isinstance(e, IMAPClientError):
        return SourceError(SourceErrorKind.UNREACHABLE, f"{what}: {e.strerror or e}")
    text = str(e)
    if isinstance(e, bytes):
        text = e.decode("utf-8", "replace")
    return SourceError(SourceErrorKind.PROTOCOL, f"{what}: {text[:300]}")


class ImapSource:
    """One logged-in, read-only connection to an account's server."""

    def __init__(self, account: Account, password: str, ca_file: Path | None = None):
        self.account = account
        self._client: IMAPClient | None = None
        self._idling = False
        self._listed: dict[str, FolderStatus] = {}  # from the last LIST-STATUS, each used once
        self._listed_at = 0.0
        self._connect(password, ca_file)

    # ----- connection -------------------------------------------------------------

    def _connect(self, password: str, ca_file: Path | None) -> None:
        a = self.account
        where = f"connecting to {a.host}:{a.effective_port}"
        try:
            ctx = _ssl_context(a, ca_file) if a.tls != TlsMode.PLAIN else None
            client = IMAPClient(a.host, port=a.effective_port, ssl=a.tls == TlsMode.IMPLICIT,
                                ssl_context=ctx if a.tls == TlsMode.IMPLICIT else None,
                                timeout=a.timeout)
            self._client = client
            if a.tls == TlsMode.STARTTLS:
                if not client.has_capability("STARTTLS"):
                    raise SourceError(SourceErrorKind.TLS,
                                      f"{a.host} does not offer STARTTLS; refusing to log in without TLS")
                client.starttls(ctx)
            where = f"logging in to {a.host}"
            client.login(a.username, password)
        except SourceError:
            self.close()
            raise
        except (IMAPClientError, OSError) as e:
            self.close()
            raise _translate(e, where) from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._idling:
                self._idling = False
                client.idle_done()
        except Exception:  # noqa: BLE001 - the connection may already be gone; logout decides
            pass
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - the connection may already be gone
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "ImapSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            raise SourceError(SourceErrorKind.PROTOCOL, "connection is closed")
        return self._client

    def _call(self, what: str, fn, *args, folder: str | None = None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SourceError:
            raise
        except (IMAPClientError, OSError) as e:
            err = _translate(e, what)
            err.folder = folder
            raise err from None

    # ----- folders ------------------------------------------------------------------

    def folders(self, filt: FolderFilter) -> list[FolderInfo]:
        """Selectable folders passing the include/exclude globs and SPECIAL-USE exclusions.

        A server with LIST-STATUS (RFC 5819) gives every folder's STATUS in the same
        answer: a poll that finds nothing new then costs one command, not one per folder.
        """
        if self.client.has_capability("LIST-STATUS"):
            listed, statuses = self._call("listing folders", self._list_status)
            self._listed, self._listed_at = statuses, time.monotonic()
        else:
            listed = self._call("listing folders", self.client.list_folders)
        excluded_flags = {f.lower() for f in filt.exclude_special_use}
        out = []
        for flags, _delim, name in listed:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            fl = frozenset(f.decode() if isinstance(f, bytes) else str(f) for f in flags)
            lower = {f.lower() for f in fl}
            if "\\noselect" in lower or "\\nonexistent" in lower:
                continue
            included_by_name = any(_match(name, p) for p in filt.include if p != "*")
            if not any(_match(name, p) for p in filt.include):
                continue
            if any(_match(name, p) for p in filt.exclude):
                continue
            if lower & excluded_flags and not included_by_name:
                continue
            out.append(FolderInfo(name, fl))
        return out

    def _list_status(self) -> tuple[list, dict[str, FolderStatus]]:
        """LIST "" "*" RETURN (STATUS (...)): the folders, and the status of each."""
        client, imap = self.client, self.client._imap
        # With RETURN options a server may leave out \Trash, \Junk...: ask for them too.
        special = ("SPECIAL-USE",) if client.has_capability("SPECIAL-USE") else ()
        typ, data = imap._simple_command("LIST", '""', '"*"', "RETURN", f"({' '.join(special + ('STATUS',))}",
                                         "(UIDVALIDITY", "UIDNEXT", "MESSAGES))")
        client._checkok("list", typ, data)
        typ, data = imap._untagged_response(typ, data, "LIST")
        lines = [item for item in data if item not in (b"", None)]
        raw = [item for item in imap.untagged_responses.pop("STATUS", []) if item not in (b"", None)]
        list_lines, status_lines = _simple_lines(lines, _LIST_LINE), _simple_lines(raw, _STATUS_LINE)
        if list_lines is None or status_lines is None:  # literals or unusual quoting: the general parser
            listed = client._proc_folder_list(lines)
            pairs = [(name, dict(as_pairs(items))) for name, items in chunk(parse_response(raw), size=2)]
        else:
            listed = [(tuple(m["flags"].split()), m["delim"] and _unquote(m["delim"]), self._folder_name(_name(m)))
                      for m in list_lines]
            pairs = [(_name(m), dict(zip(*[iter(m["items"].upper().split())] * 2))) for m in status_lines]
        statuses: dict[str, FolderStatus] = {}
        for name, st in pairs:
            if b"UIDVALIDITY" in st and b"UIDNEXT" in st:
                statuses[self._folder_name(name)] = FolderStatus(
                    int(st[b"UIDVALIDITY"]), int(st[b"UIDNEXT"]), int(st.get(b"MESSAGES", 0)))
        return listed, statuses

    def _folder_name(self, name) -> str:
        """A folder name as the server sent it, decoded as imapclient decodes LIST answers."""
        if isinstance(name, str):
            return name
        if isinstance(name, int):
            return str(name)
        return decode_utf7(name) if self.client.folder_encode else name.decode("utf-8", "replace")

    def status(self, folder: str) -> FolderStatus:
        """The folder's STATUS: from the last LIST-STATUS when it is fresh (used once), else asked."""
        if time.monotonic() - self._listed_at < LISTED_STATUS_TTL:
            listed = self._listed.pop(folder, None)
            if listed is not None:
                return listed
        st = self._call("reading folder status", self.client.folder_status, folder,
                        [b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"], folder=folder)
        return FolderStatus(int(st[b"UIDVALIDITY"]), int(st[b"UIDNEXT"]), int(st.get(b"MESSAGES", 0)))

    def examine(self, folder: str) -> int:
        """Open the folder read-only (EXAMINE) and return its UIDVALIDITY."""
        info = self._call("opening folder", self.client.select_folder, folder, readonly=True, folder=folder)
        return int(info[b"UIDVALIDITY"])

    def uids_after(self, last_uid: int, folder: str) -> list[int]:
        """UIDs above `last_uid`, ascending. `UID SEARCH n:*` also returns the highest UID
        when it is below n, so the answer is filtered."""
        uids = self._call("searching", self.client.search, ["UID", f"{last_uid + 1}:*"], folder=folder)
        return sorted(u for u in uids if u > last_uid)

    def fetch_headers(self, uids: list[int], folder: str) -> Iterator[HeaderFetch]:
        """RFC822.SIZE and the routing headers (never the body, never \\Seen).

        Read like the bodies (see `fetch_bodies`): imapclient's general response parser
        was a sixth of the sync thread's time in a backfill. A message the fast reading
        did not find (expunged meanwhile, or answered in another shape: an empty header
        section as NIL, one answer in two parts) is asked again through imapclient.
        """
        if not uids:
            return
        items = b"(UID RFC822.SIZE " + HEADER_ITEM.encode() + b")"
        found: dict[int, tuple[int, bytes]] = {}
        for uid, (around, header) in self._call("fetching headers", self._fetch_literals, uids, items,
                                                folder=folder).items():
            size = _SIZE_ITEM.search(around)
            if size is not None:
                found[uid] = (int(size.group(1)), header)
        missing = [uid for uid in uids if uid not in found]
        if missing:
            general = self._call("fetching headers", self.client.fetch, missing, ["RFC822.SIZE", HEADER_ITEM],
                                 folder=folder)
            for uid, item in general.items():
                header = next((v for k, v in item.items() if k.startswith(b"BODY[HEADER")), b"") or b""
                found[uid] = (int(item.get(b"RFC822.SIZE", 0)), header)
        for uid in uids:
            if uid in found:  # else expunged meanwhile
                yield HeaderFetch(uid, *found[uid])

    # ----- date windows, sizes and Message-ID lookups (backfill, verify, retry) -------

    def uids_in_window(self, folder: str, since: date | None, before: date | None) -> list[int]:
        """UIDs whose INTERNALDATE falls in [since, before), ascending (UID SEARCH SINCE/BEFORE).

        IMAP compares these by day, disregarding time and timezone; either bound may be open.
        """
        criteria: list = []
        if since is not None:
            criteria += ["SINCE", since]
        if before is not None:
            criteria += ["BEFORE", before]
        uids = self._call("searching by date", self.client.search, criteria or ["ALL"], folder=folder)
        return sorted(int(u) for u in uids)

    def first_date(self, folder: str) -> date | None:
        """INTERNALDATE of the first message by sequence number (usually the oldest); None if empty."""
        def fetch_first():
            self.client.use_uid = False
            try:
                return self.client.fetch("1", ["INTERNALDATE"])
            finally:
                self.client.use_uid = True
        data = self._call("reading the first message's date", fetch_first, folder=folder)
        for item in data.values():
            when = item.get(b"INTERNALDATE")
            if when is not None:
                return when.date()
        return None

    def sizes(self, uids: list[int], folder: str, chunk: int = 5000) -> dict[int, int]:
        """RFC822.SIZE of each UID still present: counting work never fetches a body."""
        out: dict[int, int] = {}
        for i in range(0, len(uids), chunk):
            part = uids[i:i + chunk]
            data = self._call("fetching sizes", self.client.fetch, part, ["RFC822.SIZE"], folder=folder)
            out.update({int(u): int(item.get(b"RFC822.SIZE", 0)) for u, item in data.items()})
        return out

    def present(self, uids: list[int], folder: str) -> list[int]:
        """Which of `uids` still exist in the examined folder."""
        if not uids:
            return []
        wanted, found = sorted(set(uids)), set()
        for i in range(0, len(wanted), 500):
            part = ",".join(str(u) for u in wanted[i:i + 500])
            found.update(int(u) for u in self._call("searching", self.client.search, ["UID", part], folder=folder))
        return [u for u in wanted if u in found]

    def uids_by_message_id(self, message_id: str, folder: str) -> list[int]:
        """UIDs whose Message-ID header contains `message_id` (UID SEARCH HEADER)."""
        needle = message_id.strip().strip("<>").strip()
        if not needle or any(c in needle for c in "\r\n\"\\"):
            return []
        uids = self._call("searching by Message-ID", self.client.search, ["HEADER", "Message-ID", needle],
                          folder=folder)
        return sorted(int(u) for u in uids)

    def fetch_bodies(self, uids: list[int], folder: str) -> dict[int, bytes]:
        """Whole raw messages with BODY.PEEK[] (leaves \\Seen unset).

        The hot path of a backfill. Each literal is read straight off the connection
        into one bytes object; imaplib's generic untagged-response bookkeeping, which
        cost two thirds of the time in profiles, is bypassed for this one command.
        """
        if not uids:
            return {}
        found = self._call("fetching messages", self._fetch_literals, uids, b"(UID BODY.PEEK[])", folder=folder)
        return {uid: data for uid, (_around, data) in found.items()}

    def _fetch_literals(self, uids: list[int], items: bytes) -> dict[int, tuple[bytes, bytes]]:
        """UID FETCH of `items`, one of which the server answers with a literal: by UID,
        the text of the other items (before and after the literal) and the literal.
        Answers without a literal are left out."""
        imap = self.client._imap  # imaplib.IMAP4 under imapclient
        tag = imap._new_tag()
        try:
            imap.send(tag + b" UID FETCH " + _seqset(uids).encode() + b" " + items + b"\r\n")
            out: dict[int, tuple[bytes, bytes]] = {}
            while True:
                line = imap.readline()
                if not line:
                    raise IMAPClientAbortError("connection closed during FETCH")
                if line.startswith(tag + b" "):
                    status, _, text = line[len(tag) + 1:].partition(b" ")
                    if status.upper() != b"OK":
                        raise IMAPClientError(f"FETCH failed: {status.decode()} {text.decode('utf-8', 'replace').strip()}")
                    return out
                m = _FETCH_LITERAL.match(line)
                if m is None:
                    if line.upper().startswith(b"* BYE"):
                        raise IMAPClientAbortError(line.decode("utf-8", "replace").strip())
                    continue  # other untagged data (EXISTS, EXPUNGE, FLAGS): not needed here
                size = int(m.group(2))
                data = imap.read(size)
                if len(data) != size:
                    raise IMAPClientAbortError("connection closed inside a message literal")
                tail = imap.readline()  # ")" or " UID n)" after the literal
                around = m.group(1) + b" " + tail
                uid = _UID_ITEM.search(around)
                if uid is not None:
                    out[int(uid.group(1))] = (around, data)
        finally:
            imap.tagged_commands.pop(tag, None)

    # ----- IDLE (RFC 2177): the server pushes new mail on one examined folder --------

    def supports_idle(self) -> bool:
        return bool(self._call("reading capabilities", self.client.has_capability, "IDLE"))

    def idle_start(self, folder: str) -> None:
        """EXAMINE `folder` (read-only) and enter IDLE on it."""
        self.examine(folder)
        self._call("starting IDLE", self.client.idle, folder=folder)
        self._idling = True

    def idle_wait(self, timeout: float, folder: str | None = None) -> bool:
        """Wait in IDLE up to `timeout` seconds; True when the server announced new mail.

        A BYE, or a connection that ended (imapclient then answers at once with nothing),
        raises SourceError, so the caller reconnects.
        """
        started = time.monotonic()
        responses = self._call("waiting in IDLE", self.client.idle_check, timeout, folder=folder)
        new_mail = _announces_mail(responses, folder)
        if not responses and time.monotonic() - started < timeout * 0.9:
            new_mail = self.idle_renew(folder)  # woken with nothing to read: a closed connection fails here
        return new_mail

    def idle_renew(self, folder: str | None = None) -> bool:
        """End IDLE and start it again (before the server's 29-minute limit, or to probe).
        True when the server announced new mail meanwhile (it may do so in DONE's answer)."""
        new_mail = self.idle_end(folder)
        self._call("restarting IDLE", self.client.idle, folder=folder)
        self._idling = True
        return new_mail

    def idle_end(self, folder: str | None = None) -> bool:
        """Leave IDLE; True when the server announced new mail in its answer."""
        if not self._idling:
            return False
        self._idling = False
        _text, responses = self._call("ending IDLE", self.client.idle_done, folder=folder)
        return _announces_mail(responses, folder)


#: `* 12 FETCH (UID 34 BODY[] {5678}` - the items before the literal, and its size.
_FETCH_LITERAL = re.compile(rb"^\* \d+ FETCH \((.*)\{(\d+)\}\r\n$", re.IGNORECASE | re.DOTALL)
_UID_ITEM = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE_ITEM = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)


def _seqset(uids: list[int]) -> str:
    """[1,2,3,7] -> '1:3,7'."""
    out, start, prev = [], None, None
    for u in sorted(uids):
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            out.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = u
    if start is not None:
        out.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(out)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when a folder name matches one of the globs (INBOX in any case, as in the config)."""
    return any(_match(name, p) for p in patterns)


def _announces_mail(responses: list, folder: str | None) -> bool:
    """True for an EXISTS/RECENT among IDLE responses; a BYE raises SourceError."""
    new_mail = False
    for r in responses:
        if r and r[0] == b"BYE":
            text = b" ".join(x for x in r[1:] if isinstance(x, bytes)).decode("utf-8", "replace")
            raise throttling(text) or SourceError(SourceErrorKind.UNREACHABLE,
                                                  f"the server ended the connection: {text[:200]}", folder)
        if len(r) >= 2 and r[1] in (b"EXISTS", b"RECENT"):
            new_mail = True
    return new_mail


#: The usual shapes of LIST and STATUS answers (a quoted string or an atom for the name);
#: anything else, such as a literal, goes to imapclient's general parser.
_NAME = rb'(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<atom>[^\s"(){}%*\\]+))'
_LIST_LINE = re.compile(rb'\((?P<flags>[^()]*)\) (?:"(?P<delim>[^"\\]|\\.)"|NIL) ' + _NAME + rb'$')
_STATUS_LINE = re.compile(_NAME + rb' \((?P<items>[A-Z0-9 -]*)\)$', re.IGNORECASE)


def _simple_lines(lines: list, pattern: re.Pattern) -> list[re.Match] | None:
    matches = []
    for line in lines:
        m = pattern.match(line) if isinstance(line, bytes) else None
        if m is None:
            return None
        matches.append(m)
    return matches


def _name(m: re.Match) -> bytes:
    """The mailbox name of a matched line: the quoted string, unescaped, or the atom."""
    return _unquote(m["quoted"]) if m["quoted"] is not None else m["atom"]


def _unquote(value: bytes) -> bytes:
    return re.sub(rb"\\(.)", rb"\1", value)


def _match(name: str, pattern: str) -> bool:
    if name.upper() == "INBOX" or name.upper().startswith("INBOX/"):
        name = "INBOX" + name[5:]
        if pattern.upper() == "INBOX" or pattern.upper().startswith("INBOX/"):
            pattern = "INBOX" + pattern[5:]
    return fnmatch.fnmatchcase(name, pattern)


def batches(items: Iterable[tuple[int, int]], max_bytes: int, max_count: int) -> Iterator[list[int]]:
    """Group (uid, size) pairs into UID lists bounded in bytes and count (design rule 8)."""
    batch: list[int] = []
    total = 0
    for uid, size in items:
        if batch and (total + size > max_bytes or len(batch) >= max_count):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


__all__ = ["ImapSource", "FolderInfo", "FolderStatus", "HeaderFetch", "batches", "imapclient"]
