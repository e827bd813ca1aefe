"""Shared fixtures: one Dovecot for the session, a fresh mailbox per test, the local
receiver over HTTP, a real SQLite ledger, and a helper that runs the CLI.

In CI (CI=true) a missing Dovecot is an error, never a skip: the integration tests
are the point of the suite.
"""
from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from imapsync.receiver import Receiver
from imapsync.testing.dovecot import Dovecot
from imapsync.testing.postgres import Postgres

DOMAIN = "acme.com"
API_KEY = "test-api-key-5f0c2b7e"  # a known secret the tests grep for
_user_ids = itertools.count(1)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_dovecot() -> None:
    """Skip without Dovecot, except in CI, where a missing server fails the test."""
    if not Dovecot.available():
        msg = "Dovecot is not installed (apt-get install dovecot-imapd; ./dev test does it as root)"
        if _in_ci():
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def dovecot():
    require_dovecot()
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres():
    if not Postgres.available():
        msg = "PostgreSQL is not installed (apt-get install postgresql; ./dev test does it as root)"
        if _in_ci():
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    with Postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh, empty ledger database of each kind the project supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return request.getfixturevalue("postgres").create_database(f"t{next(_user_ids)}")


@dataclass
class Mailbox:
    """A fresh Dovecot user."""

    server: Dovecot
    user: str
    password: str

    def deliver(self, raw: bytes, folder: str = "INBOX", flags: str = "") -> None:
        self.server.deliver(self.user, raw, folder, flags)

    def flags(self, folder: str = "INBOX") -> dict[int, set[str]]:
        return self.server.flags(self.user, folder)


@pytest.fixture
def new_mailbox(dovecot):
    """Factory: new_mailbox('alice') -> a user alice-N@acme.com (or on another domain)."""

    def make(local: str = "user", domain: str = DOMAIN) -> Mailbox:
        user = f"{local}{next(_user_ids)}@{domain}"
        password = f"pw-{user}-secret"
        dovecot.add_user(user, password)
        return Mailbox(dovecot, user, password)

    return make


@pytest.fixture
def receiver(tmp_path):
    with Receiver(tmp_path / "receiver", api_key=API_KEY) as r:
        yield r


class Env:
    """A config directory for one test: write a config, run the CLI, read the ledger."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.path = root / "config.yaml"
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("IMAPSYNC_TEST_API_KEY", API_KEY)

    def write(self, accounts: list[dict], *, endpoint: str | None, **extra) -> Path:
        data = {
            "tenants": [{"domain": DOMAIN, "endpoint": endpoint, "api_key": {"env": "IMAPSYNC_TEST_API_KEY"}}],
            "accounts": accounts,
            "upload": {"max_attempts": 3, "backoff_factor": 0.01, "backoff_max": 0.05, "timeout": 10},
        }
        data.update(extra)
        self.path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.path

    def account(self, mailbox: Mailbox, *, name: str | None = None, port: int | None = None, **extra) -> dict:
        env = f"PW_{next(_user_ids)}"
        self.monkeypatch.setenv(env, mailbox.password)
        return {"name": name or mailbox.user.split("@")[0], "host": "127.0.0.1",
                "port": port or mailbox.server.port, "tls": "plain", "username": mailbox.user,
                "password": {"env": env}, **extra}

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Run `imapsync ARGS --config FILE` as a real process; (exit code, stdout, stderr)."""
        done = subprocess.run([sys.executable, "-m", "imapsync", *args, "--config", str(self.path)],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())
        return done.returncode, done.stdout, done.stderr

    def sync(self, *args: str) -> tuple[int, str, str]:
        return self.cli("sync", *args)

    def status(self) -> dict:
        code, out, err = self.cli("status", "--json")
        assert code == 0, err
        return json.loads(out)

    def sql(self, query: str, *params) -> list[tuple]:
        with sqlite3.connect(self.root / "imapsync.sqlite3") as c:
            return c.execute(query, params).fetchall()


@pytest.fixture
def env(tmp_path, monkeypatch):
    return Env(tmp_path, monkeypatch)
