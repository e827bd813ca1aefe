"""The command line: parses options, calls the service, turns errors into words and exit codes.

Only this module prints for a person. Known errors print one line each (with the
file and key for config problems) and no traceback; an unexpected error prints one
line and how to see the traceback (--debug).
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click

from imapsync import config as config_mod
from imapsync.errors import ConfigError, ExitCode, ImapsyncError, LedgerError
from imapsync.upload_cli import upload as upload_command

log = logging.getLogger("imapsync")


def _setup_logging(level: str, fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":  # one JSON object a line, with `account`/`folder` fields where the line has them
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level",
                                                          "name": "logger"},
                                           datefmt="%Y-%m-%dT%H:%M:%S%z"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # imapclient logs protocol lines (with LOGIN arguments) at DEBUG: never let them through.
    logging.getLogger("imapclient").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per job run otherwise


def handle_errors(fn: Callable) -> Callable:
    """Known errors -> one line on stderr and their exit code; no traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            code = fn(*args, **kwargs)
        except ConfigError as e:
            for line in e.lines():
                click.echo(line, err=True)
            sys.exit(ExitCode.CONFIG)
        except LedgerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(ExitCode.UNEXPECTED)
        except ImapsyncError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(ExitCode.UNEXPECTED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException:
            raise  # a usage error found by the command itself: click prints it, exit 2
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if debug:
                raise
            click.echo(f"unexpected error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
            sys.exit(ExitCode.UNEXPECTED)
        sys.exit(int(code or 0))

    return wrapper


config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None,
    help="Config file (default: $IMAPSYNC_CONFIG or ./config.yaml).")


def _load(config_path: Path | None) -> config_mod.LoadedConfig:
    return config_mod.load(config_path or config_mod.default_config_path())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-format", default="plain", show_default=True, type=click.Choice(["plain", "json"]),
              help="Log lines on stderr as text, or as one JSON object each.")
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.version_option(package_name="imapsync")
def cli(log_level: str, log_format: str, debug: bool) -> None:
    """Archive IMAP mailboxes into Mithi Vaultastic, read-only and deduplicated."""
    _setup_logging(log_level, log_format)
    from imapsync.sinks.base import sweep_stale_spool
    sweep_stale_spool()  # what an imapsync killed mid-upload left in the temporary folder


@cli.command()
@config_option
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--once", is_flag=True, default=True, help="One pass over the accounts, then exit (the default).")
@handle_errors
def sync(config_path: Path | None, accounts: tuple[str, ...], once: bool) -> int:
    """Archive new mail of every account once, then exit.

    Exit 0 when every message reached a final state; 5 when some failed or are left
    pending; 7 when an account could not be read; 2 for a config problem or an API
    key the service refused.
    """
    from imapsync.ledger import Ledger
    from imapsync.service import run_pass_spread

    loaded = _load(config_path)
    unknown = sorted(set(accounts) - {a.name for a in loaded.config.accounts})
    if unknown:
        raise ConfigError(str(loaded.path), [config_mod.ConfigProblem("accounts", f"no account named {n!r}")
                                             for n in unknown])
    ledger = Ledger.open(loaded.ledger_url)
    try:
        result = run_pass_spread(loaded, ledger, list(accounts) or None)
    finally:
        ledger.close()
    click.echo(result.summary())
    return result.exit_code


@cli.command()
@config_option
@click.option("--account", default=None, help="Only this account.")
@click.option("--failed", "show_failed", is_flag=True,
              help="Each failed or skipped message: where, Message-ID, size, date, reason, attempts, last error.")
@click.option("--reason", default=None, help="With --failed: only this reason (e.g. s3_upload_failed).")
@click.option("--runs", "show_runs", is_flag=True, help="History of sync, backfill and retry runs, newest first.")
@click.option("--message", "message_id", default=None, metavar="MESSAGE-ID",
              help="Where this message was seen and which vaults it reached, when.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many rows (default: 1000 for --failed, 50 for --runs).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (fields in the README).")
@handle_errors
def status(config_path: Path | None, account: str | None, show_failed: bool, reason: str | None, show_runs: bool,
           message_id: str | None, limit: int | None, as_json: bool) -> int:
    """What was archived, what was not and why (reads the ledger only)."""
    from imapsync import status as st
    from imapsync.ledger import Ledger

    if show_failed + show_runs + (message_id is not None) > 1:
        raise click.UsageError("give at most one of --failed, --runs and --message")
    if reason and not show_failed:
        raise click.UsageError("--reason goes with --failed")
    loaded = _load(config_path)
    opened = Ledger.open(loaded.ledger_url)
    try:
        if show_failed:
            data, draw = st.failed(opened, account, reason, limit or 1000), st.render_failed
        elif show_runs:
            data, draw = st.runs(opened, account, limit=limit or 50), st.render_runs
        elif message_id is not None:
            data, draw = st.message(opened, message_id), st.render_message
        else:
            data, draw = st.report(opened, account), st.render
    finally:
        opened.close()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        draw(data, st.console())
    return ExitCode.OK


