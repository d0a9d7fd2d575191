"""The offline demo (the README's quick start; docs/contributing.md), as a user runs it: one
command, on a free port, verified."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, archive_members


def test_the_offline_demo_runs_end_to_end_in_one_command(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "HOME": str(tmp_path / "home"),
           "TMPDIR": str(scratch)}
    result = subprocess.run(["bash", str(ROOT / "tests" / "demo.sh"), str(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is whole: xz -t, tar -x and md5sum -c pass" in result.stdout
    assert "Traceback" not in result.stderr and "cannot connect" not in result.stderr
    members = archive_members(tmp_path / "out" / "DEMO.tar.xz")
    assert {"DEMO/LICENSE", "DEMO/metadata.csv", "DEMO/MD5SUMS"} <= set(members)
    assert not list(scratch.iterdir())                      # the demo cleans up after itself
