"""The zstd codec of a .tar.zst: one zstd frame per unit, found by walking frame and block
headers (RFC 8878), decompressed to exactly its span.

zstd has no footer or index, so a frame's end is found only by walking it: its header
(magic, descriptor, window, dictionary id, content size), then each 3-byte block header
(last-block bit, type, size), then the 4-byte content checksum. The walk reads a few bytes
a block (a block holds at most 128 KiB of tar) and needs no zstd library: --verify can
find the units of an archive on a machine without one.

What this codec accepts is stricter than the format, on purpose: only frames as
compressor() writes them. Every frame must carry a content checksum (else its bytes would
pass unchecked), need no dictionary, and ask for a window no larger than the levels here
use. Skippable frames (magic 0x184D2A50-5F) are refused, between units as anywhere: this
tool writes none, no checksum covers their content, and accepting them would let bytes
that belong to no checked unit pass --verify as part of a whole archive.

The library is the standard library's compression.zstd (Python 3.14+), backports.zstd
(the same API for 3.9-3.13) or the zstandard package, imported only when compressing or
decompressing: the tool starts without any of them, and missing() says what to install.
"""

from __future__ import annotations

import importlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import AbstractSet, Callable, ClassVar, Iterator, Optional

from ..errors import Interrupted
from ..settings import CHUNK_SIZE
from .tarstreams import TarStreamsTarget

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"                  # 0xFD2FB528, little-endian
SKIPPABLE_MAGIC_TAIL = b"\x2a\x4d\x18"            # 0x184D2A5?: the three high bytes
FRAME_CHECKSUM_SIZE = 4                           # the low 32 bits of XXH64 of the content
BLOCK_HEADER_SIZE = 3
# RFC 8878's Block_Maximum_Size: no block holds more than 128 KiB, compressed or not. A
# claimed size above it (the field holds up to 2 MiB) is damage, not a read to make.
BLOCK_MAXIMUM = 128 << 10
RESERVED_BLOCK_TYPE = 3
RLE_BLOCK_TYPE = 1
# The largest window any level in ZstdCodec.levels asks for (windowLog 23 at levels 17-19;
# 2 MiB at 3, 4 MiB at 9-15, measured by reading the Window_Descriptor that zstandard 0.25
# writes at each level). A larger claim is not a frame of ours, and capping it bounds what
# a hostile header can make the decoder allocate (libzstd's own default cap is 128 MiB).
WINDOW_LIMIT = 8 << 20
# Decompressed output comes in pieces of at most 1 MiB: a 1 MiB frame can hold GBs of zeros
# (one 4-byte RLE block per 128 KiB), and a decoder asked for "everything" would return it.
OUTPUT_PIECE = 1 << 20

# The libraries tried, in this order: the standard library's first (nothing to install),
# then its backport (the same API), then the zstandard package.
LIBRARIES = ("compression.zstd", "backports.zstd", "zstandard")
MISSING = ("--format tar.zst needs the zstandard package: pip install zstandard "
           "(or -r requirements-zstd.txt)")


# -- reading the frame structure -------------------------------------------------------------

@dataclass(frozen=True)
class FrameHeader:
    """What a frame header says about the frame that starts at `start`."""
    start: int
    end: int                 # where the first block header begins
    window_size: int

    @property
    def block_limit(self) -> int:
        """RFC 8878's Block_Maximum_Size for this frame: a block never holds more than the
        window (a single-segment frame of 5 bytes has 5-byte blocks)."""
        return min(self.window_size, BLOCK_MAXIMUM)


@dataclass(frozen=True)
class Block:
    """One block of a frame: its header at `start`, its content up to `end`."""
    start: int
    end: int
    last: bool
    output_bound: int        # the most bytes it can decompress to


def read_exactly(handle: io.BufferedIOBase, offset: int, size: int, frame: int,
                 limit: int) -> bytes:
    """size bytes at offset of the frame that starts at `frame`, which must end by limit
    (its span's end, or the file's)."""
    if offset + size > limit:
        raise ValueError(f"the zstd frame at byte {frame} is cut short at byte {limit}")
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"the zstd frame at byte {frame} is cut short at byte "
                         f"{offset + len(data)}, where the file ends")
    return data


