"""dist/tcia_downloader.pyz (tools/build_pyz.py) run the way a user runs it: one file, on a
Python with nothing installed, against tests/fakes/fake_nbia.py.

The .pyz comes from the `pyz` fixture (conftest.py: TCIA_PYZ, or built once). The tool runs
through TCIA_PYZ_PYTHON when it is set: CI points it at a bare venv of 3.9 and of 3.13
(`python3.9 -m venv --without-pip DIR`), with no packages at all. Without it, the Python
running the tests runs the .pyz with -S, so that none of this venv's packages is on its path:
what the tool imports, the .pyz must bring. The fake server and the checks run here, in the
test venv. Every run extracts to a SHIV_ROOT of the tests' own, never to ~/.shiv. The kill
campaign through the .pyz is in test_kill_campaign.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tcia_dl import __version__, errors as errors_module
from helpers import (TEMPLATE, archive_members, expected_folders, old_pythons, run_pyz,
                     series_folders, template_env, tool_arguments, verify_with_standard_tools)


def test_the_pyz_extracts_once_and_says_its_version(pyz, tmp_path):
    root = tmp_path / "shiv-root"                 # empty: the first run extracts
    for _ in range(2):
        result = run_pyz(pyz, root, "--version", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.split()[-1] == __version__, result.stdout
    extracted = list(root.glob("tcia_downloader.pyz_*/site-packages"))
    assert len(extracted) == 1, list(root.iterdir())
    assert (extracted[0] / "tcia_dl" / "cli.py").is_file()
    assert (extracted[0] / "pydicom" / "data" / "urls.json").is_file()   # read by path


def test_a_collection_becomes_one_verified_archive_through_the_pyz(pyz, shiv_root, tmp_path,
                                                                   fake_nbia_factory):
    fake = fake_nbia_factory()
    argv = tool_arguments(fake, tmp_path / "out", tmp_path / "cache")[1:]   # without SCRIPT
    result = run_pyz(pyz, shiv_root, *argv, cwd=tmp_path)
    assert result.returncode == errors_module.EXIT_OK, result.stderr[-3000:]
    archive = tmp_path / "out" / "DEMO.tar.xz"
    members = archive_members(archive)
    assert series_folders(members) == expected_folders(fake)
    assert {"DEMO/LICENSE", "DEMO/metadata.csv", "DEMO/MD5SUMS"} <= set(members)
    verify_with_standard_tools(archive, tmp_path)
    assert "damaged" not in result.stderr and "Traceback" not in result.stderr


def test_an_old_python_gets_one_line_from_the_pyz_too(pyz, shiv_root, tmp_path):
    for python in old_pythons():
        result = run_pyz(pyz, shiv_root, "--collection", "X", cwd=tmp_path, python=[str(python)])
        assert result.returncode == errors_module.EXIT_USAGE, (python, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs Python 3.9 or newer" in lines[0], (python, lines)


def test_idc_without_duckdb_is_one_line_saying_what_to_install(pyz, shiv_root, tmp_path):
    """duckdb is compiled: the .pyz cannot carry it, and the interpreter here has none."""
    result = run_pyz(pyz, shiv_root, "--collection", "X", "--mode", "idc", "--output",
                     str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
                     "--no-progress", cwd=tmp_path)
    assert result.returncode == errors_module.EXIT_USAGE, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs duckdb" in lines[0], lines
    assert "pip install" in lines[0]


def test_the_sbatch_template_runs_the_pyz_beside_it(pyz, tmp_path, fake_nbia_factory):
    """A folder holding only the template and the .pyz, and a Python with no packages: the
    template runs the .pyz (no requirements check), which unpacks under CACHE_DIR."""
    python = os.environ.get("TCIA_PYZ_PYTHON")
    if not python:
        bare = tmp_path / "bare-venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
        python = str(bare / "bin" / "python")
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(TEMPLATE, job / TEMPLATE.name)
    shutil.copy(pyz, job / "tcia_downloader.pyz")
    fake = fake_nbia_factory()
    env = template_env(tmp_path, PYTHON=python)
    for name in ("SHIV_ROOT", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(job / TEMPLATE.name), "--api-url", fake.url], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == errors_module.EXIT_OK, result.stdout + result.stderr
    assert "tcia_downloader.pyz exited with 0" in result.stdout
    archive = tmp_path / "out" / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    assert list((tmp_path / "cache" / "pyz").glob("tcia_downloader.pyz_*/site-packages/tcia_dl"))
