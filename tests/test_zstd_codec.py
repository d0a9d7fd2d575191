"""The zstd codec (formats/zstd.py): one checked zstd frame per unit, found by walking frame
and block headers, decompressed to exactly its span in bounded pieces; damage of every kind
is a ValueError naming where, never a library's own exception."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest

from tcia_dl.errors import Interrupted
from tcia_dl.formats import zstd as zstd_module
from tcia_dl.formats.tarstreams import tar_header, tar_padding
from tcia_dl.formats.zstd import OUTPUT_PIECE, WINDOW_LIMIT, ZSTD, ZstdCodec

# The standard library's API: compression.zstd from 3.14, its backport before. Both it and
# zstandard come with requirements-dev.txt, so each is tested wherever the suite runs.
STDLIB_API = "compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd"


def required(library: str) -> None:
    """A library the tests need: a skip here, a failure under CI (CI=true)."""
    try:
        __import__(library)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{library} is not installed: pip install -r requirements-dev.txt")
        pytest.skip(f"{library} is not installed")


@pytest.fixture(params=["zstandard", STDLIB_API])
def codec(request) -> ZstdCodec:
    """The codec restricted to one library, so that each is checked."""
    required(request.param)
    codec = ZstdCodec((request.param,))
    assert codec.library().name == request.param
    return codec


def cli_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (Debian package {name})")
        pytest.skip(f"{name} is not installed")
    return found


def frame_of(codec: ZstdCodec, data: bytes, level: int = ZSTD.default_level,
             piece: int = 300_000) -> bytes:
    """One unit's frame, the data fed in pieces as a writer feeds it."""
    compressor = codec.compressor(level)
    out = [compressor.compress(data[i:i + piece]) for i in range(0, len(data), piece)]
    return b"".join(out) + compressor.flush()


NOISE = bytes(120 + (value & 7) for value in range(256))


def ct_like(size: int, seed: int) -> bytes:
    """Noise of 3 bits a byte, as CT pixel data: compressed blocks, not raw or RLE ones."""
    return random.Random(seed).randbytes(size).translate(NOISE)


def write_units(path: Path, frames: list[bytes]) -> list[tuple[int, int]]:
    """The frames back to back in path; their spans, as a journal would record them."""
    spans, offset = [], 0
    with open(path, "wb") as out:
        for frame in frames:
            out.write(frame)
            spans.append((offset, offset + len(frame)))
            offset += len(frame)
    return spans


def content(codec: ZstdCodec, path: Path, span: tuple[int, int]) -> bytes:
    pieces = list(codec.decompressed(path, *span))
    assert all(0 < len(piece) <= OUTPUT_PIECE for piece in pieces)
    return b"".join(pieces)


def raises_value_error(call) -> str:
    """call() raises ValueError itself, not a library's exception nor a subclass; its
    message, which must be one sentence naming a byte offset."""
    with pytest.raises(Exception) as caught:
        call()
    assert type(caught.value) is ValueError, repr(caught.value)
    message = str(caught.value)
    assert re.search(r"\bbyte \d+", message) and "\n" not in message, message
    return message


def drain(codec: ZstdCodec, path: Path, start: int, end: int) -> None:
    for _ in codec.decompressed(path, start, end):
        pass


UNITS = [ct_like(2_500_000, 1), b"", b"a small series\n" * 3, os.urandom(200_000)]


@pytest.fixture
def units(tmp_path, codec) -> tuple[Path, list[tuple[int, int]]]:
    """Four units (multi-block CT-like, empty, tiny, incompressible) back to back."""
    path = tmp_path / "units.tar.zst"
    return path, write_units(path, [frame_of(codec, data) for data in UNITS])


# -- what compressor() writes, read back ---------------------------------------------------

def test_units_read_back_byte_identical_and_spans_are_exact(units, codec):
    path, spans = units
    assert codec.spans(path) == spans
    assert [content(codec, path, span) for span in spans] == UNITS
    assert all(codec.intact(path, *span) and codec.in_place(path, *span) for span in spans)
    assert codec.spans_from_headers(path) == spans
    assert codec.spans_from_end(path) == (spans, None)


def test_in_place_needs_frames_from_start_that_end_at_end(units, codec):
    path, spans = units
    (start, end), (_, next_end) = spans[0], spans[1]
    assert codec.in_place(path, start, end)
    assert not codec.in_place(path, start + 1, end)
    assert not codec.in_place(path, start, end - 1)
    assert not codec.in_place(path, start, end + 1)
    assert codec.in_place(path, start, next_end)        # a series of two units, back to back
    assert not codec.in_place(path, start, next_end - 1)
    assert not codec.in_place(path, start, path.stat().st_size + 10)