def frame_header(handle: io.BufferedIOBase, start: int, limit: int) -> FrameHeader:
    """The header of the frame at start, checked to be one this codec writes."""
    magic = read_exactly(handle, start, 4, start, limit)
    if magic[1:] == SKIPPABLE_MAGIC_TAIL and magic[0] & 0xF0 == 0x50:
        raise ValueError(f"a skippable zstd frame starts at byte {start}, and this tool "
                         "writes none")
    if magic != ZSTD_MAGIC:
        raise ValueError(f"no zstd frame starts at byte {start}")
    descriptor = read_exactly(handle, start + 4, 1, start, limit)[0]
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise ValueError(f"the zstd frame header at byte {start} is damaged (its reserved "
                         "bit is set)")
    if not descriptor & 0x04:
        raise ValueError(f"the zstd frame at byte {start} has no content checksum, which "
                         "this tool writes in every frame")
    window_field = 0 if single_segment else 1
    dictionary_field = (0, 1, 2, 4)[descriptor & 0x03]
    content_size_field = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    fields = read_exactly(handle, start + 5, window_field + dictionary_field +
                          content_size_field, start, limit)
    if int.from_bytes(fields[window_field:window_field + dictionary_field], "little"):
        raise ValueError(f"the zstd frame at byte {start} needs a dictionary, which this "
                         "tool never uses")
    if single_segment:
        content_size = int.from_bytes(fields[-content_size_field:], "little")
        window_size = content_size + (256 if content_size_field == 2 else 0)
    else:
        window_size = window_from_descriptor(fields[0])
    if window_size > WINDOW_LIMIT:
        raise ValueError(f"the zstd frame at byte {start} asks for a window of "
                         f"{window_size} bytes, more than the {WINDOW_LIMIT >> 20} MiB "
                         "of any level this tool writes")
    return FrameHeader(start, start + 5 + len(fields), window_size)


def window_from_descriptor(descriptor: int) -> int:
    """RFC 8878's Window_Size from its Window_Descriptor (exponent and mantissa)."""
    base = 1 << (10 + (descriptor >> 3))
    return base + (base >> 3) * (descriptor & 0x07)


def frame_blocks(handle: io.BufferedIOBase, header: FrameHeader,
                 limit: int) -> Iterator[Block]:
    """The blocks of the frame, read one 3-byte block header at a time; ValueError at the
    first that is not a block (a reserved type, a size beyond the frame's block limit) or
    that runs past limit."""
    position = header.end
    while True:
        field = int.from_bytes(read_exactly(handle, position, BLOCK_HEADER_SIZE,
                                            header.start, limit), "little")
        last, block_type, size = bool(field & 1), (field >> 1) & 3, field >> 3
        if block_type == RESERVED_BLOCK_TYPE:
            raise ValueError(f"the zstd block at byte {position} has the reserved type 3 "
                             "(damage)")
        if size > header.block_limit:
            raise ValueError(f"the zstd block at byte {position} claims {size} bytes, more "
                             f"than the {header.block_limit} its frame allows")
        stored = 1 if block_type == RLE_BLOCK_TYPE else size
        end = position + BLOCK_HEADER_SIZE + stored
        if end > limit:
            raise ValueError(f"the zstd frame at byte {header.start} is cut short at byte "
                             f"{limit}")
        # A compressed block's size is its compressed size: it may decompress to a whole
        # block's worth. Raw and RLE blocks decompress to exactly their size.
        bound = header.block_limit if block_type == 2 else size
        yield Block(position, end, last, bound)
        if last:
            return
        position = end


def frame_end(handle: io.BufferedIOBase, start: int, limit: int) -> int:
    """Where the frame that starts at start ends (after its checksum), by its structure;
    ValueError where it is not a whole frame of ours by limit."""
    header = frame_header(handle, start, limit)
    end = header.end
    for block in frame_blocks(handle, header, limit):
        end = block.end
    if end + FRAME_CHECKSUM_SIZE > limit:
        raise ValueError(f"the zstd frame at byte {start} is cut short at byte {limit}")
    return end + FRAME_CHECKSUM_SIZE


