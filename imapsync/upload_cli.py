"""`imapsync upload`: a drop-in replacement for the vendor's VaultasticActiveStoreMailUpload.py.

Why: scripts and Lambda wrappers already call the vendor script with its flags
(``-i EML_PATH | -m CONTENTS``, ``-r R1,R2``, ``-s SENDER``), its environment
(PRIMARY_DOMAIN, API_ENDPOINT_URL, API_KEY) and its exit codes. This command keeps all
three, so such a caller switches by changing the command name only, and gains the
HTTP sink's retries and idempotent request ids (and, with a config, the ledger).

Vaults = the addresses in From/To/Cc/Bcc on PRIMARY_DOMAIN (as the vendor reads them)
plus every -r address plus -s; -r and -s must be valid addresses on PRIMARY_DOMAIN.

Exit codes (the vendor's meanings): 0 uploaded; 1 unknown exception (also: uploaded but
the ledger could not be written); 2 usage: a missing environment variable, an unreadable
-i file, a bad config or budget variable; 3 neither -i nor -m, or the API called the
request malformed; 4 an invalid recipient (-r/-s not an address or not on PRIMARY_DOMAIN,
or refused by the API); 5 the upload failed after its retries, the endpoint could not be
reached, the API key was refused, or the API refused the mail for good (e.g. too large);
6 no recipient on PRIMARY_DOMAIN.

The retry budget defaults to the config's ``upload:`` section (or its defaults) and can be
set with IMAPSYNC_UPLOAD_MAX_ATTEMPTS and IMAPSYNC_UPLOAD_BACKOFF_FACTOR. The API key is
never printed: any output line that would hold it shows *** instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from imapsync.config import DEFAULT_MAX_MESSAGE_BYTES, LoadedConfig, normalize_endpoint
from imapsync.errors import ConfigError, ExitCode, ImapsyncError
from imapsync.message import MessageInfo, addresses_in, fingerprint, header_block, parse_headers, valid_address
from imapsync.routing import domain_of, routes
from imapsync.sinks.base import Outcome, UploadRequest, UploadResult

ENV_VARS = ("PRIMARY_DOMAIN", "API_ENDPOINT_URL", "API_KEY")
MAX_ATTEMPTS_ENV = "IMAPSYNC_UPLOAD_MAX_ATTEMPTS"
BACKOFF_ENV = "IMAPSYNC_UPLOAD_BACKOFF_FACTOR"
CONFIG_ENV = "IMAPSYNC_CONFIG"
VENDOR_HEADERS = ("from", "to", "cc", "bcc")
USAGE = "imapsync upload (-i EML_PATH | -m CONTENTS) [-r R1,R2] [-s SENDER] [--config PATH]"
SUCCESS = "Mail uploaded successfully"


class UploadExit(ImapsyncError):
    """Ends the command with a vendor exit code and one line for a person."""

    def __init__(self, code: ExitCode, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Target:
    """The vendor's three environment variables, read once."""

    domain: str
    endpoint: str
    api_key: str


@dataclass(frozen=True)
class Policy:
    """The HTTP sink's retry budget for this one upload."""

    max_attempts: int = 5
    backoff_factor: float = 1.0
    backoff_max: float = 60.0
    budget_seconds: float = 900.0
    timeout: float = 120.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Plan:
    """What to upload: the bytes, their ledger key and the vaults."""

    raw: bytes
    key: str
    info: MessageInfo
    vaults: tuple[str, ...]
    sender: str | None

    @property
    def fingerprint(self) -> str | None:
        return self.key if self.info.header_key is None else None


def endpoint_url(value: str) -> str:
    """API_ENDPOINT_URL as the vendor takes it: a bare host name means HTTPS."""
    return normalize_endpoint(value)


def read_target(environ: Mapping[str, str]) -> Target:
    missing = [name for name in ENV_VARS if not environ.get(name, "").strip()]
    if missing:
        raise UploadExit(ExitCode.CONFIG, f"Missing environment variable(s): {', '.join(missing)}")
    return Target(environ["PRIMARY_DOMAIN"].strip().lower(), endpoint_url(environ["API_ENDPOINT_URL"]),
                  environ["API_KEY"].strip())


def read_message(input_path: Path | None, contents: str | None) -> bytes:
    """-i wins over -m (the vendor ignores -m when both are given)."""
    if input_path is not None:
        try:
            return input_path.read_bytes()
        except OSError as e:
            raise UploadExit(ExitCode.CONFIG, f"Cannot read {input_path}: {e.strerror}") from None
    if contents is not None:
        return os.fsencode(contents)  # the exact bytes of the argument, even when not UTF-8
    raise UploadExit(ExitCode.INVALID_ARGUMENTS, f"Invalid number of arguments: give -i or -m. Usage: {USAGE}")


