"""The sinks against real endpoints: the Vaultastic HTTP sink against the local
receiver (one test per row of the API's answer table), and the directory sink."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import API_KEY

from imapsync.sinks.base import Outcome, UploadRequest
from imapsync.sinks.directory import DirectorySink
from imapsync.sinks.vaultastic import RetryPolicy, VaultasticSink

FAST = RetryPolicy(max_attempts=3, backoff_factor=0.01, backoff_max=0.05)

RAW = b"From: a@acme.com\r\nTo: b@acme.com\r\nSubject: s\r\n\r\nbody\r\n"


def request(vaults=("b@acme.com",), raw=RAW, key="m:1") -> UploadRequest:
    return UploadRequest.of(key, "acme.com", vaults, "a@acme.com", raw)


@pytest.fixture
def sink(receiver):
    s = VaultasticSink("acme.com", receiver.url, API_KEY, retry=FAST, timeout=10)
    yield s
    s.close()


def test_upload_stores_the_exact_bytes_with_vaults_and_sender(sink, receiver):
    result = sink.upload(request(("b@acme.com", "c@acme.com")))
    assert result.outcome is Outcome.UPLOADED and result.attempts == 1
    [up] = receiver.uploads()
    assert up["recipients"] == ["b@acme.com", "c@acme.com"] and up["sender"] == "a@acme.com"
    assert up["sha256"] == hashlib.sha256(RAW).hexdigest()
    assert (receiver.store / f"{up['uploadId']}.eml").read_bytes() == RAW


def test_same_request_again_is_not_stored_twice(sink, receiver):
    first, again = sink.upload(request()), sink.upload(request())
    assert first.outcome is again.outcome is Outcome.UPLOADED
    assert first.upload_id == again.upload_id and len(receiver.uploads()) == 1


@pytest.mark.parametrize("answer,outcome,reason", [
    ("invalid_recipient", Outcome.PERMANENT, "invalid_recipient"),
    ("bad_request", Outcome.PERMANENT, "bad_request"),
    (403, Outcome.FORBIDDEN, "forbidden"),
    (401, Outcome.FORBIDDEN, "forbidden"),
    (413, Outcome.PERMANENT, "too_large"),
    (422, Outcome.PERMANENT, "no_primary_recipient"),
])
def test_permanent_answers_are_not_retried(sink, receiver, answer, outcome, reason):
    receiver.script(answer)
    result = sink.upload(request())
    assert (result.outcome, result.reason, result.attempts) == (outcome, reason, 1)
    assert receiver.stats["posts"] == 1 and receiver.uploads() == []


def test_throttling_is_retried_after_retry_after(tmp_path):
    from imapsync.receiver import Receiver
    with Receiver(tmp_path / "r", api_key=API_KEY, retry_after=0) as r:
        s = VaultasticSink("acme.com", r.url, API_KEY, retry=FAST)
        r.script(429, 429)
        result = s.upload(request())
        assert result.outcome is Outcome.UPLOADED and result.attempts == 3
        assert r.stats["answers"][429] == 2 and len(r.uploads()) == 1


def test_server_errors_past_the_budget_fail_with_reason(sink, receiver):
    receiver.script(500, 500, 500)
    result = sink.upload(request())
    assert (result.outcome, result.reason, result.attempts) == (Outcome.FAILED, "server_error", 3)
    assert receiver.uploads() == []


def test_the_time_budget_counts_the_first_attempt(tmp_path):
    """budget_seconds is spent from the first attempt on: a first attempt that times out
    after the budget is over is not retried, whatever max_attempts allows."""
    from imapsync.receiver import Receiver
    with Receiver(tmp_path / "r", api_key=API_KEY, slow_ms=3000) as r:
        r.script("slow", "slow", "slow")
        s = VaultasticSink("acme.com", r.url, API_KEY, timeout=0.5,
                           retry=RetryPolicy(max_attempts=3, backoff_factor=0.01, budget_seconds=0.4))
        result = s.upload(request())
        assert (result.outcome, result.reason, result.attempts) == (Outcome.FAILED, "timeout", 1)
        assert r.stats["posts"] == 1


def test_dropped_connection_is_retried(sink, receiver):
    receiver.script("drop")
    assert sink.upload(request()).outcome is Outcome.UPLOADED
    assert len(receiver.uploads()) == 1


def test_a_kept_alive_connection_that_dies_unanswered_is_sent_again_once_on_a_new_one(sink, receiver):
    """libcurl resends a request whose reused connection ended before any answer (the race of
    keep-alive); the request id makes that safe. A second drop, on the new connection, costs
    an attempt."""
    assert sink.upload(request(key="m:warm")).outcome is Outcome.UPLOADED  # the connection is kept
    receiver.script("drop")
    assert sink.upload(request(key="m:1")).attempts == 1
    receiver.script("drop", "drop")
    result = sink.upload(request(key="m:2"))
    assert (result.outcome, result.attempts) == (Outcome.UPLOADED, 2)
    assert receiver.stats["connections"] == 4 and len(receiver.uploads()) == 3


def test_expired_slot_asks_again_with_the_same_request_id(sink, receiver):
    receiver.script("expire")
    result = sink.upload(request())
    assert result.outcome is Outcome.UPLOADED and len(receiver.uploads()) == 1
    assert receiver.stats["posts"] == 2


def test_put_failing_past_the_budget_is_s3_upload_failed(sink, receiver):
    receiver.script_put(500, 500, 500)
    result = sink.upload(request())
    assert (result.outcome, result.reason) == (Outcome.FAILED, "s3_upload_failed")


def test_unreachable_endpoint(receiver):
    url = receiver.url
    receiver.stop()
    s = VaultasticSink("acme.com", url, API_KEY, retry=RetryPolicy(max_attempts=2, backoff_factor=0.01))
    result = s.upload(request())
    assert result.outcome is Outcome.UNREACHABLE and API_KEY not in (result.detail or "")
    assert result.detail == f"cannot reach {url}: connection failed: connection refused"


def test_directory_sink_writes_each_upload_once(tmp_path):
    sink = DirectorySink(tmp_path / "out")
    assert sink.upload(request()).outcome is Outcome.UPLOADED
    assert sink.upload(request()).outcome is Outcome.UPLOADED
    files = list((tmp_path / "out" / "acme.com").glob("*.eml"))
    assert len(files) == 1 and files[0].read_bytes() == RAW
    assert files[0].stat().st_mode & 0o777 == 0o600  # mail is private, whatever the umask
    assert len((tmp_path / "out" / "acme.com" / "index.jsonl").read_text().splitlines()) == 1


def test_directory_sink_puts_a_message_on_disk_before_it_counts_as_uploaded(tmp_path, monkeypatch):
    """Once upload() answers, the ledger moves the folder's cursor past the message, so a
    power cut must not be able to take its file: the bytes are flushed before the file gets
    its name, and the name and the index line before the answer. Also for a file found
    already there (a run stopped before flushing it). The real calls, watched in order."""
    import os

    calls: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fdatasync", "fsync", "replace")}

    def watched(name):
        def call(*args):
            what = args[0] if name == "replace" else os.readlink(f"/proc/self/fd/{args[0]}")
            calls.append((name, str(Path(what).resolve().relative_to(out.resolve()))))
            return real[name](*args)
        return call

    for name in real:
        monkeypatch.setattr(os, name, watched(name))
    out = tmp_path / "out"
    sink = DirectorySink(out)
    try:
        assert sink.upload(request()).outcome is Outcome.UPLOADED
        [eml] = (out / "acme.com").glob("*.eml")
        [(_, partial)] = [c for c in calls if c[0] == "replace"]
        assert partial.startswith("acme.com/.partial/")
        assert calls == [("fsync", "."),  # the tenant folder's name, at its first use
                         ("fdatasync", partial), ("replace", partial),
                         ("fdatasync", "acme.com/index.jsonl"), ("fsync", "acme.com")]
        calls.clear()
        assert sink.upload(request()).outcome is Outcome.UPLOADED
        assert calls == [("fsync", f"acme.com/{eml.name}"), ("fdatasync", "acme.com/index.jsonl"),
                         ("fsync", "acme.com")]
    finally:
        sink.close()


def test_the_environment_proxy_is_used_unless_no_proxy_names_the_host(receiver, monkeypatch):
    """HTTP_PROXY from the environment carries the uploads (here: a proxy nobody listens on,
    so the tenant is unreachable); NO_PROXY naming the endpoint's host goes direct."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again at once: nothing listens there
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    through_proxy = VaultasticSink("acme.com", receiver.url, API_KEY, retry=FAST, timeout=10)
    assert through_proxy.upload(request()).outcome is Outcome.UNREACHABLE
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = VaultasticSink("acme.com", receiver.url, API_KEY, retry=FAST, timeout=10)
    assert direct.upload(request()).outcome is Outcome.UPLOADED and len(receiver.uploads()) == 1