def file_size(handle: io.BufferedIOBase) -> int:
    return handle.seek(0, os.SEEK_END)


@dataclass
class Chain:
    """Whole frames walked one after the other from `start`: their spans, and why the walk
    stopped before the end of the file (None: it reached it exactly)."""
    spans: list[tuple[int, int]]
    failure: Optional[ValueError]
    stopped_at: int          # the start of the frame that was not whole, or the file's end


def walk_chain(handle: io.BufferedIOBase, start: int, size: int,
               dead: AbstractSet[int] = frozenset()) -> Chain:
    """Frames back to back from start until the end of the file or the first frame that is
    not whole. A start in `dead` is known to lead to such a frame: the walk stops there."""
    spans: list[tuple[int, int]] = []
    position = start
    while position < size:
        if position in dead:
            return Chain(spans, ValueError(f"the zstd frame at byte {position} leads to "
                                           "damage"), position)
        try:
            end = frame_end(handle, position, size)
        except ValueError as exc:
            return Chain(spans, exc, position)
        spans.append((position, end))
        position = end
    return Chain(spans, None, position)


def magic_offsets(path: Path, begin: int) -> Iterator[int]:
    """Where the file holds a zstd frame magic at or after begin, read 1 MiB at a time
    (never mapped: a mapped file's pages count as the process's memory)."""
    with open(path, "rb") as handle:
        handle.seek(begin)
        offset, carry = begin, b""
        while True:
            block = handle.read(CHUNK_SIZE)
            if not block:
                return
            data = carry + block
            base = offset - len(carry)
            position = data.find(ZSTD_MAGIC)
            while position >= 0:
                yield base + position
                position = data.find(ZSTD_MAGIC, position + 1)
            carry = data[-(len(ZSTD_MAGIC) - 1):]     # a magic cut by the block's end
            offset += len(block)


def zstd_frame_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every frame in the file, walked from byte 0. ValueError (naming a
    byte offset) where the bytes are not whole frames of ours (a .part cut in an append, a
    damaged header, garbage between or after frames)."""
    with open(path, "rb") as handle:
        chain = walk_chain(handle, 0, file_size(handle))
    if chain.failure is not None:
        raise chain.failure
    return chain.spans


def zstd_frame_spans_from_headers(path: Path) -> list[tuple[int, int]]:
    """The whole frames from byte 0 until the first that is not whole (a .part cut in an
    append, at another site without its journal)."""
    with open(path, "rb") as handle:
        return walk_chain(handle, 0, file_size(handle)).spans


def zstd_frame_spans_from_end(path: Path) -> tuple[list[tuple[int, int]], Optional[ValueError]]:
    """The whole frames that end the file, in file order, and why the walk from byte 0 did
    not cover the whole file (None: it did, and every frame is returned).

    After the first frame that is not whole, the walk resynchronises: each later frame
    magic, in file order, is tried as the start of a chain of whole frames, and the first
    chain that ends exactly at the end of the file is the answer. Sound because an intact
    frame after the damage starts with the magic and walks exactly as it was written, and
    so do the intact frames after it: damage in one unit never hides the units after it.
    A magic that happens to lie inside compressed data only counts if a whole frame
    structure from there lands exactly on a later frame start and then the end of the
    file; if it does, it is reported as a frame, and its checksum (decompressed) calls it
    damaged, so no real unit is lost. The cost: one read of the file after the damage to
    find magics, and every frame start on a chain that failed is remembered, so no frame
    is walked twice (memory: one integer per such frame, as many as the spans returned).
    Only a file crafted to hold many magics whose block chains overlap can make it walk
    the same blocks again and again."""
    with open(path, "rb") as handle:
        size = file_size(handle)
        first = walk_chain(handle, 0, size)
        if first.failure is None:
            return first.spans, None
        dead = {first.stopped_at}
        for candidate in magic_offsets(path, first.stopped_at + 1):
            if candidate in dead:
                continue
            chain = walk_chain(handle, candidate, size, dead)
            if chain.failure is None:
                return chain.spans, first.failure
            dead.update(start for start, _ in chain.spans)
            dead.add(chain.stopped_at)
    return [], first.failure


def zstd_frame_in_place(path: Path, start: int, end: int) -> bool:
    """A frame header of ours at start, and the frame's structure ending exactly at end:
    one small read per block (a block holds at most 128 KiB of tar), none of the content."""
    try:
        with open(path, "rb") as handle:
            return 0 <= start < end <= file_size(handle) and \
                frame_end(handle, start, end) == end
    except ValueError:
        return False


# -- the library: compressing and decompressing ----------------------------------------------

@dataclass(frozen=True)
class ZstdLibrary:
    """One of the libraries that can compress and decompress zstd, as imported."""
    name: str
    module: ModuleType

    @property
    def stdlib_api(self) -> bool:
        """compression.zstd's API (also backports.zstd's), else zstandard's."""
        return self.name != "zstandard"

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        # EOFError: the standard API's answer to input after a frame's end.
        return (self.module.ZstdError, EOFError)


