"""`imapsync upload`, the drop-in replacement for the vendor's upload script: run as a real
process against the local receiver, with the vendor's environment and exit codes."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import API_KEY, DOMAIN
from mail import message

from imapsync.receiver import Receiver
from imapsync.upload_cli import endpoint_url

RAW = message("Carol <carol@acme.com>", "bob@acme.com, ext@outside.example", "drop-in",
              msgid="<drop-in-1@mailer.example>", cc="x@other.example")


@pytest.fixture
def eml(tmp_path) -> Path:
    path = tmp_path / "mail.eml"
    path.write_bytes(RAW)
    return path


def upload(args: list[str], receiver: Receiver | None = None, *, api_key: str = API_KEY,
           cwd: Path | None = None, **env: str) -> tuple[int, str, str]:
    """Run `python -m imapsync upload ARGS` with the vendor's variables; never shows the key."""
    environ = {"PATH": os.environ["PATH"], "PRIMARY_DOMAIN": DOMAIN, "API_KEY": api_key,
               "IMAPSYNC_UPLOAD_BACKOFF_FACTOR": "0.01"}
    if receiver is not None:
        environ["API_ENDPOINT_URL"] = receiver.url
    environ.update(env)
    environ = {k: v for k, v in environ.items() if v is not None and v != "<unset>"}
    done = subprocess.run([sys.executable, "-m", "imapsync", "upload", *args], capture_output=True,
                          text=True, timeout=60, env=environ, cwd=cwd, stdin=subprocess.DEVNULL)
    assert api_key not in done.stdout + done.stderr
    return done.returncode, done.stdout, done.stderr


def stored(receiver: Receiver) -> list[tuple[dict, bytes]]:
    return [(up, (receiver.store / f"{up['uploadId']}.eml").read_bytes()) for up in receiver.uploads()]


def test_uploads_to_the_header_vaults_plus_r(receiver, eml, tmp_path):
    code, out, err = upload(["-i", str(eml), "-r", "dave@acme.com, Erin@ACME.com"], receiver, cwd=tmp_path)
    assert (code, out, err) == (0, "Mail uploaded successfully\n", "")
    [(up, raw)] = stored(receiver)
    assert raw == RAW  # byte for byte
    assert up["recipients"] == ["bob@acme.com", "carol@acme.com", "dave@acme.com", "erin@acme.com"]
    assert up["sender"] == "carol@acme.com" and up["primaryDomain"] == DOMAIN
    assert not (tmp_path / "imapsync.sqlite3").exists()  # no config: no ledger


def test_s_adds_the_sender_vault(receiver, eml):
    code, _out, err = upload(["-i", str(eml), "-s", "frank@acme.com"], receiver)
    assert code == 0, err
    [(up, _raw)] = stored(receiver)
    assert up["sender"] == "frank@acme.com" and "frank@acme.com" in up["recipients"]


def test_m_instead_of_i_and_m_ignored_when_both(receiver, eml):
    text = message("ext@outside.example", "gina@acme.com", "via -m").decode()
    code, out, err = upload(["-m", text], receiver)
    assert code == 0, err
    assert stored(receiver)[0][1] == text.encode() and stored(receiver)[0][0]["recipients"] == ["gina@acme.com"]
    code, _out, err = upload(["-i", str(eml), "-m", text], receiver)
    assert code == 0, err
    assert stored(receiver)[1][1] == RAW


def test_the_same_upload_twice_is_stored_once(receiver, eml):
    assert upload(["-i", str(eml)], receiver)[0] == 0
    assert upload(["-i", str(eml)], receiver)[0] == 0
    assert len(receiver.uploads()) == 1  # the request id is derived from the message and vaults


def test_neither_i_nor_m_is_exit_3(receiver):
    code, out, err = upload(["-r", "bob@acme.com"], receiver)
    assert code == 3 and out == "" and err.startswith("Invalid number of arguments")


@pytest.mark.parametrize("flags,words", [
    (["-r", "bob@acme.com,not-an-address"], "Invalid recipient address: 'not-an-address'"),
    (["-r", "bob@other.example"], "bob@other.example is not on the primary domain acme.com"),
    (["-s", "carol at acme.com"], "Invalid sender address"),
])
def test_a_bad_r_or_s_is_exit_4(receiver, eml, flags, words):
    code, out, err = upload(["-i", str(eml), *flags], receiver)
    assert code == 4 and out == "" and words in err and len(err.splitlines()) == 1
    assert receiver.stats["posts"] == 0


def test_the_api_refusing_a_recipient_is_exit_4(receiver, eml):
    receiver.script("invalid_recipient")
    code, _out, err = upload(["-i", str(eml)], receiver)
    assert code == 4 and err.startswith("Invalid recipient address")


def test_no_vault_on_the_primary_domain_is_exit_6(receiver, tmp_path):
    path = tmp_path / "outside.eml"
    path.write_bytes(message("a@outside.example", "b@other.example", "no vault"))
    code, out, err = upload(["-i", str(path)], receiver)
    assert (code, out) == (6, "") and err == "No recipient on the primary domain acme.com\n"
    assert receiver.stats["posts"] == 0


