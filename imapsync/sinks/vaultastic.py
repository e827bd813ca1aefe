"""The Vaultastic Mail Upload API over HTTP: the one module that knows its wire format.

The vendor documents the SDK, not the HTTP API; this module implements the model in
vaultastic-api.md (ask for an upload slot, then PUT the raw message), so a different
real format is changed here and nowhere else. One pooled requests Session per tenant;
retries of transient answers (connection errors, timeouts, 408, 429, 5xx) are done
by urllib3's Retry with exponential backoff, jitter and Retry-After. The request id
is derived from the message key and vaults, so a retry, even after a crash, is
answered "already complete" instead of storing the message twice.
"""
from __future__ import annotations

import hashlib
import json

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from imapsync.sinks.base import Outcome, UploadRequest, UploadResult

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: How often an expired upload slot (403 on the PUT) is asked for again.
SLOT_ROUNDS = 3


class VaultasticSink:
    """Uploads to one tenant (primary domain) of the Vaultastic API."""

    def __init__(self, domain: str, endpoint: str, api_key: str, *, max_attempts: int = 5,
                 backoff_factor: float = 1.0, backoff_max: float = 60.0, timeout: float = 120.0,
                 pool_size: int = 16):
        self.domain = domain
        self.endpoint = endpoint.rstrip("/")
        self._api_key = api_key
        self.timeout = (min(10.0, timeout), timeout)
        self.max_attempts = max_attempts
        retry = Retry(
            total=max_attempts - 1, connect=max_attempts - 1, read=max_attempts - 1,
            status=max_attempts - 1, other=0, redirect=0,
            status_forcelist=TRANSIENT_STATUSES, allowed_methods={"GET", "POST", "PUT"},
            backoff_factor=backoff_factor, backoff_max=backoff_max, backoff_jitter=backoff_factor,
            respect_retry_after_header=True, raise_on_status=False,
        )
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=2, pool_maxsize=pool_size, pool_block=True)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "imapsync"

    def __repr__(self) -> str:
        return f"VaultasticSink({self.domain}, {self.endpoint})"

    def close(self) -> None:
        self.session.close()

    def health(self) -> bool:
        try:
            return self.session.get(f"{self.endpoint}/v1/health", timeout=self.timeout).ok
        except requests.RequestException:
            return False

    def upload(self, request: UploadRequest) -> UploadResult:
        body = {
            "requestId": request.request_id,
            "primaryDomain": request.tenant,
            "recipients": list(request.vaults),
            "size": len(request.raw),
            "sha256": hashlib.sha256(request.raw).hexdigest(),
        }
        if request.sender:
            body["sender"] = request.sender
        attempts = 0
        for _round in range(SLOT_ROUNDS):
            try:
                r = self.session.post(f"{self.endpoint}/v1/uploads", json=body, timeout=self.timeout,
                                      headers={"x-api-key": self._api_key})
            except requests.RequestException as e:
                return UploadResult(Outcome.UNREACHABLE, attempts + self.max_attempts, reason="unreachable",
                                    detail=f"cannot reach {self.endpoint}: {_why(e)}")
            attempts += _tries(r)
            status, answer = r.status_code, _json(r)
            if status == 200 and answer.get("status") == "complete":
                return UploadResult(Outcome.UPLOADED, attempts, upload_id=answer.get("uploadId"))
            if status == 201 and answer.get("uploadUrl"):
                put = self._put(answer["uploadUrl"], request.raw)
                attempts += put[1] - 1  # the PUT belongs to its slot's attempt; count its retries
                if put[0] is None:  # slot expired: ask again with the same requestId
                    continue
                result = put[0]
                return UploadResult(result.outcome, attempts, upload_id=result.upload_id or answer.get("uploadId"),
                                    reason=result.reason, detail=result.detail)
            return _classify_slot_answer(status, answer, attempts, r)
        return UploadResult(Outcome.FAILED, attempts, reason="slot_expired",
                            detail=f"upload slot expired {SLOT_ROUNDS} times")

    def _put(self, url: str, raw: bytes) -> tuple[UploadResult | None, int]:
        try:
            r = self.session.put(url, data=raw, timeout=self.timeout,
                                 headers={"Content-Type": "message/rfc822"})
        except requests.RequestException as e:
            return UploadResult(Outcome.FAILED, reason="s3_upload_failed",
                                detail=f"message upload failed: {_why(e)}"), self.max_attempts
        tries = _tries(r)
        if 200 <= r.status_code < 300:
            return UploadResult(Outcome.UPLOADED, upload_id=None), tries
        if r.status_code == 403:
            return None, tries
        answer = _json(r)
        if r.status_code == 400 and answer.get("error") == "digest_mismatch":
            return UploadResult(Outcome.PERMANENT, reason="digest_mismatch",
                                detail="the service received different bytes than announced"), tries
        if r.status_code in TRANSIENT_STATUSES:
            return UploadResult(Outcome.FAILED, reason="s3_upload_failed",
                                detail=f"message upload answered HTTP {r.status_code} after {tries} attempts"), tries
        return UploadResult(Outcome.PERMANENT, reason=f"http_{r.status_code}",
                            detail=_detail(answer, r.status_code)), tries


def _classify_slot_answer(status: int, answer: dict, attempts: int, r: requests.Response) -> UploadResult:
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


def _tries(r: requests.Response) -> int:
    """HTTP attempts behind one answered call, from urllib3's retry history."""
    retries = getattr(r.raw, "retries", None)
    return 1 + len(retries.history) if retries is not None else 1


def _json(r: requests.Response) -> dict:
    try:
        value = r.json()
    except (ValueError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _detail(answer: dict, status: int) -> str:
    text = answer.get("detail") or answer.get("error") or f"HTTP {status}"
    return str(text).replace("\n", " ")[:300]


def _why(e: requests.RequestException) -> str:
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError):
        return "connection failed"
    return type(e).__name__
