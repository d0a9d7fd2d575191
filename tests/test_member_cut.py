"""A member larger than a unit is cut inside (issues 20, 21): a series of a few big files
is many units compressed on all the cores it can borrow, one journal row, and every reader
follows a member from unit to unit: the standard tools, tarfile, --verify, --extract (of
that series alone too, and without a journal), damage in a unit that goes on with a member
(a kill -9 in the middle of its append: test_big_series). tarstreams.UNIT_TAR_BYTES is
lowered (as in test_big_series) and the fake's slices made 128 kB, so that each slice is
several units."""

from __future__ import annotations

import io
import lzma
import subprocess
import tarfile

import pytest

from tcia_dl import errors
from tcia_dl.formats import base as formats_base, tarstreams
from tcia_dl.formats.xz import XZ
from helpers import Run, archive_members, extract_series, flip, of_series, verify
from test_big_series import (BIG_SLICES, SMALL_UNITS, CompressorProbe, journal_rows,
                             read_back_whole, unit_count)


def units_inside_members(codec, archive) -> int:
    """How many units of the archive start inside a member (not with a tar header)."""
    heads = [codec.head(archive, start, end, tarstreams.TAR_BLOCK)[0]
             for start, end in codec.spans(archive)]
    return sum(1 for head in heads if not tarstreams.begins_member(head))


def test_a_member_larger_than_a_unit_is_cut_into_units_and_read_back_whole(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch):
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=2, **BIG_SLICES)
    run = Run(tmp_path, fake, fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    codec = archive_format.codec
    archive = run.output / f"DEMO{archive_format.suffix}"
    rows = journal_rows(run.output / f"DEMO{archive_format.suffix}.journal")
    sizes = {s["SeriesInstanceUID"]: int(s["FileSize"]) for s in fake.series("DEMO")}
    assert set(rows) == set(sizes)                                   # one row a series
    for uid, (_, _, ends) in rows.items():          # every unit of at most SMALL_UNITS tar
        assert len(ends) + 1 >= sizes[uid] // SMALL_UNITS, (uid, ends)
    assert max(len(ends) + 1 for _, _, ends in rows.values()) >= 3 * 5    # 3 slices
    spans = codec.spans(archive)
    assert len(spans) == unit_count(rows) + 1                        # + the closing unit
    assert units_inside_members(codec, archive) >= len(spans) // 2

    members = read_back_whole(archive, len(spans), fake, tmp_path, capsys)

    uid, (path, _, _) = max(rows.items(), key=lambda row: row[1][1])    # the last series
    wanted = of_series(members, f"DEMO/{path}")
    assert extract_series(archive, uid, tmp_path) == wanted and len(wanted) > 3


def test_without_its_journal_the_archive_still_verifies_and_extracts_a_series(
        tmp_path, fake_nbia_factory, capsys, monkeypatch):
    """No journal says where a series' units are: a unit that does not start with a header
    is read by the one before it, and --extract maps it to that one's series."""
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=2, **BIG_SLICES)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    rows = journal_rows(tmp_path / "out" / "DEMO.tar.xz.journal")
    (tmp_path / "out" / "DEMO.tar.xz.journal").unlink()
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines
    members = archive_members(archive)
    uid, (path, _, _) = min(rows.items(), key=lambda row: row[1][1])    # the first series
    assert extract_series(archive, uid, tmp_path) == of_series(members, f"DEMO/{path}")


@pytest.mark.parametrize("cores", [1, 2])
def test_the_units_of_one_member_compress_on_the_idle_cores(tmp_path, cores):
    """One file of 24 units: with a second core idle, two of its units compress at once;
    with one core, never two. The units, decompressed one after the other, are its tar."""
    body = bytes(range(256)) * 4096 + lzma.compress(bytes(1 << 20))     # 1 MiB + a bit
    counter = CompressorProbe(want=2, wait=20.0 if cores == 2 else 2.0)
    shared = formats_base.PackingCores(cores)
    scratch = tmp_path / "series.part"
    scratch.write_bytes(b"")
    packer = tarstreams.SplitPacker(scratch, lambda: counter.wrap(XZ.compressor(1)), "S/",
                                    tmp_path, 48 << 10, shared)
    with shared.own():
        packer.add("slide.svs", len(body), iter([body[i:i + 65536]
                                                 for i in range(0, len(body), 65536)]))
        prepared = packer.finish()
    assert counter.peak == packer.most_units_at_once == cores
    assert len(prepared.unit_ends) + 1 >= len(body) // (48 << 10)
    tar = lzma.decompress(scratch.read_bytes()) + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert archive.extractfile("S/slide.svs").read() == body
    subprocess.run(["xz", "-t", str(scratch)], check=True)