def test_a_keep_alive_connection_the_server_closed_is_replaced_without_a_retry(tmp_path):
    """The receiver restarts on the same port between two uploads (its idle connections are
    cut): the second upload goes out on a new connection at its first attempt."""
    from imapsync.receiver import Receiver

    first = Receiver(tmp_path / "store", api_key=API_KEY).start()
    port = first._address[1]  # type: ignore[index]
    s = VaultasticSink("acme.com", first.url, API_KEY, retry=RetryPolicy(max_attempts=1), timeout=10)
    try:
        assert s.upload(request(key="m:1")).outcome is Outcome.UPLOADED
        first.stop()
        with Receiver(tmp_path / "store", api_key=API_KEY, port=port) as again:
            result = s.upload(request(key="m:2"))
            assert (result.outcome, result.attempts) == (Outcome.UPLOADED, 1)
            assert len(again.uploads()) == 2  # the first read back from the store, the second new
    finally:
        s.close()


def test_connections_are_reused_by_later_threads_and_never_outnumber_requests_at_once(receiver):
    """Three threads upload, then three new threads (the daemon's next pass): the connections
    of the first are reused by the second, never more than three, and close() closes them."""
    from concurrent.futures import ThreadPoolExecutor

    s = VaultasticSink("acme.com", receiver.url, API_KEY, retry=FAST, timeout=10)
    try:
        for rounds in range(2):
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(lambda i, n=rounds: s.upload(request(key=f"m:{n}:{i}")), range(30)))
            assert all(r.outcome is Outcome.UPLOADED for r in results)
            assert 1 <= receiver.stats["connections"] <= 3  # the receiver's count of accepted connections
        assert len(receiver.uploads()) == 60
    finally:
        s.close()
    assert not s._http._handles  # type: ignore[attr-defined]