@cli.command()
@config_option
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--http", "http_address", default=None, metavar="HOST:PORT",
              help="Serve /healthz, /status and /metrics here (e.g. 127.0.0.1:9108).")
@click.option("--http-allow-remote", is_flag=True, help="Allow --http on a non-loopback address.")
@handle_errors
def run(config_path: Path | None, accounts: tuple[str, ...], http_address: str | None,
        http_allow_remote: bool) -> int:
    """Archive every account on its schedule until stopped (SIGTERM/SIGINT; SIGHUP reloads).

    The first SIGTERM or Ctrl-C lets running passes finish their current batch (at most
    schedule.stop_timeout) and exits 0; a second one stops at once (exit 128+signal).
    """
    from imapsync.daemon import run_daemon
    from imapsync.http_status import parse_address

    http = None
    if http_address is not None:
        try:
            http = parse_address(http_address, http_allow_remote)
        except ValueError as e:
            click.echo(f"error: --http: {e}", err=True)
            return ExitCode.CONFIG
    path = config_path or config_mod.default_config_path()
    loaded = config_mod.load(path)
    unknown = sorted(set(accounts) - {a.name for a in loaded.config.accounts})
    if unknown:
        raise ConfigError(str(loaded.path), [config_mod.ConfigProblem("accounts", f"no account named {n!r}")
                                             for n in unknown])
    return run_daemon(path, loaded, only=set(accounts) or None, http=http)


@cli.command()
@config_option
@handle_errors
def doctor(config_path: Path | None) -> int:
    """Check the config, the ledger, each IMAP login and each endpoint and API key; print a table.

    Exit 0 only if every check passed (2: an API key refused, 7: an account cannot be
    read, 5: an endpoint unreachable, 1: the ledger not writable).
    """
    from imapsync.doctor import exit_code, render, run_checks
    from imapsync.status import console

    rows = run_checks(_load(config_path))
    render(rows, console())
    return exit_code(rows)


@cli.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the demo's files (config, ledger, uploads) in this directory.")
@handle_errors
def demo(keep: Path | None) -> int:
    """Archive sample mail from a local IMAP server into the local receiver, then show status."""
    from imapsync.demo import run_demo

    from imapsync.status import console

    return run_demo(keep, console())


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def receiver(args: tuple[str, ...]) -> None:
    """Serve the modelled Vaultastic API on loopback (see `imapsync receiver --help`)."""
    from imapsync.receiver import main as receiver_main

    sys.exit(receiver_main(list(args)))


# `imapsync upload`: the drop-in replacement for the vendor's upload script (upload_cli.py).
cli.add_command(upload_command)


@cli.group()
def ledger() -> None:
    """Look after the ledger itself."""


@ledger.command("check")
@config_option
@handle_errors
def ledger_check(config_path: Path | None) -> int:
    """Is the ledger consistent? No row pointing at nothing, no cursor past an unfinished copy.

    Prints one line per problem (then a summary) and exits 1 if there is any; exit 0 and
    one summary line when the ledger is consistent. Reads only the ledger.
    """
    from imapsync.ledger import Ledger
    from imapsync.ledger_check import check

    loaded = config_mod.load(config_path or config_mod.default_config_path(), resolve_secrets=False)
    opened = Ledger.open(loaded.ledger_url)
    try:
        result = check(opened)
    finally:
        opened.close()
    for line in result.lines():
        click.echo(line)
    click.echo(result.summary())
    return ExitCode.OK if result.ok else ExitCode.UNEXPECTED


def _accounts_known(loaded: config_mod.LoadedConfig, accounts: tuple[str, ...]) -> None:
    unknown = sorted(set(accounts) - {a.name for a in loaded.config.accounts})
    if unknown:
        raise ConfigError(str(loaded.path), [config_mod.ConfigProblem("accounts", f"no account named {n!r}")
                                             for n in unknown])


_DAY = click.DateTime(formats=["%Y-%m-%d"])


@cli.command()
@config_option
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--folder", "folders", multiple=True, metavar="GLOB",
              help="Only folders matching this glob (repeatable; within the account's own folder filter).")
@click.option("--since", type=_DAY, default=None, help="Messages that arrived on or after this day (YYYY-MM-DD).")
@click.option("--before", type=_DAY, default=None, help="Messages that arrived before this day (YYYY-MM-DD).")
@click.option("--newest-first", is_flag=True, help="Walk from the newest window back to the oldest.")
@click.option("--dry-run", is_flag=True,
              help="Fetch headers only; say what would be uploaded to which vaults, what skipped and why.")
