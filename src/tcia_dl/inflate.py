"""Raw deflate: the zip entries NBIA sends, inflated and checked by python-isal when it is
installed (pip install "tcia-downloader[fast]"), else by the standard library's zlib.

Inflating every entry is the largest part of verification: 3.9 s of the 95 s of CPU the
bench collection costs (1,046 MB of DICOM in zips deflated at level 1; cProfile, one core).
Measured on our machine kind (Python 3.11, 600 CT-like entries of 132 kB, 2.3x deflated;
process time): inflate zlib 286-299 MB/s, isal 1.9.1 609-616 MB/s, zlib-ng 1.1.0 467 MB/s;
CRC-32 zlib 1.9 GB/s, isal 7.5-9.0 GB/s. The two produce the same bytes and the same CRC-32,
so the checks are the same whichever runs: every byte inflated, the deflate stream ending
exactly where the entry's compressed size says, its size and its CRC-32 the zip's.

An entry's local header is checked as zipfile checks it (signature, the name of the central
directory) before its data are read: the raw bytes are read from the zip's file at the
offset zipfile gives, never past the entry's compressed size.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .settings import CHUNK_SIZE

# The local header, as zipstream reads it too (APPNOTE 4.3.7).
LOCAL_HEADER = b"PK\x03\x04"
LOCAL_HEADER_STRUCT = struct.Struct("<4s5H3L2H")   # APPNOTE 4.3.7, 30 bytes
FLAG_ENCRYPTED = 0x1
FLAG_UTF8 = 0x800


@dataclass(frozen=True)
class Deflate:
    """One implementation of raw deflate: zlib's API (decompressobj(-15), crc32), its name
    for the debug log, and the exception it raises on damaged data."""
    name: str
    decompressobj: Callable[[int], "zlib._Decompress"]
    crc32: Callable[[bytes, int], int]
    error: type[Exception]


def available_deflates() -> list[Deflate]:
    """The implementations this Python can use, fastest first (zlib always last)."""
    found = []
    try:
        from isal import isal_zlib     # optional: the "fast" extra
        from isal import __version__ as isal_version
    except ImportError:
        pass
    else:
        found.append(Deflate(f"python-isal {isal_version}", isal_zlib.decompressobj,
                             isal_zlib.crc32, isal_zlib.error))
    found.append(Deflate(f"zlib {zlib.ZLIB_RUNTIME_VERSION}", zlib.decompressobj, zlib.crc32,
                         zlib.error))
    return found


FASTEST = available_deflates()[0]


def opens_fast(info: zipfile.ZipInfo) -> bool:
    """Whether an entry is one open_entry inflates itself (deflated, not encrypted); zipfile
    reads any other kind."""
    return info.compress_type == zipfile.ZIP_DEFLATED and not info.flag_bits & FLAG_ENCRYPTED


def entry_ends(archive: zipfile.ZipFile) -> dict[int, int]:
    """Where each entry's bytes must end, by its local header's offset: at the next local
    header, or the central directory. zipfile checks this from Python 3.12 on ("overlapped
    entries", a zip bomb's trick); open_entry checks it on every Python."""
    offsets = sorted({info.header_offset for info in archive.infolist()})
    directory = getattr(archive, "start_dir", None)
    ends = offsets[1:] + ([directory] if isinstance(directory, int) else [])
    return dict(zip(offsets, ends))


def open_entry(archive: zipfile.ZipFile, zip_file: BinaryIO, info: zipfile.ZipInfo,
               ends: dict[int, int], deflate: Deflate = FASTEST,
               ) -> "InflatedEntry | zipfile.ZipExtFile":
    """A reader of the entry's content: InflatedEntry for a deflated entry, zipfile's own
    for any other. zip_file is the zip opened a second time (zipfile's handle stays zipfile's);
    ends is entry_ends(archive). Damage raises zipfile.BadZipFile, as zipfile's reader does."""
    if not opens_fast(info):
        return archive.open(info)
    zip_file.seek(info.header_offset)
    header = zip_file.read(LOCAL_HEADER_STRUCT.size)
    if len(header) != LOCAL_HEADER_STRUCT.size or not header.startswith(LOCAL_HEADER):
        raise zipfile.BadZipFile(f"{info.filename}: no local header where the directory says")
    fields = LOCAL_HEADER_STRUCT.unpack(header)
    flags, name_length, extra_length = fields[2], fields[9], fields[10]
    raw_name = zip_file.read(name_length)
    try:
        name: "str | None" = raw_name.decode("utf-8" if flags & FLAG_UTF8 else "cp437")
    except UnicodeDecodeError:
        name = None
    if name != info.orig_filename:
        raise zipfile.BadZipFile(f"{info.filename}: its local header names {raw_name!r}")
    start = zip_file.seek(extra_length, 1)
    end = ends.get(info.header_offset)
    if end is not None and start + info.compress_size > end:
        raise zipfile.BadZipFile(f"{info.filename}: overlapped entries")
    return InflatedEntry(zip_file, info, deflate)


class InflatedEntry(io.BufferedIOBase):
    """read(n) as zipfile's reader gives it: n bytes unless the entry ends first. The
    compressed bytes are read up to the entry's compressed size and no further; the entry's
    end is checked where it is reached (BadZipFile): the deflate stream ends exactly there,
    the content has the zip's size and CRC-32. Content beyond the zip's size is refused
    as it comes, so a damaged or hostile entry never inflates past what the zip declares.
    Closing it leaves the zip's handle open: it is the caller's."""

    def __init__(self, raw: BinaryIO, info: zipfile.ZipInfo, deflate: Deflate):
        super().__init__()
        self._raw = raw
        self._name = info.filename
        self._packed_left = info.compress_size
        self._size_left = info.file_size
        self._crc_expected = info.CRC
        self._deflate = deflate
        self._inflater = deflate.decompressobj(-zlib.MAX_WBITS)
        self._crc = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def read(self, n: "int | None" = -1) -> bytes:
        if n is None or n < 0:
            n = self._size_left + 1        # all that is left (and one byte too many, if any)
        parts: list[bytes] = []
        wanted = n
        while wanted > 0 and not self._ended:
            part = self._inflate_some(wanted)
            if part:
                parts.append(part)
                wanted -= len(part)
        return b"".join(parts)

    def _inflate_some(self, most: int) -> bytes:
        """Up to `most` bytes of content (possibly none, while compressed bytes are read).
        Both libraries may hold inflated bytes back (max_length): after the stream's end
        they are drained with empty input, and the end is checked once none is left."""
        inflater = self._inflater
        if inflater.eof:
            part = self._decompress(b"", most)
            if not part:
                self._check_end()
        else:
            packed = inflater.unconsumed_tail or self._read_packed()
            part = self._decompress(packed, most)
            if not part and not packed and not inflater.eof:
                raise zipfile.BadZipFile(f"{self._name}: its deflate stream ends before its end")
        if len(part) > self._size_left:
            raise zipfile.BadZipFile(f"{self._name}: more content than its size in the zip")
        self._size_left -= len(part)
        self._crc = self._deflate.crc32(part, self._crc)
        return part

    def _decompress(self, packed: bytes, most: int) -> bytes:
        try:
            return self._inflater.decompress(packed, most)
        except self._deflate.error as exc:
            raise zipfile.BadZipFile(f"{self._name}: damaged deflate data ({exc})") from None

    def _read_packed(self) -> bytes:
        data = self._raw.read(min(CHUNK_SIZE, self._packed_left))
        self._packed_left -= len(data)
        return data

    def _check_end(self) -> None:
        """The deflate stream has ended: it must fill the entry's compressed size exactly
        and give its size and CRC-32."""
        if self._inflater.unused_data or self._packed_left:
            raise zipfile.BadZipFile(f"{self._name}: its deflate stream ends before its "
                                     "compressed size")
        if self._size_left:
            raise zipfile.BadZipFile(f"{self._name}: {self._size_left} bytes fewer than its "
                                     "size in the zip")
        if self._crc != self._crc_expected:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {self._name!r}")
        self._ended = True