def test_server_errors_past_the_budget_are_exit_5(receiver, eml):
    receiver.script(500, 500, 500)
    code, out, err = upload(["-i", str(eml)], receiver, IMAPSYNC_UPLOAD_MAX_ATTEMPTS="2")
    assert code == 5 and out == "" and "after 2 attempt(s)" in err
    assert receiver.stats["posts"] == 2 and receiver.uploads() == []


def test_an_unreachable_endpoint_is_exit_5(receiver, eml):
    receiver.stop()
    code, _out, err = upload(["-i", str(eml)], receiver, IMAPSYNC_UPLOAD_MAX_ATTEMPTS="2")
    assert code == 5 and err.startswith("Failed to upload the mail")


def test_a_refused_key_is_exit_5_and_says_so(receiver, eml):
    code, _out, err = upload(["-i", str(eml)], receiver, api_key="wrong-key-7d1e99")
    assert code == 5 and "the API key was refused" in err


@pytest.mark.parametrize("unset", [["API_KEY"], ["PRIMARY_DOMAIN", "API_ENDPOINT_URL"]])
def test_missing_environment_is_exit_2_naming_the_variables(receiver, eml, unset):
    code, out, err = upload(["-i", str(eml)], receiver, **{name: "<unset>" for name in unset})
    assert (code, out) == (2, "") and err == f"Missing environment variable(s): {', '.join(unset)}\n"


def test_an_unreadable_file_and_a_bad_budget_are_exit_2(receiver, eml, tmp_path):
    code, _out, err = upload(["-i", str(tmp_path / "nope.eml")], receiver)
    assert code == 2 and "No such file" in err
    code, _out, err = upload(["-i", str(eml)], receiver, IMAPSYNC_UPLOAD_MAX_ATTEMPTS="many")
    assert code == 2 and "IMAPSYNC_UPLOAD_MAX_ATTEMPTS" in err


def test_endpoint_url_accepts_a_bare_host_or_a_url():
    assert endpoint_url("ActiveStoreMailUploadAPI.vaultastic.com") == "https://ActiveStoreMailUploadAPI.vaultastic.com"
    assert endpoint_url(" api.example.com/ ") == "https://api.example.com"
    assert endpoint_url("http://127.0.0.1:8025/") == "http://127.0.0.1:8025"
    assert endpoint_url("HTTPS://api.example.com/stage") == "HTTPS://api.example.com/stage"


# ----- the ledger -----------------------------------------------------------------------------

def write_config(root: Path) -> Path:
    """A full config whose secrets are NOT set: upload needs only the ledger from it."""
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "tenants": [{"domain": DOMAIN, "endpoint": "upload.example.com", "api_key": {"env": "UNSET_KEY_VAR"}}],
        "accounts": [{"name": "a", "host": "imap.acme.com", "username": "a@acme.com",
                      "password": {"env": "UNSET_PW_VAR"}}],
    }))
    return path


def ledger_rows(db: Path) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(db) as c:
        messages = c.execute("SELECT key, message_id, state, upload_id, size FROM messages").fetchall()
        deliveries = c.execute("SELECT vault, tenant, upload_id FROM deliveries ORDER BY vault").fetchall()
    return messages, deliveries


def test_config_records_the_upload_in_the_ledger(receiver, eml, tmp_path):
    from imapsync.message import MessageInfo, header_block

    config = write_config(tmp_path)
    code, out, err = upload(["-i", str(eml), "-r", "dave@acme.com", "--config", str(config)], receiver)
    assert (code, out, err) == (0, "Mail uploaded successfully\n", "")
    [(up, _raw)] = stored(receiver)
    key = MessageInfo.from_headers(header_block(RAW), len(RAW)).header_key
    messages, deliveries = ledger_rows(tmp_path / "imapsync.sqlite3")
    assert messages == [(key, "<drop-in-1@mailer.example>", "uploaded", up["uploadId"], len(RAW))]
    assert deliveries == [(v, DOMAIN, up["uploadId"]) for v in ("bob@acme.com", "carol@acme.com", "dave@acme.com")]


def test_imapsync_config_records_too_and_a_message_without_id_is_keyed_by_fingerprint(receiver, tmp_path):
    from imapsync.message import fingerprint

    config = write_config(tmp_path)
    raw = message("ext@outside.example", "hal@acme.com", "no id", msgid=None)
    code, _out, err = upload(["-m", raw.decode()], receiver, IMAPSYNC_CONFIG=str(config))
    assert code == 0, err
    messages, deliveries = ledger_rows(tmp_path / "imapsync.sqlite3")
    assert [(m[0], m[2]) for m in messages] == [(fingerprint(raw), "uploaded")]
    assert [d[0] for d in deliveries] == ["hal@acme.com"]


def test_a_missing_config_is_exit_2_and_a_failed_upload_is_not_recorded(receiver, eml, tmp_path):
    code, _out, err = upload(["-i", str(eml), "--config", str(tmp_path / "nope.yaml")], receiver)
    assert code == 2 and "no such file" in err and receiver.stats["posts"] == 0
    config = write_config(tmp_path)
    receiver.script(500, 500)
    code, _out, _err = upload(["-i", str(eml), "--config", str(config)], receiver, IMAPSYNC_UPLOAD_MAX_ATTEMPTS="2")
    assert code == 5 and ledger_rows(tmp_path / "imapsync.sqlite3") == ([], [])
