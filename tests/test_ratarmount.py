"""ratarmount (PyPI) reads our archives without extracting them (#23, point 10): its
library, ratarmountcore, reads every member of an archive of each format we write, byte for
byte what the codec's own tool and tar give; its index goes where it is told (by default it
lands beside the archive, which --verify and a rerun do not mind); and where FUSE works, a
mount shows the same files. requirements-dev.txt installs ratarmount; the quick path
(requirements-test.txt) does not, and these tests then skip."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Run, standard_tar, wait_until
from tcia_dl import cli, errors

pytest.importorskip("ratarmountcore", reason="ratarmountcore is in requirements-dev.txt")
from ratarmountcore.mountsource.factory import open_mount_source  # noqa: E402


def made_archive(tmp_path: Path, fake, archive_format) -> Path:
    run = Run(tmp_path, fake, fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    return run.output / f"DEMO{archive_format.suffix}"


def files_by_standard_tools(archive: Path) -> dict[str, bytes]:
    """name -> content, as the codec's command line tool and tarfile read the archive."""
    with standard_tar(archive) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()
                if member.isfile()}


def files_through_ratarmountcore(archive: Path, **options) -> dict[str, bytes]:
    """name -> content of every regular file, read through ratarmountcore's index."""
    found: dict[str, bytes] = {}
    with open_mount_source(str(archive), **options) as source:
        folders = ["/"]
        while folders:
            folder = folders.pop()
            for name, info in (source.list(folder) or {}).items():
                path = f"{folder.rstrip('/')}/{name}"
                if stat.S_ISDIR(info.mode):
                    folders.append(path)
                elif stat.S_ISREG(info.mode):
                    with source.open(info) as handle:
                        found[path.lstrip("/")] = handle.read()
    return found


def test_ratarmountcore_reads_every_member_of_each_format_with_its_index_elsewhere(
        tmp_path, fake_nbia, archive_format):
    archive = made_archive(tmp_path, fake_nbia, archive_format)
    expected = files_by_standard_tools(archive)
    assert len(expected) > 20                   # the series' files and the collection files
    index = tmp_path / "indexes" / f"{archive.name}.index.sqlite"
    index.parent.mkdir()
    assert files_through_ratarmountcore(archive, indexFilePath=str(index)) == expected
    assert index.is_file()
    assert not list(archive.parent.glob("*.index.sqlite"))     # nothing beside the archive


def test_by_default_the_index_lands_beside_the_archive_which_our_tools_do_not_mind(
        tmp_path, fake_nbia, archive_format, capsys):
    archive = made_archive(tmp_path, fake_nbia, archive_format)
    expected = files_by_standard_tools(archive)
    assert files_through_ratarmountcore(archive, writeIndex=True) == expected
    beside = archive.with_name(f"{archive.name}.index.sqlite")
    assert beside.is_file()                      # on read-only storage: --index-file
    capsys.readouterr()
    assert cli.main(["--verify", str(archive), "--cache_dir", str(tmp_path / "v")]) == \
        errors.EXIT_OK, capsys.readouterr().out
    rerun = Run(tmp_path, fake_nbia, fmt=archive_format.format_name)
    assert rerun.code == errors.EXIT_OK and "nothing to do" in rerun.log


def fuse_works() -> bool:
    """FUSE can be tried: the device, the setuid helper, and ratarmount's command."""
    if importlib.util.find_spec("ratarmount") is None:
        return False
    return Path("/dev/fuse").exists() and bool(shutil.which("fusermount3") or
                                               shutil.which("fusermount"))


@pytest.mark.skipif(not fuse_works(), reason="no /dev/fuse, fusermount or ratarmount here")
def test_a_fuse_mount_shows_the_same_files(tmp_path, fake_nbia, archive_format):
    archive = made_archive(tmp_path, fake_nbia, archive_format)
    expected = files_by_standard_tools(archive)
    mount = tmp_path / "mnt"
    mount.mkdir()
    index = tmp_path / f"{archive.name}.index.sqlite"
    # The README's command: ratarmount --index-file INDEX ARCHIVE MOUNTPOINT
    subprocess.run([sys.executable, "-m", "ratarmount", "--index-file", str(index), str(archive),
                    str(mount)], check=True, capture_output=True, timeout=60)
    try:
        wait_until(lambda: os.path.ismount(mount), 30, "the mount")
        seen = {str(path.relative_to(mount)): path.read_bytes() for path in mount.rglob("*")
                if path.is_file()}
        assert seen == expected
    finally:
        subprocess.run([sys.executable, "-m", "ratarmount", "-u", str(mount)],
                       capture_output=True, timeout=60)
    assert not os.path.ismount(mount)