def parse_addresses(values: tuple[str, ...] | list[str], domain: str, what: str) -> list[str]:
    """Comma-separated addresses, each valid and on the primary domain, else exit 4."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            addr = part.strip().lower()
            if not addr:
                continue
            if not valid_address(addr):
                raise UploadExit(ExitCode.INVALID_RECIPIENT, f"Invalid {what} address: {part.strip()!r}")
            if domain_of(addr) != domain:
                raise UploadExit(ExitCode.INVALID_RECIPIENT,
                                 f"Invalid {what} address: {addr} is not on the primary domain {domain}")
            if addr not in out:
                out.append(addr)
    return out


def plan_upload(raw: bytes, domain: str, recipients: list[str], sender: str | None) -> Plan:
    """Vaults = From/To/Cc/Bcc on the primary domain + -r + -s; none -> exit 6."""
    info = MessageInfo.from_headers(header_block(raw), len(raw))
    fields = parse_headers(header_block(raw))
    found = addresses_in(v for name in VENDOR_HEADERS for v in fields.get(name, []))
    extra = recipients + ([sender] if sender else [])
    route = next(iter(routes(found + extra, info.sender, None, {domain: {}})), None)
    if route is None:
        raise UploadExit(ExitCode.NO_PRIMARY_RECIPIENT, f"No recipient on the primary domain {domain}")
    return Plan(raw, info.header_key or fingerprint(raw), info, tuple(sorted(route.vaults)),
                sender or route.sender)


def _env_number(environ: Mapping[str, str], name: str, kind: type, low: float, default):
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise UploadExit(ExitCode.CONFIG, f"{name} must be a number >= {low}, not {value!r}")
    return number


def read_policy(environ: Mapping[str, str], loaded: LoadedConfig | None) -> Policy:
    base = Policy()
    if loaded is not None:
        up = loaded.config.upload
        base = Policy(up.max_attempts, up.backoff_factor, up.backoff_max, up.budget_seconds, up.timeout,
                      up.max_message_bytes)
    return Policy(_env_number(environ, MAX_ATTEMPTS_ENV, int, 1, base.max_attempts),
                  _env_number(environ, BACKOFF_ENV, float, 0, base.backoff_factor),
                  base.backoff_max, base.budget_seconds, base.timeout, base.max_message_bytes)


def load_config(config_path: Path | None, environ: Mapping[str, str]) -> tuple[LoadedConfig | None, str | None]:
    """The config (secrets unresolved: only the ledger and upload policy are used), and a
    warning when IMAPSYNC_CONFIG names a file that does not exist (then: no ledger)."""
    from imapsync import config as config_mod

    if config_path is None:
        named = environ.get(CONFIG_ENV, "").strip()
        if not named:
            return None, None
        config_path = Path(named)
        if not config_path.is_file():
            return None, f"warning: {CONFIG_ENV}={named}: no such file; the upload is not recorded in a ledger"
    return config_mod.load(config_path, resolve_secrets=False), None


def exit_for(result: UploadResult, plan: Plan) -> tuple[ExitCode, str]:
    """The vendor exit code and its one line for an upload's result."""
    detail = result.detail or result.reason or result.outcome.value
    if result.outcome is Outcome.UPLOADED:
        return ExitCode.OK, SUCCESS
    if result.outcome is Outcome.FORBIDDEN:
        return ExitCode.UPLOAD_FAILED, f"Failed to upload the mail: the API key was refused ({detail})"
    if result.outcome is Outcome.PERMANENT and result.reason == "invalid_recipient":
        return ExitCode.INVALID_RECIPIENT, f"Invalid recipient address: {detail}"
    if result.outcome is Outcome.PERMANENT and result.reason == "no_primary_recipient":
        return ExitCode.NO_PRIMARY_RECIPIENT, f"No recipient on the primary domain: {detail}"
    if result.outcome is Outcome.PERMANENT and result.reason == "bad_request":
        return ExitCode.INVALID_ARGUMENTS, f"Invalid request: {detail}"
    if result.outcome is Outcome.PERMANENT and result.reason == "too_large":
        return ExitCode.UPLOAD_FAILED, f"Failed to upload the mail: {len(plan.raw)} bytes is over the API's limit"
    return ExitCode.UPLOAD_FAILED, f"Failed to upload the mail after {result.attempts} attempt(s): {detail}"


def send(plan: Plan, target: Target, policy: Policy) -> UploadResult:
    from imapsync.sinks.vaultastic import RetryPolicy, VaultasticSink

    retry = RetryPolicy(max_attempts=policy.max_attempts, backoff_factor=policy.backoff_factor,
                        backoff_max=policy.backoff_max, budget_seconds=policy.budget_seconds)
    sink = VaultasticSink(target.domain, target.endpoint, target.api_key, retry=retry, timeout=policy.timeout)
    try:
        return sink.upload(UploadRequest.of(plan.key, target.domain, plan.vaults, plan.sender, plan.raw))
    finally:
        sink.close()


