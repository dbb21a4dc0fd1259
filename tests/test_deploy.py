"""deploy/: the systemd unit passes `systemd-analyze verify`, and its environment file names only settings that
`clusterctl join` reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parent.parent / "deploy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    # the unit starts /usr/local/bin/clusterctl; here that is this environment's console script
    script = Path(sys.executable).parent / "clusterctl"
    assert script.exists()
    unit = (DEPLOY / "systemd" / "clusterctl.service").read_text()
    assert "ExecStart=/usr/local/bin/clusterctl join" in unit
    copy = tmp_path / "clusterctl.service"
    copy.write_text(unit.replace("/usr/local/bin/clusterctl", str(script)))
    p = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "clusterctl.service" not in p.stderr, p.stderr


def test_the_environment_file_sets_only_what_join_reads():
    env = (DEPLOY / "systemd" / "clusterctl.env").read_text()
    names = set(re.findall(r"^#?(CLUSTERCTL_[A-Z_]+)=", env, flags=re.M))
    assert {"CLUSTERCTL_TOKEN_FILE", "CLUSTERCTL_PORT", "CLUSTERCTL_DEVICE", "CLUSTERCTL_MEMORY"} <= names
    help_text = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "join", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert not {n for n in names if n not in help_text}, "names in clusterctl.env that join does not read"
