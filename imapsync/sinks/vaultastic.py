"""The Vaultastic Mail Upload API over HTTP: the one module that knows its wire format.

The vendor documents the SDK, not the HTTP API; this module implements the model in
vaultastic-api.md (ask for an upload slot, then PUT the raw message), so a different
real format is changed here and nowhere else. Requests go through http_transport (keep-alive
connections on libcurl; it says why not http.client, requests or urllib3's pool).
Every HTTP attempt takes a token from the tenant's bucket; transient answers (connection
errors, timeouts, 408, 429, 5xx) are retried by tenacity with exponential backoff and
full jitter, never sooner than Retry-After, and within a budget per message of attempts
and seconds. A 429 pauses the whole tenant.
The request id is derived from the message key and vaults, so a retry, even after a
crash, is answered "already complete" instead of storing the message twice.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
)
from tenacity.wait import wait_random_exponential

from imapsync.ratelimit import TokenBucket
from imapsync.sinks.base import Outcome, UploadRequest, UploadResult
from imapsync.sinks.http_transport import (
    Answer,
    CannotConnect,
    ConnectionLost,
    Transport,
    TransportError,
)

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: How often an expired upload slot (403 on the PUT) is asked for again.
SLOT_ROUNDS = 3
#: The API's documented throttle: 10,000 requests/s, bursts of 5,000.
DEFAULT_RATE, DEFAULT_BURST = 10_000.0, 5_000


@dataclass(frozen=True)
class RetryPolicy:
    """Design rule 6: how long one message may keep trying."""

    max_attempts: int = 5
    backoff_factor: float = 1.0  # seconds; full jitter over factor * 2**attempt
    backoff_max: float = 60.0
    budget_seconds: float = 900.0  # per step, whatever the attempts


Reply = Answer | TransportError


class VaultasticSink:
    """Uploads to one tenant (primary domain) of the Vaultastic API. Thread-safe."""

    def __init__(self, domain: str, endpoint: str, api_key: str, *, retry: RetryPolicy = RetryPolicy(),
                 timeout: float = 120.0, rate: float = DEFAULT_RATE,
                 burst: int = DEFAULT_BURST):
        self.domain = domain
        self.endpoint = endpoint.rstrip("/")
        self._api_key = api_key
        self.retry = retry
        self.bucket = TokenBucket(rate, burst)
        self._http = Transport(min(10.0, timeout), timeout)

    def __repr__(self) -> str:
        return f"VaultasticSink({self.domain}, {self.endpoint})"

    def _request(self, method: str, url: str, *, body=None, headers: dict[str, str] | None = None,
                 json_body: dict | None = None) -> Answer:
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        return self._http.request(method, url, body=body, headers=headers)

    def close(self) -> None:
        self._http.close()

    def health(self) -> bool:
        try:
            return self._request("GET", f"{self.endpoint}/v1/health").status < 400
        except TransportError:
            return False

    def check_key(self) -> tuple[bool | None, str]:
        """Is the API key accepted? Asks for a slot with an empty (invalid) request, which
        can never upload anything: the key is checked before the body, so 400 means the
        key was accepted and 401/403 that it was refused. (True/False/None = unknown, why)."""
        try:
            r = self._request("POST", f"{self.endpoint}/v1/uploads", json_body={},
                              headers={"x-api-key": self._api_key})
        except TransportError as e:
            return None, f"cannot reach {self.endpoint}: {e}"
        if r.status in (401, 403):
            return False, f"the API refused the key (HTTP {r.status})"
        if r.status == 400:
            return True, "key accepted (an empty upload request was refused as malformed, as it should be)"
        return None, f"unexpected answer HTTP {r.status} to an empty upload request"

    # ----- one HTTP attempt, and attempts with retries ----------------------------

    def _attempt(self, method: str, url: str, request: UploadRequest | None = None, **kwargs) -> Reply:
        self.bucket.acquire()
        try:
            if request is not None and request.payload.path is None:  # in memory: one send, no copy
                r = self._request(method, url, body=request.payload.read(), **kwargs)
            elif request is not None:  # spooled: a fresh reader for every attempt, streamed
                with request.payload.open() as body:
                    r = self._request(method, url, body=body, **kwargs)
            else:
                r = self._request(method, url, **kwargs)
        except TransportError as e:
            return e
        if r.status == 429:
            self.bucket.pause(r.retry_after or self.retry.backoff_factor)
        return r

    def _wait(self, state: RetryCallState) -> float:
        jitter = wait_random_exponential(multiplier=self.retry.backoff_factor, max=self.retry.backoff_max)(state)
        answer = state.outcome.result() if state.outcome else None
        after = answer.retry_after if isinstance(answer, Answer) else None
        return max(jitter, after or 0.0)

    def _with_retries(self, method: str, url: str, **kwargs) -> tuple[Reply, int]:
        """The first attempt goes straight out (most answers need no retry, and tenacity's
        bookkeeping cost 0.1 ms of CPU per upload); after a transient answer, tenacity
        takes over with that answer as its attempt 1, in the budget that is left."""
        started = time.monotonic()
        answer = self._attempt(method, url, **kwargs)
        if not _transient(answer):
            return answer, 1
        first = [answer]
        retrying = Retrying(
            stop=stop_after_attempt(self.retry.max_attempts)
            | stop_after_delay(max(0.0, self.retry.budget_seconds - (time.monotonic() - started))),
            wait=self._wait, retry=retry_if_result(_transient),
            retry_error_callback=lambda state: state.outcome.result(), sleep=time.sleep)
        answer = retrying(lambda: first.pop() if first else self._attempt(method, url, **kwargs))
        return answer, retrying.statistics.get("attempt_number", 1)

    # ----- the two steps -------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResult:
        body = {
            "requestId": request.request_id,
            "primaryDomain": request.tenant,
            "recipients": list(request.vaults),
            "size": request.payload.size,
            "sha256": request.payload.sha256,
        }
        if request.sender:
            body["sender"] = request.sender
        attempts = 0
        for _round in range(SLOT_ROUNDS):
            answer, tries = self._with_retries("POST", f"{self.endpoint}/v1/uploads", json_body=body,
                                               headers={"x-api-key": self._api_key})
            attempts += tries
            if isinstance(answer, TransportError):
                if isinstance(answer, CannotConnect):
                    return UploadResult(Outcome.UNREACHABLE, attempts, reason="unreachable",
                                        detail=f"cannot reach {self.endpoint}: {answer}")
                if isinstance(answer, ConnectionLost):
                    return UploadResult(Outcome.FAILED, attempts, reason="connection_lost",
                                        detail=f"{self.endpoint} closed the connection without an answer "
                                               f"({tries} attempts)")
                return UploadResult(Outcome.FAILED, attempts, reason="timeout",
                                    detail=f"no answer from {self.endpoint} after {tries} attempts")
            status, data = answer.status, _json(answer)
            if status == 200 and data.get("status") == "complete":
                return UploadResult(Outcome.UPLOADED, attempts, upload_id=data.get("uploadId"))
            if status == 201 and data.get("uploadUrl"):
                result, put_tries = self._put(data["uploadUrl"], request)
                attempts += put_tries - 1  # the PUT belongs to its slot's attempt; count its retries
                if result is None:  # the slot expired: ask again with the same requestId
                    continue
                return UploadResult(result.outcome, attempts, upload_id=data.get("uploadId"),
                                    reason=result.reason, detail=result.detail)
            return _classify_slot_answer(status, data, attempts)
        return UploadResult(Outcome.FAILED, attempts, reason="slot_expired",
                            detail=f"upload slot expired {SLOT_ROUNDS} times")

    def _put(self, url: str, request: UploadRequest) -> tuple[UploadResult | None, int]:
        answer, tries = self._with_retries(
            "PUT", url, request=request,
            headers={"Content-Type": "message/rfc822", "Content-Length": str(request.payload.size)})
        if isinstance(answer, TransportError):
            return UploadResult(Outcome.FAILED, reason="s3_upload_failed",
                                detail=f"message upload failed after {tries} attempts: {answer}"), tries
        if 200 <= answer.status < 300:
            return UploadResult(Outcome.UPLOADED), tries
        if answer.status == 403:
            return None, tries
        data = _json(answer)
        if answer.status == 400 and data.get("error") == "digest_mismatch":
            return UploadResult(Outcome.PERMANENT, reason="digest_mismatch",
                                detail="the service received different bytes than announced"), tries
        if answer.status in TRANSIENT_STATUSES:
            return UploadResult(Outcome.FAILED, reason="s3_upload_failed",
                                detail=f"message upload answered HTTP {answer.status} after {tries} attempts"), tries
        return UploadResult(Outcome.PERMANENT, reason=f"http_{answer.status}",
                            detail=_detail(data, answer.status)), tries


def _transient(answer: Reply) -> bool:
    if isinstance(answer, TransportError):
        return True
    return answer.status in TRANSIENT_STATUSES


def _classify_slot_answer(status: int, answer: dict, attempts: int) -> UploadResult:
    """The action for each row of the answer table in vaultastic-api.md."""
    error = answer.get("error")
    if status == 400 and error == "invalid_recipient":
        return UploadResult(Outcome.PERMANENT, attempts, reason="invalid_recipient", detail=_detail(answer, status))
    if status == 400:
        return UploadResult(Outcome.PERMANENT, attempts, reason="bad_request", detail=_detail(answer, status))
    if status in (401, 403):
        return UploadResult(Outcome.FORBIDDEN, attempts, reason="forbidden",
                            detail=f"the API refused the key (HTTP {status})")
    if status == 413:
        return UploadResult(Outcome.PERMANENT, attempts, reason="too_large", detail="over the API's size limit")
    if status == 422:
        return UploadResult(Outcome.PERMANENT, attempts, reason="no_primary_recipient",
                            detail="the API found no recipient on the primary domain")
    if status == 429:
        return UploadResult(Outcome.FAILED, attempts, reason="throttled",
                            detail=f"still throttled (HTTP 429) after {attempts} attempts")
    if status in TRANSIENT_STATUSES:
        return UploadResult(Outcome.FAILED, attempts, reason="server_error",
                            detail=f"HTTP {status} after {attempts} attempts")
    return UploadResult(Outcome.PERMANENT, attempts, reason=f"http_{status}", detail=_detail(answer, status))


def _json(r: Answer) -> dict:
    try:
        value = json.loads(r.data or b"null")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _detail(answer: dict, status: int) -> str:
    text = answer.get("detail") or answer.get("error") or f"HTTP {status}"
    return str(text).replace("\n", " ")[:300]
