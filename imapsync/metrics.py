"""Prometheus metrics of `imapsync run`, served at /metrics by http_status.py.

Why here and not in the sync: the algorithm already reports what it did (each
pass's AccountResult with counts by state and bytes), so the daemon feeds those into
counters after each pass, and the upload latency is measured by wrapping each sink
(`timed_sinks`), the one place every upload goes through. Nothing in sync.py knows
about metrics. A private registry keeps the process's default collectors out of
tests and lets several daemons live in one interpreter.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from imapsync.sinks.base import Outcome, Sink, UploadRequest, UploadResult
from imapsync.sync import AccountResult

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

#: Final states counted per pass; pending copies are a gauge (they are redone later).
FINAL_STATES = ("uploaded", "duplicate", "skipped", "failed")
#: Upload latency buckets in seconds: the API takes 2-15 s per mail; the receiver far less.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120)


class Metrics:
    """Every metric of one daemon, in its own registry."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter("imapsync_messages", "Copies of messages handled, by final state",
                                ["account", "state"], registry=r)
        self.pending = Gauge("imapsync_pending_messages", "Copies left pending by the last pass (retried next)",
                             ["account"], registry=r)
        self.bytes = Counter("imapsync_uploaded_bytes", "Bytes of messages uploaded", ["account"], registry=r)
        self.upload_seconds = Histogram("imapsync_upload_duration_seconds",
                                        "Time to upload one message to one tenant (with its retries)",
                                        ["tenant", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.last_success = Gauge("imapsync_last_success_timestamp_seconds",
                                  "When an account's last pass ended without an account error (Unix time)",
                                  ["account"], registry=r)
        self.errors = Counter("imapsync_errors", "Errors by kind: account errors (auth_failed, unreachable, "
                              "throttled, ...), tenant closures (upload_unreachable, upload_forbidden), "
                              "ledger and internal", ["account", "kind"], registry=r)
        self.runs = Counter("imapsync_runs", "Passes over an account, by outcome", ["account", "outcome"], registry=r)
        self.backoff_until = Gauge("imapsync_backoff_until_timestamp_seconds",
                                   "Until when a failing account is left alone (Unix time; 0 when not)",
                                   ["account"], registry=r)
        self.running = Gauge("imapsync_accounts_running", "Account passes running now", registry=r)

    def observe_pass(self, result: AccountResult, closed_tenants: Mapping[str, UploadResult]) -> None:
        """Count what one pass over an account did."""
        name, counts = result.account, result.counts
        for state in FINAL_STATES:
            n = getattr(counts, state)
            if n:
                self.messages.labels(name, state).inc(n)
        self.pending.labels(name).set(counts.pending)
        if counts.bytes:
            self.bytes.labels(name).inc(counts.bytes)
        for closed in closed_tenants.values():
            self.errors.labels(name, f"upload_{closed.reason or closed.outcome.value}").inc()
        if result.error is not None:
            self.errors.labels(name, result.error.kind).inc()
            self.runs.labels(name, "error").inc()
        else:
            self.last_success.labels(name).set(time.time())
            self.runs.labels(name, "partial" if counts.failed or counts.pending else "ok").inc()

    def error(self, account: str, kind: str) -> None:
        self.errors.labels(account, kind).inc()

    def timed_sinks(self, sinks: Mapping[str, Sink]) -> dict[str, Sink]:
        """The same sinks, each upload timed into the latency histogram."""
        wrapped: dict[int, Sink] = {}
        for s in sinks.values():
            wrapped.setdefault(id(s), _TimedSink(s, self.upload_seconds))
        return {tenant: wrapped[id(s)] for tenant, s in sinks.items()}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _TimedSink:
    """A sink that observes each upload's duration, labelled by tenant and outcome."""

    def __init__(self, inner: Sink, histogram: Histogram):
        self.inner = inner
        self.histogram = histogram

    def upload(self, request: UploadRequest) -> UploadResult:
        started = time.monotonic()
        result = self.inner.upload(request)
        outcome = result.outcome.value if isinstance(result.outcome, Outcome) else str(result.outcome)
        self.histogram.labels(request.tenant, outcome).observe(time.monotonic() - started)
        return result

    def close(self) -> None:
        self.inner.close()
