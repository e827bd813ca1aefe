"""Configuration: YAML file -> validated, immutable models with secrets resolved.

Everything is checked before any network I/O, and every problem is reported at once
as `FILE: key.path: problem` (see errors.ConfigError), so an administrator fixes the
file in one go. Secrets come from the environment, a file or a command; they are held
as pydantic SecretStr so that no repr, log line or traceback shows them.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from imapsync.errors import ConfigError, ConfigProblem

log = logging.getLogger("imapsync.config")

DEFAULT_CONFIG_NAME = "config.yaml"
DEFAULT_LEDGER_NAME = "imapsync.sqlite3"
#: Folders flagged with these SPECIAL-USE attributes are not archived unless included by name.
DEFAULT_EXCLUDED_SPECIAL_USE = ("\\Trash", "\\Junk", "\\Drafts")
#: The API's documented per-message limit.
DEFAULT_MAX_MESSAGE_BYTES = 50 * 1024 * 1024
#: Sinks that upload to a tenant's endpoint with its API key.
API_SINKS = ("vaultastic", "vaultastic-sdk")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
               "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3}


def normalize_endpoint(value: str) -> str:
    """Like the vendor SDK's API_ENDPOINT_URL: a bare host name means HTTPS; a URL is kept."""
    value = value.strip().rstrip("/")
    return value if re.match(r"^https?://", value, re.IGNORECASE) else f"https://{value}"


def _parse_size(value: Any) -> Any:
    """Accept 1048576, '1MiB', '50MB' for byte sizes."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"not a size: {value!r} (use e.g. 1048576, '16MiB' or '50MB')")
        return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(value: Any) -> Any:
    """Accept 30, 1.5, '500ms', '30s', '5m', '1h', '1d' for durations (in seconds)."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30, '30s', '5m' or '1h')")
        return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    return value


#: Seconds; written as a number or with a unit ("500ms", "30s", "5m", "1h", "1d").
Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
#: RFC 2177: a server may end an IDLE after 30 minutes; re-IDLE before 29.
MAX_IDLE_RENEW = 29 * 60


def _check_cron(expr: str | None) -> str | None:
    if expr is None:
        return None
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as e:
        raise ValueError(f"not a crontab expression (minute hour day month weekday): {e}") from None
    return expr


def _idle_folders(value: Any) -> Any:
    """`idle: true` watches INBOX; a list names the folders; false/[] turns IDLE off."""
    if value is True:
        return ["INBOX"]
    if value is False:
        return []
    return value


