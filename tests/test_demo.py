"""`imapsync demo`, as a newcomer runs it: a real process, exit 0, a truthful report."""
from __future__ import annotations

import re
import subprocess
import sys

from imapsync.demo import sample_mail


def test_demo_archives_sample_mail_and_prints_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "imapsync", "demo", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first = re.search(r"first pass:\s+3 account\(s\): (\d+) uploaded, (\d+) duplicate, (\d+) skipped, "
                      r"0 failed, 0 pending", done.stdout)
    assert first, done.stdout
    uploaded, duplicate, skipped = map(int, first.groups())
    archivable = [m for m in sample_mail() if m[1] != "Trash"]
    assert uploaded + duplicate + skipped == len(archivable)
    assert duplicate >= 1 and skipped >= 1
    assert "second pass: 3 account(s): 0 uploaded" in done.stdout
    assert "no_primary_recipient" in done.stdout  # the status table names the reason
    assert len(list((tmp_path / "receiver").glob("*.eml"))) == uploaded
    # the kept config works with the ordinary commands
    status = subprocess.run([sys.executable, "-m", "imapsync", "status", "--config", str(tmp_path / "config.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "alice" in status.stdout
