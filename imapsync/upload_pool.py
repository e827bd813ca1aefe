"""Uploads in flight, bounded: a thread pool fed through a bounded number of slots.

`submit` blocks when `concurrency * 2` uploads are queued or running, so fetching
waits when uploads lag and memory stays bounded (design rule 8). Results come back
to the submitting thread through `collect`, so the ledger is written from one thread.
A tenant closed by a refused key or an unreachable endpoint answers its queued jobs
at once without calling the sink (they stay pending for the next pass).
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imapsync.sinks.base import Outcome, Sink, UploadRequest, UploadResult

log = logging.getLogger("imapsync.upload")


@dataclass
class TenantGate:
    """Tenants closed for the rest of this pass (key refused, endpoint unreachable)."""

    closed: dict[str, UploadResult] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close(self, tenant: str, result: UploadResult) -> None:
        with self._lock:
            if tenant in self.closed:
                return
            self.closed[tenant] = result
        log.error("Tenant %s: uploads stopped for this pass: %s", tenant, result.detail)


@dataclass
class Job:
    request: UploadRequest
    owner: Any  # the caller's token (one copy of a message)


@dataclass
class Done:
    job: Job
    result: UploadResult


class UploadPool:
    def __init__(self, sinks: Mapping[str, Sink], gate: TenantGate, concurrency: int):
        self.sinks = sinks
        self.gate = gate
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload")
        self._slots = threading.Semaphore(concurrency * 2)
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self.outstanding = 0  # submitted and not yet collected (touched by the owner thread only)

    def submit(self, job: Job) -> None:
        self._slots.acquire()
        self.outstanding += 1
        self._executor.submit(self._run, job)

    def _run(self, job: Job) -> None:
        tenant = job.request.tenant
        try:
            closed = self.gate.closed.get(tenant)
            if closed is not None:
                result = UploadResult(closed.outcome, 0, reason=closed.reason, detail=closed.detail)
            else:
                result = self.sinks[tenant].upload(job.request)
                if result.outcome in (Outcome.FORBIDDEN, Outcome.UNREACHABLE):
                    self.gate.close(tenant, result)
        except Exception as e:  # noqa: BLE001 - a sink bug must not lose the message
            log.exception("Upload to %s crashed", tenant)
            result = UploadResult(Outcome.FAILED, 1, reason="internal_error", detail=type(e).__name__)
        self._done.put(Done(job, result))
        self._slots.release()

    def collect(self, block: bool = False) -> list[Done]:
        """Finished uploads; with `block`, wait for at least one if any is outstanding."""
        out: list[Done] = []
        if block and self.outstanding:
            out.append(self._done.get())
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.outstanding -= len(out)
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
