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


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    # imapclient logs protocol lines (with LOGIN arguments) at DEBUG: never let them through.
    logging.getLogger("imapclient").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


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
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.version_option(package_name="imapsync")
def cli(log_level: str, debug: bool) -> None:
    """Archive IMAP mailboxes into Mithi Vaultastic, read-only and deduplicated."""
    _setup_logging(log_level)


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
    from imapsync.service import run_pass

    loaded = _load(config_path)
    unknown = sorted(set(accounts) - {a.name for a in loaded.config.accounts})
    if unknown:
        raise ConfigError(str(loaded.path), [config_mod.ConfigProblem("accounts", f"no account named {n!r}")
                                             for n in unknown])
    ledger = Ledger.open(loaded.ledger_url)
    try:
        result = run_pass(loaded, ledger, list(accounts) or None)
    finally:
        ledger.close()
    click.echo(result.summary())
    return result.exit_code


@cli.command()
@config_option
@click.option("--account", default=None, help="Only this account.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (fields in the README).")
@handle_errors
def status(config_path: Path | None, account: str | None, as_json: bool) -> int:
    """What was archived, what was not and why (reads the ledger only)."""
    from imapsync.ledger import Ledger
    from imapsync.status import console, render, report

    loaded = _load(config_path)
    ledger = Ledger.open(loaded.ledger_url)
    try:
        data = report(ledger, account)
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data, console())
    return ExitCode.OK


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


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="imapsync", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