def test_a_member_is_never_cut_where_its_next_block_would_pass_for_a_header(tmp_path):
    """A tar inside a file (nothing but headers of empty files: every block passes for a
    header) gives no place to cut until its end-of-archive blocks: the unit grows past its
    size rather than start with a block a reader would take for a member."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as nested:
        for number in range(64):
            nested.addfile(tarfile.TarInfo(f"empty-{number}"))
    body = inner.getvalue()
    scratch = tmp_path / "series.part"
    scratch.write_bytes(b"")
    packer = tarstreams.SplitPacker(scratch, lambda: XZ.compressor(1), "S/", tmp_path,
                                    4096, None)
    packer.add("inner.tar", len(body), iter([body]))
    packer.add("after", 3, iter([b"abc"]))
    prepared = packer.finish()
    starts = [0, *prepared.unit_ends]
    data = scratch.read_bytes()
    heads = [lzma.decompress(data[start:end])[:512]
             for start, end in zip(starts, [*prepared.unit_ends, len(data)])]
    # the first unit holds the 64 headers (32 kB of tar, a unit is 4 kB): cut in the zeros
    assert len(heads) >= 2 and tarstreams.begins_member(heads[0])
    assert not any(tarstreams.begins_member(head) for head in heads[1:-1])
    tar = lzma.decompress(data) + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert archive.extractfile("S/inner.tar").read() == body
        assert archive.extractfile("S/after").read() == b"abc"


def test_damage_in_a_unit_inside_a_member_names_its_series_and_the_repair_mends_it(
        tmp_path, fake_nbia_factory, capsys, monkeypatch):
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=3, **BIG_SLICES)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    before = archive_members(archive)
    rows = journal_rows(tmp_path / "out" / "DEMO.tar.xz.journal")
    after_first = sorted(rows.items(), key=lambda row: row[1][1])[1:]
    uid, (path, end, ends) = max(after_first, key=lambda row: len(row[1][2]))  # a 396 kB one
    start = max(e for _, e, _ in rows.values() if e < end)
    unit_start, unit_end = start + ends[2], start + ends[3]          # its fourth unit
    flip(archive, (unit_start + unit_end) // 2)

    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    assert any(f"(bytes {unit_start}-{unit_end}) is damaged" in line and
               f"(series DEMO/{path}, from the journal)" in line for line in lines), lines
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    assert any(line.startswith(f"1 damaged series are listed in {manifest}") for line in lines)
    assert uid in manifest.read_text().split()
    assert Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None,
               compression=False).code == errors.EXIT_OK
    assert archive_members(archive) == before
    assert verify(archive, capsys)[0] == errors.EXIT_OK


def test_a_unit_that_goes_on_with_a_member_no_unit_before_it_holds_is_damage(
        tmp_path, fake_nbia_factory, capsys, monkeypatch):
    """The first unit of a cut member taken out (and the journal, which would say so):
    the units after it start inside a member whose header is gone."""
    monkeypatch.setattr(tarstreams, "UNIT_TAR_BYTES", SMALL_UNITS)
    fake = fake_nbia_factory(demo_series=1, **BIG_SLICES)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    journal = tmp_path / "out" / "DEMO.tar.xz.journal"
    (_, _, ends), = journal_rows(journal).values()
    journal.unlink()
    data = archive.read_bytes()
    archive.write_bytes(data[ends[0]:])
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE
    size = ends[1] - ends[0]
    assert any(f"stream 1 (bytes 0-{size}) is damaged: it does not start with a tar "
               "header, and no stream before it ends inside a member" in line
               for line in lines), lines
