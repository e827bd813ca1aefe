"""What every sink takes and answers: one upload of one message to one tenant's vaults.

The sync loop sees only these types. Outcomes follow design rule 6: UPLOADED after
an acknowledgement; PERMANENT with a reason at once (no retry helps); FAILED after
the retry budget; and two tenant-wide outcomes that leave the message pending for
the next pass: UNREACHABLE (the endpoint cannot be reached at all) and FORBIDDEN
(the API key is refused).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

#: Namespace for request ids: the same message to the same vaults always gets the
#: same id, so a retry after a crash is recognised by the API and not stored twice.
_REQUEST_NS = uuid.UUID("6f1c1c6e-7d3a-4c8e-9a55-2f7f3c1d9b10")


class Outcome(str, Enum):
    UPLOADED = "uploaded"
    PERMANENT = "permanent"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class UploadRequest:
    key: str  # the ledger's message key
    tenant: str  # primary domain
    vaults: tuple[str, ...]  # sorted primary e-mail addresses
    sender: str | None
    raw: bytes

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
