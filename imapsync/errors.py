"""Error types that carry data; only the CLI turns them into words and exit codes.

Each third-party library is translated into these where it is used (imapclient in
the IMAP source, pycurl in the sinks, SQLAlchemy in the ledger), so the sync loop
and the CLI never see a library's own exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class ExitCode(IntEnum):
    """CLI exit codes, aligned with the vendor's upload SDK (0-6) plus 7 for accounts."""

    OK = 0
    UNEXPECTED = 1
    CONFIG = 2  # usage or configuration error; also an API key the service refuses
    INVALID_ARGUMENTS = 3
    INVALID_RECIPIENT = 4
    UPLOAD_FAILED = 5  # some messages failed (after retries) or could not be uploaded
    NO_PRIMARY_RECIPIENT = 6
    ACCOUNT_FAILED = 7  # some accounts could not be synced (login, connection, TLS)
    INCOMPLETE = 8  # `verify`: some messages in the mailbox are not accounted for in the ledger


class ImapsyncError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass
class ConfigProblem:
    """One problem in a config file: where (dotted key path) and what."""

    path: str
    problem: str


class ConfigError(ImapsyncError):
    """The configuration is unusable; carries every problem found, not just the first."""

    def __init__(self, file: str, problems: list[ConfigProblem]):
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: {len(problems)} configuration problem(s)")

    def lines(self) -> list[str]:
        return [
            f"{self.file}: {p.path}: {p.problem}" if p.path else f"{self.file}: {p.problem}"
            for p in self.problems
        ]


class SourceErrorKind:
    AUTH = "auth_failed"
    UNREACHABLE = "unreachable"  # cannot connect, or the connection broke
    TLS = "tls_error"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol_error"  # the server refused a command (NO/BAD)
    THROTTLED = "throttled"  # the server asked us to come back later ([THROTTLED], [UNAVAILABLE])

    #: Kinds after which a new connection may well succeed.
    RECONNECTABLE = frozenset({"unreachable", "timeout"})


@dataclass
class SourceError(ImapsyncError):
    """An IMAP account or folder could not be read. `detail` never holds a secret."""

    kind: str
    detail: str
    folder: str | None = None
    retry_after: float | None = None  # seconds the server asked us to wait, when it said so

    def __post_init__(self) -> None:
        super().__init__(f"{self.kind}: {self.detail}")

    def __reduce__(self):  # rebuilt from its fields (results of accounts synced in other processes)
        return type(self), (self.kind, self.detail, self.folder, self.retry_after)

    def __str__(self) -> str:
        where = f" (folder {self.folder})" if self.folder else ""
        return f"{self.kind}: {self.detail}{where}"


@dataclass
class LedgerError(ImapsyncError):
    """The ledger could not be opened, migrated or written."""

    detail: str
    url: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.detail)

    def __str__(self) -> str:
        return f"ledger {self.url}: {self.detail}" if self.url else f"ledger: {self.detail}"