@pytest.fixture
def tls_front(receiver, tmp_path):
    """HTTPS on loopback in front of the receiver (a self-signed certificate for 127.0.0.1),
    as the real endpoint is HTTPS: (url, certificate file)."""
    import shutil
    import socket
    import ssl
    import subprocess
    import threading

    from imapsync.testing.fault_proxy import shut_down

    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI not installed (./dev test installs it as root)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    target = receiver._address  # type: ignore[attr-defined]

    def pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shut_down(src, dst)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            try:
                client = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()  # a client that refused our certificate
                continue
            upstream = socket.create_connection(target)
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}", cert
    listener.close()


def test_https_endpoint_with_a_trusted_certificate_uploads(tls_front, receiver, monkeypatch):
    url, cert = tls_front
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    s = VaultasticSink("acme.com", url, API_KEY, retry=FAST, timeout=10)
    try:
        result = s.upload(request())
    finally:
        s.close()
    assert (result.outcome, result.attempts) == (Outcome.UPLOADED, 1)
    [up] = receiver.uploads()
    assert (receiver.store / f"{up['uploadId']}.eml").read_bytes() == RAW


def test_https_endpoint_with_an_untrusted_certificate_is_unreachable_and_nothing_is_sent(tls_front, receiver,
                                                                                           monkeypatch):
    url, _cert = tls_front
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system's CAs only: they do not know our certificate
    s = VaultasticSink("acme.com", url, API_KEY, retry=FAST, timeout=10)
    try:
        result = s.upload(request())
    finally:
        s.close()
    assert result.outcome is Outcome.UNREACHABLE and "TLS certificate not trusted" in (result.detail or "")
    assert receiver.stats["posts"] == 0 and receiver.uploads() == []


@pytest.mark.parametrize("header, low, high", [("7", 7, 7), ("date+3", 1, 3), (None, None, None)])
def test_retry_after_is_read_as_seconds_or_as_an_http_date(header, low, high):
    """libcurl reads Retry-After: delta-seconds, or an HTTP date turned into the seconds
    left until it; none means the sink's own backoff."""
    import email.utils
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from imapsync.sinks.http_transport import Transport

    class Throttling(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(429)
            if header is not None:
                value = email.utils.formatdate(time.time() + 3, usegmt=True) if header == "date+3" else header
                self.send_header("Retry-After", value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answer = Transport(5, 5).request("POST", f"http://127.0.0.1:{server.server_port}/v1/uploads", body=b"{}")
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status == 429
    if low is None:
        assert answer.retry_after is None
    else:
        assert low <= answer.retry_after <= high