def test_one_frame_per_unit_with_a_content_checksum(codec):
    frame = frame_of(codec, ct_like(300_000, 2))
    assert frame[:4] == zstd_module.ZSTD_MAGIC and frame[4] & 0x04   # Content_Checksum_flag
    assert frame.count(zstd_module.ZSTD_MAGIC) >= 1
    compressor = codec.compressor(1)
    compressor.compress(b"x")
    compressor.flush()
    with pytest.raises(ValueError):
        compressor.compress(b"more")                 # a finished frame takes nothing more


def test_levels_outside_the_range_are_refused_and_the_highest_reads_back(tmp_path, codec):
    low, high = codec.levels
    assert low <= codec.default_level <= high
    for level in (low - 1, high + 1):
        with pytest.raises(ValueError):
            codec.compressor(level)
    data = ct_like(200_000, 3)
    path = tmp_path / "high.zst"
    spans = write_units(path, [frame_of(codec, data, level) for level in (low, high)])
    assert [content(codec, path, span) for span in spans] == [data, data]


def test_the_zstd_cli_and_gnu_tar_read_per_unit_frames(tmp_path, units, codec):
    """Each unit a frame of its own is still one .tar.zst to zstd and tar."""
    zstd_cli, tar_cli = cli_tool("zstd"), cli_tool("tar")
    path, _ = units
    assert subprocess.run([zstd_cli, "-q", "-t", str(path)]).returncode == 0
    assert subprocess.run([zstd_cli, "-q", "-dc", str(path)], capture_output=True,
                          check=True).stdout == b"".join(UNITS)

    members = {"DEMO/series-1/1-1.dcm": ct_like(30_000, 4), "DEMO/series-2/1-1.dcm": b"x" * 777}
    frames, tar_bytes = [], 0
    for name, data in members.items():
        fragment = tar_header(name, len(data), 0) + data + tar_padding(len(data))
        frames.append(frame_of(codec, fragment))
        tar_bytes += len(fragment)
    closing = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
    closing += tarfile.NUL * (-(tar_bytes + len(closing)) % tarfile.RECORDSIZE)
    frames.append(frame_of(codec, closing))
    archive = tmp_path / "DEMO.tar.zst"
    write_units(archive, frames)
    assert codec.spans(archive) == write_units(tmp_path / "again.tar.zst", frames)
    listed = subprocess.run([tar_cli, "--zstd", "-tf", str(archive)], capture_output=True,
                            text=True, check=True)
    assert listed.stdout.split() == list(members)
    assert listed.stderr == ""
    for name, data in members.items():
        assert subprocess.run([tar_cli, "--zstd", "-xOf", str(archive), name],
                              capture_output=True, check=True).stdout == data


# -- damage: a ValueError naming where, never a library's exception -------------------------