def import_zstd_library(names: tuple[str, ...] = LIBRARIES) -> ZstdLibrary:
    """The first of the libraries that imports; ImportError (saying what to install) when
    none does."""
    for name in names:
        try:
            return ZstdLibrary(name, importlib.import_module(name))
        except ImportError:
            continue
    raise ImportError(MISSING)


class UnitCompressor:
    """One zstd frame, with a content checksum, of whatever is passed to compress() until
    flush() ends it. A new one for every unit: frames never depend on each other."""

    def __init__(self, compress: Callable[[bytes], bytes], finish: Callable[[], bytes]):
        self._compress = compress
        self._finish = finish
        self._finished = False

    def compress(self, data: bytes) -> bytes:
        if self._finished:
            raise ValueError("this zstd frame is already finished")
        return self._compress(data)

    def flush(self) -> bytes:
        """The rest of the frame: its last block and its checksum."""
        if self._finished:
            raise ValueError("this zstd frame is already finished")
        self._finished = True
        return self._finish()


def unit_compressor(library: ZstdLibrary, level: int) -> UnitCompressor:
    """A single-threaded compressor: a worker compresses one series at a time, and the
    workers together already keep the usable cores busy."""
    module = library.module
    if library.stdlib_api:
        parameter = module.CompressionParameter
        compressor = module.ZstdCompressor(options={parameter.compression_level: level,
                                                    parameter.checksum_flag: 1})
        return UnitCompressor(compressor.compress,
                              lambda: compressor.flush(module.ZstdCompressor.FLUSH_FRAME))
    stream = module.ZstdCompressor(level=level, write_checksum=True).compressobj()
    return UnitCompressor(stream.compress, stream.flush)


class FrameDecoder:
    """One frame's decoder, fed input that ends at block boundaries so that each feed
    decompresses to at most OUTPUT_PIECE bytes."""

    def __init__(self, library: ZstdLibrary):
        module = library.module
        self._stdlib_api = library.stdlib_api
        if self._stdlib_api:
            limit = module.DecompressionParameter.window_log_max
            self._decoder = module.ZstdDecompressor(
                options={limit: WINDOW_LIMIT.bit_length() - 1})
        else:
            self._decoder = module.ZstdDecompressor(
                max_window_size=WINDOW_LIMIT).decompressobj()

    @property
    def finished(self) -> bool:
        """The frame's end, checksum included, has been decoded."""
        return bool(self._decoder.eof)

    def feed(self, data: bytes) -> list[bytes]:
        """What data decompresses to. zstandard's decompressobj returns all of it at once,
        which the caller bounds by feeding at most OUTPUT_PIECE worth of blocks; the
        standard API is asked for OUTPUT_PIECE at a time all the same."""
        if not self._stdlib_api:
            piece = self._decoder.decompress(data)
            return [piece] if piece else []
        pieces = [self._decoder.decompress(data, max_length=OUTPUT_PIECE)]
        while not self._decoder.eof and not self._decoder.needs_input:
            pieces.append(self._decoder.decompress(b"", max_length=OUTPUT_PIECE))
        return [piece for piece in pieces if piece]


