"""The README's quick start, word for word (#23, point 1): its lines are read from README.md
(between the "quick start" markers) and run in a fresh clone of this repository, in a fresh
venv under a HOME of their own, offline. Each line must be one this test knows how to run:
one it does not know fails the test, so that the quick start and its test change together.

What is not run as written, and why: `<this repository>` is the repository the test runs
from; the real download needs TCIA (no network in tests), so the --verify line checks the
demo's archive instead of the download's; the suite itself is what CI runs (`.ci/run` runs
that very command), so here it is collected only (pytest installed, every module imports)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

BEGIN, END = "<!-- quick start:", "<!-- quick start end -->"


def quick_start_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(BEGIN):text.index(END)]
    lines = block.split("```")[1].strip("\n").splitlines()
    assert 0 < len(lines) <= 15                # the issue: a quick start of 15 lines or fewer
    return lines


def runnable(lines: list[str]) -> list[str]:
    """Each line as the test runs it (see the module's docstring)."""
    script, download = [], None
    for line in lines:
        command = line.split(" #", 1)[0].rstrip()
        clone = re.fullmatch(r"git clone <this repository> (\S+) && cd (\S+)", command)
        real_run = re.fullmatch(r"python3 tcia_downloader.py --collection (\S+) --output (\S+) "
                                r"--compression", command)
        check = re.fullmatch(r"python3 tcia_downloader.py --verify (\S+)", command)
        if clone:
            script.append(f"git clone -q {ROOT} {clone[1]} && cd {clone[2]}")
        elif real_run:                              # TCIA itself: not from a test
            download = f"{real_run[2]}/{real_run[1]}.tar.xz"
            script.append(f": needs TCIA, not run: {command}")
        elif check and check[1] == download:
            script.append("python3 tcia_downloader.py --verify demo-out/DEMO.tar.xz")
        elif command == "python3 -m pytest -q":
            script.append("python3 -m pytest -q --collect-only -p no:cacheprovider")
        elif re.fullmatch(r"python3 -m venv (\S+) && \. \1/bin/activate", command) or \
                command in ("python3 -m pip install -r requirements-test.txt",
                            "bash tests/demo.sh demo-out"):
            script.append(command)
        else:
            raise AssertionError(f"the README's quick start has a line this test does not "
                                 f"know how to run: {line!r}; teach it in {__file__}")
    return script


def path_python_version() -> str:
    found = shutil.which("python3")
    if found is None:
        return ""
    return subprocess.run([found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(path_python_version() != "%d.%d" % sys.version_info[:2],
                    reason="the quick start runs the python3 on PATH, whose own run tests it")
def test_the_quick_start_runs_as_written_in_a_fresh_clone(tmp_path):
    script = runnable(quick_start_lines())
    home = tmp_path / "home"
    home.mkdir()
    # A user's shell: no venv of ours, and not CI (where the quick path's skips would fail).
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("VIRTUAL_ENV", "PYTHON")) and key != "CI"}
    env.update(HOME=str(home), TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", "-c", "set -euo pipefail -x\n" + "\n".join(script)],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    clone = tmp_path / "tcia_downloader"
    venv_python = home / "tcia-venv" / "bin" / "python3"
    assert venv_python.exists()
    assert "demo: demo-out/DEMO.tar.xz is whole" in output, output[-3000:]
    assert re.search(r"demo-out/DEMO\.tar\.xz: archive, \d+ series, \d+ files.*: OK", output), \
        output[-3000:]
    assert re.search(r"\d+ tests collected", output) and "error" not in \
        output.split("tests collected")[-1].lower(), output[-3000:]
    assert (clone / "demo-out" / "DEMO.tar.xz").is_file()
