"""A sink that writes each upload as an .eml file: local archives, dry runs, demos.

Files (mode 0600) are named by request id under one folder per tenant, written first in the
tenant's .partial folder and renamed into place, so a crash never leaves a half-written
message among the archived ones and a repeated upload finds the file already there. An
index.jsonl beside them records vaults and sender for each file. A partial file names
the process writing it (as spool files do): the ones of a process that was killed are
removed when the tenant folder is next used, and their messages, still pending in the
ledger, are written again.

A message counts as uploaded only once its bytes, its name and its index line are on disk
(fdatasync, then fsync of the folder): the ledger then moves the folder's cursor past it,
so a file that a power cut could still take would be a message lost. mbsync does the same
by default. Concurrent uploads share the filesystem's journal commits.
"""
from __future__ import annotations

import errno
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from imapsync.sinks.base import (
    Outcome,
    UploadRequest,
    UploadResult,
    spool_prefix,
    sweep_stale_spool,
)

#: Where a file is written before it is renamed into its tenant's folder.
PARTIAL = ".partial"


class DirectorySink:
    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._indexes: dict[Path, int] = {}  # tenant folder -> index.jsonl opened for appending
        self._folders: dict[Path, int] = {}  # tenant folder -> the folder itself, opened to fsync it

    def upload(self, request: UploadRequest) -> UploadResult:
        folder = self.root / request.tenant
        target = folder / f"{request.request_id}.eml"
        try:
            index = self._index(folder)
            if not target.exists():
                tmp = folder / PARTIAL / f"{spool_prefix()}{threading.get_ident()}.part"
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    f.write(request.raw)  # mode 0600, as the index and the ledger: mail is private
                    f.flush()
                    os.fdatasync(f.fileno())  # the bytes are on disk before their name is
                os.replace(tmp, target)
                line = json.dumps({"file": target.name, "key": request.key, "vaults": list(request.vaults),
                                   "sender": request.sender, "size": request.payload.size,
                                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                os.write(index, (line + "\n").encode())  # one O_APPEND write: whole lines without a lock
            else:  # written by a run that may have stopped before it was on disk
                _sync(target)
            os.fdatasync(index)
            _fsync_folder(self._folders[folder])  # the name is on disk before the ledger says uploaded
        except OSError as e:
            return UploadResult(Outcome.UNREACHABLE, reason="directory_error",
                                detail=f"cannot write {target}: {e.strerror}")
        return UploadResult(Outcome.UPLOADED, upload_id=target.name)

    def _index(self, folder: Path) -> int:
        """The tenant's index.jsonl, opened once (on first use, the folder is made and what
        killed processes left in its .partial folder is removed)."""
        fd = self._indexes.get(folder)
        if fd is None:
            with self._lock:
                fd = self._indexes.get(folder)
                if fd is None:
                    (folder / PARTIAL).mkdir(parents=True, exist_ok=True)
                    sweep_stale_spool(folder / PARTIAL, "partially written")
                    fd = os.open(folder / "index.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    self._folders[folder] = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                    _sync(folder.parent, folder=True)  # the tenant folder's own name
                    self._indexes[folder] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            fds = [*self._indexes.values(), *self._folders.values()]
            self._indexes, self._folders = {}, {}
        for fd in fds:
            os.close(fd)


def _sync(path: Path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        if folder:
            _fsync_folder(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(fd: int) -> None:
    """Some filesystems cannot sync a folder (EINVAL): their names need nothing more."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
