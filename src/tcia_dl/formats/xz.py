"""The xz codec: a unit is one xz stream, found from its footer and index, decompressed to
its span; and the .tar.xz format that is made of them."""

from __future__ import annotations

import io
import lzma
import os
import threading
import zlib
from pathlib import Path
from typing import Iterator, Optional

from ..errors import Interrupted
from ..settings import CHUNK_SIZE
from ..storage import read_range
from .base import ProbingCompressor, UnitCompressor
from .tarstreams import TarStreamsTarget

XZ_HEADER_MAGIC = b"\xfd7zXZ\x00"
XZ_FOOTER_MAGIC = b"YZ"
# What an incompressible unit is made at (formats.base.ProbingCompressor).
CHEAPEST_PRESET = 0


def read_exactly(handle: io.BufferedIOBase, offset: int, size: int) -> bytes:
    if offset < 0:
        raise ValueError("the file is too short to hold that xz stream")
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"the file ends before byte {offset + size}")
    return data


def xz_varint(data: bytes, position: int) -> tuple[int, int]:
    """An xz variable-length integer (at most 9 bytes) at position; ValueError past the
    data's end or when longer."""
    value = 0
    for shift in range(0, 63, 7):
        if position >= len(data):
            raise ValueError("an xz index ends inside a number")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
    raise ValueError("an xz index holds a number longer than 9 bytes")


# An xz index holds one record of a few bytes per block; Python's lzma writes one block per
# stream and `xz -T0` one per 3 dictionary sizes (24 MiB at -6), so 16 MiB of index is over
# a million blocks: a larger Backward Size is damage, not an index worth reading.
XZ_INDEX_LIMIT = 16 << 20
XZ_CHECK_FLAGS = {b"\0\0", b"\0\x01", b"\0\x04", b"\0\x0a"}   # none, CRC32, CRC64, SHA-256


def before_stream_padding(handle: io.BufferedIOBase, end: int) -> int:
    """Where the NUL stream padding (whole groups of 4) before end begins, reading back
    64 kB at a time (4 bytes at a time took 10 s for 16 MiB)."""
    while end >= 4:
        size = min(end, 64 * 1024) & ~3
        block = read_exactly(handle, end - size, size)
        zeros = size - len(block.rstrip(b"\0"))
        end -= zeros & ~3
        if zeros < size:
            break
    return end


def xz_index_blocks(index: bytes, where: int) -> int:
    """The bytes of the blocks an xz index (as read, CRC32 included) describes."""
    if index[0] != 0 or zlib.crc32(index[:-4]) != int.from_bytes(index[-4:], "little"):
        raise ValueError(f"the xz index before byte {where} is damaged")
    count, position = xz_varint(index, 1)
    if count > len(index):                       # each record takes at least 2 bytes
        raise ValueError(f"the xz index before byte {where} is damaged")
    blocks = 0
    for _ in range(count):
        unpadded, position = xz_varint(index, position)
        _, position = xz_varint(index, position)
        blocks += (unpadded + 3) & ~3
    if index[position:-4].strip(b"\0") or (len(index) - 4 - position) >= 4:
        raise ValueError(f"the xz index before byte {where} is damaged")
    return blocks


def xz_stream_span_ending(handle: io.BufferedIOBase, end: int) -> int:
    """The start of the xz stream that ends at end, from its footer and index, every
    field's CRC32 checked (a bit flipped in a footer's Backward Size once made this read a
    claimed 2 GiB "index"). Where an index lies about its blocks, the span is wrong, and
    decompressing it (which must end exactly at end) says so."""
    footer = read_exactly(handle, end - 12, 12)
    if footer[10:] != XZ_FOOTER_MAGIC:
        raise ValueError(f"no xz stream ends at byte {end}")
    if zlib.crc32(footer[4:10]) != int.from_bytes(footer[:4], "little") or \
            footer[8:10] not in XZ_CHECK_FLAGS:
        raise ValueError(f"the xz stream footer before byte {end} is damaged")
    index_size = (int.from_bytes(footer[4:8], "little") + 1) * 4
    if index_size > min(XZ_INDEX_LIMIT, end - 24):
        raise ValueError(f"the xz stream footer before byte {end} is damaged "
                         f"(an index of {index_size} bytes)")
    blocks = xz_index_blocks(read_exactly(handle, end - 12 - index_size, index_size), end - 12)
    start = end - 12 - index_size - blocks - 12
    header = read_exactly(handle, start, 12)
    if header[:6] != XZ_HEADER_MAGIC or header[6:8] != footer[8:10] or \
            zlib.crc32(header[6:8]) != int.from_bytes(header[8:12], "little"):
        raise ValueError(f"the xz stream ending at byte {end} has no header")
    return start