def frame_input(handle: io.BufferedIOBase, start: int, end: int) -> Iterator[bytes]:
    """The frame between start and end in pieces that end at block boundaries, each
    decompressing to at most OUTPUT_PIECE bytes (and reading at most about as much). The
    frame's structure must end exactly at end: a frame cut short, or bytes after it within
    the span, are ValueError before its last piece is given."""
    header = frame_header(handle, start, end)
    piece_start, piece_end, piece_output = start, header.end, 0
    for block in frame_blocks(handle, header, end):
        if piece_output + block.output_bound > OUTPUT_PIECE:
            yield read_exactly(handle, piece_start, piece_end - piece_start, start, end)
            piece_start, piece_output = piece_end, 0
        piece_end, piece_output = block.end, piece_output + block.output_bound
    frame_stop = piece_end + FRAME_CHECKSUM_SIZE
    if frame_stop > end:
        raise ValueError(f"the zstd frame at byte {start} is cut short at byte {end}")
    if frame_stop < end:
        raise ValueError(f"{end - frame_stop} bytes follow the zstd frame that ends at byte "
                         f"{frame_stop}")
    yield read_exactly(handle, piece_start, frame_stop - piece_start, start, end)


def zstd_decompressed(library: ZstdLibrary, path: Path, start: int, end: int,
                      stop: Optional[threading.Event] = None) -> Iterator[bytes]:
    """The content of the one frame between start and end, in pieces of at most
    OUTPUT_PIECE, its checksum checked by the library. Any damage is a ValueError: the
    library's own errors are translated. Interrupted when stop is set (checked every
    piece)."""
    decoder = FrameDecoder(library)
    with open(path, "rb") as handle:
        for data in frame_input(handle, start, end):
            try:
                pieces = decoder.feed(data)
            except library.errors as exc:
                raise ValueError(f"the zstd frame at byte {start} is damaged ({exc})") \
                    from None
            for piece in pieces:
                if stop is not None and stop.is_set():
                    raise Interrupted()
                yield piece
            if stop is not None and stop.is_set():
                raise Interrupted()
    if not decoder.finished:
        raise ValueError(f"the zstd frame at byte {start} is cut short (its decoder "
                         "expects more)")


def zstd_head(library: ZstdLibrary, path: Path, start: int, end: int,
              size: int) -> tuple[bytes, int]:
    """At least the first `size` decompressed bytes of the frame at start (fewer if it holds
    fewer), reading it a block at a time; and how many compressed bytes that took."""
    decoder = FrameDecoder(library)
    data, read = bytearray(), 0
    with open(path, "rb") as handle:
        header = frame_header(handle, start, end)
        piece_start = start
        for block in frame_blocks(handle, header, end):
            chunk = read_exactly(handle, piece_start, block.end - piece_start, start, end)
            read, piece_start = read + len(chunk), block.end
            try:
                for piece in decoder.feed(chunk):
                    data += piece
            except library.errors as exc:
                raise ValueError(f"the zstd frame at byte {start} is damaged ({exc})") \
                    from None
            if len(data) >= size:
                break
    return bytes(data), read


