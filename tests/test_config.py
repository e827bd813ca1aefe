"""Config validation: every problem at once, one line each, exit 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from imapsync import config
from imapsync.errors import ConfigError

TENANT = {"domain": "acme.com", "endpoint": "upload.example.com", "api_key": {"env": "CFG_TEST_KEY"}}


def account(**kw):
    base = {"name": "a", "host": "imap.acme.com", "username": "a@acme.com", "password": {"env": "CFG_TEST_PW"}}
    base.update(kw)
    return base


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch):
    monkeypatch.setenv("CFG_TEST_KEY", "k")
    monkeypatch.setenv("CFG_TEST_PW", "p")


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(data, "cfg.yaml")
    return e.value.lines()


def test_valid_config_resolves_secrets_and_defaults(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    loaded = config.parse({"tenants": [TENANT], "accounts": [account(password={"file": "pw"}, port=993)]},
                          str(tmp_path / "c.yaml"), tmp_path)
    a = loaded.config.accounts[0]
    assert loaded.password(a).get_secret_value() == "from-file"
    assert "from-file" not in repr(loaded) + repr(loaded.password(a))
    assert loaded.config.tenants[0].endpoint == "https://upload.example.com"  # bare host -> HTTPS
    assert a.tls == config.TlsMode.IMPLICIT and a.verify_certificate
    assert loaded.ledger_url == f"sqlite:///{tmp_path.resolve() / 'imapsync.sqlite3'}"


def test_password_from_command():
    loaded = config.parse({"tenants": [TENANT], "accounts": [account(password={"command": "echo s3cret"})]})
    assert loaded.password(loaded.config.accounts[0]).get_secret_value() == "s3cret"


def test_all_problems_reported_at_once():
    lines = problems({
        "tenants": [TENANT],
        "accounts": [
            account(name="a", bogus=1),  # unknown key
            {"name": "b", "host": "imap.acme.com", "password": {"env": "CFG_TEST_PW"}},  # missing username
            account(name="c", port="not-a-port"),  # wrong type
            account(name="d", tls="plain"),  # plaintext to a remote host
        ],
    })
    assert lines == [
        "cfg.yaml: accounts[0].bogus: unknown key",
        "cfg.yaml: accounts[1].username: missing required key",
        "cfg.yaml: accounts[2].port: Input should be a valid integer, unable to parse string as an integer",
        "cfg.yaml: accounts[3].tls: plain sends the password in clear to imap.acme.com; use implicit "
        "or starttls, or set allow_insecure: true",
    ]


def test_plaintext_allowed_on_loopback_or_when_insecure_is_allowed():
    config.parse({"tenants": [TENANT], "accounts": [account(host="127.0.0.1", tls="plain"),
                                                     account(name="b", tls="plain", allow_insecure=True)]})


@pytest.mark.parametrize("secret,problem", [
    ({"env": "CFG_TEST_UNSET"}, "environment variable CFG_TEST_UNSET is not set"),
    ({"file": "/nonexistent/pw"}, "cannot read secret file /nonexistent/pw: No such file or directory"),
    ({"command": "false"}, "secret command exited 1"),
    ({"env": "A", "file": "b"}, "give exactly one of env, file or command"),
    ({"vault": "x"}, "unknown key"),
])
def test_secret_problems(secret, problem):
    lines = problems({"tenants": [TENANT], "accounts": [account(password=secret)]})
    assert lines[0].startswith("cfg.yaml: accounts[0].password") and lines[0].endswith(problem)


def test_vaultastic_sink_needs_endpoint_and_key():
    assert problems({"tenants": [{"domain": "acme.com"}]}) == [
        "cfg.yaml: tenants[0].endpoint: required for sink vaultastic",
        "cfg.yaml: tenants[0].api_key: required for sink vaultastic",
    ]
    config.parse({"tenants": [{"domain": "acme.com"}], "sink": "directory", "directory": "out"})


def test_cli_bad_config_prints_one_line_per_problem_and_exits_2(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"tenants": [TENANT], "acounts": [],
                                    "accounts": [account(tls="plain", timeout="soon")]}))
    done = subprocess.run([sys.executable, "-m", "imapsync", "sync", "--config", str(path)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "CFG_TEST_KEY": "k",
                                                                "CFG_TEST_PW": "p"})
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}: accounts[0].timeout: Input should be a valid number, unable to parse string as a number",
        f"{path}: acounts: unknown key",
        f"{path}: accounts[0].tls: plain sends the password in clear to imap.acme.com; use implicit or "
        "starttls, or set allow_insecure: true",
    ]
    assert "Traceback" not in done.stderr


def test_cli_missing_config_file_and_bad_yaml(tmp_path):
    run = lambda p: subprocess.run([sys.executable, "-m", "imapsync", "status", "--config", str(p)],  # noqa: E731
                                   capture_output=True, text=True)
    done = run(tmp_path / "nope.yaml")
    assert done.returncode == 2 and done.stderr.startswith(f"{tmp_path / 'nope.yaml'}: no such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [\n")
    done = run(bad)
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "Traceback" not in done.stderr


def test_the_example_config_is_valid(tmp_path, monkeypatch):
    """config.yaml.example documents every option: it must stay loadable as written."""
    import shutil
    from pathlib import Path
    example = Path(__file__).parent.parent / "config.yaml.example"
    shutil.copy(example, tmp_path / "config.yaml")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "support.password").write_text("pw\n")
    monkeypatch.setenv("VAULTASTIC_API_KEY", "k")
    monkeypatch.setenv("ALICE_IMAP_PASSWORD", "p")
    loaded = config.load(tmp_path / "config.yaml")
    assert [a.name for a in loaded.config.accounts] == ["alice", "support"]
    assert loaded.config.upload.max_message_bytes == 50_000_000