def xz_stream_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every xz stream in the file, found from its end as `xz --list` does:
    a stream's footer gives the size of its index, the index the sizes of its blocks; NUL
    padding may stand between streams. Reads a few bytes a stream. ValueError where the
    bytes are not whole xz streams (a .part cut in an append, a damaged footer)."""
    spans, failure = xz_stream_spans_from_end(path)
    if failure is not None:
        raise failure
    return spans


def xz_stream_spans_from_end(path: Path) -> tuple[list[tuple[int, int]], Optional[ValueError]]:
    """The streams found walking back from the end of the file, in file order, and why the
    walk stopped before byte 0 (None: it reached it). The streams found are whole and in
    place even when an earlier one is damaged."""
    spans: list[tuple[int, int]] = []
    with open(path, "rb") as handle:
        end = before_stream_padding(handle, handle.seek(0, os.SEEK_END))
        try:
            while end > 0:
                start = xz_stream_span_ending(handle, end)
                spans.append((start, end))
                end = before_stream_padding(handle, start)
        except ValueError as exc:
            return spans[::-1], exc
    return spans[::-1], None


def xz_stream_spans_from_headers(path: Path) -> list[tuple[int, int]]:
    """The whole streams at the start of a file whose end is not a stream's (a .part cut
    in an append, at another site without its journal): each stream header, recognised by
    its magic and the CRC32 of its flags, ends the stream before it, whose footer magic
    must stand just before it (after any padding). Stops at the first stream without one."""
    with open(path, "rb") as handle:
        starts = xz_header_offsets(handle)
        size = handle.seek(0, os.SEEK_END)
        spans = []
        for start, following in zip(starts, starts[1:] + [size]):
            end = before_stream_padding(handle, following)
            if end - 2 <= start or read_exactly(handle, end - 2, 2) != XZ_FOOTER_MAGIC:
                break
            spans.append((start, end))
    return spans


def xz_header_offsets(handle: io.BufferedIOBase) -> list[int]:
    """Where the file holds an xz stream header (its magic, and the CRC32 of its flags),
    read 1 MiB at a time (a mapped file's pages counted as the process's memory: 1.3 GB
    for a 600 MiB archive)."""
    starts: list[int] = []
    handle.seek(0)
    offset, carry = 0, b""
    while True:
        block = handle.read(CHUNK_SIZE)
        if not block:
            return starts
        data = carry + block
        base = offset - len(carry)
        position = data.find(XZ_HEADER_MAGIC)
        while position >= 0:
            header = data[position:position + 12]
            if len(header) < 12:
                break                               # its end comes with the next block
            if zlib.crc32(header[6:8]) == int.from_bytes(header[8:12], "little"):
                starts.append(base + position)
            position = data.find(XZ_HEADER_MAGIC, position + 1)
        # a header cut by the block's end, or the start of a magic, comes again next time
        carry = data[position:] if position >= 0 else data[-11:]
        offset += len(block)


# Decompressed output is taken 1 MiB at a time: a 157 kB stream can hold 1 GiB of zeros,
# and decompress() without max_length returned it in one piece (4.3 GB peak).
XZ_OUTPUT_PIECE = 1 << 20


def lzma_pieces(decompressor: lzma.LZMADecompressor, data: bytes) -> bytes:
    """The next piece of output, lzma's own complaint as the ValueError every codec raises
    for damage."""
    try:
        return decompressor.decompress(data, max_length=XZ_OUTPUT_PIECE)
    except lzma.LZMAError as exc:
        raise ValueError(str(exc)) from None


def xz_decompressed(path: Path, start: int, end: int,
                    stop: Optional[threading.Event] = None) -> Iterator[bytes]:
    """The content of the one xz stream between start and end, in pieces of at most
    XZ_OUTPUT_PIECE, its CRCs and index checked by lzma. The stream must end exactly at
    end: bytes after it (another stream, garbage) are damage, never ignored. Interrupted
    when stop is set (checked every piece)."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    position = start
    for chunk in read_range(path, start, end):
        position += len(chunk)
        if decompressor.eof:
            raise ValueError(f"{end - position + len(chunk)} bytes follow the stream's end")
        piece = lzma_pieces(decompressor, chunk)
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted()
            if piece:
                yield piece
            if decompressor.eof or decompressor.needs_input:
                break
            piece = lzma_pieces(decompressor, b"")
        if decompressor.eof and (decompressor.unused_data or position < end):
            raise ValueError(f"{end - position + len(decompressor.unused_data)} bytes "
                             "follow the stream's end")
    if not decompressor.eof:
        raise ValueError("the stream is cut short")