IdleFolders = Annotated[list[str], BeforeValidator(_idle_folders)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretSource(Strict):
    """Where a secret comes from: exactly one of env, file or command."""

    env: str | None = None
    file: Path | None = None
    command: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretSource":
        given = [k for k in ("env", "file", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file or command")
        return self


def _secret_source(value: Any) -> Any:
    # An inline string is allowed (for quick trials) but never required.
    if isinstance(value, str):
        return {"inline": value}
    return value


class InlineSecret(Strict):
    inline: str


SecretSpec = Annotated[SecretSource | InlineSecret, BeforeValidator(_secret_source)]


class TlsMode(str, Enum):
    IMPLICIT = "implicit"  # TLS from the first byte (port 993)
    STARTTLS = "starttls"  # plain connect, then STARTTLS is required
    PLAIN = "plain"  # no TLS: loopback only unless allow_insecure


class FolderFilter(Strict):
    """Glob patterns on folder names (fnmatch, case-sensitive; INBOX matches any case)."""

    include: list[str] = ["*"]
    exclude: list[str] = []
    exclude_special_use: list[str] = list(DEFAULT_EXCLUDED_SPECIAL_USE)


class AccountSchedule(Strict):
    """When one account is archived by `imapsync run`; unset keys come from `schedule:`."""

    every: PositiveDuration | None = None  # a poll interval, e.g. "5m"
    cron: str | None = None  # or a crontab expression, e.g. "*/10 8-18 * * 1-5"
    idle: IdleFolders | None = None  # IMAP IDLE on these folders (true = INBOX)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return _check_cron(v)

    @model_validator(mode="after")
    def _one_trigger(self) -> "AccountSchedule":
        if self.every is not None and self.cron is not None:
            raise ValueError("give every or cron, not both")
        return self


class Account(Strict):
    name: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = TlsMode.IMPLICIT
    verify_certificate: bool = True
    ca_file: Path | None = None
    allow_insecure: bool = False
    username: str = Field(min_length=1)
    password: SecretSpec
    vault: str | None = None
    folders: FolderFilter = FolderFilter()
    timeout: float = Field(default=60.0, gt=0)
    schedule: AccountSchedule = AccountSchedule()  # `imapsync run` only

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == TlsMode.IMPLICIT else 143)


class Tenant(Strict):
    """One Vaultastic tenant: a primary domain with its endpoint and API key."""

    domain: str = Field(min_length=3)
    endpoint: str | None = None
    api_key: SecretSpec | None = None
    aliases: dict[str, str] = {}

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.strip().lower()
        if "@" in v or "." not in v or " " in v:
            raise ValueError(f"not a domain name: {v!r}")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        # Like the vendor SDK: a bare host name means HTTPS.
        return None if v is None else normalize_endpoint(v)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        return {k.strip().lower(): t.strip().lower() for k, t in v.items()}


class Upload(Strict):
    """Concurrency, rate, retry and size policy for uploads (design rule 6)."""

    concurrency: int = Field(default=16, ge=1, le=256)
    rate: float = Field(default=10_000.0, gt=0)  # requests/s per tenant (the API's limit)
    burst: int = Field(default=5_000, ge=1)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_factor: float = Field(default=1.0, ge=0)
    backoff_max: float = Field(default=60.0, ge=0)
    budget_seconds: float = Field(default=900.0, gt=0)
    timeout: float = Field(default=120.0, gt=0)
    max_message_bytes: ByteSize = DEFAULT_MAX_MESSAGE_BYTES
    spool_bytes: ByteSize = 4 * 1024 * 1024  # larger messages wait for upload in a file


class Sdk(Strict):
    """How the vaultastic-sdk sink runs the vendor's VaultasticActiveStoreMailUpload.py."""

    script: Path | None = None  # required for sink vaultastic-sdk; relative to the config file
    python: Path | None = None  # default: the interpreter running imapsync
    mode: Literal["subprocess", "inprocess"] = "subprocess"
    timeout: float = Field(default=300.0, gt=0)  # seconds per run of the script (subprocess mode)
    max_attempts: int = Field(default=5, ge=1, le=50)  # runs per message while it exits 5
    unknown_error_attempts: int = Field(default=2, ge=1, le=50)  # runs per message while it exits 1
    pass_env: list[str] = []  # extra environment variables (fnmatch globs) the script may see


class Fetch(Strict):
    # bodies in memory ahead of their upload: up to `connections` batches (4 MiB: peak RSS -20 MB against 8)
    batch_bytes: ByteSize = 4 * 1024 * 1024
    batch_messages: int = Field(default=500, ge=1)
    parallel_accounts: int = Field(default=8, ge=1, le=256)  # accounts synced side by side in a pass
    # `imapsync sync` with many accounts spreads them over this many processes (0: one per CPU)
    processes: int = Field(default=0, ge=0, le=64)
    connections: int = Field(default=4, ge=1, le=32)  # per account: 1 for headers + bodies fetched ahead
    reconnects: int = Field(default=3, ge=0, le=100)  # within one pass, after a drop or timeout
    reconnect_backoff: float = Field(default=1.0, ge=0)  # seconds before the first; doubles


class Schedule(AccountSchedule):
    """How `imapsync run` schedules accounts: the defaults, the caps and the backoff."""

    jitter: Duration = 30.0  # each run starts up to this much later, so accounts spread out
    misfire_grace: Duration = 300.0  # a run later than this (e.g. after a suspend) is skipped
    timezone: str | None = None  # for cron expressions; default: the machine's zone
    max_connections: int = Field(default=20, ge=1, le=10_000)  # IMAP connections of passes at once, in all
    max_connections_per_host: int = Field(default=10, ge=1, le=10_000)  # ... and to one server
    backoff_initial: Duration = 60.0  # an account that failed waits this long, doubling
    backoff_max: Duration = 3600.0  # ... up to this
    throttle_backoff: Duration = 300.0  # when a server says it is throttling without a time
    idle_renew: PositiveDuration = 25 * 60.0  # re-IDLE this often (before the server's 29 min)
    stop_timeout: Duration = 60.0  # a warm stop waits this long for running accounts
    lease_seconds: PositiveDuration = 60.0  # an account's lease; renewed while it is synced

    @field_validator("idle_renew")
    @classmethod
    def _renew(cls, v: float) -> float:
        if v > MAX_IDLE_RENEW:
            raise ValueError("must be at most 29m: servers may end an IDLE after 30 minutes")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone: {v!r}") from None
        return v

    @model_validator(mode="after")
    def _backoff(self) -> "Schedule":
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self


class Backfill(Strict):
    """How `imapsync backfill` walks history and reports its progress."""

    window_days: int = Field(default=30, ge=1, le=3650)  # one UID SEARCH SINCE/BEFORE per window
    parallel_accounts: int = Field(default=4, ge=1, le=256)  # accounts backfilled at once
    progress_interval: float = Field(default=10.0, gt=0)  # seconds between progress log lines (not on a terminal)
    lease_wait: float = Field(default=300.0, ge=0)  # seconds to wait for an account another worker holds


class Config(Strict):
    """The whole configuration, with the file it came from."""

    ledger: str | None = None
    sink: Literal["vaultastic", "vaultastic-sdk", "directory"] = "vaultastic"
    directory: Path | None = None
    sdk: Sdk | None = None
    tenants: list[Tenant] = Field(min_length=1)
    accounts: list[Account] = []
    upload: Upload = Upload()
    fetch: Fetch = Fetch()
    schedule: Schedule = Schedule()  # `imapsync run`
    backfill: Backfill = Backfill()  # `imapsync backfill`

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems: list[str] = []
        names = [a.name for a in self.accounts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"accounts: duplicate account name(s): {', '.join(dupes)}")
        domains = [t.domain for t in self.tenants]
        if len(set(domains)) != len(domains):
            problems.append("tenants: a domain is listed twice")
        if self.sink == "directory" and self.directory is None:
            problems.append("directory: required when sink is directory")
        if self.sink == "vaultastic-sdk" and (self.sdk is None or self.sdk.script is None):
            problems.append("sdk.script: required when sink is vaultastic-sdk")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tenant_for(self, domain: str) -> Tenant | None:
        domain = domain.lower()
        return next((t for t in self.tenants if t.domain == domain), None)


class LoadedConfig:
    """A validated Config plus what was resolved from outside it (paths, secrets)."""

    def __init__(self, path: Path, config: Config, secrets: dict[str, SecretStr]):
        self.path = path
        self.config = config
        self._secrets = secrets

    def __repr__(self) -> str:  # never show secrets
        return f"LoadedConfig({self.path})"

    @property
    def ledger_url(self) -> str:
        url = self.config.ledger
        if url is None:
            return f"sqlite:///{self.path.parent.resolve() / DEFAULT_LEDGER_NAME}"
        if "://" not in url:  # a plain path: a SQLite file, relative to the config
            p = Path(url)
            return f"sqlite:///{(p if p.is_absolute() else self.path.parent / p).resolve()}"
        return url

    @property
    def directory(self) -> Path | None:
        d = self.config.directory
        if d is None:
            return None
        return d if d.is_absolute() else (self.path.parent / d).resolve()

    def password(self, account: Account) -> SecretStr:
        return self._secrets[f"accounts.{account.name}.password"]

    def api_key(self, tenant: Tenant) -> SecretStr | None:
        return self._secrets.get(f"tenants.{tenant.domain}.api_key")

    def resolve_path(self, p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_config_path() -> Path:
    return Path(os.environ.get("IMAPSYNC_CONFIG") or DEFAULT_CONFIG_NAME)


def _is_tag(part: Any) -> bool:
    """pydantic puts union-member and validator names in error locations; hide them."""
    return isinstance(part, str) and (
        part in ("SecretSource", "InlineSecret") or part.startswith("function-"))


def _loc(loc: tuple[Any, ...]) -> str:
    """('accounts', 0, 'host') -> 'accounts[0].host'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part):
            out += f".{part}" if out else str(part)
    return out


def _problem(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    return err["msg"].removeprefix("Value error, ")


def _problems_from(exc: ValidationError, data: Any) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    out: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        tags = [p for p in loc if _is_tag(p)]
        if tags:
            # A secret is one of two shapes: report only against the shape written.
            prefix = loc[: loc.index(tags[0])]
            written_str = isinstance(_dig(data, prefix), str)
            if any("InlineSecret" in str(t) for t in tags) != written_str:
                continue
        path, problem = _loc(loc), _problem(err)
        if (path, problem) not in seen:
            seen.add((path, problem))
            out.append(ConfigProblem(path, problem))
    return out


def _raw_checks(data: dict[str, Any]) -> list[ConfigProblem]:
    """Checks that must be reported even when the same entry has other problems."""
    out = []
    accounts = data.get("accounts")
    for i, a in enumerate(accounts if isinstance(accounts, list) else []):
        if (isinstance(a, dict) and a.get("tls") == "plain" and not a.get("allow_insecure")
                and isinstance(a.get("host"), str) and not is_loopback(a["host"])):
            out.append(ConfigProblem(
                f"accounts[{i}].tls",
                f"plain sends the password in clear to {a['host']}; use implicit or "
                "starttls, or set allow_insecure: true"))
    return out


def _dig(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _resolve_secret(spec: SecretSource | InlineSecret, base: Path) -> str:
    if isinstance(spec, InlineSecret):
        return spec.inline
    if spec.env is not None:
        value = os.environ.get(spec.env)
        if not value:
            raise ValueError(f"environment variable {spec.env} is not set")
        return value
    if spec.file is not None:
        path = spec.file if spec.file.is_absolute() else base / spec.file
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"cannot read secret file {path}: {e.strerror}") from None
    assert spec.command is not None
    try:
        done = subprocess.run(shlex.split(spec.command), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"secret command failed: {type(e).__name__}") from None
    if done.returncode != 0:
        # stderr may echo the secret: do not show it
        raise ValueError(f"secret command exited {done.returncode}")
    value = done.stdout.rstrip("\r\n")
    if not value:
        raise ValueError("secret command printed nothing")
    return value


def _sdk_problems(config: Config, base: Path) -> list[ConfigProblem]:
    """The vendor script (and interpreter, when given) must exist when the SDK sink is used."""
    sdk = config.sdk
    if config.sink != "vaultastic-sdk" or sdk is None or sdk.script is None:
        return []
    out = []
    script = sdk.script if sdk.script.is_absolute() else base / sdk.script
    if not script.is_file():
        out.append(ConfigProblem("sdk.script", f"no such file: {script}"))
    if sdk.python is not None:
        python = sdk.python if sdk.python.is_absolute() else base / sdk.python
        if not (python.is_file() or (len(sdk.python.parts) == 1 and shutil.which(str(sdk.python)))):
            out.append(ConfigProblem("sdk.python", f"no such file: {python}"))
    return out


def parse(data: Any, file: str = "<config>", base: Path | None = None, *,
          resolve_secrets: bool = True) -> LoadedConfig:
    """Validate a config mapping and resolve its secrets; raise ConfigError with all problems.

    With resolve_secrets=False no secret is read (for commands that need only the ledger,
    such as `imapsync upload`); LoadedConfig.password() and api_key() then have nothing.
    """
    base = base or Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError(file, [ConfigProblem("", "the file must hold a mapping of keys")])
    problems: list[ConfigProblem] = _raw_checks(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(file, _problems_from(e, data) + problems) from None
    if problems:
        raise ConfigError(file, problems)
    secrets: dict[str, SecretStr] = {}
    for i, account in enumerate(config.accounts):
        try:
            if resolve_secrets:
                secrets[f"accounts.{account.name}.password"] = SecretStr(
                    _resolve_secret(account.password, base))
        except ValueError as e:
            problems.append(ConfigProblem(f"accounts[{i}].password", str(e)))
        if account.ca_file is not None:
            ca = account.ca_file if account.ca_file.is_absolute() else base / account.ca_file
            if not ca.is_file():
                problems.append(ConfigProblem(f"accounts[{i}].ca_file", f"no such file: {ca}"))
    for i, tenant in enumerate(config.tenants):
        if config.sink in API_SINKS:
            if tenant.endpoint is None:
                problems.append(ConfigProblem(f"tenants[{i}].endpoint", f"required for sink {config.sink}"))
            if tenant.api_key is None:
                problems.append(ConfigProblem(f"tenants[{i}].api_key", f"required for sink {config.sink}"))
        if tenant.api_key is not None and resolve_secrets:
            try:
                secrets[f"tenants.{tenant.domain}.api_key"] = SecretStr(
                    _resolve_secret(tenant.api_key, base))
            except ValueError as e:
                problems.append(ConfigProblem(f"tenants[{i}].api_key", str(e)))
    problems += _sdk_problems(config, base)
    if problems:
        raise ConfigError(file, problems)
    return LoadedConfig(Path(file), config, secrets)


def load(path: Path, *, resolve_secrets: bool = True) -> LoadedConfig:
    """Read and validate a YAML config file (see parse() for resolve_secrets)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [ConfigProblem("", "no such file (give --config PATH or set IMAPSYNC_CONFIG)")]) from None
    except OSError as e:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read: {e.strerror}")]) from None
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when built in
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), [ConfigProblem(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    loaded = parse(data if data is not None else {}, str(path), path.parent.resolve(),
                   resolve_secrets=resolve_secrets)
    loaded.path = path
    _warn_if_exposed(path, loaded.config)
    return loaded


def inline_secrets(config: Config) -> list[str]:
    """Key paths of the secrets written in the file itself (not {env}, {file} or {command})."""
    out = [f"accounts[{i}].password" for i, a in enumerate(config.accounts) if isinstance(a.password, InlineSecret)]
    out += [f"tenants[{i}].api_key" for i, t in enumerate(config.tenants) if isinstance(t.api_key, InlineSecret)]
    if config.ledger and "://" in config.ledger:
        try:
            if urlsplit(config.ledger).password:
                out.append("ledger (a password in the URL)")
        except ValueError:
            pass
    return out


def _warn_if_exposed(path: Path, config: Config) -> None:
    """One warning when every user of the machine may read a secret written in the file."""
    try:
        readable = bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return
    inline = inline_secrets(config)
    if readable and inline:
        log.warning("%s: readable by every user of this machine and holds %s inline (%s); "
                    "chmod 600 %s, or give secrets as {env: NAME} or {file: PATH}",
                    path, "a secret" if len(inline) == 1 else "secrets",
                    ", ".join(inline[:3]) + (f" and {len(inline) - 3} more" if len(inline) > 3 else ""), path)