@click.option("--window-days", type=click.IntRange(1, 3650), default=None,
              help="Days per date window (default: backfill.window_days, 30).")
@click.option("--wait", "lease_wait", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for an account another worker is syncing (default: backfill.lease_wait).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the whole plan as JSON on stdout.")
@handle_errors
def backfill(config_path: Path | None, accounts: tuple[str, ...], folders: tuple[str, ...], since, before,
             newest_first: bool, dry_run: bool, window_days: int | None, lease_wait: float | None,
             as_json: bool) -> int:
    """Archive existing mail, date window by date window, with progress; resumable.

    Uses the same ledger, dedup and uploads as `sync`: nothing archived by one is uploaded
    again by the other. Ctrl-C (or SIGTERM) finishes the batch in hand and stops; a kill
    loses nothing acknowledged: run the same command again to continue. Exit codes as
    for `sync`; 130 when stopped.
    """
    from imapsync.backfill import backfill as run_backfill
    from imapsync.backfill import render_dry_run, warm_stop
    from imapsync.ledger import Ledger
    from imapsync.progress import Tracker, display
    from imapsync.status import console
    from imapsync.sync import Windows

    since_day, before_day = since.date() if since else None, before.date() if before else None
    if since_day and before_day and before_day <= since_day:
        raise click.BadParameter("must be a later day than --since", param_hint="--before")
    loaded = _load(config_path)
    _accounts_known(loaded, accounts)
    cfg = loaded.config.backfill
    selection = Windows(since_day, before_day, newest_first, window_days or cfg.window_days, folders)
    tracker = Tracker()
    opened = Ledger.open(loaded.ledger_url)
    try:
        with warm_stop() as stop, display(tracker, cfg.progress_interval):
            result = run_backfill(loaded, opened, selection, accounts=list(accounts) or None, dry_run=dry_run,
                                  tracker=tracker, stop=stop, lease_wait=lease_wait)
    finally:
        opened.close()
    if result.dry_run is not None:
        if as_json:
            click.echo(json.dumps(result.dry_run.as_dict(), indent=2, sort_keys=True))
        else:
            render_dry_run(result.dry_run.as_dict(), console())
    click.echo(result.summary())
    return result.exit_code


@cli.command()
@config_option
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--folder", "folders", multiple=True, metavar="GLOB", help="Only folders matching this glob (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (fields in the README).")
@handle_errors
def verify(config_path: Path | None, accounts: tuple[str, ...], folders: tuple[str, ...], as_json: bool) -> int:
    """Reconcile each mailbox with the ledger: every message present must be accounted for.

    Prints counts per folder and every unaccounted message. Exit 0 only when complete;
    8 when some message is not accounted for; 5 when all are, but some failed; 7 when
    an account could not be read. Reads the mailbox (headers only) and the ledger.
    """
    from imapsync import verify as verify_mod
    from imapsync.ledger import Ledger
    from imapsync.status import console

    loaded = _load(config_path)
    _accounts_known(loaded, accounts)
    opened = Ledger.open(loaded.ledger_url)
    try:
        report = verify_mod.verify(loaded, opened, list(accounts) or None, folders)
    finally:
        opened.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        verify_mod.render(report, console())
    return report.exit_code


@cli.command()
@config_option
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--reason", default=None,
              help="Only messages that failed (or were skipped) for this reason, e.g. s3_upload_failed.")
@click.option("--wait", "lease_wait", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for an account another worker is syncing (default: backfill.lease_wait).")
@handle_errors
def retry(config_path: Path | None, accounts: tuple[str, ...], reason: str | None, lease_wait: float | None) -> int:
    """Upload failed messages again, fetched by UID (or by Message-ID when the UID is gone).

    Exit 0 when every retried message is now archived; 5 when some still fail.
    """
    from imapsync.backfill import warm_stop
    from imapsync.ledger import Ledger
    from imapsync.retry import retry as run_retry

    loaded = _load(config_path)
    _accounts_known(loaded, accounts)
    opened = Ledger.open(loaded.ledger_url)
    try:
        with warm_stop() as stop:
            result = run_retry(loaded, opened, accounts=list(accounts) or None, reason=reason, stop=stop,
                               lease_wait=lease_wait)
    finally:
        opened.close()
    click.echo(result.summary())
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    from imapsync.memory import keep_large_buffers_off_the_heap, no_collection_at_exit

    keep_large_buffers_off_the_heap()
    no_collection_at_exit()
    try:
        cli.main(args=argv, prog_name="imapsync", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
