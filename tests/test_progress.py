"""Backfill progress as a person sees it: a live table on a terminal (the backfill runs
under a pseudo-terminal), plain log lines when its output is piped."""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import date

from conftest import API_KEY
from history import seed_history

from imapsync.receiver import Receiver


def run_on_a_terminal(args: list[str], timeout: float = 90) -> tuple[int, str]:
    """Run a command with stdin/stdout/stderr on a new pty; (exit code, everything it drew)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(os.environ, TERM="xterm-256color")
    for name in ("NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES"):
        env.pop(name, None)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has closed it
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_live_display_on_a_terminal_and_log_lines_when_piped(new_mailbox, env, dovecot, tmp_path):
    alice, bob = new_mailbox("alice"), new_mailbox("bob")
    seed_history(dovecot, alice.user, 120, ["INBOX", "Archive"], date(2023, 1, 1), date(2024, 6, 30), tag="a")
    seed_history(dovecot, bob.user, 120, ["INBOX", "Archive"], date(2023, 1, 1), date(2024, 6, 30), tag="b")
    with Receiver(tmp_path / "store", api_key=API_KEY, latency_ms=10) as rx:
        env.write([env.account(alice, name="alice"), env.account(bob, name="bob")], endpoint=rx.url,
                  upload={"concurrency": 2, "max_attempts": 3, "backoff_factor": 0.01, "timeout": 10},
                  backfill={"progress_interval": 0.2})

        code, screen = run_on_a_terminal([sys.executable, "-m", "imapsync", "backfill", "--account", "alice",
                                          "--config", str(env.path)])
        assert code == 0, screen
        assert "\x1b[?25l" in screen  # rich hides the cursor while it redraws the table in place
        assert "imapsync backfill" in screen
        for column in ("messages", "bytes", "rate", "ETA", "failed", "folder"):
            assert column in screen
        assert re.search(r"alice .*120/120", screen)  # messages done / total, the totals counted up front
        assert "msg/s" in screen
        assert "Backfill alice:" not in screen  # no plain log lines on a terminal
        assert "1 account(s): 120 uploaded" in screen

        code, out, err = env.cli("backfill", "--account", "bob")  # piped
        assert code == 0, err
        assert "\x1b[" not in err + out
        lines = [line for line in err.splitlines() if "Backfill bob:" in line]
        assert lines, err
        assert re.search(r"Backfill bob: 120/120 messages, [\d.]+ KB/[\d.]+ KB, [\d.]+ msg/s", lines[-1]), lines[-1]
        assert lines[-1].endswith("done")
        assert len(rx.uploads()) == 240
