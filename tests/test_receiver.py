"""The local Vaultastic stand-in, exercised over real HTTP on loopback with `requests`."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from imapsync.receiver import API_KEY_ENV, Receiver, main

KEY = "s3cret-key-for-tests"
MAIL = (b"From: carol@acme.com\r\nTo: alice@acme.com\r\nSubject: hello\r\n"
        b"Message-ID: <1@acme.com>\r\n\r\nBody line\r\n")


def request_body(raw: bytes = MAIL, **over: Any) -> dict[str, Any]:
    body = {"requestId": str(uuid.uuid4()), "primaryDomain": "acme.com",
            "recipients": ["alice@acme.com", "bob@other.org"], "sender": "carol@acme.com",
            "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    body.update(over)
    return body


@pytest.fixture
def rx(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(tmp_path / "store", api_key=KEY, retry_after=7).start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["x-api-key"] = KEY
        yield session


def post(s: requests.Session, rx: Receiver, body: Any) -> requests.Response:
    return s.post(f"{rx.url}/v1/uploads", json=body, timeout=10)


def put(s: requests.Session, url: str, raw: bytes = MAIL) -> requests.Response:
    return s.put(url, data=raw, headers={"Content-Type": "message/rfc822"}, timeout=10)


def upload(s: requests.Session, rx: Receiver, raw: bytes = MAIL, **over: Any) -> requests.Response:
    slot = post(s, rx, request_body(raw, **over))
    assert slot.status_code == 201, slot.text
    return put(s, slot.json()["uploadUrl"], raw)


def stored(rx: Receiver) -> tuple[list[Path], list[dict[str, Any]]]:
    lines = (rx.store / "uploads.jsonl").read_text().splitlines()
    return sorted(rx.store.glob("*.eml")), [json.loads(line) for line in lines]


def test_health_needs_no_key(rx: Receiver) -> None:
    r = requests.get(f"{rx.url}/v1/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_two_step_upload_stores_exact_bytes_and_one_line(rx: Receiver, http: requests.Session) -> None:
    body = request_body()
    slot = post(http, rx, body)
    assert slot.status_code == 201
    granted = slot.json()
    assert granted["expiresIn"] == 900
    assert granted["uploadUrl"].startswith(f"{rx.url}/v1/put/")
    done = put(http, granted["uploadUrl"])
    assert done.status_code == 200
    assert done.headers["ETag"] == f'"{body["sha256"]}"'
    files, lines = stored(rx)
    assert files == [rx.store / f"{granted['uploadId']}.eml"]
    assert files[0].read_bytes() == MAIL
    assert {p.stat().st_mode & 0o777 for p in (files[0], rx.store / "uploads.jsonl")} == {0o600}  # mail is private
    assert len(lines) == 1
    line = lines[0]
    assert line.pop("receivedAt").endswith("+00:00")
    assert line == {"uploadId": granted["uploadId"], **body}
    [in_memory] = rx.uploads()
    in_memory.pop("receivedAt")
    assert in_memory == line
    assert rx.stats["posts"] == 1 and rx.stats["puts"] == 1


def test_large_body_is_read_in_chunks(rx: Receiver, http: requests.Session) -> None:
    raw = MAIL + os.urandom(3 * 1024 * 1024 + 17)
    assert upload(http, rx, raw).status_code == 200
    files, _ = stored(rx)
    assert files[0].read_bytes() == raw


def test_same_request_id_is_idempotent(rx: Receiver, http: requests.Session) -> None:
    body = request_body()
    granted = post(http, rx, body).json()
    again = post(http, rx, body)  # granted but not yet put: same uploadId, fresh URL
    assert again.status_code == 201
    assert again.json()["uploadId"] == granted["uploadId"]
    assert again.json()["uploadUrl"] != granted["uploadUrl"]
    assert put(http, again.json()["uploadUrl"]).status_code == 200
    retried = post(http, rx, body)
    assert (retried.status_code, retried.json()) == (
        200, {"uploadId": granted["uploadId"], "status": "complete"})
    assert put(http, again.json()["uploadUrl"]).status_code == 200  # repeated PUT: 200, no copy
    assert put(http, granted["uploadUrl"]).status_code == 200  # the older token, same upload
    files, lines = stored(rx)
    assert len(files) == 1 and len(lines) == 1 and len(rx.uploads()) == 1


@pytest.mark.parametrize(("over", "status", "error"), [
    ({"recipients": ["alice@acme.com", "not an address"]}, 400, "invalid_recipient"),
    ({"recipients": ["alice@@acme.com"]}, 400, "invalid_recipient"),
    ({"recipients": ["@acme.com"]}, 400, "invalid_recipient"),
    ({"sender": "carol"}, 400, "invalid_recipient"),
    ({"requestId": None}, 400, "bad_request"),
    ({"size": "12"}, 400, "bad_request"),
    ({"size": True}, 400, "bad_request"),
    ({"recipients": "alice@acme.com"}, 400, "bad_request"),
    ({"sha256": "abc"}, 400, "bad_request"),
    ({"recipients": ["bob@other.org", "eve@acme.com.evil"]}, 422, "no_primary_recipient"),
    ({"recipients": []}, 422, "no_primary_recipient"),
    ({"size": 50 * 1024 * 1024 + 1}, 413, "too_large"),
])
def test_step1_errors(rx: Receiver, http: requests.Session, over: dict[str, Any], status: int,
                      error: str) -> None:
    r = post(http, rx, request_body(**over))
    assert r.status_code == status
    assert r.json()["error"] == error
    if status == 400:
        assert r.json()["detail"]


def test_primary_domain_matches_case_insensitively(rx: Receiver, http: requests.Session) -> None:
    assert post(http, rx, request_body(recipients=["Alice@ACME.com"])).status_code == 201


def test_malformed_json_is_bad_request(rx: Receiver, http: requests.Session) -> None:
    r = http.post(f"{rx.url}/v1/uploads", data=b"{nope", timeout=10,
                  headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "bad_request")


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x"])
def test_missing_or_wrong_key_is_403(rx: Receiver, key: str | None) -> None:
    headers = {} if key is None else {"x-api-key": key}
    r = requests.post(f"{rx.url}/v1/uploads", json=request_body(), headers=headers, timeout=10)
    assert (r.status_code, r.json()) == (403, {"error": "forbidden"})
    assert rx.uploads() == []


def test_digest_mismatch(rx: Receiver, http: requests.Session) -> None:
    url = post(http, rx, request_body()).json()["uploadUrl"]
    for wrong in (MAIL.replace(b"hello", b"jello"), MAIL + b"x"):
        r = put(http, url, wrong)
        assert (r.status_code, r.json()) == (400, {"error": "digest_mismatch"})
    assert put(http, url).status_code == 200  # the slot survives a bad body
    assert len(stored(rx)[0]) == 1


def test_put_needs_rfc822_content_type(rx: Receiver, http: requests.Session) -> None:
    url = post(http, rx, request_body()).json()["uploadUrl"]
    r = http.put(url, data=MAIL, headers={"Content-Type": "text/plain"}, timeout=10)
    assert (r.status_code, r.json()["error"]) == (400, "bad_request")


def test_unknown_token_is_expired(rx: Receiver, http: requests.Session) -> None:
    r = put(http, f"{rx.url}/v1/put/{uuid.uuid4().hex}")
    assert (r.status_code, r.json()) == (403, {"error": "expired"})


def test_scripted_expire_then_new_slot_same_upload(rx: Receiver, http: requests.Session) -> None:
    rx.script("expire")
    body = request_body()
    first = post(http, rx, body).json()
    r = put(http, first["uploadUrl"])
    assert (r.status_code, r.json()) == (403, {"error": "expired"})
    assert put(http, first["uploadUrl"]).status_code == 403  # that token stays dead
    second = post(http, rx, body)
    assert second.status_code == 201 and second.json()["uploadId"] == first["uploadId"]
    assert put(http, second.json()["uploadUrl"]).status_code == 200
    assert [u["requestId"] for u in rx.uploads()] == [body["requestId"]]


def test_scripted_500_then_success(rx: Receiver, http: requests.Session) -> None:
    rx.script(500)
    body = request_body()
    r = post(http, rx, body)
    assert (r.status_code, r.json()) == (500, {"error": "internal_error"})
    r = post(http, rx, body)
    assert r.status_code == 201
    assert put(http, r.json()["uploadUrl"]).status_code == 200
    assert rx.stats["answers"][500] == 1


def test_scripted_answers_in_order(rx: Receiver, http: requests.Session) -> None:
    rx.script(401, 403, 413, 422, 503, "invalid_recipient", "bad_request")
    got = [post(http, rx, request_body()) for _ in range(8)]
    assert [(r.status_code, r.json().get("error")) for r in got] == [
        (401, "forbidden"), (403, "forbidden"), (413, "too_large"),
        (422, "no_primary_recipient"), (503, "service_unavailable"),
        (400, "invalid_recipient"), (400, "bad_request"), (201, None)]


def test_429_carries_retry_after(rx: Receiver, http: requests.Session) -> None:
    rx.script(429)
    r = post(http, rx, request_body())
    assert (r.status_code, r.headers["Retry-After"]) == (429, "7")


def test_random_throttle_and_fail_rates(tmp_path: Path, http: requests.Session) -> None:
    with Receiver(tmp_path, api_key=KEY, throttle_rate=1.0, retry_after=3, seed=1) as rx:
        rx.script(500)  # scripted answers come before random faults
        assert post(http, rx, request_body()).status_code == 500
        r = post(http, rx, request_body())
        assert (r.status_code, r.headers["Retry-After"]) == (429, "3")
    with Receiver(tmp_path, api_key=KEY, fail_rate=1.0, seed=1) as rx:
        assert post(http, rx, request_body()).status_code == 500
    with pytest.raises(ValueError):
        Receiver(tmp_path, fail_rate=0.7, throttle_rate=0.7)


def test_scripted_drop_closes_without_answer(rx: Receiver, http: requests.Session) -> None:
    rx.script("drop")
    body = request_body()
    with pytest.raises(requests.ConnectionError):
        post(http, rx, body)
    assert post(http, rx, body).status_code == 201
    assert rx.stats["drops"] == 1


def test_scripted_lost_grants_then_drops(rx: Receiver, http: requests.Session) -> None:
    body = request_body()
    url = post(http, rx, body).json()["uploadUrl"]
    rx.script_put("lost")  # stored, but the answer never arrives
    with pytest.raises(requests.ConnectionError):
        put(http, url)
    r = post(http, rx, body)
    assert (r.status_code, r.json()["status"]) == (200, "complete")
    assert len(stored(rx)[0]) == 1


def test_scripted_put_answers(rx: Receiver, http: requests.Session) -> None:
    body = request_body()
    url = post(http, rx, body).json()["uploadUrl"]
    rx.script_put(500, "drop", 403)
    r = put(http, url)
    assert (r.status_code, r.json()) == (500, {"error": "internal_error"})
    with pytest.raises(requests.ConnectionError):
        put(http, url)
    r = put(http, url)
    assert (r.status_code, r.json()) == (403, {"error": "expired"})
    assert rx.uploads() == []
    again = post(http, rx, body)
    assert put(http, again.json()["uploadUrl"]).status_code == 200


def test_script_rejects_unknown_answers(rx: Receiver) -> None:
    for bad in ("explode", 200, True):
        with pytest.raises(ValueError):
            rx.script(bad)
    with pytest.raises(ValueError):
        rx.script_put("expire")


def test_peak_in_flight_counts_concurrent_requests(tmp_path: Path) -> None:
    clients = 8
    barrier = threading.Barrier(clients)
    statuses: list[int] = []
    with Receiver(tmp_path, api_key=KEY, latency_ms=200) as rx:
        def client() -> None:
            with requests.Session() as s:
                s.headers["x-api-key"] = KEY
                s.get(f"{rx.url}/v1/health", timeout=10)  # connect before the race
                barrier.wait(timeout=10)
                statuses.append(post(s, rx, request_body()).status_code)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = rx.stats
    assert statuses == [201] * clients
    assert stats["peak_in_flight"] == clients
    assert stats["in_flight"] == 0
    assert stats["posts"] == clients


def test_restart_on_same_store_keeps_idempotency(tmp_path: Path, http: requests.Session) -> None:
    body = request_body()
    with Receiver(tmp_path, api_key=KEY) as first:
        granted = post(http, first, body).json()
        assert put(http, granted["uploadUrl"]).status_code == 200
    with (tmp_path / "uploads.jsonl").open("a") as f:
        f.write('{"torn line')  # a crash mid-write must not stop the next start
    with Receiver(tmp_path, api_key=KEY) as second:
        r = post(http, second, body)
        assert (r.status_code, r.json()) == (200, {"uploadId": granted["uploadId"],
                                                   "status": "complete"})
        assert [u["uploadId"] for u in second.uploads()] == [granted["uploadId"]]
    assert len(list(tmp_path.glob("*.eml"))) == 1


def test_stop_is_idempotent_and_closes_the_port(tmp_path: Path) -> None:
    rx = Receiver(tmp_path).start()
    url = rx.url
    with requests.Session() as s:
        assert s.get(f"{url}/v1/health", timeout=10).status_code == 200
        rx.stop()
        rx.stop()
        with pytest.raises(requests.ConnectionError):
            s.get(f"{url}/v1/health", timeout=10)


def test_verbose_log_never_shows_the_key(tmp_path: Path, http: requests.Session,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver(tmp_path, api_key=KEY, verbose=True) as rx:
        assert upload(http, rx).status_code == 200
    err = capsys.readouterr().err
    assert "POST /v1/uploads" in err and "/v1/put/<token>" in err
    assert KEY not in err


def test_main_refuses_non_loopback_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", "0.0.0.0", "--store", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "--allow-remote" in captured.err


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, API_KEY_ENV: KEY}
    proc = subprocess.Popen([sys.executable, "-m", "imapsync.receiver", "--store", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("receiver listening on http://127.0.0.1:")
        assert line.endswith(f", storing in {tmp_path}")
        url = line.split()[3].rstrip(",")
        assert requests.get(f"{url}/v1/health", timeout=10).status_code == 200
        forbidden = requests.post(f"{url}/v1/uploads", json=request_body(), timeout=10)
        assert forbidden.status_code == 403  # the key came from the environment
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0
    assert KEY not in line + out + err


def test_scripted_ok_skips_random_faults_and_slow_answers_late(tmp_path: Path, http: requests.Session) -> None:
    """Words for fault mixes (issue 7): "ok" answers normally even at fail_rate 1; "slow"
    answers normally after slow_ms, so a client with a shorter timeout gives up first."""
    with Receiver(tmp_path, api_key=KEY, fail_rate=1.0, slow_ms=600) as rx:
        rx.script("ok", "slow")
        body = request_body()
        assert post(http, rx, body).status_code == 201
        with pytest.raises(requests.Timeout):
            http.post(f"{rx.url}/v1/uploads", json=body, headers={"x-api-key": KEY}, timeout=0.2)
        assert post(http, rx, body).status_code == 500  # the script is spent: random faults again
        rx.script("ok")
        url = post(http, rx, body).json()["uploadUrl"]
        rx.script_put("slow")
        with pytest.raises(requests.Timeout):
            http.put(url, data=MAIL, headers={"Content-Type": "message/rfc822"}, timeout=0.2)
        r = put(http, url)  # the slow PUT completed meanwhile, or this one does: stored once either way
        assert r.status_code == 200 and len(rx.uploads()) == 1
    with pytest.raises(ValueError):
        rx.script("fast")
