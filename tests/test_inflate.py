"""tcia_dl.inflate: zip entries inflated by python-isal (the "fast" extra) or zlib, with the
same checks zipfile makes: the same bytes, and damage of every kind refused, by both."""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from tcia_dl import inflate
from tcia_dl.errors import TransientError
from tcia_dl.plan import PlannedSeries
from tcia_dl.sources.nbia import verify_zip

BACKENDS = inflate.available_deflates()


@pytest.fixture(params=BACKENDS, ids=[b.name.split()[0] for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> inflate.Deflate:
    return request.param


def test_isal_is_the_one_used_when_installed() -> None:
    """CI installs the extra (requirements-dev.txt): there the fast path is what runs."""
    assert BACKENDS[-1].name.startswith("zlib")
    if importlib.util.find_spec("isal") is not None:
        assert inflate.FASTEST.name.startswith("python-isal")
        assert len(BACKENDS) == 2
    else:
        assert inflate.FASTEST == BACKENDS[-1]


def contents() -> dict[str, bytes]:
    random = os.urandom(5 << 19)            # 2.5 MiB that do not deflate: 3 raw reads
    return {"a.dcm": b"DICM" * 5_000, "empty.dcm": b"", "noise.dcm": random,
            "dir/b.dcm": bytes(range(256)) * 9_000, "ünïcode.dcm": b"x" * 1000}


def write_zip(path: Path, files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(path, "w", method, compresslevel=1) as z:
        for name, data in files.items():
            z.writestr(name, data)


@pytest.mark.parametrize("size", [7, 65536, 1 << 20, -1])
def test_reads_what_zipfile_reads(tmp_path: Path, backend: inflate.Deflate, size: int) -> None:
    files = contents()
    write_zip(tmp_path / "s.zip", files)
    with zipfile.ZipFile(tmp_path / "s.zip") as archive, open(tmp_path / "s.zip", "rb") as raw:
        for info in archive.infolist():
            if size == 7 and info.filename == "noise.dcm":
                continue                   # 370,000 calls: the small reads of the others do
            with inflate.open_entry(archive, raw, info, inflate.entry_ends(archive), backend) as entry:
                assert isinstance(entry, inflate.InflatedEntry)
                got = bytearray()
                while True:
                    part = entry.read(size)
                    if size > 0:   # n bytes unless the entry ends: as zipfile's reader
                        assert len(part) == min(size, len(files[info.filename]) - len(got))
                    if not part:
                        break
                    got += part
            assert bytes(got) == files[info.filename] == archive.read(info)


def test_stored_entries_are_zipfiles_to_read(tmp_path: Path) -> None:
    write_zip(tmp_path / "s.zip", {"a.dcm": b"stored" * 10}, zipfile.ZIP_STORED)
    with zipfile.ZipFile(tmp_path / "s.zip") as archive, open(tmp_path / "s.zip", "rb") as raw:
        entry = inflate.open_entry(archive, raw, archive.infolist()[0], {})
        assert isinstance(entry, zipfile.ZipExtFile)
        assert entry.read() == b"stored" * 10


def entry_of(packed: bytes, *, size: int, crc: int, backend: inflate.Deflate,
             compress_size: "int | None" = None) -> inflate.InflatedEntry:
    """An entry whose directory says size, crc and compress_size, over the bytes packed."""
    info = zipfile.ZipInfo("e.dcm")
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size, info.CRC = size, crc
    info.compress_size = len(packed) if compress_size is None else compress_size
    return inflate.InflatedEntry(io.BytesIO(packed), info, backend)


def deflated(data: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


DATA = bytes(range(256)) * 4000


def read_all(entry: inflate.InflatedEntry) -> bytes:
    return b"".join(iter(lambda: entry.read(65536), b""))


def test_a_good_entry_reads_whole(backend: inflate.Deflate) -> None:
    assert read_all(entry_of(deflated(DATA), size=len(DATA), crc=zlib.crc32(DATA),
                             backend=backend)) == DATA


@pytest.mark.parametrize("damage, why", [
    ("crc", "Bad CRC-32"),
    ("size larger", "fewer than its size"),
    ("size smaller", "more content than its size"),
    ("bytes after the stream", "ends before its compressed size"),
    ("truncated", "deflate stream ends before its end"),
    ("garbled", "damaged deflate data"),
])
def test_damage_is_a_bad_zip(backend: inflate.Deflate, damage: str, why: str) -> None:
    packed, size, crc, compress_size = deflated(DATA), len(DATA), zlib.crc32(DATA), None
    if damage == "crc":
        crc ^= 1
    elif damage == "size larger":
        size += 1
    elif damage == "size smaller":
        size -= 1
    elif damage == "bytes after the stream":
        packed += b"\0" * 10
    elif damage == "truncated":
        packed = packed[:len(packed) // 2]
    elif damage == "garbled":
        packed = b"\xff" * 8 + packed[8:]
    entry = entry_of(packed, size=size, crc=crc, backend=backend, compress_size=compress_size)
    with pytest.raises(zipfile.BadZipFile, match=why):
        read_all(entry)


def test_never_reads_past_the_compressed_size(backend: inflate.Deflate) -> None:
    """The raw bytes after the entry (the next entry, the directory) are never read."""
    packed = deflated(DATA)
    raw = io.BytesIO(packed + b"NEXT ENTRY")
    info = zipfile.ZipInfo("e.dcm")
    info.compress_type, info.compress_size = zipfile.ZIP_DEFLATED, len(packed)
    info.file_size, info.CRC = len(DATA), zlib.crc32(DATA)
    assert read_all(inflate.InflatedEntry(raw, info, backend)) == DATA
    assert raw.tell() == len(packed)


def test_a_bomb_stops_at_its_declared_size(backend: inflate.Deflate) -> None:
    """64 MiB of zeros declared as 1 kB: refused after 1 kB of content, never held."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = packer.compress(b"\0" * (1 << 20))
    packed = block + b"".join(packer.compress(b"\0" * (1 << 20)) for _ in range(63))
    packed += packer.flush()
    entry = entry_of(packed, size=1000, crc=0, backend=backend)
    handed = []
    with pytest.raises(zipfile.BadZipFile, match="more content than its size"):
        while True:
            part = entry.read(1 << 20)
            handed.append(len(part))
            if not part:
                break
    assert sum(handed) <= 1000


def local_header_at(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo(name).header_offset


@pytest.mark.parametrize("local_name", [b"bb", b"\xff\xff"])   # bb.dcm; not UTF-8
def test_a_local_header_that_names_another_file(tmp_path: Path, backend: inflate.Deflate,
                                                local_name: bytes) -> None:
    write_zip(tmp_path / "s.zip", {"ä.dcm": DATA})             # UTF-8 flag set
    data = bytearray((tmp_path / "s.zip").read_bytes())
    at = local_header_at(tmp_path / "s.zip", "ä.dcm") + inflate.LOCAL_HEADER_STRUCT.size
    data[at:at + 2] = local_name                               # "ä" is 2 bytes
    (tmp_path / "s.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(tmp_path / "s.zip") as archive, open(tmp_path / "s.zip", "rb") as raw:
        with pytest.raises(zipfile.BadZipFile, match="local header names"):
            inflate.open_entry(archive, raw, archive.getinfo("ä.dcm"), {}, backend)


def test_no_local_header_where_the_directory_says(tmp_path: Path,
                                                  backend: inflate.Deflate) -> None:
    write_zip(tmp_path / "s.zip", {"a.dcm": DATA})
    data = bytearray((tmp_path / "s.zip").read_bytes())
    at = local_header_at(tmp_path / "s.zip", "a.dcm")
    data[at:at + 4] = b"XXXX"
    (tmp_path / "s.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(tmp_path / "s.zip") as archive, open(tmp_path / "s.zip", "rb") as raw:
        with pytest.raises(zipfile.BadZipFile, match="no local header"):
            inflate.open_entry(archive, raw, archive.getinfo("a.dcm"), {}, backend)


def test_verify_zip_refuses_an_entry_whose_crc_is_wrong(tmp_path: Path) -> None:
    """Through the source: a deflated entry whose CRC-32 in the directory is not its
    content's is a damaged zip (download again), whichever inflater runs."""
    dicom = bytes(128) + b"DICM" + bytes(1000)
    write_zip(tmp_path / "s.zip", {"1.dcm": dicom})
    data = bytearray((tmp_path / "s.zip").read_bytes())
    directory = data.rindex(b"PK\x01\x02")
    crc_at = directory + 16                       # the central header's CRC-32 field
    crc, = struct.unpack_from("<L", data, crc_at)
    struct.pack_into("<L", data, crc_at, crc ^ 0xFFFF)
    (tmp_path / "s.zip").write_bytes(bytes(data))
    series = PlannedSeries(uid="1.2.3", collection="C", path="p", record={}, image_count=1,
                           file_size=len(dicom))
    with pytest.raises(TransientError, match="damaged zip entry.*Bad CRC-32"):
        verify_zip(tmp_path / "s.zip", series, series_hash="0" * 32)


def test_overlapped_entries_are_refused_on_every_python(tmp_path: Path,
                                                       backend: inflate.Deflate) -> None:
    """Two directory entries over one entry's bytes (a zip bomb's trick): zipfile refuses
    them from 3.12 on, open_entry on every Python."""
    write_zip(tmp_path / "s.zip", {"a.dcm": DATA, "b.dcm": DATA})
    with zipfile.ZipFile(tmp_path / "s.zip") as archive, open(tmp_path / "s.zip", "rb") as raw:
        a, b = archive.infolist()
        a.compress_size = b.header_offset + 1 - a.header_offset   # reaches into b's header
        with pytest.raises(zipfile.BadZipFile, match="overlapped entries"):
            inflate.open_entry(archive, raw, a, inflate.entry_ends(archive), backend)
        assert inflate.entry_ends(archive) == {a.header_offset: b.header_offset,
                                               b.header_offset: archive.start_dir}