def frame_layout(path: Path, start: int) -> tuple[int, list[zstd_module.Block]]:
    """The end of the frame header at start and its blocks, as the codec walks them."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        header = zstd_module.frame_header(handle, start, size)
        return header.end, list(zstd_module.frame_blocks(handle, header, size))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def set_block_header(path: Path, block: zstd_module.Block, block_type: int, size: int) -> None:
    patch(path, block.start, (int(block.last) | block_type << 1 | size << 3).to_bytes(3, "little"))


def test_a_flipped_byte_in_a_block_is_damage(units, codec):
    path, spans = units
    _, blocks = frame_layout(path, spans[0][0])
    assert blocks[0].end - blocks[0].start > 1000                # a compressed block
    middle = (blocks[0].start + blocks[0].end) // 2
    patch(path, middle, bytes([path.read_bytes()[middle] ^ 0x10]))
    assert codec.spans(path) == spans                            # the structure still stands
    raises_value_error(lambda: drain(codec, path, *spans[0]))
    assert not codec.intact(path, *spans[0])
    assert content(codec, path, spans[2]) == UNITS[2]             # its neighbours read on


def test_a_wrong_checksum_is_damage(units, codec):
    path, spans = units
    _, end = spans[2]
    patch(path, end - 1, bytes([path.read_bytes()[end - 1] ^ 0x01]))
    assert codec.spans(path) == spans
    raises_value_error(lambda: drain(codec, path, *spans[2]))
    assert not codec.intact(path, *spans[2])


def test_a_truncated_frame_is_damage(tmp_path, units, codec):
    path, spans = units
    start, end = spans[0]
    cut = tmp_path / "cut.zst"
    cut.write_bytes(path.read_bytes()[:end - 5000])
    assert "cut short" in raises_value_error(lambda: codec.spans(cut))
    assert "cut short" in raises_value_error(lambda: drain(codec, cut, start, end))
    assert "cut short" in raises_value_error(lambda: drain(codec, path, start, end - 2))
    assert not codec.in_place(cut, start, end)


def test_garbage_after_a_frame_is_damage(tmp_path, units, codec):
    path, spans = units
    start, end = spans[2]
    with open(path, "ab") as out:
        out.write(b"garbage!")
    size = path.stat().st_size
    assert f"byte {spans[-1][1]}" in raises_value_error(lambda: codec.spans(path))
    assert codec.spans_from_headers(path) == spans
    # within a span: the bytes after the frame's end (another frame's, or garbage) are damage
    assert "bytes follow" in raises_value_error(lambda: drain(codec, path, start, spans[3][1]))
    assert "8 bytes follow" in raises_value_error(lambda: drain(codec, path, spans[3][0], size))
    assert not codec.intact(path, spans[3][0], size)
    assert not codec.in_place(path, spans[3][0], size)


def test_a_huge_claimed_block_size_is_damage_not_a_huge_read(units, codec):
    path, spans = units
    _, blocks = frame_layout(path, spans[0][0])
    set_block_header(path, blocks[1], 2, (1 << 21) - 1)          # 2 MiB, the field's maximum
    assert "claims" in raises_value_error(lambda: codec.spans(path))
    assert "claims" in raises_value_error(lambda: drain(codec, path, *spans[0]))
    assert not codec.in_place(path, *spans[0])


def test_a_reserved_block_type_is_damage(units, codec):
    path, spans = units
    _, blocks = frame_layout(path, spans[0][0])
    set_block_header(path, blocks[0], 3, blocks[0].end - blocks[0].start - 3)
    assert "reserved type" in raises_value_error(lambda: codec.spans(path))
    assert "reserved type" in raises_value_error(lambda: drain(codec, path, *spans[0]))


def test_frames_this_tool_never_writes_are_refused(tmp_path, codec):
    """A skippable frame between units, a frame without checksum, one asking for a window
    beyond every level's: none is a unit of ours (the module's docstring says why)."""
    good = frame_of(codec, b"unit")
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"note"
    path = tmp_path / "skippable.zst"
    write_units(path, [good, skippable, good])
    assert "skippable" in raises_value_error(lambda: codec.spans(path))

    required("zstandard")
    import zstandard
    unchecked = zstandard.ZstdCompressor(write_checksum=False).compress(b"unit")
    write_units(path, [good, unchecked])
    assert "no content checksum" in raises_value_error(lambda: codec.spans(path))

    wide = bytearray(good)
    assert not wide[4] & 0x20                                    # a Window_Descriptor follows
    wide[5] = (24 - 10) << 3                                     # 16 MiB
    assert zstd_module.window_from_descriptor(wide[5]) > WINDOW_LIMIT
    _, wide_span = write_units(path, [good, bytes(wide)])
    assert "window" in raises_value_error(lambda: codec.spans(path))
    assert "window" in raises_value_error(lambda: drain(codec, path, *wide_span))


def test_any_flipped_bit_is_a_value_error_or_the_same_content(tmp_path, codec):
    """Every byte of a small frame, a bit flipped in each: the frame reads back as it was
    (a bit no check covers, such as a larger window) or fails with a ValueError, never
    another exception."""
    data = ct_like(1500, 5) + b"tail" * 50
    frame = frame_of(codec, data)
    path = tmp_path / "flip.zst"
    outcomes = {"same": 0, "damage": 0}
    for position in range(len(frame)):
        flipped = bytearray(frame)
        flipped[position] ^= 1 << (position % 8)
        path.write_bytes(bytes(flipped))
        try:
            same = content(codec, path, (0, len(frame))) == data
        except ValueError:
            outcomes["damage"] += 1
            continue
        assert same, f"a flipped bit at byte {position} gave other content without an error"
        outcomes["same"] += 1
    assert outcomes["damage"] > len(frame) * 0.9


# -- finding units in a damaged or cut file ---------------------------------------------------

def test_spans_from_end_recovers_the_frames_after_a_damaged_one(tmp_path, codec):
    data = [ct_like(300_000, 10 + i) for i in range(5)]
    path = tmp_path / "damaged.zst"
    spans = write_units(path, [frame_of(codec, d) for d in data])
    _, blocks = frame_layout(path, spans[1][0])
    set_block_header(path, blocks[0], 2, 60_000)                 # unit 1 walks astray
    raises_value_error(lambda: codec.spans(path))
    found, why = codec.spans_from_end(path)
    assert found == spans[2:] and type(why) is ValueError
    assert [content(codec, path, span) for span in found] == data[2:]
    assert codec.spans_from_headers(path) == spans[:1]


def test_spans_from_end_skips_magics_inside_data_and_whole_looking_damage(tmp_path, codec):
    """Frame magics inside a unit (stored raw: random data) are tried and rejected; the
    frames after two damaged units are those found (damage in a unit hides nothing after
    it, but the chain found is the one that reaches the end)."""
    magic = zstd_module.ZSTD_MAGIC
    noisy = b"".join(os.urandom(5000) + magic + bytes([0x04, 0x58]) for _ in range(20))
    data = [noisy, ct_like(100_000, 20), noisy, ct_like(100_000, 21), b"end"]
    path = tmp_path / "magics.zst"
    spans = write_units(path, [frame_of(codec, d) for d in data])
    patch(path, spans[0][0], b"\0\0\0\0")                         # unit 0 loses its magic
    assert codec.spans_from_end(path)[0] == spans[1:]
    _, blocks = frame_layout(path, spans[2][0])
    set_block_header(path, blocks[0], 3, 0)                       # and unit 2 a block header
    found, why = codec.spans_from_end(path)
    assert found == spans[3:] and "no zstd frame starts at byte 0" in str(why)


def test_spans_from_end_finds_nothing_when_the_last_frame_is_cut(tmp_path, units, codec):
    path, spans = units
    cut = tmp_path / "cut.zst"
    cut.write_bytes(path.read_bytes()[:-3])
    found, why = codec.spans_from_end(cut)
    assert found == [] and "cut short" in str(why)
    assert codec.spans_from_headers(cut) == spans[:-1]


def test_spans_from_headers_stops_at_a_cut_append(tmp_path, units, codec):
    path, spans = units
    cut = tmp_path / "units.tar.zst.part"
    next_frame = frame_of(codec, ct_like(100_000, 30))
    cut.write_bytes(path.read_bytes() + next_frame[:len(next_frame) // 2])
    assert codec.spans_from_headers(cut) == spans
    raises_value_error(lambda: codec.spans(cut))
    empty = tmp_path / "empty.tar.zst.part"
    empty.write_bytes(b"")
    assert codec.spans_from_headers(empty) == codec.spans(empty) == []


# -- bounded memory, stopping -------------------------------------------------------------------

def test_a_small_frame_of_a_gib_of_zeros_decompresses_in_bounded_pieces(tmp_path, codec):
    compressor = codec.compressor(1)
    path = tmp_path / "zeros.zst"
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        for _ in range(1024):
            out.write(compressor.compress(zeros))
        out.write(compressor.flush())
    assert path.stat().st_size < 1 << 20                          # a GiB in under a MiB
    total = 0
    tracemalloc.start()
    try:
        for piece in codec.decompressed(path, 0, path.stat().st_size):
            assert len(piece) <= OUTPUT_PIECE and piece == zeros[:len(piece)]
            total += len(piece)
            del piece
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 1 << 30
    assert peak < 8 * OUTPUT_PIECE, f"{peak} bytes at the peak"


def test_a_set_stop_interrupts_decompression(tmp_path, codec):
    path = tmp_path / "stop.zst"
    data = ct_like(3 << 20, 40)
    (span,) = write_units(path, [frame_of(codec, data)])
    stop = threading.Event()
    pieces = codec.decompressed(path, *span, stop=stop)
    next(pieces)
    stop.set()
    with pytest.raises(Interrupted):
        next(pieces)
    with pytest.raises(Interrupted):
        next(iter(codec.decompressed(path, *span, stop=stop)))


# -- the library is optional ----------------------------------------------------------------------

def test_missing_says_what_to_install_when_no_library_imports(monkeypatch, tmp_path):
    required("zstandard")                                         # requirements-dev has it
    assert ZSTD.missing() is None
    for name in zstd_module.LIBRARIES:
        monkeypatch.setitem(sys.modules, name, None)              # `import name` fails
    message = ZSTD.missing()
    assert message is not None and "\n" not in message
    assert "pip install zstandard" in message and "--format tar.zst" in message
    with pytest.raises(ImportError, match="pip install zstandard"):
        ZSTD.compressor(ZSTD.default_level)
    # finding frames needs no library: --verify lists units on a machine without one
    path = tmp_path / "none.zst"
    path.write_bytes(bytes.fromhex("28b52ffd240001000099e9d851"))    # an empty frame
    assert ZSTD.spans(path) == [(0, 13)] and ZSTD.in_place(path, 0, 13)


def test_the_tool_starts_without_importing_a_zstd_library():
    # (urllib3 imports backports.zstd itself when it is installed, for zstd content
    # encoding: what counts is what importing the tool adds)
    probe = ("import sys, requests\n"
             "def zstd(): return {m for m in ('zstandard', 'backports.zstd', 'compression.zstd') "
             "if m in sys.modules}\n"
             "before = zstd()\n"
             "import tcia_dl.formats.zstd, tcia_dl.cli\n"
             "print(sorted(zstd() - before))")
    src = Path(zstd_module.__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(src)})
    assert out.stdout.strip() == "[]"
