"""Incompressible units (JPEG slides) are made at the codec's cheapest setting, each unit
deciding for itself (formats.base.ProbingCompressor): seen in the xz block header's LZMA2
dictionary size (preset 0: 256 KiB; preset 1: 1 MiB), in an archive xz and tar read whole."""
from __future__ import annotations

import io
import lzma
import random
import subprocess
import tarfile

from tcia_dl.formats import base
from tcia_dl.formats.tarstreams import SplitPacker
from tcia_dl.formats.xz import XZ, xz_stream_spans

MIB = 1 << 20


def noise(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def text(size: int) -> bytes:
    line = b"<roi x='12' y='40' label='tumor'/>\n"
    return (line * (size // len(line) + 1))[:size]


def varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def lzma2_dictionary(stream: bytes) -> int:
    """The dictionary size of the first block of an xz stream (its LZMA2 filter's one
    property byte, after the 12-byte stream header and the block header's flags)."""
    flags = stream[13]
    at = 14
    for present in (flags & 0x40, flags & 0x80):         # compressed, uncompressed size
        if present:
            _, at = varint(stream, at)
    filter_id, at = varint(stream, at)
    assert filter_id == 0x21                              # LZMA2, the only filter
    size, at = varint(stream, at)
    assert size == 1
    bits = stream[at]
    return (2 | (bits & 1)) << (bits // 2 + 11)


def compress(data: bytes, level: int) -> tuple[bytes, base.UnitCompressor]:
    compressor = XZ.compressor(level)
    out = b"".join(compressor.compress(data[i:i + 3 * MIB // 2])
                   for i in range(0, len(data), 3 * MIB // 2)) + compressor.flush()
    assert lzma.decompress(out) == data
    return out, compressor


def test_an_incompressible_unit_is_made_at_preset_0_a_compressible_one_at_its_level():
    slide, _ = compress(noise(3 * MIB), XZ.default_level)
    assert lzma2_dictionary(slide) == 256 << 10          # preset 0
    table, _ = compress(text(3 * MIB), XZ.default_level)
    assert lzma2_dictionary(table) == 1 << 20            # preset 1, as asked
    # a level above the default is kept too; a small unit is not probed
    assert lzma2_dictionary(compress(text(2 * MIB), 6)[0]) == 8 << 20
    assert lzma2_dictionary(compress(noise(32 << 10), 6)[0]) == 8 << 20


def test_the_probe_reads_the_units_first_mebibyte_only():
    # compressible first MiB, noise after: the default level (the probe sees the head)
    _, compressor = compress(text(MIB) + noise(2 * MIB), XZ.default_level)
    assert compressor.cheap is False
    _, compressor = compress(noise(MIB) + text(2 * MIB), XZ.default_level)
    assert compressor.cheap is True


def test_each_unit_of_a_split_series_decides_for_itself_and_the_archive_reads_whole(tmp_path):
    scratch = tmp_path / "series.part"
    scratch.write_bytes(b"")
    members = {"slide.svs": noise(2 * MIB), "a.xml": text(3 * MIB // 2),
               "c.svs": noise(900 << 10, seed=9)}
    packer = SplitPacker(scratch, lambda: XZ.compressor(XZ.default_level), "PKG/", tmp_path,
                         unit_bytes=MIB, cores=None)
    for name, data in members.items():
        packer.add(name, len(data), iter([data]))
    packer.finish()
    data = scratch.read_bytes()
    spans = xz_stream_spans(scratch)
    dictionaries = [lzma2_dictionary(data[start:end]) for start, end in spans]
    # slide.svs cut into two whole units of noise (preset 0, each probed on its own), then
    # its last bytes and a.xml's first (a unit of text: preset 1), a.xml's rest, and c.svs
    # (noise, but a unit under a MiB: not worth a probe, preset 1)
    assert dictionaries == [256 << 10, 256 << 10, 1 << 20, 1 << 20, 1 << 20]
    subprocess.run(["xz", "-t", str(scratch)], check=True)
    tar = io.BytesIO(lzma.decompress(data) + b"\0" * 1024)
    with tarfile.open(fileobj=tar) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert got == {f"PKG/{name}": body for name, body in members.items()}


def test_zstd_has_no_probe():
    """zstd passes incompressible blocks through faster than the probe would run."""
    from tcia_dl.formats.zstd import ZSTD
    assert not isinstance(ZSTD.compressor(ZSTD.default_level), base.ProbingCompressor)
