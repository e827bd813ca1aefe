"""What every sink takes and answers: one upload of one message to one tenant's vaults.

The sync loop sees only these types. Outcomes follow design rule 6: UPLOADED after
an acknowledgement; PERMANENT with a reason at once (no retry helps); FAILED after
the retry budget; and two tenant-wide outcomes that leave the message pending for
the next pass: UNREACHABLE (the endpoint cannot be reached at all) and FORBIDDEN
(the API key is refused).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO, Protocol

from imapsync import process

log = logging.getLogger("imapsync.spool")

#: Spool files name the process that wrote them and its PID namespace
#: (imapsync-<pid>-<namespace>-<random>.eml; the directory sink's partial files end in
#: .part), so that those of a process that died before removing them can be told apart
#: and swept, and never those of another container's process that shares the folder
#: (its pid means nothing here).
_SPOOL_NAME = re.compile(r"imapsync-(?:sdk-)?(\d+)-(\d+)-[^/]*\.(?:eml|part)\Z")

#: Namespace for request ids: the same message to the same vaults always gets the
#: same id, so a retry after a crash is recognised by the API and not stored twice.
_REQUEST_NS = uuid.UUID("6f1c1c6e-7d3a-4c8e-9a55-2f7f3c1d9b10")


class Outcome(str, Enum):
    UPLOADED = "uploaded"
    PERMANENT = "permanent"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    FORBIDDEN = "forbidden"


class Payload:
    """The raw bytes of one message, in memory or spooled to a file (large messages).

    A spooled payload is streamed to the sink from its file, so a large message is
    not held in memory while it waits for, or goes through, its upload. The digest is
    computed on first use, in the upload thread that needs it, not in the sync loop.
    """

    def __init__(self, data: bytes | None = None, path: Path | None = None):
        if (data is None) == (path is None):
            raise ValueError("give data or path")
        self._data = data
        self.path = path
        self.size = len(data) if data is not None else path.stat().st_size  # type: ignore[union-attr]
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            if self._data is not None:
                self._sha256 = hashlib.sha256(self._data).hexdigest()
            else:
                h = hashlib.sha256()
                with open(self.path, "rb") as f:  # type: ignore[arg-type]
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                self._sha256 = h.hexdigest()
        return self._sha256

    @classmethod
    def spooled(cls, data: bytes, directory: Path | None = None) -> "Payload":
        fd, name = tempfile.mkstemp(prefix=spool_prefix(), suffix=".eml", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return cls(path=Path(name))

    def read(self) -> bytes:
        if self._data is not None:
            return self._data
        return self.path.read_bytes()  # type: ignore[union-attr]

    def open(self) -> BinaryIO:
        """A fresh reader from the first byte (one per attempt)."""
        if self._data is not None:
            import io
            return io.BytesIO(self._data)
        return open(self.path, "rb")  # type: ignore[arg-type]

    def discard(self) -> None:
        """Drop the bytes (and the spool file): called once the upload is settled."""
        self._data = b"" if self._data is not None else None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def spool_prefix(kind: str = "") -> str:
    """The start of a spool file's name: the program, the kind of file and this process."""
    return f"imapsync-{kind}{os.getpid()}-{_pid_namespace()}-"


@functools.cache
def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: one namespace
        return 0


def sweep_stale_spool(directory: Path | None = None, what: str = "spooled") -> int:
    """Remove what processes killed before they could clean up left in `directory`: spool
    files (0600 copies of messages; the temporary folder by default) or the directory
    sink's partial files; returns how many. A file is removed only when it is ours (same
    user) and the process named in it, in our PID namespace, is gone. The messages
    themselves are not lost: the ledger holds them as pending (or the cursor never passed
    them), so the next pass fetches them again from the mailbox."""
    folder = Path(directory or tempfile.gettempdir())
    namespace, removed = _pid_namespace(), 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _SPOOL_NAME.match(entry.name)
        if match is None or int(match.group(2)) != namespace or not process.gone(int(match.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    if removed:
        log.warning("Removed %d %s message file(s) from %s left by imapsync processes that were killed; "
                    "their messages are fetched again from the mailbox", removed, what, folder)
    return removed


@dataclass(frozen=True)
class UploadRequest:
    key: str  # the ledger's message key
    tenant: str  # primary domain
    vaults: tuple[str, ...]  # sorted primary e-mail addresses
    sender: str | None
    payload: Payload

    @classmethod
    def of(cls, key: str, tenant: str, vaults, sender: str | None, raw: bytes) -> "UploadRequest":
        return cls(key, tenant, tuple(sorted(vaults)), sender, Payload(raw))

    @property
    def raw(self) -> bytes:
        return self.payload.read()

    @property
    def request_id(self) -> str:
        return str(uuid.uuid5(_REQUEST_NS, "\n".join((self.key, self.tenant, *self.vaults))))


@dataclass(frozen=True)
class UploadResult:
    outcome: Outcome
    attempts: int = 1
    upload_id: str | None = None
    reason: str | None = None  # short machine word, e.g. too_large, s3_upload_failed
    detail: str | None = field(default=None)  # one line for a person; never a secret


class Sink(Protocol):
    """Delivers messages. Implementations must be safe to call from several threads."""

    def upload(self, request: UploadRequest) -> UploadResult: ...

    def close(self) -> None: ...
