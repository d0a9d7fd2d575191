"""A big series becomes several independent units (cut between members, compressed on the
idle cores at once) and stays one series: one journal row, read back whole by the standard
tools, tarfile, --verify and --extract (of it alone too), kill-safe in the middle of its
append, and repaired as one series when its first unit is damaged. Every archive format of
the registry; tarstreams.UNIT_TAR_BYTES is lowered so that the fake's series of ~75 kB are
big (its sample series holds a 39 kB member: larger than a unit, it is cut across two;
test_member_cut has members many units long)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading

import pytest

from tcia_dl import cli, errors
from tcia_dl.formats import base as formats_base, codec_of, tarstreams
from helpers import (ROOT, Run, archive_members, expected_folders, extract_series, flip,
                     journal_uids, of_series, series_folders, tool_arguments, tree_members,
                     verify, verify_with_standard_tools, wait_until)

# Two of the fake's 9 kB slices to a unit: four units a series.
SMALL_UNITS = 24_000
# The sample series (49 kB) stays one unit; the others (75 kB) become two.
MIXED_UNITS = 60_000
# 128 kB slices (256 x 256 x 16 bit): each is cut into six units of SMALL_UNITS of tar.
BIG_SLICES = {"image_size": 256, "instances": 3}


def journal_columns(journal) -> set[str]:
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        return {row[1] for row in db.execute("PRAGMA table_info(series)")}


def journal_rows(journal) -> dict[str, tuple[str, int, list[int]]]:
    """uid -> (its folder path, archive_end, unit_ends) of every row."""
    units = "unit_ends" if "unit_ends" in journal_columns(journal) else "NULL"
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        rows = db.execute(f"SELECT uid, path, archive_end, {units} FROM series").fetchall()
    return {uid: (path, end, json.loads(ends) if ends else []) for uid, path, end, ends in rows}


def unit_count(rows: dict[str, tuple[str, int, list[int]]]) -> int:
    return sum(len(ends) + 1 for _, _, ends in rows.values())


def read_back_whole(archive, units: int, fake, tmp_path, capsys) -> dict[str, str]:
    """The archive read whole by its codec's own test, tar -x and md5sum -c, tarfile (xz),
    --verify (OK, its `units` counted) and --extract of everything; its members."""
    verify_with_standard_tools(archive, tmp_path)
    members = archive_members(archive)
    assert series_folders(members) == expected_folders(fake)
    codec = codec_of(archive)
    if codec.name == "xz":                     # tarfile reads .tar.zst only from 3.14 on
        with tarfile.open(archive, "r:xz") as tar:
            assert {m.name for m in tar.getmembers() if m.isfile()} == set(members)

    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines
    assert lines[-1].endswith(": OK") and f"in {units} {codec.name} {codec.unit}s" \
        in lines[-1]

    everything = tmp_path / "everything"
    assert cli.main(["--extract", str(archive), "--output", str(everything),
                     "--cache_dir", str(tmp_path / "cache")]) == errors.EXIT_OK
    assert tree_members(everything) == members
    return members


def split_series(rows: dict[str, tuple[str, int, list[int]]]) -> list[tuple[str, str, int]]:
    """(uid, path, archive_end) of the series of several units, in archive order."""
    return sorted(((uid, path, end) for uid, (path, end, ends) in rows.items() if ends),
                  key=lambda row: row[2])


@pytest.mark.parametrize("unit_bytes", [SMALL_UNITS, MIXED_UNITS])
def test_a_big_series_is_several_units_read_back_whole_and_one_journal_row(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch, unit_bytes):
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", unit_bytes)
    fake = fake_nbia_factory(demo_series=4, instances=8)
    run = Run(tmp_path, fake, fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    archive = run.output / f"DEMO{archive_format.suffix}"
    rows = journal_rows(run.output / f"DEMO{archive_format.suffix}.journal")
    assert set(rows) == {s["SeriesInstanceUID"] for s in fake.series("DEMO")}   # a row each
    assert len(split_series(rows)) == (4 if unit_bytes == SMALL_UNITS else 3)
    spans = archive_format.codec.spans(archive)
    assert len(spans) == unit_count(rows) + 1 > len(rows) + 1         # + the closing unit

    members = read_back_whole(archive, len(spans), fake, tmp_path, capsys)

    uid, path, _ = split_series(rows)[-1]
    wanted = of_series(members, f"DEMO/{path}")
    assert extract_series(archive, uid, tmp_path) == wanted and len(wanted) > 4


def test_a_series_under_the_threshold_stays_one_unit_exactly_as_before(
        tmp_path, fake_nbia_factory, archive_format, monkeypatch):
    """The default threshold: every series of the fake is one unit, packed by the one-unit
    packer on the worker's thread, and the journal has no unit_ends column."""
    fake = fake_nbia_factory(demo_series=3, instances=8)
    made: list[str] = []
    real_packer = tarstreams.TarStreamsTarget.packer

    def packer(self, series, scratch, cores=None):
        packer = real_packer(self, series, scratch, cores)
        made.append(type(packer).__name__)
        return packer
    monkeypatch.setattr(tarstreams.TarStreamsTarget, "packer", packer)
    run = Run(tmp_path, fake, fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    journal = run.output / f"DEMO{archive_format.suffix}.journal"
    assert unit_count(journal_rows(journal)) == len(journal_rows(journal)) == 3
    assert set(made) == {"UnitPacker"}
    assert "unit_ends" not in journal_columns(journal)     # the journal 0.4.0 resumes


class CompressorProbe:
    """Counts the compressors at work at once. The first call waits (at most `wait` s) for
    `want` of them to work together: a packer that would use that many cores shows it
    (the wait can only time out when it does not)."""

    def __init__(self, want: int, wait: float):
        self.want, self.wait = want, wait
        self.active = self.peak = 0
        self.waited = False
        self.changed = threading.Condition()

    def wrap(self, compressor: formats_base.UnitCompressor) -> "ProbedCompressor":
        return ProbedCompressor(self, compressor)

    def enter(self) -> None:
        with self.changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
            if not self.waited:
                self.waited = True
                self.changed.wait_for(lambda: self.active >= self.want, timeout=self.wait)

    def leave(self) -> None:
        with self.changed:
            self.active -= 1


class ProbedCompressor:
    def __init__(self, probe: CompressorProbe, compressor: formats_base.UnitCompressor):
        self._probe, self._compressor = probe, compressor

    def compress(self, data: bytes) -> bytes:
        self._probe.enter()
        try:
            return self._compressor.compress(data)
        finally:
            self._probe.leave()

    def flush(self) -> bytes:
        return self._compressor.flush()


@pytest.mark.parametrize("cores", [1, 2])
def test_a_big_series_compresses_on_the_idle_cores_never_on_more_than_there_are(
        tmp_path, fake_nbia_factory, archive_format, monkeypatch, cores):
    """One worker, so that one series packs at a time: with two cores its units compress
    two at once (the idle core is borrowed); with one, never two."""
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cores))
    probe = CompressorProbe(want=2, wait=10.0 if cores == 2 else 2.0)
    codec_type = type(archive_format.codec)
    real = codec_type.compressor
    monkeypatch.setattr(codec_type, "compressor", lambda self, level: probe.wrap(real(self, level)))
    fake = fake_nbia_factory(demo_series=1, instances=8)     # no member larger than a unit
    run = Run(tmp_path, fake, "--workers", "1", fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    assert probe.peak == cores
    assert series_folders(archive_members(run.output / f"DEMO{archive_format.suffix}")) == \
        expected_folders(fake)


def test_a_series_waiting_for_its_own_core_goes_before_a_borrower():
    cores = formats_base.PackingCores(2)
    got_in = threading.Event()

    def third_series() -> None:
        with cores.own():
            got_in.set()
    with cores.own():
        assert cores.borrow()                            # the idle core, for one unit
        assert not cores.borrow()                        # none left
        thread = threading.Thread(target=third_series)
        thread.start()
        wait_until(lambda: cores._waiting == 1, 30, "a series waiting for a core")
        cores.give_back()                                # the unit ends
        # The core is free, but the waiting series has it before any borrower.
        assert not cores.borrow()
        thread.join()
        assert got_in.is_set()
    assert cores.borrow()
    cores.give_back()


# -- a kill -9 in the middle of a split series' append -----------------------------------

KILLING_RUN = """
import os, signal, sys
sys.path.insert(0, {src!r})
from tcia_dl import cli
from tcia_dl.formats import tarstreams

tarstreams.UNIT_TAR_BYTES = int(sys.argv[1])
where = sys.argv[2]
real_append = tarstreams.TarStreamsTarget._append


def append_then_die(self, prepared):
    # The first split series appended after a commit: its first unit whole (and, "inside",
    # half of its second), on disk, then SIGKILL: the journal never hears of it.
    if where != "never" and prepared.unit_ends and self.journal.committed():
        size = prepared.path.stat().st_size - prepared.offset
        second_end = prepared.unit_ends[1] if len(prepared.unit_ends) > 1 else size
        cut = prepared.unit_ends[0]
        if where == "inside":
            cut += (second_end - cut) // 2
        with open(self.part, "r+b") as out, open(prepared.path, "rb") as units:
            out.seek(self.archive_end)
            units.seek(prepared.offset)
            out.write(units.read(cut))
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_append(self, prepared)


tarstreams.TarStreamsTarget._append = append_then_die
sys.exit(cli.main(sys.argv[3:]))
"""


def run_killing(tmp_path, fake, archive_format, where: str) -> subprocess.CompletedProcess:
    script = tmp_path / "killing_run.py"
    script.write_text(KILLING_RUN.format(src=str(ROOT / "src")))
    arguments = tool_arguments(fake, tmp_path / "out", tmp_path / "cache",
                               fmt=archive_format.format_name)[1:]
    return subprocess.run([sys.executable, str(script), str(SMALL_UNITS), where, *arguments],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=120)


@pytest.mark.parametrize("slices", [{"instances": 8}, BIG_SLICES], ids=["small", "cut"])
@pytest.mark.parametrize("where", ["between_units", "inside"])
def test_a_kill_9_in_a_split_series_append_loses_nothing_and_leaves_no_partial_series(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch, where, slices):
    """small: units cut between members (but the sample series' 39 kB one); cut: every
    slice cut across units, so the kill falls inside a member."""
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=4, **slices)
    reference = Run(tmp_path / "ref", fake, fmt=archive_format.format_name)
    assert reference.code == errors.EXIT_OK, reference.log
    suffix = archive_format.suffix
    expected = archive_members(reference.output / f"DEMO{suffix}")
    fake.counters.reset()

    killed = run_killing(tmp_path, fake, archive_format, where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    output = tmp_path / "out"
    journal = output / f"DEMO{suffix}.journal"
    committed = journal_uids(output, journal.name)
    rows = journal_rows(journal)
    part = output / f"DEMO{suffix}.part"
    committed_end = max(end for _, end, _ in rows.values())
    assert committed and part.stat().st_size > committed_end
    downloads = {uid: fake.counters.complete_downloads(uid) for uid in committed}
    # --verify of what the kill left: the committed series, checked; the rest, a note.
    code, lines = verify(part, capsys)
    assert code == errors.EXIT_OK, lines
    assert any(f"after byte {committed_end}" in line and "a resume cuts them off" in line
               for line in lines), lines
    assert f"{len(committed)} series" in lines[-1]

    resumed = run_killing(tmp_path, fake, archive_format, "never")
    assert resumed.returncode == errors.EXIT_OK, resumed.stderr
    archive = output / f"DEMO{suffix}"
    assert archive_members(archive) == expected
    assert {uid: fake.counters.complete_downloads(uid) for uid in committed} == downloads
    assert {uid: journal_rows(journal)[uid] for uid in committed} == rows   # kept as they were
    final_rows = journal_rows(journal)
    assert len(final_rows) == 4 and \
        len(archive_format.codec.spans(archive)) == unit_count(final_rows) + 1
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines


# -- damage in the first unit of a split series ------------------------------------------

@pytest.mark.parametrize("where", ["inside", "header"])
def test_damage_in_the_first_unit_of_a_split_series_names_it_and_the_repair_mends_it(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch, where):
    """inside: the unit fails its checks; header: its first bytes are gone, so the file's
    units cannot be walked and the journal's (every unit of every series) are read."""
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=4, instances=8)
    assert Run(tmp_path, fake, fmt=archive_format.format_name).code == errors.EXIT_OK
    archive = tmp_path / "out" / f"DEMO{archive_format.suffix}"
    before = archive_members(archive)
    rows = journal_rows(tmp_path / "out" / f"DEMO{archive_format.suffix}.journal")
    uid, path, end = split_series(rows)[1]
    start = max((e for _, e, _ in rows.values() if e < end), default=0)
    first_unit_end = start + rows[uid][2][0]
    flip(archive, (start + first_unit_end) // 2 if where == "inside" else start)

    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE
    assert any(f"(bytes {start}-{first_unit_end}) is damaged" in line and
               f"(series DEMO/{path}, from the journal)" in line for line in lines), lines
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    assert any(line.startswith(f"1 damaged series are listed in {manifest}") for line in lines)
    assert uid in manifest.read_text().split()

    fake.counters.reset()
    repair = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None,
                 compression=False)
    assert repair.code == errors.EXIT_OK, repair.log
    assert archive_members(archive) == before
    assert verify(archive, capsys)[0] == errors.EXIT_OK
    assert fake.counters.complete_downloads(uid) >= 1
    assert not any(fake.counters.complete_downloads(other) for other in rows if other != uid)
    assert not manifest.exists()


@pytest.mark.parametrize("unit_ends", ["[999999999]", "[5, 3]", "not a list"])
def test_a_journal_whose_unit_ends_are_not_ours_is_ignored_not_believed(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch, unit_ends):
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=2, instances=8)
    assert Run(tmp_path, fake, fmt=archive_format.format_name).code == errors.EXIT_OK
    archive = tmp_path / "out" / f"DEMO{archive_format.suffix}"
    journal = tmp_path / "out" / f"DEMO{archive_format.suffix}.journal"
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE series SET unit_ends = ? WHERE unit_ends IS NOT NULL", (unit_ends,))
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines           # the archive alone: its MD5SUMS
    assert any(line.startswith(f"{journal.name} is ignored") for line in lines), lines
