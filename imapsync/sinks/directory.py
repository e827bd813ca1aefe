"""A sink that writes each upload as an .eml file: local archives, dry runs, demos.

Files are named by request id under one folder per tenant, written to a temporary
name and renamed, so a crash never leaves a half-written message under its final
name and a repeated upload finds the file already there. An index.jsonl beside
them records vaults and sender for each file.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from imapsync.sinks.base import Outcome, UploadRequest, UploadResult


class DirectorySink:
    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()

    def upload(self, request: UploadRequest) -> UploadResult:
        folder = self.root / request.tenant
        target = folder / f"{request.request_id}.eml"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                tmp = target.with_suffix(f".tmp{threading.get_ident()}")
                tmp.write_bytes(request.raw)
                os.replace(tmp, target)
                line = json.dumps({"file": target.name, "key": request.key, "vaults": list(request.vaults),
                                   "sender": request.sender, "size": len(request.raw),
                                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                with self._lock, open(folder / "index.jsonl", "a", encoding="utf-8") as index:
                    index.write(line + "\n")
        except OSError as e:
            return UploadResult(Outcome.UNREACHABLE, reason="directory_error",
                                detail=f"cannot write {target}: {e.strerror}")
        return UploadResult(Outcome.UPLOADED, upload_id=target.name)

    def close(self) -> None:
        pass