# -- the codec -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZstdCodec:
    """zstd for --format tar.zst: one frame per unit. `libraries`: the modules tried, in
    order (tests name one to check each)."""
    libraries: tuple[str, ...] = LIBRARIES

    name: ClassVar[str] = "zstd"
    unit: ClassVar[str] = "frame"
    suffix: ClassVar[str] = ".tar.zst"
    magic: ClassVar[bytes] = ZSTD_MAGIC
    level_note: ClassVar[str] = "zstd levels; 3 is ~10x as fast as xz 1, 15 % larger"
    # zstd's own scale without --ultra (20-22 need windows of 32-128 MiB to decompress) and
    # without the negative "fast" levels (measured as below: -1 222 MB/s, ratio 1.85; -5
    # 261 MB/s, 1.72: 29 % and 39 % more bytes than level 1, whose 155 MB/s already
    # outruns the network).
    levels: ClassVar[tuple[int, int]] = (1, 19)
    # Measured on 92 MB of CT-like DICOM (tests/fakes/fake_nbia.py's slices: 8 series of 25
    # slices of 512x512 int16, as tar fragments), one frame (compressor() here) or xz stream
    # (LZMACompressor, CRC64, as tarxz writes) per series, fed 4 MiB at a time; MB/s of tar
    # per second of process_time, one core (median of 2 runs; 1 run above level 12);
    # zstandard 0.25 (libzstd 1.5.7), Python 3.11, this project's 2-core machine kind:
    #   xz preset 1 (the .tar.xz default): 10.0 MB/s, ratio 2.96
    #   zstd 1: 155 MB/s, 2.39 | 3: 100 MB/s, 2.56 | 6: 38 MB/s, 2.64 | 9: 26 MB/s, 2.68
    #   zstd 12: 9.9 MB/s, 2.73 | 15: 1.3 MB/s, 2.81 | 17: 1.2 MB/s, 2.97 | 19: 1.1 MB/s, 2.96
    # No level gives xz -1's ratio faster than xz -1 (17 and 19 match it at a ninth of its
    # speed). 3 is the knee: 10x xz -1's speed for 15 % more bytes; 6 buys 3 % for 2.7x the
    # CPU. At 100 MB/s a core outpaces the network, which then sets the run time.
    default_level: ClassVar[int] = 3
    # The ratios of that measurement, for the space estimate (a level between two measured
    # ones takes the lower one's).
    measured_ratios: ClassVar[tuple[tuple[int, float], ...]] = (
        (1, 2.39), (3, 2.56), (6, 2.64), (9, 2.68), (12, 2.73), (15, 2.81), (17, 2.97))

    def ratio(self, level: int) -> float:
        return max(ratio for measured, ratio in self.measured_ratios if measured <= level)

    def library(self) -> ZstdLibrary:
        return import_zstd_library(self.libraries)

    def missing(self) -> Optional[str]:
        """None when a zstd library imports; else one line saying what to install."""
        try:
            self.library()
        except ImportError:
            return MISSING
        return None

    def compressor(self, level: int) -> UnitCompressor:
        """A compressor of one frame, with a content checksum, at level."""
        low, high = self.levels
        if not low <= level <= high:
            raise ValueError(f"zstd compression levels are {low} to {high}, not {level}")
        return unit_compressor(self.library(), level)

    def spans(self, path: Path) -> list[tuple[int, int]]:
        return zstd_frame_spans(path)

    def spans_from_end(self, path: Path) -> tuple[list[tuple[int, int]], Optional[ValueError]]:
        return zstd_frame_spans_from_end(path)

    def spans_from_headers(self, path: Path) -> list[tuple[int, int]]:
        return zstd_frame_spans_from_headers(path)

    def in_place(self, path: Path, start: int, end: int) -> bool:
        return zstd_frame_in_place(path, start, end)

    def decompressed(self, path: Path, start: int, end: int,
                     stop: Optional[threading.Event] = None) -> Iterator[bytes]:
        return zstd_decompressed(self.library(), path, start, end, stop)

    def head(self, path: Path, start: int, end: int, size: int) -> tuple[bytes, int]:
        return zstd_head(self.library(), path, start, end, size)

    def intact(self, path: Path, start: int, end: int) -> bool:
        """One whole frame of ours between start and end, by its own checksum."""
        try:
            for _ in self.decompressed(path, start, end):
                pass
        except ValueError:
            return False
        return True


ZSTD = ZstdCodec()


class TarZstTarget(TarStreamsTarget):
    """--format tar.zst: <name>.tar.zst, one zstd frame per series (`zstd -t`,
    `tar --zstd -xf` and Python 3.14's tarfile read it whole)."""

    format_name = "tar.zst"
    suffix = ".tar.zst"
    codec = ZSTD
