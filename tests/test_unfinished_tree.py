"""A folder tree (--format dir) is visibly unfinished until it is finished (#23, point 6):
its collection folder holds UNFINISHED.txt from before its first series is moved in until its
collection files are written; --verify counts what the journal committed; a rerun finishes
it and the marker goes. A tree of a run before the marker existed is still recognised."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from helpers import (Run, expected_folders, journal_uids, series_folders, start_subprocess,
                     tool_arguments, tree_members, wait_until)
from tcia_dl import cli, errors
from tcia_dl.formats.tree import DirectoryTarget

JOURNAL = "DEMO.journal"


def verify_lines(path: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["--verify", str(path), "--cache_dir", str(path.parent / "vcache")])
    return code, capsys.readouterr().out.splitlines()


def committed_files(output: Path) -> int:
    with sqlite3.connect(f"file:{output / JOURNAL}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM files").fetchone()[0]


def interrupt_after(process: subprocess.Popen, output: Path, journal: str, commits: int) -> None:
    """SIGINT, as Ctrl-C sends it, once the journal has that many series committed."""
    try:
        wait_until(lambda: len(journal_uids(output, journal)) >= commits, 60,
                   f"{commits} commits in {journal}")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == errors.EXIT_SIGINT, stderr


def stopped_tree(tmp_path: Path, fake) -> tuple[Path, Path, set[str]]:
    """A tree run stopped by SIGINT once two series are committed."""
    output, cache = tmp_path / "out", tmp_path / "cache"
    interrupt_after(start_subprocess(fake, output, cache, fmt="dir"), output, JOURNAL, 2)
    committed = journal_uids(output, JOURNAL)
    assert 2 <= len(committed) < len(fake.series("DEMO"))
    return output, cache, committed


def test_a_stopped_tree_says_so_verifies_what_is_committed_and_a_rerun_finishes_it(
        tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=16, conn_bandwidth=60_000)
    output, cache, committed = stopped_tree(tmp_path, fake)
    root = output / "DEMO"
    marker = root / "UNFINISHED.txt"
    assert marker.is_file() and "not finished" in marker.read_text()
    assert not list(root.glob("MD5SUMS*"))

    # --verify counts what the journal committed, on the collection folder or its output
    for where in (root, output):
        code, lines = verify_lines(where, capsys)
        assert code == errors.EXIT_OK, lines
        summary = lines[-1]
        assert f"unfinished folder tree, {len(committed)} series, " \
               f"{committed_files(output)} files" in summary, lines
        assert any(line.startswith("DEMO: not finished (UNFINISHED.txt)") and
                   f"the {len(committed)} series its journal has committed" in line
                   for line in lines), lines

    # a committed file that changed is damage, named by its series
    victim = next(p for p in root.rglob("*.dcm") if not p.name.startswith("."))
    original = victim.read_bytes()
    victim.write_bytes(b"x" + original[1:])
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_INCOMPLETE and "but the journal says" in "\n".join(lines)
    victim.write_bytes(original)

    downloads = {uid: fake.counters.complete_downloads(uid) for uid in committed}
    rerun = start_subprocess(fake, output, cache, fmt="dir")
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == errors.EXIT_OK, stderr
    assert not marker.exists()
    assert {uid: fake.counters.complete_downloads(uid) for uid in committed} == downloads
    assert series_folders({f"DEMO/{k}": v for k, v in tree_members(root).items()}) == \
        expected_folders(fake)
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=root, check=True)
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_OK and ": folder tree, 16 series" in lines[-1], lines


def test_a_stopped_tree_without_a_marker_from_an_earlier_version_is_still_unfinished(
        tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=16, conn_bandwidth=60_000)
    output, cache, committed = stopped_tree(tmp_path, fake)
    marker = output / "DEMO" / "UNFINISHED.txt"
    marker.unlink()                      # as a run before the marker left it
    code, lines = verify_lines(output / "DEMO", capsys)
    assert code == errors.EXIT_OK, lines
    assert f"unfinished folder tree, {len(committed)} series" in lines[-1], lines
    assert any("not finished (no MD5SUMS, and DEMO.journal is not finished)" in line
               for line in lines), lines
    # the next run that opens it marks it at once, before it fetches anything
    target = DirectoryTarget.open("DEMO", output, tmp_path / "scratch", None, "")
    try:
        assert marker.is_file()
    finally:
        target.close()
    rerun = start_subprocess(fake, output, cache, fmt="dir")
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == errors.EXIT_OK, stderr
    assert not marker.exists() and (output / "DEMO" / "MD5SUMS").is_file()


def test_a_finished_tree_has_no_marker_names_its_folder_and_is_recognised(
        tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    first = Run(tmp_path, fake, compression=False)
    assert first.code == errors.EXIT_OK, first.log
    root = first.output / "DEMO"
    assert not list(root.glob("UNFINISHED*"))
    # the report names the tree, not the folder it is in
    assert f"output: {root.resolve()}\n" in first.log, first.log
    # a tree finished before the marker existed looks the same: a rerun leaves it alone
    again = Run(tmp_path, fake, compression=False)
    assert again.code == errors.EXIT_OK and "is finished; nothing to do" in again.log
    assert not list(root.glob("UNFINISHED*"))
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_OK and ": folder tree, " in lines[-1], lines


def test_a_repair_marks_the_tree_unfinished_until_it_is_whole_again(tmp_path,
                                                                    fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    assert Run(tmp_path, fake, compression=False).code == errors.EXIT_OK
    root = tmp_path / "out" / "DEMO"
    victim = next(root.rglob("*.dcm"))
    victim.write_bytes(b"damaged")
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_INCOMPLETE
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    target = DirectoryTarget.open("DEMO", tmp_path / "out", tmp_path / "scratch", None, "")
    try:
        where = victim.parent.relative_to(tmp_path / "out").as_posix()
        target.replace_damaged([uid for uid, folder in target.journal.locations().items()
                                if folder == where])
        assert (root / "UNFINISHED.txt").is_file()      # before any folder is taken out
    finally:
        target.close()
    repair = Run(tmp_path, fake, "--retry-failed", str(manifest), compression=False,
                 collection=None)
    assert repair.code == errors.EXIT_OK, repair.log
    assert not (root / "UNFINISHED.txt").exists()
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_OK, lines


def test_shards_mark_their_own_part_and_verify_counts_the_finished_and_the_committed(
        tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=16, conn_bandwidth=60_000)
    output, cache = tmp_path / "out", tmp_path / "cache"
    first = subprocess.run(tool_arguments_for(fake, output, cache, "0/2"), capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == errors.EXIT_OK, first.stderr
    root = output / "DEMO"
    finished = journal_uids(output, "DEMO.shard-0-of-2.journal")
    process = subprocess.Popen(tool_arguments_for(fake, output, cache, "1/2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    interrupt_after(process, output, "DEMO.shard-1-of-2.journal", 1)
    committed = journal_uids(output, "DEMO.shard-1-of-2.journal")
    assert sorted(p.name for p in root.glob("UNFINISHED*")) == ["UNFINISHED.shard-1-of-2.txt"]
    assert (root / "MD5SUMS.shard-0-of-2").is_file()
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_OK, lines
    assert f"unfinished folder tree, {len(finished) + len(committed)} series" in lines[-1], lines
    assert not any("no journal records yet" in line for line in lines), lines
    # the finished part's collection files are checked too, against its MD5SUMS
    license_file = root / "LICENSE.shard-0-of-2"
    original = license_file.read_bytes()
    license_file.write_bytes(original + b"changed")
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_INCOMPLETE and "LICENSE.shard-0-of-2" in "\n".join(lines), lines
    license_file.write_bytes(original)
    rerun = subprocess.run(tool_arguments_for(fake, output, cache, "1/2"), capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == errors.EXIT_OK, rerun.stderr
    assert not list(root.glob("UNFINISHED*"))
    code, lines = verify_lines(root, capsys)
    assert code == errors.EXIT_OK and ": folder tree, 16 series" in lines[-1], lines


def tool_arguments_for(fake, output: Path, cache: Path, shard: str) -> list[str]:
    return [sys.executable, *tool_arguments(fake, output, cache, "--shard", shard, fmt="dir")]
