"""A big NBIA series is verified and packed while its zip arrives (sources/zipstream.py,
nbia.verify_arriving_zip): the zip read front to back gives exactly zipfile's entries, a
zip it cannot read that way (or a bad one) goes to verify_zip once complete, and a run that
streams makes the same archive, packing before the download has ended."""

from __future__ import annotations

import io
import struct
import threading
import zipfile
import zlib

import pytest

from tcia_dl import errors
from tcia_dl.formats import base as formats_base
from tcia_dl.errors import NotStreamable, SeriesAttemptAbandoned, TransientError
from tcia_dl.sources import nbia, zipstream
from tcia_dl.sources.zipstream import GrowingFile, zip_entries
from helpers import Run, archive_members, expected_folders, series_folders, verify

ENTRIES = {"LICENSE": b"License Information.\n", "1-01.dcm": bytes(range(256)) * 4000,
           "empty.dcm": b"", "1-02.dcm": b"\x00" * 3_000_000, "md5hashes.csv": b"a,b\n"}


class Unseekable(io.RawIOBase):
    """What zipfile writes to a servlet stream: no tell, so data descriptors (as Java's
    ZipOutputStream writes, and NBIA sends)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def zip_of(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, seekable: bool = False,
           zip64: bool = False) -> bytes:
    out = io.BytesIO() if seekable else Unseekable()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in entries.items():
            if zip64:
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                with archive.open(info, "w", force_zip64=True) as entry:
                    entry.write(data)
            else:
                archive.writestr(name, data)
    return bytes(out.getvalue() if seekable else out.data)


def reader_of(data: bytes, step: int):
    """read(n) over data, at most step bytes a call: a zip that arrives in small pieces."""
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        piece = data[position:position + min(n, step)]
        position += len(piece)
        return piece
    return read


@pytest.mark.parametrize("method,seekable,zip64", [
    (zipfile.ZIP_DEFLATED, False, False),     # NBIA's: deflate with data descriptors
    (zipfile.ZIP_DEFLATED, True, False),      # sizes in the local headers
    (zipfile.ZIP_STORED, True, False),
    (zipfile.ZIP_DEFLATED, False, True),      # zip64 local headers and descriptors
])
@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_the_entries_read_front_to_back_are_zipfiles(method, seekable, zip64, step):
    if step == 1 and len(ENTRIES["1-02.dcm"]) > 100_000:
        entries = {**ENTRIES, "1-02.dcm": b"\x00" * 100_000}   # byte by byte, kept short
    else:
        entries = ENTRIES
    data = zip_of(entries, method, seekable, zip64)
    streamed = list(zip_entries(reader_of(data, step), 64 << 20))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        expected = [(i.filename, archive.read(i), i.CRC) for i in archive.infolist()]
    assert [(e.name, e.data, e.crc) for e in streamed] == expected


def test_a_zip64_extra_field_with_zero_sizes_means_an_8_byte_descriptor():
    """As Python 3.9's zipfile writes a zip64 entry to a stream (3.12 puts 0xFFFFFFFF in
    the header instead): the sizes are in the descriptor, 8 bytes each."""
    content = b"License Information.\n" * 50
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    packed = packer.compress(content) + packer.flush()
    extra = struct.pack("<2H2Q", 1, 16, 0, 0)
    header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0x8, 8, 0, 33, 0, 0, 0, 7, len(extra))
    descriptor = struct.pack("<4sL2Q", b"PK\x07\x08", zlib.crc32(content), len(packed),
                             len(content))
    data = header + b"LICENSE" + extra + packed + descriptor + zipstream.CENTRAL_HEADER
    entries = list(zip_entries(reader_of(data, 5), 64 << 20))
    assert [(e.name, e.data) for e in entries] == [("LICENSE", content)]


def test_a_stored_entry_with_a_data_descriptor_is_not_streamable():
    data = zip_of(ENTRIES, zipfile.ZIP_STORED, seekable=False)
    with pytest.raises(NotStreamable, match="data descriptor"):
        list(zip_entries(reader_of(data, 1 << 20), 64 << 20))


def test_an_entry_larger_than_is_held_whole_is_not_streamable():
    data = zip_of(ENTRIES)
    with pytest.raises(NotStreamable, match="more than"):
        list(zip_entries(reader_of(data, 1 << 20), 1_000_000))


@pytest.mark.parametrize("where", ["deflate data", "crc"])
def test_a_damaged_entry_is_not_streamable_never_a_wrong_entry(where):
    data = bytearray(zip_of(ENTRIES))
    start = data.index(b"1-01.dcm") + len("1-01.dcm")
    if where == "deflate data":
        data[start + 40] ^= 0xFF
    else:                                      # the descriptor's CRC after the entry
        at = data.index(zipstream.DESCRIPTOR, start) + 4
        data[at] ^= 0xFF
    with pytest.raises(NotStreamable):
        list(zip_entries(reader_of(bytes(data), 1 << 20), 64 << 20))


def test_a_cut_zip_is_not_streamable():
    data = zip_of(ENTRIES)
    with pytest.raises(NotStreamable, match="ends"):
        list(zip_entries(reader_of(data[:len(data) // 2], 1 << 20), 64 << 20))


# -- the growing scratch file ---------------------------------------------------------------

def test_the_reader_has_an_entry_before_the_download_has_written_the_rest(tmp_path):
    data = zip_of(ENTRIES)
    first_entry_end = data.index(b"PK\x03\x04", 10)       # the second local header
    path = tmp_path / "series.zip"
    growing = GrowingFile(path)
    first_read = threading.Event()
    outcome: dict[str, object] = {}

    def download() -> None:
        with open(path, "wb") as out:
            out.write(data[:first_entry_end + 4])
            out.flush()
            growing.grew(first_entry_end + 4)
            # The rest only once the reader has had the first entry: a reader that waited
            # for the whole file would leave this waiting, and the test would fail.
            outcome["reader had it first"] = first_read.wait(timeout=30)
            out.write(data[first_entry_end + 4:])
            out.flush()
            growing.grew(len(data) - first_entry_end - 4)
        growing.ended(None)

    thread = threading.Thread(target=download)
    thread.start()
    names = []
    for entry in zip_entries(growing.read, 64 << 20):
        names.append(entry.name)
        first_read.set()
    thread.join()
    growing.close()
    assert outcome["reader had it first"]
    assert names == list(ENTRIES)


def test_a_failed_download_fails_the_reader_and_an_abandoned_one_stops(tmp_path):
    path = tmp_path / "series.zip"
    path.write_bytes(b"PK\x03\x04")
    growing = GrowingFile(path)
    growing.grew(4)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(growing.read(100)), daemon=True)
    reader.start()
    reader.join(timeout=30)              # what is written is read before the download ends
    assert got == [b"PK\x03\x04"]
    growing.ended(TransientError("connection reset"))
    with pytest.raises(TransientError, match="reset"):
        growing.read(100)
    with pytest.raises(TransientError, match="reset"):
        growing.wait_for_end()

    other = GrowingFile(path)
    other.abandon()
    with pytest.raises(SeriesAttemptAbandoned):
        other.grew(1)


# -- a run ----------------------------------------------------------------------------------

class Watch:
    """Counts the series verified while they arrived, the zips verify_zip judged, and
    whether a packer had a file of each streamed series before its download ended."""

    def __init__(self, monkeypatch):
        self.streamed = 0
        self.whole = 0
        self.held = 0               # downloads held after their second HTTP chunk
        self.packed_before_the_end = 0
        self.lock = threading.Lock()
        real_arriving, real_whole = nbia.verify_arriving_zip, nbia.verify_zip

        def arriving(growing, series, sink, stop, series_hash):
            first = threading.Event()
            real_add = sink.add

            def add(name, size, chunks):
                real_add(name, size, chunks)
                first.set()
            real_grew = growing.grew
            seen = {"chunks": 0}

            def grew(n):
                real_grew(n)
                seen["chunks"] += 1
                if seen["chunks"] == 2:
                    # Hold the download after its second HTTP chunk until a file is packed:
                    # only packing during the download lets it go on in time.
                    packed = first.wait(timeout=30)
                    with self.lock:
                        self.held += 1
                        self.packed_before_the_end += packed
            growing.grew = grew
            sink.add = add
            verified = real_arriving(growing, series, sink, stop, series_hash)
            with self.lock:
                self.streamed += 1
            return verified

        def whole(*args, **kwargs):
            with self.lock:
                self.whole += 1
            return real_whole(*args, **kwargs)
        monkeypatch.setattr(nbia, "verify_arriving_zip", arriving)
        monkeypatch.setattr(nbia, "verify_zip", whole)


def test_a_run_that_streams_every_series_makes_the_same_archive(
        tmp_path, fake_nbia_factory, archive_format, capsys, monkeypatch):
    # 32 kB slices: a zip of several of the fake's 32 KiB HTTP chunks
    fake = fake_nbia_factory(demo_series=4, instances=12, image_size=128, include_md5="honour")
    plain = Run(tmp_path, fake, fmt=archive_format.format_name, name="plain",
                output=tmp_path / "plain")
    assert plain.code == errors.EXIT_OK, plain.log
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)          # every series is big
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake, "--workers", "1", fmt=archive_format.format_name)
    assert run.code == errors.EXIT_OK, run.log
    assert watch.streamed == 4 and watch.whole == 0
    # The sample series' zip (49 kB of pydicom's files) may come in one piece; the others
    # never do.
    assert watch.packed_before_the_end == watch.held >= 3
    archive = run.output / f"DEMO{archive_format.suffix}"
    assert archive_members(archive) == archive_members(plain.output / archive.name)
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines
    assert not list((tmp_path / "out").glob("**/*.units"))


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_a_zip_only_verify_zip_may_judge_goes_to_it_and_is_downloaded_again(
        tmp_path, fake_nbia_factory, monkeypatch, capsys, fault):
    """A mismatching file, or a zip without its central directory: the streamed work is
    thrown away, verify_zip judges the complete zip as it always did, the series is
    downloaded again, and the archive is whole."""
    fake = fake_nbia_factory(demo_series=3, instances=6, include_md5="honour",
                             faults={fault: 0.5})
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake, "--workers", "1", "--retries", "10")
    assert run.code == errors.EXIT_OK, run.log
    assert watch.whole >= 1
    assert ("MD5 mismatch" if fault == "corrupt" else "truncated") in run.log
    archive = run.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines


@pytest.mark.parametrize("nasty", ["contaminate", "junk"])
def test_files_that_are_not_the_series_are_dropped_while_streaming_as_verify_zip_drops_them(
        tmp_path, fake_nbia_factory, monkeypatch, nasty):
    """contaminate: another series' file, which md5hashes.csv does not list; junk: a file
    that is not DICOM, which it lists. Both are dropped, and the archive is what a run
    without streaming makes."""
    fake = fake_nbia_factory(demo_series=2, instances=6, include_md5="honour", nasty={nasty})
    plain = Run(tmp_path, fake, name="plain", output=tmp_path / "plain")
    assert plain.code == errors.EXIT_OK, plain.log
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake, "--workers", "1")
    assert run.code == errors.EXIT_OK, run.log
    assert (watch.whole, watch.streamed) == (0, 2)
    assert archive_members(run.output / "DEMO.tar.xz") == \
        archive_members(plain.output / "DEMO.tar.xz")
    assert dropped_line(run.log) == dropped_line(plain.log) != "files dropped (not the series'): 0"


def dropped_line(log: str) -> str:
    return next(line.split("INFO", 1)[1].strip() for line in log.splitlines()
                if "files dropped" in line)


def test_with_no_idle_core_a_series_downloads_first_once(tmp_path, fake_nbia_factory,
                                                         monkeypatch):
    fake = fake_nbia_factory(demo_series=3, instances=6, include_md5="honour")
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)
    monkeypatch.setattr(formats_base.PackingCores, "borrow", lambda self: False)
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    assert (watch.whole, watch.streamed) == (3, 0)
    assert fake.counters.requests("getImage") == 3
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)


def test_zips_without_md5_table_stream_too_judged_by_the_series_hash(
        tmp_path, fake_nbia_factory, monkeypatch, capsys):
    """A server that ignores IncludeMD5: each zip is judged as a whole by getMD5Hierarchy's
    hash once it has arrived, as verify_zip judges it, with one download a series."""
    fake = fake_nbia_factory(demo_series=3, instances=6, include_md5="ignore")
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake, "--workers", "1")
    assert run.code == errors.EXIT_OK, run.log
    assert (watch.whole, watch.streamed) == (0, 3)
    assert fake.counters.requests("getImage") == 3
    assert fake.counters.requests("getImageWithMD5Hash") == 0
    assert "ignores IncludeMD5=Yes" in run.log
    archive = run.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines


def test_series_hashes_of_another_formula_send_the_series_to_getimagewithmd5hash(
        tmp_path, fake_nbia_factory, monkeypatch):
    fake = fake_nbia_factory(demo_series=3, instances=6, include_md5="ignore",
                             md5_hierarchy="other")
    monkeypatch.setattr(nbia, "STREAM_FROM", 1)
    watch = Watch(monkeypatch)
    run = Run(tmp_path, fake, "--workers", "1")
    assert run.code == errors.EXIT_OK, run.log
    assert "using getImageWithMD5Hash for the rest of the run" in run.log
    # A zip its series hash does not verify is judged by verify_zip and downloaded again
    # with md5hashes.csv; once the run has switched, every series comes from there.
    first, then = fake.counters.requests("getImage"), fake.counters.requests("getImageWithMD5Hash")
    assert 1 <= first <= 3 and then == 3 and watch.whole >= 1
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
