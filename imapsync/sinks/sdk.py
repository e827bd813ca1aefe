"""The vaultastic-sdk sink: uploads by running the vendor's own VaultasticActiveStoreMailUpload.py.

Why: the vendor documents its SDK script (flags, environment, exit codes), not the HTTP
wire format, which imapsync only models (vaultastic-api.md). Running the vendor's script
is the always-compatible path for an endpoint that does not speak the model.

Two modes:

- subprocess (default): the raw message goes to a private temp .eml file (0600, removed
  afterwards; a payload already spooled to a file is passed as it is) and the script runs as
  ``PYTHON SCRIPT -i FILE -r V1,V2 [-s SENDER]`` with PRIMARY_DOMAIN, API_ENDPOINT_URL and
  API_KEY in its environment. The script's environment is otherwise an allow-list
  (PATH, HOME, locale, proxies, CA bundles, plus ``sdk.pass_env``) so that it never sees
  the IMAP passwords or other tenants' keys that imapsync itself holds in its environment.
- inprocess: the script is imported from its path and
  ``uploadMailToVaultasticActiveStore(message)`` is called with the message text. That
  function takes the vaults from the headers only, so a message whose requested vaults
  (or sender) are not all in its From/To/Cc/Bcc, or which is not valid UTF-8 text, is
  sent through subprocess mode instead. The vendor module reads its configuration from
  os.environ, which is process-wide: calls are serialised by one lock per process, with
  the tenant's variables set around each call and restored afterwards. The timeout
  applies to subprocess runs only.

Exit codes (or SystemExit codes, in-process) map to outcomes; see EXIT_CODES below.
Codes 5 (S3 upload failed) and 1 (unknown exception) are transient and retried with
exponential backoff and full jitter (tenacity): 5 up to ``max_attempts`` runs, 1 up to
``unknown_error_attempts`` runs, all within ``upload.budget_seconds``; the backoff is the
``upload:`` section's (backoff_factor, backoff_max). ``attempts`` in the result is how many
times the script ran. No result detail ever holds the API key: it is replaced by ***.
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_random_exponential

from imapsync.config import LoadedConfig
from imapsync.message import addresses_in, header_block, parse_headers
from imapsync.sinks.base import Outcome, Sink, UploadRequest, UploadResult, spool_prefix

VENDOR_FUNCTION = "uploadMailToVaultasticActiveStore"
#: Exit code -> (outcome, reason) for the codes that end an upload at once.
EXIT_CODES: dict[int, tuple[Outcome, str | None]] = {
    0: (Outcome.UPLOADED, None),
    3: (Outcome.PERMANENT, "bad_request"),
    4: (Outcome.PERMANENT, "invalid_recipient"),
    6: (Outcome.PERMANENT, "no_primary_recipient"),
}
EXIT_S3_FAILED = 5  # transient: retried up to max_attempts, then FAILED s3_upload_failed
EXIT_UNKNOWN = 1  # transient: retried up to unknown_error_attempts, then FAILED sdk_error
TIMED_OUT = -1000  # our marker for a run killed by the timeout (never a real exit code)
#: Environment variables the script inherits from imapsync's own environment.
SAFE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
            "TEMP", "TMP", "SYSTEMROOT", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
            "https_proxy", "no_proxy", "PYTHONIOENCODING", "PYTHONUTF8")
DETAIL_MAX = 300

#: os.environ is process-wide: one in-process vendor call at a time.
_INPROCESS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Run:
    """One run of the vendor script: its exit code (or TIMED_OUT) and last line of output."""

    code: int
    detail: str | None


def sdk_endpoint(endpoint: str) -> str:
    """API_ENDPOINT_URL for the script: a bare host for https://HOST (as the vendor documents
    it, e.g. ActiveStoreMailUploadAPI.vaultastic.com), the full URL otherwise."""
    endpoint = endpoint.strip().rstrip("/")
    rest = endpoint[len("https://"):] if endpoint.lower().startswith("https://") else None
    return rest if rest and "/" not in rest else endpoint


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def last_line(*outputs: str | bytes | None) -> str | None:
    """The last non-empty line of the first output that has one (stderr before stdout)."""
    for out in outputs:
        if isinstance(out, bytes):
            out = out.decode("utf-8", "replace")
        lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def script_env(domain: str, endpoint: str, api_key: str, pass_env: Iterable[str] = (),
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The script's environment: the allow-listed variables plus the vendor's three."""
    environ = os.environ if environ is None else environ
    patterns = (*SAFE_ENV, *pass_env)
    env = {k: v for k, v in environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    env.update(PRIMARY_DOMAIN=domain, API_ENDPOINT_URL=sdk_endpoint(endpoint), API_KEY=api_key)
    return env


def header_addresses(raw: bytes) -> frozenset[str]:
    """Addresses in From/To/Cc/Bcc: where the vendor function finds vaults in-process."""
    fields = parse_headers(header_block(raw))
    return frozenset(addresses_in(v for name in ("from", "to", "cc", "bcc") for v in fields.get(name, [])))


def _exit_code(value: Any) -> int:
    """A SystemExit code as the interpreter would turn it into an exit status."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 1  # sys.exit("message") exits 1


def _return_code(value: Any) -> int:
    """The vendor function's return value as an exit code: an int is one, False is an
    unknown failure, anything else (None, True, a response) means it returned normally."""
    if value is False:
        return EXIT_UNKNOWN
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return 0


class SdkSink:
    """Uploads to one tenant by running the vendor's script (see the module docstring)."""

    def __init__(self, domain: str, endpoint: str, api_key: str, script: Path, *,
                 python: str | Path | None = None,
                 mode: Literal["subprocess", "inprocess"] = "subprocess",
                 timeout: float = 300.0, max_attempts: int = 5, unknown_error_attempts: int = 2,
                 backoff_factor: float = 1.0, backoff_max: float = 60.0, budget_seconds: float = 900.0,
                 pass_env: Iterable[str] = (), sleep: Callable[[float], None] | None = None):
        self.domain = domain
        self.endpoint = endpoint
        self._api_key = api_key
        self.script = Path(script)
        self.python = str(python or sys.executable)
        self.mode = mode
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.unknown_error_attempts = unknown_error_attempts
        self.backoff_factor = backoff_factor
        self.backoff_max = backoff_max
        self.budget_seconds = budget_seconds
        self.pass_env = tuple(pass_env)
        self._sleep = sleep
        self._module: ModuleType | None = None

    def __repr__(self) -> str:
        return f"SdkSink({self.domain}, {self.script}, {self.mode})"

    def close(self) -> None:
        self._module = None

    # ----- the Sink protocol -------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResult:
        if self.mode == "inprocess" and self._fits_inprocess(request):
            return self._with_retries(lambda: self._run_inprocess(request.raw))
        with self._eml_file(request) as path:
            argv = self._argv(path, request)
            return self._with_retries(lambda: self._run_subprocess(argv))

    # ----- retries and results -------------------------------------------------------------

    def _with_retries(self, attempt: Callable[[], Run]) -> UploadResult:
        runs: list[Run] = []

        def once() -> Run:
            runs.append(attempt())
            return runs[-1]

        def out_of_budget(state: RetryCallState) -> bool:
            unknown = sum(r.code == EXIT_UNKNOWN for r in runs)
            return len(runs) >= self.max_attempts or (
                runs[-1].code == EXIT_UNKNOWN and unknown >= self.unknown_error_attempts)

        kwargs: dict[str, Any] = {"sleep": self._sleep} if self._sleep else {}
        retrying = Retrying(
            retry=retry_if_result(lambda r: r.code in (EXIT_S3_FAILED, EXIT_UNKNOWN)),
            stop=stop_after_delay(self.budget_seconds) | out_of_budget,
            wait=wait_random_exponential(multiplier=self.backoff_factor, max=self.backoff_max),
            retry_error_callback=lambda state: state.outcome.result(),  # the last run, not an error
            **kwargs)
        last = retrying(once)
        return self._result(last, len(runs))

    def _result(self, run: Run, attempts: int) -> UploadResult:
        detail = self._clean(run.detail)
        if run.code in EXIT_CODES:
            outcome, reason = EXIT_CODES[run.code]
            return UploadResult(outcome, attempts, reason=reason, detail=detail)
        if run.code == EXIT_S3_FAILED:
            return UploadResult(Outcome.FAILED, attempts, reason="s3_upload_failed",
                                detail=detail or f"the SDK exited 5 (S3 upload failed) {attempts} times")
        if run.code == TIMED_OUT:
            return UploadResult(Outcome.FAILED, attempts, reason="sdk_error",
                                detail=f"the SDK script timed out after {self.timeout:g} s")
        return UploadResult(Outcome.FAILED, attempts, reason="sdk_error",
                            detail=detail or f"the SDK exited {run.code}")

    def _clean(self, detail: str | None) -> str | None:
        """One line for a person: never the API key, at most DETAIL_MAX characters."""
        if not detail:
            return None
        return redact(detail.replace("\n", " "), self._api_key)[:DETAIL_MAX]

    # ----- subprocess mode ----------------------------------------------------------------

    @contextlib.contextmanager
    def _eml_file(self, request: UploadRequest) -> Iterator[Path]:
        """The message as a private file for -i: its spool file (owned and removed by the
        payload), or a temp file of ours (0600, removed here)."""
        if request.payload.path is not None:
            yield request.payload.path
            return
        fd, name = tempfile.mkstemp(prefix=spool_prefix("sdk-"), suffix=".eml")  # 0600 by construction
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(request.raw)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def _argv(self, path: Path, request: UploadRequest) -> list[str]:
        argv = [self.python, str(self.script), "-i", str(path), "-r", ",".join(request.vaults)]
        return argv + (["-s", request.sender] if request.sender else [])

    def _run_subprocess(self, argv: list[str]) -> Run:
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False,
                                  timeout=self.timeout,
                                  env=script_env(self.domain, self.endpoint, self._api_key, self.pass_env))
        except subprocess.TimeoutExpired:
            return Run(TIMED_OUT, None)
        except OSError as e:
            return Run(2, f"cannot run {self.python}: {e.strerror}")
        return Run(done.returncode, last_line(done.stderr, done.stdout))

    # ----- in-process mode ----------------------------------------------------------------

    def _fits_inprocess(self, request: UploadRequest) -> bool:
        """The vendor function finds vaults (and the sender) in From/To/Cc/Bcc only, and
        takes text: anything else goes through the script's -r/-s flags and a file."""
        try:
            request.raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        found = header_addresses(request.raw)
        wanted = set(request.vaults) | ({request.sender} if request.sender else set())
        return {a.lower() for a in wanted} <= found

    @contextlib.contextmanager
    def _vendor_env(self):
        """The tenant's PRIMARY_DOMAIN/API_ENDPOINT_URL/API_KEY in os.environ, then restored."""
        values = {"PRIMARY_DOMAIN": self.domain, "API_ENDPOINT_URL": sdk_endpoint(self.endpoint),
                  "API_KEY": self._api_key}
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _load_module(self) -> ModuleType:
        """One module instance per sink, imported with this tenant's environment set (a
        vendor module that reads its configuration at import time gets the right one)."""
        if self._module is None:
            spec = importlib.util.spec_from_file_location(f"_vaultastic_sdk_{id(self)}", self.script)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {self.script}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not callable(getattr(module, VENDOR_FUNCTION, None)):
                raise ImportError(f"{self.script.name} has no function {VENDOR_FUNCTION}")
            self._module = module
        return self._module

    def _run_inprocess(self, raw: bytes) -> Run:
        out, err = io.StringIO(), io.StringIO()
        with _INPROCESS_LOCK, self._vendor_env(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = _return_code(getattr(self._load_module(), VENDOR_FUNCTION)(raw.decode("utf-8")))
                why = None
            except SystemExit as e:
                code, why = _exit_code(e.code), (e.code if isinstance(e.code, str) else None)
            except Exception as e:  # noqa: BLE001 - the vendor's unknown exception: transient
                code, why = EXIT_UNKNOWN, f"{type(e).__name__}: {e}"
        return Run(code, why or last_line(err.getvalue(), out.getvalue()))


def make_sdk_sinks(loaded: LoadedConfig) -> dict[str, Sink]:
    """One SdkSink per tenant, from a LoadedConfig whose sink is vaultastic-sdk."""
    cfg = loaded.config
    sdk, up = cfg.sdk, cfg.upload
    if sdk is None or sdk.script is None:
        raise ValueError("sink vaultastic-sdk needs sdk.script")  # config validation prevents this
    python = _python_path(loaded, sdk.python)
    sinks: dict[str, Sink] = {}
    for t in cfg.tenants:
        key = loaded.api_key(t)
        sinks[t.domain] = SdkSink(
            t.domain, t.endpoint or "", key.get_secret_value() if key else "",
            loaded.resolve_path(sdk.script) or sdk.script, python=python, mode=sdk.mode, timeout=sdk.timeout,
            max_attempts=sdk.max_attempts, unknown_error_attempts=sdk.unknown_error_attempts,
            backoff_factor=up.backoff_factor, backoff_max=up.backoff_max, budget_seconds=up.budget_seconds,
            pass_env=sdk.pass_env)
    return sinks


def _python_path(loaded: LoadedConfig, python: Path | None) -> str:
    """sdk.python: a bare name is looked up on PATH; a relative path is relative to the config."""
    if python is None:
        return sys.executable
    if len(python.parts) == 1 and not (loaded.path.parent / python).exists():
        return str(python)
    return str(loaded.resolve_path(python))
