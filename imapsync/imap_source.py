"""Read-only access to one IMAP account: the only module that imports imapclient.

Every folder is opened with EXAMINE and every body fetched with BODY.PEEK[], so the
mailbox is never changed (design rule 1); no STORE, EXPUNGE, MOVE or COPY is ever
sent. Library and socket errors are translated into SourceError with a kind the
sync loop and `status` understand; no message text here ever holds the password.
"""
from __future__ import annotations

import fnmatch
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imapclient
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from imapsync.config import Account, FolderFilter, TlsMode
from imapsync.errors import SourceError, SourceErrorKind
from imapsync.message import ROUTING_HEADERS

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


def _ssl_context(account: Account, ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not account.verify_certificate:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _translate(e: BaseException, what: str) -> SourceError:
    """Map a library or socket error to a SourceError (never including credentials)."""
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
        self._connect(password, ca_file)

    # ----- connection -------------------------------------------------------------

    def _connect(self, password: str, ca_file: Path | None) -> None:
        a = self.account
        where = f"connecting to {a.host}:{a.effective_port}"
        try:
            ctx = _ssl_context(a, ca_file)
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
        """Selectable folders passing the include/exclude globs and SPECIAL-USE exclusions."""
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

    def status(self, folder: str) -> FolderStatus:
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
        """RFC822.SIZE and the routing headers (never the body, never \\Seen)."""
        data = self._call("fetching headers", self.client.fetch, uids, ["RFC822.SIZE", HEADER_ITEM], folder=folder)
        for uid in uids:
            item = data.get(uid)
            if item is None:  # expunged meanwhile
                continue
            header = next((v for k, v in item.items() if k.startswith(b"BODY[HEADER")), b"") or b""
            yield HeaderFetch(uid, int(item.get(b"RFC822.SIZE", 0)), header)

    def fetch_bodies(self, uids: list[int], folder: str) -> dict[int, bytes]:
        """Whole raw messages with BODY.PEEK[] (leaves \\Seen unset)."""
        data = self._call("fetching messages", self.client.fetch, uids, ["BODY.PEEK[]"], folder=folder)
        return {uid: item[b"BODY[]"] for uid, item in data.items() if b"BODY[]" in item}


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