def record(ledger, plan: Plan, target: Target, result: UploadResult) -> None:
    """The message and the vaults it reached, in one transaction (as a sync would)."""
    from imapsync.ledger import State

    with ledger.tx() as c:
        ref = ledger.ensure_message(c, plan.key, message_id=plan.info.message_id, fingerprint=plan.fingerprint,
                                    size=len(plan.raw), date=plan.info.date, state=State.UPLOADED,
                                    overwrite=False)
        ledger.record_upload(c, ref, tenant=target.domain, vaults=plan.vaults, upload_id=result.upload_id,
                             attempts=result.attempts)


def run(input_path: Path | None, contents: str | None, recipients: tuple[str, ...], sender: str | None,
        config_path: Path | None, environ: Mapping[str, str]) -> tuple[ExitCode, list[str]]:
    """The whole command, without printing: the exit code and lines for stderr ("" prefix)
    or stdout (the success line). Raises UploadExit and ConfigError."""
    raw = read_message(input_path, contents)
    target = read_target(environ)
    vaults_r = parse_addresses(recipients, target.domain, "recipient")
    senders = parse_addresses((sender,) if sender else (), target.domain, "sender")
    plan = plan_upload(raw, target.domain, vaults_r, senders[0] if senders else None)
    loaded, warning = load_config(config_path, environ)
    policy = read_policy(environ, loaded)
    if len(raw) > policy.max_message_bytes:
        raise UploadExit(ExitCode.UPLOAD_FAILED,
                         f"Failed to upload the mail: {len(raw)} bytes is over the limit of {policy.max_message_bytes}")
    ledger = _open_ledger(loaded)
    try:
        result = send(plan, target, policy)
        code, line = exit_for(result, plan)
        if code is ExitCode.OK and ledger is not None:
            try:
                record(ledger, plan, target, result)
            except ImapsyncError as e:
                return ExitCode.UNEXPECTED, [*([warning] if warning else []),
                                             f"Mail uploaded, but the ledger was not updated: {e}"]
    finally:
        if ledger is not None:
            ledger.close()
    return code, [*([warning] if warning else []), line]


def _open_ledger(loaded: LoadedConfig | None):
    """Opened before the upload, so a broken ledger stops us before anything is sent."""
    if loaded is None:
        return None
    from imapsync.ledger import Ledger

    return Ledger.open(loaded.ledger_url)


def _say(line: str, api_key: str, err: bool) -> None:
    click.echo(line.replace(api_key, "***") if api_key else line, err=err)


@click.command("upload", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-i", "input_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The mail as an .eml file (wins over -m).")
@click.option("-m", "contents", default=None, help="The mail itself, as the argument's text.")
@click.option("-r", "recipients", multiple=True,
              help="Comma-separated vault addresses on PRIMARY_DOMAIN, added to those in From/To/Cc/Bcc.")
@click.option("-s", "sender", default=None, help="The sender's vault address on PRIMARY_DOMAIN.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Record the upload in this config's ledger (default: $IMAPSYNC_CONFIG if set; else no ledger).")
def upload(input_path: Path | None, contents: str | None, recipients: tuple[str, ...], sender: str | None,
           config_path: Path | None) -> None:
    """Upload one mail like VaultasticActiveStoreMailUpload.py (same flags, environment and exit codes).

    Reads PRIMARY_DOMAIN, API_ENDPOINT_URL (a bare host means HTTPS) and API_KEY from the
    environment. Exit 0 uploaded, 1 unknown error, 2 missing environment or usage, 3 neither
    -i nor -m, 4 invalid recipient, 5 upload failed, 6 no recipient on PRIMARY_DOMAIN.
    """
    environ = dict(os.environ)
    api_key = environ.get("API_KEY", "").strip()
    try:
        code, lines = run(input_path, contents, recipients, sender, config_path, environ)
    except UploadExit as e:
        code, lines = e.code, [e.message]
    except ConfigError as e:
        code, lines = ExitCode.CONFIG, e.lines()
    except ImapsyncError as e:  # e.g. the ledger cannot be opened
        code, lines = ExitCode.UNEXPECTED, [f"Unknown exception: {e}"]
    except Exception as e:  # noqa: BLE001 - the vendor's "unknown exception"
        code, lines = ExitCode.UNEXPECTED, [f"Unknown exception: {type(e).__name__}: {e}"]
    for line in lines:
        _say(line, api_key, err=not (code is ExitCode.OK and line == SUCCESS))
    sys.exit(int(code))
