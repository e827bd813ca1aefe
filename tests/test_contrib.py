"""The systemd unit example in contrib/ is a unit systemd accepts, and runs a command imapsync knows."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "contrib" / "imapsync.service"


def _exec_start() -> list[str]:
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_runs_a_command_line_imapsync_accepts():
    argv = _exec_start()
    assert argv[0].endswith("/bin/imapsync")
    done = subprocess.run([sys.executable, "-m", "imapsync", *argv[1:], "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--http" in done.stdout


def test_systemd_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    venv_imapsync = Path(sys.executable).with_name("imapsync")
    unit = tmp_path / "imapsync.service"
    unit.write_text(UNIT.read_text().replace("/opt/imapsync/.venv/bin/imapsync", str(venv_imapsync)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "imapsync.service" in line and "EnvironmentFile" not in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
