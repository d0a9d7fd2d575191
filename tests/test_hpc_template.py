"""tcia_downloader_hpc.sh run as a plain script, on a machine without slurm."""

from __future__ import annotations

import signal
import subprocess

from tcia_dl import errors
from helpers import (TEMPLATE, archive_members, expected_folders, journal_uids,
                     series_folders, template_env, verify_with_standard_tools, wait_until)

def test_the_template_runs_without_slurm(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    result = subprocess.run(["bash", str(TEMPLATE), "--api-url", fake.url],
                            env=template_env(tmp_path), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=120)
    assert result.returncode == errors.EXIT_OK, result.stdout + result.stderr
    archive = tmp_path / "out" / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    verify_with_standard_tools(archive, tmp_path)
    assert "job none" in result.stdout and "exited with 0" in result.stdout
    assert "requeue" not in result.stdout


def test_the_template_passes_sigusr1_on_and_exits_75_without_requeue(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=8, conn_bandwidth=20_000)
    process = subprocess.Popen(["bash", str(TEMPLATE), "--api-url", fake.url],
                               env=template_env(tmp_path, WORKERS="2", STOP_GRACE="30"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, cwd=tmp_path)
    wait_until(lambda: len(journal_uids(tmp_path / "out")) >= 1, 60, "a first commit")
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == errors.EXIT_CHECKPOINT, output
    assert "starting no new series" in output
    assert "requeue" not in output                      # no slurm job to requeue
    assert 1 <= len(journal_uids(tmp_path / "out")) < 8


def test_a_warning_before_python_is_ready_still_counts_as_a_checkpoint(tmp_path):
    """The downloader stand-in dies of SIGUSR1 at once, as Python does before it has set
    its handler; the template must report a checkpoint (75), not a crash."""
    stand_in = tmp_path / "tcia_downloader.py"
    stand_in.write_text("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\n"
                        "signal.pause()\n")
    env = template_env(tmp_path, TCIA_DOWNLOADER=str(stand_in))
    # the stand-in skips the requirements check only if they are importable: they are here
    result = subprocess.run(["bash", str(TEMPLATE)], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=60)
    assert result.returncode == errors.EXIT_CHECKPOINT, result.stdout + result.stderr


def test_the_template_says_how_to_install_what_is_missing(tmp_path):
    fake_python = tmp_path / "python-without-packages"
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    result = subprocess.run(["bash", str(TEMPLATE)],
                            env=template_env(tmp_path, PYTHON=str(fake_python)),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "pip install -r" in result.stderr and "requirements.txt" in result.stderr


def test_extra_flags_pass_through_and_a_manifest_replaces_the_collection(tmp_path,
                                                                         fake_nbia_factory):
    fake = fake_nbia_factory()
    uids = [s["SeriesInstanceUID"] for s in fake.series("DEMO")][:2]
    manifest = tmp_path / "x.tcia"
    manifest.write_text("databasketId=x.tcia\nListOfSeriesToDownload=\n" + "\n".join(uids) + "\n")
    result = subprocess.run(["bash", str(TEMPLATE), "--manifest", str(manifest), "--api-url",
                             fake.url], env=template_env(tmp_path), capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=120)
    assert result.returncode == errors.EXIT_OK, result.stdout + result.stderr
    assert journal_uids(tmp_path / "out", "x.tar.xz.journal") == set(uids)
