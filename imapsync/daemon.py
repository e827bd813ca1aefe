"""`imapsync run`: archives every configured account on its schedule until stopped.

Why this shape: the sync of one account (sync.py) is already a complete, restartable
pass; the daemon only decides *when* each pass runs and keeps one account's trouble
away from the others. APScheduler 3 (BackgroundScheduler) holds one job per account,
on an interval (`every: 5m`) or a crontab (`cron: "*/10 8-18 * * 1-5"`), with
max_instances=1 (a slow account never runs twice at once), coalescing of missed runs,
a misfire grace time and a random start jitter (1,000 accounts do not connect in the
same second). Around each pass:

* caps: at most `max_connections` passes at once (the executor's size) and at most
  `max_connections_per_host` to one server; a pass that finds its server full gives
  its thread back and is started again as soon as a slot of that server frees;
* the account's ledger lease (purpose "daemon"), so a concurrent `imapsync sync` or
  another daemon on the same ledger never works on the same account;
* backoff: an account whose pass fails (login, connection, throttling) is left alone
  for a time that doubles with each failure in a row, or as long as the server asked
  (Microsoft's "Suggested Backoff Time"); the time is in the ledger, so `status` says
  until when; a pass that works clears it;
* IMAP IDLE watchers (idle.py) start a pass at once when the server announces mail.

Lifecycle: the first SIGTERM/SIGINT is a warm stop (no new pass; running passes end
after their current batch with their uploads recorded; exit 0) bounded by
`stop_timeout`; a second signal, or the bound, stops cold (exit 128+signal; work in
flight is pending in the ledger and redone on the next start). SIGHUP reloads the
config: running passes finish with the config they started with, new passes use the
new one, jobs and watchers are added, removed or rescheduled.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from imapsync import config as config_mod
from imapsync.config import Account, LoadedConfig, Schedule
from imapsync.errors import ConfigError, LedgerError, SourceError, SourceErrorKind
from imapsync.http_status import Health, Routes, StatusServer
from imapsync.idle import IdleWatcher
from imapsync.lease import AccountLease, worker_name
from imapsync.ledger import Ledger
from imapsync.metrics import CONTENT_TYPE_LATEST, Metrics
from imapsync.service import connector, make_sinks, settings_of
from imapsync.sinks.base import Sink
from imapsync.sync import AccountResult, Settings, sync_account
from imapsync.upload_pool import TenantGate, UploadPool

log = logging.getLogger("imapsync.daemon")

#: The default poll interval when neither the account nor `schedule:` says.
DEFAULT_EVERY = 300.0
#: The run kind the ledger records for the daemon's passes (`status` shows it).
RUN_KIND = "scheduled"
#: How often the scheduler's heartbeat job runs; /healthz wants one within 3 of these.
HEARTBEAT = 2.0


def _job_id(account: str) -> str:
    return f"account:{account}"


@dataclass(frozen=True)
class Plan:
    """When one account runs: its trigger, and the folders watched with IDLE."""

    every: float | None
    cron: str | None
    jitter: float
    idle: tuple[str, ...]

    @property
    def when(self) -> tuple:
        """What the trigger is made of (a change reschedules the job)."""
        return self.every, self.cron, self.jitter

    @classmethod
    def of(cls, account: Account, defaults: Schedule) -> "Plan":
        own = account.schedule
        if own.every is not None or own.cron is not None:
            every, cron = own.every, own.cron
        else:
            every, cron = defaults.every, defaults.cron
        if every is None and cron is None:
            every = DEFAULT_EVERY
        idle = own.idle if own.idle is not None else (defaults.idle or [])
        jitter = defaults.jitter if every is None else min(defaults.jitter, every)  # never more than the interval
        return cls(every, cron, jitter, tuple(idle))

    def trigger(self, tz: tzinfo) -> IntervalTrigger | CronTrigger:
        if self.cron is not None:
            return _cron(self.cron, tz, self.jitter)
        assert self.every is not None
        return IntervalTrigger(seconds=self.every, timezone=tz, jitter=self.jitter or None)

    def first_run(self, tz: tzinfo) -> datetime | None:
        """An interval account runs soon after start (spread over the jitter); cron waits its turn."""
        if self.cron is not None:
            return None
        return datetime.now(tz) + timedelta(seconds=random.uniform(0, self.jitter))


def _cron(expr: str, tz: tzinfo, jitter: float) -> CronTrigger:
    minute, hour, day, month, day_of_week = expr.split()
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week,
                       timezone=tz, jitter=jitter or None)


@dataclass
class Runtime:
    """What one loaded config becomes. Shared by the passes that started under it; closed
    (its sinks) when a reload replaced it and its last pass ended."""

    loaded: LoadedConfig
    sinks: dict[str, Sink]
    settings: Settings
    accounts: dict[str, Account]
    users: int = 0
    retired: bool = False

    @classmethod
    def build(cls, loaded: LoadedConfig, metrics: Metrics, only: set[str] | None) -> "Runtime":
        accounts = {a.name: a for a in loaded.config.accounts if not only or a.name in only}
        return cls(loaded, metrics.timed_sinks(make_sinks(loaded)), settings_of(loaded), accounts)

    def close(self) -> None:
        for sink in {id(s): s for s in self.sinks.values()}.values():
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("Closing a sink failed", exc_info=True)


class ConnectionSlots:
    """Counting semaphores for IMAP connections: `total` at once, `per_host` to one server.

    A pass takes as many as it may open (`fetch.connections`: one for headers, the rest
    fetching bodies ahead; at most `per_host`). A pass that cannot have them does not
    wait in its thread (that would starve the other servers of threads): it is
    remembered, and `release` names the accounts to start when slots of its server free.
    """

    def __init__(self, total: int, per_host: int):
        self.total, self.per_host = total, per_host
        self._lock = threading.Lock()
        self._in_use = 0
        self._hosts: Counter[str] = Counter()
        self._waiting: dict[str, deque[str]] = {}

    def weight(self, connections: int) -> int:
        return max(1, min(connections, self.per_host, self.total))

    def try_acquire(self, host: str, account: str, n: int = 1) -> bool:
        with self._lock:
            if self._in_use + n > self.total or self._hosts[host] + n > self.per_host:
                queue = self._waiting.setdefault(host, deque())
                if account not in queue:
                    queue.append(account)
                return False
            self._in_use += n
            self._hosts[host] += n
            return True

    def release(self, host: str, n: int = 1) -> list[str]:
        """Free `n` slots; returns the waiting accounts that may now have theirs (this server's first)."""
        with self._lock:
            self._in_use -= n
            self._hosts[host] -= n
            wake: list[str] = []
            free = self.total - self._in_use
            for h in sorted(self._waiting, key=lambda x: x != host):
                queue = self._waiting[h]
                room = min(free, self.per_host - self._hosts[h])
                while queue and room > 0:
                    wake.append(queue.popleft())
                    room -= 1
                    free -= 1
            return wake


@dataclass
class _AccountState:
    poked: threading.Event = field(default_factory=threading.Event)  # run again when this pass ends
    backoff_until: datetime | None = None  # naive UTC, as in the ledger
    failing: bool = False


class Daemon:
    """The scheduler loop of `imapsync run`; `Daemon(...).run()` returns the exit code."""

    def __init__(self, config_path: Path, loaded: LoadedConfig, ledger: Ledger, *,
                 only: set[str] | None = None, http: tuple[str, int] | None = None):
        self.config_path = config_path
        self.ledger = ledger
        self.only = only
        self.metrics = Metrics()
        self.stop = threading.Event()  # warm stop: no new pass; running passes end after their batch
        self._reload = threading.Event()
        self._lock = threading.Condition()
        self._running: set[str] = set()
        self._states: dict[str, _AccountState] = {}
        self._plans: dict[str, Plan] = {}
        self._watchers: dict[tuple[str, str], tuple[IdleWatcher, tuple]] = {}  # -> (watcher, what it uses)
        self._heartbeat = time.monotonic()
        self.owner = worker_name("daemon")
        schedule = loaded.config.schedule
        self.schedule = schedule
        self.tz = _zone(schedule.timezone)
        self.slots = ConnectionSlots(schedule.max_connections, schedule.max_connections_per_host)
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(schedule.max_connections),
                       "heartbeat": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": max(1, int(schedule.misfire_grace))},
            timezone=self.tz)
        self.runtime = Runtime.build(loaded, self.metrics, only)
        for name, (failures, until) in ledger.backoffs().items():  # a restart keeps the backoff
            self._state(name).failing = failures > 0
            self._state(name).backoff_until = until
            if until is not None:
                self.metrics.backoff_until.labels(name).set(until.replace(tzinfo=timezone.utc).timestamp())
        self.http: StatusServer | None = None
        if http is not None:
            self.http = StatusServer(http, Routes(self.health, self.status, self._metrics))

    # ----- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal stops it. Must be called from the main thread."""
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        self.scheduler.start()
        self.scheduler.add_job(self._beat, IntervalTrigger(seconds=HEARTBEAT), id="heartbeat",
                               executor="heartbeat", next_run_time=datetime.now(self.tz))
        if self.http is not None:
            self.http.start()
        self._apply(self.runtime)
        log.info("Daemon %s: started with %d account(s)", self.owner, len(self.runtime.accounts))
        while not self.stop.is_set():
            self.stop.wait(0.5)
            if self._reload.is_set() and not self.stop.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception:  # noqa: BLE001 - a reload that fails keeps the daemon as it was
                    log.exception("Daemon: reload failed; going on with the previous config")
        return self._shutdown()

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("Daemon: second %s: stopping at once (cold stop); uploads in flight are redone "
                        "on the next start", name)
            _exit_now(128 + signum)
        log.info("Daemon: %s: stopping after the work in flight (warm stop, at most %.0fs); send it again "
                 "to stop at once", name, self.schedule.stop_timeout)
        self.stop.set()

    def _on_reload_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload.set()

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.schedule.stop_timeout
        self.scheduler.shutdown(wait=False)
        for watcher, _ in list(self._watchers.values()):
            watcher.stop()
        with self._lock:
            while self._running and time.monotonic() < deadline:
                self._lock.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            late = sorted(self._running)
        if late:
            log.error("Daemon: %s still running after %.0fs; stopping cold (their uploads in flight are "
                      "redone on the next start)", ", ".join(late), self.schedule.stop_timeout)
            _exit_now(128 + signal.SIGTERM)
        for watcher, _ in list(self._watchers.values()):
            watcher.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.http is not None:
            self.http.stop()
        self.runtime.close()
        log.info("Daemon: stopped (warm); every pass ended with its work recorded")
        return 0

    # ----- configuration ---------------------------------------------------------------

    def reload(self) -> None:
        """Read the config again; keep the old one if the new one has problems."""
        try:
            loaded = config_mod.load(self.config_path)
        except ConfigError as e:
            for line in e.lines():
                log.error("Reload refused: %s", line)
            return
        if loaded.ledger_url != self.runtime.loaded.ledger_url:
            log.warning("Reload: the ledger setting changed; it takes effect on restart")
        for key in ("max_connections", "max_connections_per_host", "timezone", "misfire_grace"):
            if getattr(loaded.config.schedule, key) != getattr(self.schedule, key):
                log.warning("Reload: schedule.%s changed; it takes effect on restart", key)
        runtime = Runtime.build(loaded, self.metrics, self.only)
        with self._lock:
            old, self.runtime = self.runtime, runtime
            old.retired = True
            close_old = old.users == 0
        if close_old:
            old.close()
        self._apply(runtime)
        log.info("Daemon: config reloaded: %d account(s)", len(runtime.accounts))

    def _apply(self, runtime: Runtime) -> None:
        """Make jobs and watchers match the config: add, reschedule, remove."""
        schedule = runtime.loaded.config.schedule
        self.schedule = schedule.model_copy(update={k: getattr(self.schedule, k) for k in (
            "max_connections", "max_connections_per_host", "timezone", "misfire_grace")})
        wanted = {name: Plan.of(a, schedule) for name, a in runtime.accounts.items()}
        for name in sorted(set(self._plans) - set(wanted)):
            try:
                self.scheduler.remove_job(_job_id(name))  # a running pass of it still finishes
            except JobLookupError:
                pass
            del self._plans[name]
            log.info("Account %s: removed from the schedule", name, extra={"account": name})
        for name, plan in wanted.items():
            before = self._plans.get(name)
            if before == plan:
                continue
            trigger = plan.trigger(self.tz)
            if before is None:
                first = plan.first_run(self.tz)
                self.scheduler.add_job(self._run_account, trigger, args=[name], id=_job_id(name), name=name,
                                       **({"next_run_time": first} if first else {}))
            elif before.when != plan.when:
                self.scheduler.reschedule_job(_job_id(name), trigger=trigger)
            self._plans[name] = plan
            when = f"every {plan.every:g}s" if plan.every is not None else f"cron {plan.cron!r}"
            log.info("Account %s: scheduled %s%s", name, when,
                     f", IDLE on {', '.join(plan.idle)}" if plan.idle else "", extra={"account": name})
        self._apply_watchers(runtime, wanted, schedule)

    def _apply_watchers(self, runtime: Runtime, wanted: dict[str, Plan], schedule: Schedule) -> None:
        keep: set[tuple[str, str]] = set()
        for name, plan in wanted.items():
            account = runtime.accounts[name]
            uses = (account, runtime.loaded.password(account), schedule.idle_renew)  # a change restarts it
            for folder in plan.idle:
                key = (name, folder)
                keep.add(key)
                current = self._watchers.get(key)
                if current is not None and current[1] == uses:
                    continue
                if current is not None:
                    current[0].stop()
                watcher = IdleWatcher(name, folder, connector(runtime.loaded, account), renew=schedule.idle_renew,
                                      on_new_mail=lambda n=name: self.wake(n))
                self._watchers[key] = (watcher.start(), uses)
        for key in set(self._watchers) - keep:
            self._watchers.pop(key)[0].stop()

    # ----- passes ----------------------------------------------------------------------

    def wake(self, name: str) -> None:
        """Run the account's pass now (new mail announced); again after it if it is running."""
        with self._lock:
            self._state(name).poked.set()
            running = name in self._running
        if not running and not self.stop.is_set():
            self._trigger(name)

    def _trigger(self, name: str) -> None:
        if self.stop.is_set():
            return
        try:
            self.scheduler.modify_job(_job_id(name), next_run_time=datetime.now(self.tz))
        except JobLookupError:
            pass  # removed by a reload meanwhile

    def _run_account(self, name: str) -> None:
        """One scheduled run of one account (in a scheduler thread). Never raises."""
        if self.stop.is_set():
            return
        with self._lock:
            runtime = self.runtime
            runtime.users += 1
        try:
            account = runtime.accounts.get(name)
            if account is None or self._backing_off(name):
                return
            n = self.slots.weight(runtime.settings.connections)
            if not self.slots.try_acquire(account.host, name, n):
                log.debug("Account %s: %s is at its connection cap; waiting for a slot", name, account.host)
                return
            try:
                self._leased_passes(runtime, account)
            finally:
                for other in self.slots.release(account.host, n):
                    self._trigger(other)
        except Exception as e:  # noqa: BLE001 - one account's trouble never stops the daemon
            kind = "ledger" if isinstance(e, LedgerError) else "internal"
            self.metrics.error(name, kind)
            if isinstance(e, LedgerError):
                log.error("Account %s: %s", name, e, extra={"account": name})
            else:
                log.exception("Account %s: unexpected error", name, extra={"account": name})
        finally:
            with self._lock:
                runtime.users -= 1
                close = runtime.retired and runtime.users == 0
            if close:
                runtime.close()

    def _leased_passes(self, runtime: Runtime, account: Account) -> None:
        name = account.name
        with AccountLease(self.ledger, name, self.owner, "daemon", self.schedule.lease_seconds) as lease:
            if not lease.held:
                log.info("Account %s: skipped, being synced by %s", name, lease.holder(), extra={"account": name})
                return
            state = self._state(name)
            with self._lock:
                self._running.add(name)
                self.metrics.running.set(len(self._running))
            try:
                while True:
                    state.poked.clear()
                    result = self._pass(runtime, account)
                    with self._lock:  # the same lock as wake()'s look at _running: no poke is lost
                        if not state.poked.is_set() or self.stop.is_set() or result.error is not None:
                            self._running.discard(name)
                            break
            finally:
                with self._lock:
                    self._running.discard(name)
                    self.metrics.running.set(len(self._running))
                    self._lock.notify_all()

    def _pass(self, runtime: Runtime, account: Account) -> AccountResult:
        gate = TenantGate()
        pool = UploadPool(runtime.sinks, gate, runtime.loaded.config.upload.concurrency)
        try:
            result = sync_account(account, connector(runtime.loaded, account), self.ledger, pool,
                                  runtime.settings, kind=RUN_KIND, stop=self.stop)
        finally:
            pool.close()
        self.metrics.observe_pass(result, gate.closed)
        if result.error is not None:
            self._failed(account.name, result.error)
        else:
            self._succeeded(account.name, result)
        return result

    # ----- backoff -----------------------------------------------------------------------

    def _backing_off(self, name: str) -> bool:
        until = self._state(name).backoff_until
        return until is not None and _utcnow() < until

    def _failed(self, name: str, error: SourceError) -> None:
        s = self.schedule
        floor = error.retry_after or (s.throttle_backoff if error.kind == SourceErrorKind.THROTTLED else 0.0)

        def delay_for(failures: int) -> float:
            return max(min(s.backoff_initial * 2 ** (failures - 1), s.backoff_max), floor)

        failures, until = self.ledger.back_off(name, delay_for)
        state = self._state(name)
        state.failing, state.backoff_until = True, until
        self.metrics.backoff_until.labels(name).set(until.replace(tzinfo=timezone.utc).timestamp())
        log.warning("Account %s: backing off until %s UTC (%d failure(s) in a row): %s", name,
                    until.isoformat(timespec="seconds"), failures, error, extra={"account": name})

    def _succeeded(self, name: str, result: AccountResult) -> None:
        state = self._state(name)
        if state.failing:
            self.ledger.clear_backoff(name)
            state.failing, state.backoff_until = False, None
            self.metrics.backoff_until.labels(name).set(0)
            log.info("Account %s: working again", name, extra={"account": name})
        c = result.counts
        if c.uploaded or c.failed or c.pending or c.skipped or c.duplicate:
            log.info("Account %s: %d uploaded, %d duplicate, %d skipped, %d failed, %d pending", name,
                     c.uploaded, c.duplicate, c.skipped, c.failed, c.pending, extra={"account": name})

    def _state(self, name: str) -> _AccountState:
        with self._lock:
            return self._states.setdefault(name, _AccountState())

    # ----- observability -----------------------------------------------------------------

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    def health(self) -> Health:
        checks: dict[str, str] = {}
        if self.stop.is_set():
            checks["scheduler"] = "stopping"
        elif not self.scheduler.running:
            checks["scheduler"] = "not running"
        elif time.monotonic() - self._heartbeat > 3 * HEARTBEAT:
            checks["scheduler"] = f"no heartbeat for {time.monotonic() - self._heartbeat:.0f}s"
        else:
            checks["scheduler"] = "ok"
        try:
            self.ledger.check_writable()
            checks["ledger"] = "ok"
        except LedgerError as e:
            checks["ledger"] = f"not writable: {e.detail}"
        return Health(checks, all(v == "ok" for v in checks.values()))

    def status(self) -> dict:
        from imapsync.status import report

        return report(self.ledger)

    def _metrics(self) -> tuple[bytes, str]:
        return self.metrics.exposition(), CONTENT_TYPE_LATEST


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # the ledger's naive UTC


def _zone(name: str | None) -> tzinfo:
    if name is None:
        from tzlocal import get_localzone

        return get_localzone()
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def _exit_now(code: int) -> None:
    """A cold stop: flush what was logged and leave without waiting for any thread."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stderr.flush()
    os._exit(code)


def run_daemon(config_path: Path, loaded: LoadedConfig, *, only: set[str] | None = None,
               http: tuple[str, int] | None = None) -> int:
    """Open the ledger and run the daemon until it is stopped; returns the exit code."""
    ledger = Ledger.open(loaded.ledger_url)
    try:
        return Daemon(config_path, loaded, ledger, only=only, http=http).run()
    finally:
        ledger.close()
