"""Progress of a long pass (a backfill): counters per account, drawn live or logged.

Why: a backfill of years of mail runs for hours; an administrator wants to see, per
account, how many messages and bytes are done out of how many, how fast, how long
is left, which folder it is in and how many failed so far. On a terminal that is a
live table (rich) redrawn in place; when the output goes to a file or a pipe (cron,
systemd, CI) it is one plain log line per account every few seconds, so the log
stays readable.

The counters are fed from two sides: the sync pass calls `folder()` and `handled()`
(the `sync.ProgressHook` protocol) as it settles each copy; the backfill's census,
which counts the work with UID SEARCH and RFC822.SIZE only (never a body), calls
`add_total()` and `counted()`. Both may run in different threads: every counter
change takes the account's lock.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from imapsync.ledger import State

log = logging.getLogger("imapsync.progress")


class Phase(str, Enum):
    WAITING = "waiting"  # for the account's lease
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"
    BUSY = "busy"  # another worker kept the account


@dataclass
class Snapshot:
    """One account's progress at one instant (what a display or a log line shows)."""

    account: str
    phase: Phase
    folder: str | None
    done: int
    done_bytes: int
    total: int | None  # None until the census has finished
    total_bytes: int | None
    rate: float  # messages per second, this run
    byte_rate: float
    eta: float | None  # seconds
    failures: int
    elapsed: float


@dataclass
class AccountProgress:
    """The counters of one account. Implements sync.ProgressHook."""

    account: str
    phase: Phase = Phase.WAITING
    current_folder: str | None = None
    done: int = 0
    done_bytes: int = 0
    total: int = 0
    total_bytes: int = 0
    complete_total: bool = False
    failures: int = 0
    _started: float | None = None
    _ended: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ----- sync.ProgressHook ------------------------------------------------------------

    def folder(self, name: str) -> None:
        with self._lock:
            self.current_folder = name
            if self._started is None:
                self._started = time.monotonic()
            self.phase = Phase.RUNNING

    def handled(self, state: State | None, size: int) -> None:
        with self._lock:
            self.done += 1
            self.done_bytes += size
            if state in (State.FAILED, State.PENDING):
                self.failures += 1

    # ----- the census -------------------------------------------------------------------

    def add_total(self, messages: int, size: int) -> None:
        with self._lock:
            self.total += messages
            self.total_bytes += size

    def counted(self) -> None:
        with self._lock:
            self.complete_total = True

    # ----- the run ----------------------------------------------------------------------

    def finish(self, phase: Phase) -> None:
        with self._lock:
            self.phase = phase
            self._ended = time.monotonic()

    def snapshot(self) -> Snapshot:
        with self._lock:
            end = self._ended or time.monotonic()
            elapsed = end - self._started if self._started is not None else 0.0
            rate = self.done / elapsed if elapsed > 0 else 0.0
            byte_rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
            eta = None
            if self.complete_total and self.phase is Phase.RUNNING:
                if byte_rate > 0 and self.total_bytes:
                    eta = max(0.0, (self.total_bytes - self.done_bytes) / byte_rate)
                elif rate > 0:
                    eta = max(0.0, (self.total - self.done) / rate)
            return Snapshot(self.account, self.phase, self.current_folder, self.done, self.done_bytes,
                            self.total if self.complete_total else None,
                            self.total_bytes if self.complete_total else None,
                            rate, byte_rate, eta, self.failures, elapsed)


class Tracker:
    """Every account's progress in one run."""

    def __init__(self) -> None:
        self._accounts: dict[str, AccountProgress] = {}
        self._lock = threading.Lock()

    def account(self, name: str) -> AccountProgress:
        with self._lock:
            return self._accounts.setdefault(name, AccountProgress(name))

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            accounts = list(self._accounts.values())
        return [a.snapshot() for a in accounts]


# ----- words and numbers ------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _of(done: int, total: int | None) -> str:
    return f"{done}/{total}" if total is not None else f"{done}/counting…"


# ----- on a terminal: a live table --------------------------------------------------------

def _table(tracker: Tracker) -> Table:
    table = Table(title="imapsync backfill", title_justify="left", expand=False, padding=(0, 1))
    for col, justify in (("account", "left"), ("", "left"), ("messages", "right"), ("bytes", "right"),
                         ("rate", "right"), ("ETA", "right"), ("failed", "right"), ("folder", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "folder")  # type: ignore[arg-type]
    for s in tracker.snapshots():
        total = s.total_bytes if s.total_bytes else None
        bar = ProgressBar(total=total or 1, completed=s.done_bytes if total else 0, width=20,
                          pulse=total is None and s.phase is Phase.RUNNING)
        failed = f"[red]{s.failures}[/]" if s.failures else "0"
        table.add_row(s.account, bar, _of(s.done, s.total),
                      f"{human_bytes(s.done_bytes)}/{human_bytes(s.total_bytes)}",
                      f"{s.rate:.0f} msg/s {human_bytes(s.byte_rate)}/s", human_seconds(s.eta), failed,
                      s.folder or "" if s.phase is Phase.RUNNING else s.phase.value)
    return table


@contextmanager
def live(tracker: Tracker, console: Console) -> Iterator[None]:
    """A live table on `console` (a terminal); log records are printed above it."""
    with Live(get_renderable=lambda: Group(_table(tracker)), console=console, refresh_per_second=4,
              redirect_stdout=False, redirect_stderr=True, transient=False):
        handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
        streams = [h.stream for h in handlers]
        for h in handlers:  # through rich's stderr proxy, so a log line does not tear the table
            h.setStream(sys.stderr)
        try:
            yield
        finally:
            for h, stream in zip(handlers, streams):
                h.setStream(stream)


# ----- elsewhere: periodic log lines -------------------------------------------------------

def log_line(s: Snapshot) -> None:
    log.info("Backfill %s: %s messages, %s/%s, %.1f msg/s, %s/s, ETA %s, %d failed, %s",
             s.account, _of(s.done, s.total), human_bytes(s.done_bytes), human_bytes(s.total_bytes),
             s.rate, human_bytes(s.byte_rate), human_seconds(s.eta), s.failures,
             f"folder {s.folder}" if s.phase is Phase.RUNNING and s.folder else s.phase.value)


@contextmanager
def log_lines(tracker: Tracker, interval: float) -> Iterator[None]:
    """One log line per account every `interval` seconds, and a last one at the end."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(interval):
            for s in tracker.snapshots():
                if s.phase is Phase.RUNNING:
                    log_line(s)

    thread = threading.Thread(target=tick, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for s in tracker.snapshots():
            log_line(s)


def display(tracker: Tracker, interval: float, console: Console | None = None):
    """The live table when `console` (stderr by default) is a terminal, log lines otherwise."""
    console = console or Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal:
        return live(tracker, console)
    return log_lines(tracker, interval)


__all__ = ["Tracker", "AccountProgress", "Phase", "Snapshot", "display", "human_bytes", "human_seconds"]
