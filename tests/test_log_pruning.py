"""Logs do not pile up (#23, point 8): every invocation writes two logs, and each keeps the
logs of the newest 50 runs and none older than 30 days, in $XDG_CACHE_HOME's folder when no
--cache_dir is given. Only names the tool gives its logs are touched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from helpers import SCRIPT
from tcia_dl import errors
from tcia_dl.logs import LOG_DAYS, LOGS_KEPT

DAY = 86400


def fake_run_logs(logs: Path, when: float) -> str:
    """The two logs an earlier run at `when` left; returns its stamp."""
    stamp = datetime.fromtimestamp(when).strftime("%Y-%m-%d_%H-%M-%S")
    for kind in ("info", "debug"):
        path = logs / f"{stamp}-{kind}.log"
        path.write_text(f"{kind} log of {stamp}\n")
        os.utime(path, (when, when))
    return stamp


def stamps(logs: Path) -> set[str]:
    return {path.name.rsplit("-", 1)[0] for path in logs.glob("*-info.log")}


def invoke(tmp_path: Path) -> None:
    """Any invocation (here a --verify of nothing, exit 2), with no --cache_dir."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, str(SCRIPT), "--verify", str(tmp_path / "nothing")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == errors.EXIT_USAGE, result.stderr


def test_the_newest_runs_logs_stay_in_xdg_cache_home_and_no_more(tmp_path):
    logs = tmp_path / "xdg" / "tcia_downloader" / "logs"
    logs.mkdir(parents=True)
    now = time.time()
    earlier = [fake_run_logs(logs, now - 3600 + 50 * i) for i in range(LOGS_KEPT + 10)]
    mine = logs / "notes.txt"                 # not a name the tool gives a log: it stays
    mine.write_text("mine\n")
    os.utime(mine, (now - 400 * DAY, now - 400 * DAY))
    invoke(tmp_path)
    left = stamps(logs)
    new = left - set(earlier)
    assert len(new) == 1 and len(left) == LOGS_KEPT        # this run's, and the 49 newest
    assert left - new == set(earlier[-(LOGS_KEPT - 1):])
    assert all((logs / f"{stamp}-debug.log").is_file() for stamp in left)
    assert len(list(logs.glob("*.log"))) == 2 * LOGS_KEPT
    assert mine.is_file()
    assert not (tmp_path / "home" / ".cache").exists()     # XDG_CACHE_HOME, not ~/.cache


def test_logs_older_than_30_days_go_even_when_there_are_few(tmp_path):
    logs = tmp_path / "xdg" / "tcia_downloader" / "logs"
    logs.mkdir(parents=True)
    now = time.time()
    recent = {fake_run_logs(logs, now - DAY * days) for days in (0.5, 3, LOG_DAYS - 1)}
    old = {fake_run_logs(logs, now - DAY * days) for days in (LOG_DAYS + 1, 90)}
    invoke(tmp_path)
    left = stamps(logs)
    assert recent <= left and not (old & left)
    assert not [path for stamp in old for path in logs.glob(f"{stamp}-*")]
    assert len(left) == len(recent) + 1