def xz_head(path: Path, start: int, end: int, size: int) -> tuple[bytes, int]:
    """At least the first `size` decompressed bytes of the stream at start (fewer if it
    holds fewer), reading 16 kB of it at a time; and how many compressed bytes it took."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    data, read = bytearray(), 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while read < end - start and not decompressor.eof and len(data) < size:
            chunk = handle.read(min(16 * 1024, end - start - read))
            if not chunk:
                break
            read += len(chunk)
            try:
                data += decompressor.decompress(chunk, max_length=size)
            except lzma.LZMAError as exc:
                raise ValueError(str(exc)) from None
    return bytes(data), read


def xz_in_place(path: Path, start: int, end: int) -> bool:
    """A stream's header magic at start and its footer magic just before end."""
    with open(path, "rb") as handle:
        handle.seek(start)
        head = handle.read(len(XZ_HEADER_MAGIC))
        handle.seek(max(end - len(XZ_FOOTER_MAGIC), 0))
        return head == XZ_HEADER_MAGIC and handle.read(len(XZ_FOOTER_MAGIC)) == XZ_FOOTER_MAGIC


class XzCompressor:
    """One xz stream: CRC64 over its content (what `xz -t` and --verify check)."""

    def __init__(self, level: int):
        self._lzma = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                         preset=level)

    def compress(self, data: bytes) -> bytes:
        return self._lzma.compress(data)

    def flush(self) -> bytes:
        return self._lzma.flush()


class XzCodec:
    """xz through the standard library's lzma (it lets go of the GIL while it works)."""

    name = "xz"
    unit = "stream"
    suffix = ".tar.xz"
    magic = XZ_HEADER_MAGIC
    levels = (0, 9)
    # Preset 1 compresses CT about 6x faster than preset 6 for about 10 % more output
    # (shared/measured.md); on a cluster node the preset, not the network, sets the run time.
    default_level = 1
    level_note = "xz presets; 6 is ~10% smaller and ~6x slower"
    # Ratios on CT-like DICOM measured on our machines (shared/measured.md), by preset.
    ratios = (2.7, 2.85, 2.86, 2.89, 3.0, 3.05, 3.15, 3.15, 3.15, 3.15)

    def missing(self) -> Optional[str]:
        return None                           # lzma is part of every CPython we support

    def compressor(self, level: int) -> UnitCompressor:
        """One stream at level; a unit that the probe finds incompressible (a JPEG slide)
        at preset 0, about twice as fast for the same bytes (base.PROBE_RATIO's table)."""
        if level == CHEAPEST_PRESET:
            return XzCompressor(level)
        return ProbingCompressor(lambda cheap: XzCompressor(CHEAPEST_PRESET if cheap
                                                            else level))

    def ratio(self, level: int) -> float:
        return self.ratios[level]

    spans = staticmethod(xz_stream_spans)
    spans_from_end = staticmethod(xz_stream_spans_from_end)
    spans_from_headers = staticmethod(xz_stream_spans_from_headers)
    in_place = staticmethod(xz_in_place)
    decompressed = staticmethod(xz_decompressed)
    head = staticmethod(xz_head)

    def intact(self, path: Path, start: int, end: int) -> bool:
        """One whole xz stream between start and end, by its own checks (CRC64, index)."""
        try:
            for _ in xz_decompressed(path, start, end):
                pass
        except (lzma.LZMAError, EOFError, ValueError):
            return False
        return True


XZ = XzCodec()


class TarXzTarget(TarStreamsTarget):
    """--format tar.xz: <name>.tar.xz, one xz stream per series (`xz -t`, `tar -xJf` and
    tarfile read it whole)."""

    format_name = "tar.xz"
    suffix = ".tar.xz"
    codec = XZ
