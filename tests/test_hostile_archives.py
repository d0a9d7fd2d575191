"""Hostile and broken archives (issue #18): --verify and --extract of an archive someone
crafted, or that a disk damaged, never hang, never show a traceback, never take memory in
proportion to what a member decompresses to, never write outside --output or leave scratch
behind, end promptly on SIGINT/SIGTERM, and never call OK what GNU tar and xz would read
differently. Every crafted archive is built here, byte by byte where it has to be."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Union

import pytest

from tcia_dl import cli, errors
from tcia_dl.formats import tree, xz as xzread
from helpers import ROOT, Run

MiB = 1 << 20
MTIME = 1_600_000_000
SERIES = "DEMO/P-1/2020-01-01-STUDY-1/1-SERIES-1"      # <Collection>/<patient>/<study>/<series>
LICENSE = b"CC BY 4.0: https://creativecommons.org/licenses/by/4.0/\n"
CITATION = b"# DEMO\n\nCite https://doi.org/10.0000/fake-nbia-demo\n"
METADATA_HEADER = "SeriesInstanceUID,PatientID,SeriesDescription,Collection,Path"


# -- builders: tar members ------------------------------------------------------------------

def pad(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = "",
           mtime: int = MTIME) -> bytes:
    """One tar member as GNU tar and tarfile write it (a pax header first where needed)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, link, mtime, 0o644
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return info.tobuf(tarfile.PAX_FORMAT) + data + pad(len(data))


def pax_record(key: str, value: str) -> bytes:
    """"<length> key=value\\n", the length counting itself."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax_header(records: bytes) -> bytes:
    """A pax extended header ('x') holding exactly these record bytes, malformed or not."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size, info.mtime = tarfile.XHDTYPE, len(records), MTIME
    return info.tobuf(tarfile.USTAR_FORMAT) + records + pad(len(records))


def ustar(name: str, size: int) -> bytes:
    """A bare ustar header block claiming size bytes (no content, no pax)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


# -- builders: xz streams -------------------------------------------------------------------

def xz_stream(*members: bytes, end: bool = False) -> bytes:
    """One independent xz stream of these members (end: the end-of-archive blocks too)."""
    return lzma.compress(b"".join(members) + (bytes(2 * tarfile.BLOCKSIZE) if end else b""),
                         format=lzma.FORMAT_XZ, preset=0)


def crafted_archive(path: Path, streams: Iterable[bytes]) -> Path:
    path.write_bytes(b"".join(streams))
    return path


def md5sums_of(digests: dict[str, str], collection: str = "DEMO") -> bytes:
    """An MD5SUMS of <collection>/ from name -> MD5, names relative to the collection
    folder (a name outside it is listed as it is)."""
    prefix = collection + "/"
    rows = [f"{md5}  {name[len(prefix):] if name.startswith(prefix) else name}"
            for name, md5 in sorted(digests.items())]
    return ("\n".join(rows) + "\n").encode()


def md5sums_for(files: dict[str, bytes], collection: str = "DEMO") -> bytes:
    return md5sums_of({name: hashlib.md5(data).hexdigest() for name, data in files.items()},
                      collection)


def metadata_csv(*rows: dict[str, str]) -> bytes:
    columns = METADATA_HEADER.split(",")
    lines = [METADATA_HEADER] + [",".join(row.get(c, "") for c in columns) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def closing_members(listed: dict[str, bytes], metadata: bytes = metadata_csv(),
                    digests: dict[str, str] | None = None) -> list[bytes]:
    """LICENSE, CITATION.md, metadata.csv and an MD5SUMS listing them, listed and digests
    (name -> MD5 of what is not at hand), as the members of our closing stream."""
    own = {"DEMO/LICENSE": LICENSE, "DEMO/CITATION.md": CITATION, "DEMO/metadata.csv": metadata}
    sums = md5sums_of({**{n: hashlib.md5(d).hexdigest() for n, d in {**listed, **own}.items()},
                       **(digests or {})})
    return [*(member(name, data) for name, data in own.items()), member("DEMO/MD5SUMS", sums)]


def closing_stream(listed: dict[str, bytes], metadata: bytes = metadata_csv(),
                   digests: dict[str, str] | None = None) -> bytes:
    """The closing stream of our layout (see closing_members), then end-of-archive."""
    return xz_stream(*closing_members(listed, metadata, digests), end=True)


def our_layout(path: Path, series: dict[str, bytes], listed: dict[str, bytes] | None = None,
               metadata: bytes = metadata_csv()) -> Path:
    """One stream per file of series, then a closing stream whose MD5SUMS lists listed
    (default: series, as they are)."""
    streams = [xz_stream(member(name, data)) for name, data in series.items()]
    return crafted_archive(path, [*streams, closing_stream(series if listed is None else listed,
                                                           metadata)])


# The same, built by hand where lzma.compress would be too slow (GiBs of zeros, MiBs of
# random bytes): LZMA2 chunks that each reset the dictionary, in one block, CRC32 checked.

XZ_MAGIC = b"\xfd7zXZ\x00"
CHECK_CRC32 = b"\x00\x01"


def crc32le(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "little")


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def xz_index(records: list[tuple[int, int]]) -> bytes:
    """Index: 0x00, count, (unpadded, uncompressed) per block, padding, CRC32."""
    body = b"\x00" + varint(len(records)) + b"".join(varint(u) + varint(n) for u, n in records)
    body += bytes(-len(body) % 4)
    return body + crc32le(body)


def xz_footer(index_size: int, flags: bytes = CHECK_CRC32) -> bytes:
    """Footer: CRC32 of the next six bytes, backward size, stream flags, 'YZ'."""
    backward = (index_size // 4 - 1).to_bytes(4, "little")
    return crc32le(backward + flags) + backward + flags + b"YZ"


def raw_lzma2(data: bytes) -> bytes:
    """LZMA2 chunks of data, the first resetting the dictionary, without the end marker."""
    chunks = lzma.compress(data, format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
    assert chunks[-1:] == b"\x00"
    return chunks[:-1]


_ZERO_MIB: list[bytes] = []


class Zeros(int):
    """So many zero bytes, in a hand-built stream."""


class Stored(bytes):
    """Bytes stored in uncompressed LZMA2 chunks (fast for random data)."""


def fast_xz_stream(pieces: Iterable[Union[bytes, Zeros, Stored]]) -> bytes:
    """An xz stream of the pieces' bytes in order, built in time proportional to its
    compressed size (plus a CRC32 over what it decompresses to)."""
    if not _ZERO_MIB:
        _ZERO_MIB.append(raw_lzma2(bytes(MiB)))
    block_header = bytes([2, 0, 0x21, 1, 0x16, 0, 0, 0])       # 12 bytes, LZMA2, 8 MiB dict
    block_header += crc32le(block_header)
    parts: list = [XZ_MAGIC + CHECK_CRC32 + crc32le(CHECK_CRC32), block_header]
    crc = size = compressed = 0
    zero = bytes(MiB)
    for piece in pieces:
        if isinstance(piece, Zeros):
            whole, rest = divmod(int(piece), MiB)
            chunks = [_ZERO_MIB[0]] * whole + ([raw_lzma2(bytes(rest))] if rest else [])
            for _ in range(whole):
                crc = zlib.crc32(zero, crc)
            crc = zlib.crc32(bytes(rest), crc)
        elif isinstance(piece, Stored):
            view = memoryview(piece)
            chunks = []
            for at in range(0, len(view), 65536):
                chunk = view[at:at + 65536]
                chunks += [b"\x01" + (len(chunk) - 1).to_bytes(2, "big"), chunk]
            crc = zlib.crc32(view, crc)
        elif piece:
            chunks = [raw_lzma2(piece)]
            crc = zlib.crc32(piece, crc)
        else:
            continue
        size += len(piece) if not isinstance(piece, Zeros) else int(piece)
        compressed += sum(len(chunk) for chunk in chunks)
        parts += chunks
    compressed += 1
    parts += [b"\x00", bytes(-compressed % 4), crc.to_bytes(4, "little")]
    index = xz_index([(len(block_header) + compressed + 4, size)])
    parts += [index, xz_footer(len(index))]
    return b"".join(parts)


def stream_parts(stream: bytes) -> tuple[bytes, bytes, bytes]:
    """(header and blocks, index, footer) of one xz stream."""
    backward = int.from_bytes(stream[-8:-4], "little")
    index_start = len(stream) - 12 - (backward + 1) * 4
    return stream[:index_start], stream[index_start:-12], stream[-12:]


def lying_stream(stream: bytes, covered: int) -> bytes:
    """stream with its index (and footer's backward size) rewritten to claim one block that
    also covers the `covered` bytes before it: walking back from its footer finds one big
    stream starting that far earlier. Every CRC is recomputed: only the lie is left."""
    body, _, footer = stream_parts(stream)
    assert covered % 4 == 0 and footer[8:10] == b"\x00\x04"          # CRC64, one block
    padded = covered + len(body) - 12                               # all of it a "block"
    index = xz_index([(padded, 123456)])
    return body + index + xz_footer(len(index), flags=footer[8:10])


# -- running the tool -----------------------------------------------------------------------

def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


def tool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """tcia_downloader.py in a child process (a hang is a TimeoutExpired, not a stuck test)."""
    try:
        return subprocess.run([sys.executable, str(ROOT / "tcia_downloader.py"), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args[:2])} still running after {timeout} s (a hang); "
                             f"stdout so far: {exc.stdout!r}") from None


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["--verify", str(path), "--cache_dir", str(path.parent / "vcache")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out.splitlines()


def extract(path: Path, into: Path, capsys, *selection: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["--extract", str(path), "--output", str(into), *selection,
                    "--cache_dir", str(into.parent / "xcache")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out.splitlines()


def summary_of(lines: list[str]) -> str:
    assert lines and " -> " in lines[-1] and (lines[-1].endswith(": OK")
                                              or lines[-1].endswith("problem(s)")), lines
    return lines[-1]


# A child that runs main() and writes its own peak RSS (ru_maxrss, kB) to a file: the
# whole process is the tool, nothing else is counted.
# The child's own peak: VmHWM belongs to the memory the process has since its exec, where
# ru_maxrss keeps the high-water mark of the forked copy of this (large) test process.
MEASURED = """
import sys
sys.path.insert(0, sys.argv[1])
import tcia_downloader
try:
    code = tcia_downloader.main(sys.argv[3:])
finally:
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    with open(sys.argv[2], "w") as handle:
        handle.write(str(peak))
sys.exit(code)
"""


def measured(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of the tool run in a child."""
    peak = tmp_path / f"peak-{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, "-c", MEASURED, str(ROOT), str(peak), *args],
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, int(peak.read_text())


def files_outside(root: Path, allowed: Iterable[Path]) -> list[Path]:
    """Everything under root that is not a folder and not under one of allowed (links
    are not followed: a link is reported where it stands)."""
    allowed = [os.path.abspath(p) for p in allowed]
    return [p for p in root.rglob("*") if p.is_symlink() or not p.is_dir()
            if not any(os.path.abspath(p) == a or os.path.abspath(p).startswith(a + os.sep)
                       for a in allowed)]


def dicom(number: int = 1, series: str = SERIES) -> str:
    return f"{series}/{number:08d}.dcm"


def run_both(archive: Path, tmp_path: Path, timeout: float,
             *selection: str) -> dict[str, subprocess.CompletedProcess]:
    """--verify and --extract of archive, each in a child; neither may show a traceback."""
    runs = {"--verify": tool("--verify", str(archive), "--cache_dir", str(tmp_path / "vcache"),
                             timeout=timeout),
            "--extract": tool("--extract", str(archive), "--output", str(tmp_path / "x"),
                              *selection, "--cache_dir", str(tmp_path / "xcache"),
                              timeout=timeout)}
    for done in runs.values():
        no_traceback(done.stdout, done.stderr)
    return runs


# -- 1. a pax record of length 0 --------------------------------------------------------------

def test_a_pax_record_of_length_zero_is_a_malformed_header_not_a_hang(tmp_path):
    """Today pax_path() steps 0 bytes forward for ever: --verify and --extract hang."""
    bad = pax_header(b"0 path=x\n") + ustar(dicom(1), 3) + b"abc" + pad(3)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz",
                              [xz_stream(bad), closing_stream({dicom(1): b"abc"})])
    tar = subprocess.run(["tar", "-tJf", str(archive)], capture_output=True, text=True,
                         timeout=20)
    assert tar.returncode != 0 and "Malformed extended header" in tar.stderr   # GNU tar's word
    for command, done in run_both(archive, tmp_path, timeout=20).items():
        assert done.returncode == errors.EXIT_INCOMPLETE, (command, done.stdout, done.stderr)
        named = [line for line in done.stdout.lower().splitlines() if "malformed" in line
                 and ("pax" in line or "extended header" in line)]
        assert named, (command, done.stdout)


# -- 2a. unsafe members that MD5SUMS lists: --verify applies --extract's rules ---------------

UNSAFE_REASONS = ("symbolic link", "absolute", "leaves the folder", "(..)", "unsafe",
                  "not a regular file", "refused")


def unsafe_case(kind: str, outside: Path) -> tuple[list[tuple[str, bytes, bytes, str]], list[str]]:
    """(members as (name, data, tar type, link target), the names that are unsafe)."""
    link = ("DEMO/link", b"", tarfile.SYMTYPE, str(outside))
    if kind == "symlink":
        return [link], ["DEMO/link"]
    if kind == "through_a_symlink":
        return [link, ("DEMO/link/x", b"through the link", tarfile.REGTYPE, "")], \
            ["DEMO/link", "DEMO/link/x"]
    if kind == "absolute":
        name = str(outside / "abs")
        return [(name, b"absolute", tarfile.REGTYPE, "")], [name]
    assert kind == "dotdot"
    return [("DEMO/../x", b"up one", tarfile.REGTYPE, "")], ["DEMO/../x"]


@pytest.mark.parametrize("kind", ["symlink", "through_a_symlink", "absolute", "dotdot"])
def test_verify_names_every_unsafe_member_that_md5sums_lists(tmp_path, kind, capsys):
    """Today --verify hashes a link (as empty), a file through it and DEMO/../x like any
    file: listed in MD5SUMS, they verify OK (exit 0), and tar -x would write them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    members, unsafe = unsafe_case(kind, outside)
    honest = {dicom(1): b"honest"}
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [
        xz_stream(*(member(name, data, kind=t, link=link) for name, data, t, link in members)),
        xz_stream(member(dicom(1), b"honest")),
        closing_stream({**honest, **{name: data for name, data, _, _ in members}})])
    before = sorted(tmp_path.rglob("*"))

    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    for name in unsafe:
        assert any(name in line and any(why in line.split(name, 1)[1] for why in UNSAFE_REASONS)
                   for line in lines[:-1]), (name, lines)

    into = tmp_path / "into"
    code, lines = extract(archive, into, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    assert list(outside.iterdir()) == []
    new = set(tmp_path.rglob("*")) - set(before)
    assert files_outside(tmp_path, [into, tmp_path / "vcache", tmp_path / "xcache"]) == \
        [p for p in before if p.is_symlink() or not p.is_dir()], new
    assert (into / dicom(1)).read_bytes() == b"honest"
    assert not (tmp_path / "x").exists() and not (into / "x").exists()


# -- 2b. streams xz -t rejects: a lying index, garbage inside a span --------------------------

def lying_archive(path: Path, kind: str) -> Path:
    """Archives whose last stream's index claims one block reaching back over the bytes
    before it: walking back from the end finds a stream there, decompressing it reads the
    first (whole) stream only and stops, never seeing the rest."""
    hidden = xz_stream(member("DEMO/hidden.txt", b"what xz -t sees and a naive reader skips"))
    series = xz_stream(member(dicom(1), b"abc"))
    closing = closing_stream({dicom(1): b"abc"})
    if kind == "second_stream_from_byte_0":
        # two streams in all: a whole one-stream archive, then one claiming to start at 0
        whole = xz_stream(member(dicom(1), b"abc"), *closing_members({dicom(1): b"abc"}),
                          end=True)
        return crafted_archive(path, [whole, lying_stream(hidden, len(whole))])
    if kind == "ignored_stream":
        return crafted_archive(path, [series, closing, lying_stream(hidden, len(closing))])
    assert kind == "garbage"
    garbage = bytes(range(1, 65))
    return crafted_archive(path, [series, closing, garbage,
                                  lying_stream(hidden, len(closing) + len(garbage))])


@pytest.mark.parametrize("kind", ["second_stream_from_byte_0", "ignored_stream", "garbage"])
def test_bytes_a_stream_does_not_account_for_are_damage(tmp_path, kind, capsys):
    """Today the span's decompressor stops at the first stream's end and the rest of the
    span (a stream, garbage) is never looked at: --verify and --extract say OK."""
    archive = lying_archive(tmp_path / "DEMO.tar.xz", kind)
    assert subprocess.run(["xz", "-t", str(archive)], capture_output=True,
                          timeout=20).returncode != 0
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    code, lines = extract(archive, tmp_path / "x", capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    assert summary_of(lines).endswith("problem(s)")


# -- 2c. members a naive reader reads other than tar ----------------------------------------

def test_a_pax_size_is_honoured_as_tar_does(tmp_path, capsys):
    """ustar says 100 bytes, pax says 200: tar reads 200 (both end at the same block), MD5SUMS
    lists the MD5 of the first 100. Today --verify reads the ustar size and says OK."""
    content = bytes(range(200))
    block = pax_header(pax_record("size", "200")) + ustar(dicom(1), 100) + content + pad(200)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [
        xz_stream(block), closing_stream({}, digests={dicom(1): hashlib.md5(content[:100])
                                                      .hexdigest()})])
    by_tar = tmp_path / "tar"
    by_tar.mkdir()
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(by_tar)], check=True, timeout=20)
    assert (by_tar / dicom(1)).read_bytes() == content
    assert subprocess.run(["md5sum", "--quiet", "-c", "MD5SUMS"], cwd=by_tar / "DEMO",
                          capture_output=True).returncode != 0
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    code, lines = extract(archive, tmp_path / "x", capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    assert not (tmp_path / "x" / dicom(1)).exists() or \
        (tmp_path / "x" / dicom(1)).read_bytes() == content


def test_the_last_of_two_pax_paths_names_the_member_as_for_tar(tmp_path, capsys):
    """Two path= records: tar (and tarfile) take the last, MD5SUMS lists the first. Today
    pax_path() returns the first and --verify says OK."""
    first, second = dicom(1), dicom(2)
    records = pax_record("path", first) + pax_record("path", second)
    block = pax_header(records) + ustar(dicom(3), 3) + b"abc" + pad(3)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz",
                              [xz_stream(block), closing_stream({first: b"abc"})])
    listing = subprocess.run(["tar", "-tJf", str(archive)], capture_output=True, text=True,
                             check=True, timeout=20).stdout.splitlines()
    assert second in listing and first not in listing
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    assert any(first in line and "missing" in line for line in lines), lines


# -- 3c. a stale journal beside an archive --------------------------------------------------

def archive_in_order(tmp_path: Path, fake, output: Path, later_uid: str) -> Path:
    """A finished archive whose later_uid series' stream comes last (it fails in the first
    run and is appended by the resume)."""
    fake.script_faults(later_uid, ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1", output=output).code == errors.EXIT_INCOMPLETE
    assert Run(tmp_path, fake, output=output).code == errors.EXIT_OK
    return output / "DEMO.tar.xz"


def test_extract_with_another_archives_journal_writes_only_the_patient_asked_for(
        tmp_path, fake_nbia_factory, capsys):
    """Two series of two patients, in opposite orders in two archives: the last series'
    stream of both ends at the same byte, which the stale journal says holds the other
    series. Today --extract trusts the journal's stream -> series map: --patient of the
    series listed last writes nothing, of the other writes the other patient's files too
    (MD5SUMS lists them, so they pass its check)."""
    fake = fake_nbia_factory(demo_series=2)
    one, two = fake.series("DEMO")
    assert one["PatientID"] != two["PatientID"]
    first = archive_in_order(tmp_path, fake, tmp_path / "a", two["SeriesInstanceUID"])
    second = archive_in_order(tmp_path, fake, tmp_path / "b", one["SeriesInstanceUID"])
    stale = tmp_path / "b" / "DEMO.tar.xz.journal"
    shutil.copy(tmp_path / "a" / "DEMO.tar.xz.journal", stale)
    # The two archives' streams end at nearly the same bytes (their tar headers hold the
    # time of packing): make the stale journal name exactly the second archive's ends.
    ends = [end for _, end in xzread.xz_stream_spans(second)]
    with sqlite3.connect(stale) as db:
        rows = db.execute("SELECT uid FROM series ORDER BY archive_end").fetchall()
        for (uid,), end in zip(rows, ends):
            db.execute("UPDATE series SET archive_end = ? WHERE uid = ?", (end, uid))
    assert xzread.xz_stream_spans(first)[0][0] == 0 and len(rows) == 2

    for patient in (two["PatientID"], one["PatientID"]):
        into = tmp_path / f"x-{patient}"
        code, lines = extract(second, into, capsys, "--patient", patient)
        assert code in (errors.EXIT_OK, errors.EXIT_INCOMPLETE), lines
        summary_of(lines)
        written = [p.relative_to(into / "DEMO") for p in (into / "DEMO").rglob("*.dcm")]
        assert {p.parts[0] for p in written} == {patient}, (patient, written)
        with tarfile.open(second, "r:xz") as tar:
            theirs = sorted(m.name for m in tar.getmembers()
                            if m.name.startswith(f"DEMO/{patient}/"))
        assert sorted(f"DEMO/{p}" for p in written) == theirs


# -- 4. memory --------------------------------------------------------------------------------

PEAK_LIMIT = 500 * 1000 * 1000
GiB = 1 << 30


def zeros_md5(size: int) -> str:
    if size == GiB:
        return "cd573cfaace07e7949bc0c46028904ff"       # `head -c 1G /dev/zero | md5sum`
    digest, zero = hashlib.md5(), bytes(MiB)
    for _ in range(size // MiB):
        digest.update(zero)
    digest.update(bytes(size % MiB))
    return digest.hexdigest()


def zeros_archive(path: Path, size: int) -> Path:
    """Our layout, one series of one member of size zero bytes (150 kB a GiB), MD5SUMS right."""
    name = dicom(1)
    return crafted_archive(path, [fast_xz_stream([ustar(name, size), Zeros(size)]),
                                  closing_stream({}, digests={name: zeros_md5(size)})])


def test_a_member_of_a_gib_of_zeros_verifies_and_extracts_in_little_memory(tmp_path):
    """A legal archive (xz -t and md5sum -c pass) whose one member decompresses to 1 GiB
    (300 MiB for --extract, to spare the disk) from 150 kB. Today read_range() feeds 4 MiB
    of compressed bytes to one decompress() call with no max_length: the whole member lands
    in memory, then is copied (peak ~4 GB for the GiB, ~1.3 GB for 300 MiB)."""
    archive = zeros_archive(tmp_path / "DEMO.tar.xz", GiB)
    code, out, err, peak = measured(tmp_path, "--verify", str(archive), "--cache_dir",
                                    str(tmp_path / "c"))
    no_traceback(out, err)
    assert code == errors.EXIT_OK, out
    assert peak < PEAK_LIMIT, f"--verify peak RSS {peak / 1e6:.0f} MB"

    (tmp_path / "small").mkdir()
    archive = zeros_archive(tmp_path / "small" / "DEMO.tar.xz", 300 * MiB)
    into = tmp_path / "x"
    code, out, err, peak = measured(tmp_path, "--extract", str(archive), "--output", str(into),
                                    "--cache_dir", str(tmp_path / "c"))
    no_traceback(out, err)
    assert code == errors.EXIT_OK, out
    assert peak < PEAK_LIMIT, f"--extract peak RSS {peak / 1e6:.0f} MB"
    assert (into / dicom(1)).stat().st_size == 300 * MiB


def test_many_big_members_named_like_collection_files_take_little_memory(tmp_path):
    """12 members of 64 MiB of zeros named like collection files (MD5SUMS.1, metadata-1.csv)
    beside the real ones: not listed, so exit 1. Today each is kept as text up to 64 MiB
    (768 MiB in all), and csv reads a 64 MiB field of the metadata ones."""
    size = 64 * MiB
    names = [f"DEMO/MD5SUMS.{i}" for i in range(1, 7)] + \
        [f"DEMO/metadata-{i}.csv" for i in range(1, 7)]
    pieces: list = [xz_stream(member(dicom(1), b"abc"))]
    big = []
    for name in names:
        big += [ustar(name, size), Zeros(size)]
    closing = fast_xz_stream([*big, *closing_members({dicom(1): b"abc"}),
                              bytes(2 * tarfile.BLOCKSIZE)])
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [*pieces, closing])
    for args in (["--verify", str(archive)],
                 ["--extract", str(archive), "--output", str(tmp_path / "x")]):
        code, out, err, peak = measured(tmp_path, *args, "--cache_dir", str(tmp_path / "c"))
        no_traceback(out, err)
        assert code == errors.EXIT_INCOMPLETE, (args[0], out, err[-2000:])
        assert peak < PEAK_LIMIT, f"{args[0]} peak RSS {peak / 1e6:.0f} MB"


def flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def test_a_flipped_backward_size_bit_neither_reads_the_archive_into_memory_nor_crashes(
        tmp_path):
    """Bit 27 of the last footer's Backward Size makes the index 512 MiB: today
    xz_stream_spans() reads those 512 MiB in one read() (then mmaps and scans the whole
    file for stream headers)."""
    data = random.Random(4).randbytes(MiB)
    count = 600
    name = dicom(1)
    digest = hashlib.md5()
    for _ in range(count):
        digest.update(data)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [
        fast_xz_stream([ustar(name, count * MiB), *[Stored(data)] * count]),
        closing_stream({}, digests={name: digest.hexdigest()})])
    size = archive.stat().st_size
    flip_bit(archive, size - 8 + 3, 3)             # bit 27 of the little-endian field
    with open(archive, "rb") as handle:
        handle.seek(size - 8)
        assert 500 * MiB < int.from_bytes(handle.read(4), "little") * 4 < size
    code, out, err, peak = measured(tmp_path, "--verify", str(archive), "--cache_dir",
                                    str(tmp_path / "c"))
    no_traceback(out, err)
    assert code == errors.EXIT_INCOMPLETE, out
    assert peak < PEAK_LIMIT, f"--verify peak RSS {peak / 1e6:.0f} MB"


@pytest.fixture
def real_archive(tmp_path, fake_nbia_factory) -> Path:
    """A finished 3-series archive from the fake server, its journal beside it."""
    fake = fake_nbia_factory(demo_series=3)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    return tmp_path / "out" / "DEMO.tar.xz"


def test_each_flipped_backward_size_bit_of_a_real_archive_gives_a_repair_manifest(
        real_archive, capsys):
    """Today a high bit makes xz_stream_spans() seek before byte 0: an OSError that main()
    reports as 'cannot write ...', without the .damaged.tcia."""
    original = real_archive.read_bytes()
    manifest = real_archive.with_name("DEMO.damaged.tcia")
    wrong = []
    for bit in range(32):
        real_archive.write_bytes(original)
        flip_bit(real_archive, len(original) - 8 + bit // 8, bit % 8)
        manifest.unlink(missing_ok=True)
        code, lines = verify(real_archive, capsys)
        if code != errors.EXIT_INCOMPLETE or not manifest.exists():
            wrong.append((bit, code, lines[-3:]))
    assert not wrong


# -- 5. crashes -------------------------------------------------------------------------------

# One child for hundreds of --verify runs: each case flips one bit of the archive (its
# journal beside it), runs main() with stdout and stderr captured, and prints one JSON line.
FLIPS = """
import contextlib, io, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import tcia_downloader as td
archive, cache, cases = sys.argv[2], sys.argv[3], json.load(open(sys.argv[4]))
manifest = archive[:-len(".tar.xz")] + ".damaged.tcia"
original = open(archive, "rb").read()
for offset, bit in cases:
    data = bytearray(original)
    data[offset] ^= 1 << bit
    with open(archive, "wb") as handle:
        handle.write(data)
    if os.path.exists(manifest):
        os.unlink(manifest)
    out, err, escaped = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = td.main(["--verify", archive, "--cache_dir", cache])
        except BaseException:
            code, escaped = None, traceback.format_exc()
    print(json.dumps({"offset": offset, "bit": bit, "code": code, "escaped": escaped,
                      "traceback": "Traceback" in out.getvalue() + err.getvalue(),
                      "manifest": os.path.exists(manifest),
                      "last": (out.getvalue().splitlines() or err.getvalue().splitlines()
                               or [""])[-1][-300:]}), flush=True)
with open(archive, "wb") as handle:
    handle.write(original)
"""


def test_single_bit_flips_near_stream_ends_are_reported_damage_with_a_manifest(real_archive,
                                                                               tmp_path):
    """Every bit of the last 64 bytes of the closing stream (block end, check, index,
    footer) and a sample of each series stream's: exit 1, no exception, a repair manifest.
    Today index bits make xz_varint() run past the index (IndexError escapes) and
    Backward Size bits make it seek before byte 0 (an OSError main() calls 'cannot write',
    exit 1 without a manifest)."""
    spans = xzread.xz_stream_spans(real_archive)
    pick = random.Random(18)
    cases = [(spans[-1][1] - 64 + i // 8, i % 8) for i in range(512)]
    for _, end in spans[:-1]:
        cases += [(end - 64 + i // 8, i % 8) for i in pick.sample(range(512), 16)]
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, "-c", FLIPS, str(ROOT), str(real_archive),
                           str(tmp_path / "fcache"), str(listing)],
                          capture_output=True, text=True, timeout=90)
    no_traceback(done.stderr)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases), done.stderr[-2000:]
    wrong = [r for r in results if r["code"] != errors.EXIT_INCOMPLETE or r["escaped"]
             or r["traceback"] or not r["manifest"]]
    assert not wrong, (f"{len(wrong)} of {len(cases)} flips handled wrong, e.g.:\n" +
                       "\n".join(json.dumps(r)[:600] for r in wrong[:: max(1, len(wrong) // 8)]))


def garbage_journal(path: Path) -> None:
    path.write_bytes(random.Random(5).randbytes(4096))


def wrong_schema_journal(path: Path) -> None:
    """Tables named as ours, enough for read_journal(), without the columns the rest reads."""
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE series (uid TEXT, collection TEXT, path TEXT)")
        db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        db.execute("INSERT INTO series VALUES ('1.2.3', 'DEMO', 'P/S/1-x')")
        db.execute("INSERT INTO meta VALUES ('finished', 'yes')")
    db.close()


def bad_json_journal(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE series SET record = '{not json'")
    db.close()


@pytest.fixture
def real_part(tmp_path, fake_nbia_factory) -> Path:
    """An unfinished archive (one of 4 series failed), its journal beside it."""
    fake = fake_nbia_factory(demo_series=4)
    fake.script_faults(fake.series("DEMO")[2]["SeriesInstanceUID"], ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1").code == errors.EXIT_INCOMPLETE
    return tmp_path / "out" / "DEMO.tar.xz.part"


@pytest.mark.parametrize("spoil", [garbage_journal, wrong_schema_journal, bad_json_journal],
                         ids=["garbage", "wrong_schema", "bad_record_json"])
@pytest.mark.parametrize("which", ["finished", "part"])
def test_a_malformed_journal_beside_an_archive_is_no_traceback(request, tmp_path, spoil, which):
    """Today: garbage -> read_journal() raises 'unreadable' (exit 2: as if there were
    nothing to check); the wrong schema passes read_journal() and then 'no such column:
    archive_end' escapes as a traceback; bad record JSON in a .part's journal escapes from
    json.loads() in --extract."""
    archive = request.getfixturevalue("real_archive" if which == "finished" else "real_part")
    spoil(archive.with_name("DEMO.tar.xz.journal"))
    for command, done in run_both(archive, tmp_path, timeout=60).items():
        assert done.returncode in (errors.EXIT_OK, errors.EXIT_INCOMPLETE), (command, done.stdout,
                                                                     done.stderr[-2000:])
        last = done.stdout.splitlines()[-1] if done.stdout.strip() else ""
        assert last.endswith(": OK") or last.endswith("problem(s)"), (command, done.stdout)


@pytest.mark.parametrize("name", ["notes.journal", "DEMO.journal"])
def test_a_garbage_journal_beside_a_folder_tree_is_no_traceback(tmp_path, fake_nbia_factory,
                                                                name):
    """A folder tree's journal is <output>/<name>.journal (journal_path()); --verify reads
    every *.journal there. Today repair_manifests() queries each, and sqlite's 'file is not
    a database' escapes as a traceback even when the tree is whole."""
    fake = fake_nbia_factory(demo_series=2)
    assert Run(tmp_path, fake, compression=False).code == errors.EXIT_OK
    output = tmp_path / "out"
    assert tree.DirectoryTarget.journal_path(output, "DEMO").exists()
    garbage_journal(output / name)
    for path in (output, output / "DEMO"):
        done = tool("--verify", str(path), "--cache_dir", str(tmp_path / "c"))
        no_traceback(done.stdout, done.stderr)
        assert done.returncode in (errors.EXIT_OK, errors.EXIT_INCOMPLETE), done.stderr[-2000:]
        assert done.stdout.splitlines()[-1].endswith((": OK", "problem(s)")), done.stdout


def test_an_implausible_mtime_is_refused_without_a_traceback(tmp_path):
    """mtime=2**80 in a pax header: --verify exit 1 naming the member, --extract exit 1
    without writing it. Today the pax mtime is not read at all: both say OK."""
    name = dicom(1)
    block = pax_header(pax_record("mtime", str(2 ** 80))) + ustar(name, 3) + b"abc" + pad(3)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz",
                              [xz_stream(block), closing_stream({name: b"abc"})])
    runs = run_both(archive, tmp_path, timeout=60)
    verified, extracted = runs["--verify"], runs["--extract"]
    assert verified.returncode == errors.EXIT_INCOMPLETE, verified.stdout
    assert any(name in line for line in verified.stdout.splitlines()[:-1]), verified.stdout
    assert extracted.returncode == errors.EXIT_INCOMPLETE, extracted.stdout
    assert not (tmp_path / "x" / name).exists()


def metadata_archive(path: Path, header: str, description: str) -> Path:
    name = dicom(1)
    columns = header.split(",")
    row = [{"SeriesInstanceUID": "1.2.3", "PatientID": "P-1", "SeriesDescription": description,
            "Collection": "DEMO", "Path": SERIES[len("DEMO/"):]}.get(c.replace("\0", ""), "")
           for c in columns]
    metadata = (header + "\n" + ",".join(row) + "\n").encode()
    return crafted_archive(path, [xz_stream(member(name, b"abc")),
                                  closing_stream({name: b"abc"}, metadata=metadata)])


def test_a_200000_character_metadata_value_is_our_own_kind_of_content(tmp_path):
    """Today csv's 131072-character field limit raises _csv.Error out of cross_check()
    (--verify) and metadata_rows() (--extract)."""
    archive = metadata_archive(tmp_path / "DEMO.tar.xz", METADATA_HEADER, "d" * 200_000)
    for command, done in run_both(archive, tmp_path, timeout=60).items():
        assert done.returncode == errors.EXIT_OK, (command, done.stdout, done.stderr[-2000:])


def test_a_nul_in_a_metadata_header_is_no_traceback(tmp_path):
    archive = metadata_archive(tmp_path / "DEMO.tar.xz",
                               METADATA_HEADER.replace("PatientID", "Patient\0ID"), "desc")
    for command, done in run_both(archive, tmp_path, timeout=60).items():
        assert done.returncode in (errors.EXIT_OK, errors.EXIT_INCOMPLETE), (command, done.stdout)
        assert done.stdout.splitlines()[-1].endswith((": OK", "problem(s)")), done.stdout


# -- 6. signals -------------------------------------------------------------------------------

# The tool in a child whose read_range() (the generator of chunks every stream is read
# through) sends the signal to its own process on its first chunk, then counts the chunks
# each thread reads after it: no sleep, no race with the reading.
SIGNALLED = """
import json, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import tcia_downloader as td
from tcia_dl.formats import tarstreams
from tcia_dl.sources import idc
from tcia_dl import storage
from tcia_dl import verify
from tcia_dl.formats import xz as xzread
sig, report = getattr(signal, sys.argv[2]), sys.argv[3]
real, lock, state = storage.read_range, threading.Lock(), {"sent": False, "after": {}}
def write_report():                  # at every count: however the process ends, it is there
    with open(report, "w") as handle:
        json.dump(state, handle)
def read_range(path, start, end):
    for chunk in real(path, start, end):
        with lock:
            if not state["sent"]:
                state["sent"] = True
                write_report()
                os.kill(os.getpid(), sig)
            else:
                thread = threading.current_thread().name
                state["after"][thread] = state["after"].get(thread, 0) + 1
                write_report()
        yield chunk
tarstreams.read_range = read_range
idc.read_range = read_range
verify.read_range = read_range
xzread.read_range = read_range
sys.exit(td.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def forty_streams(tmp_path_factory) -> Path:
    """40 series streams of 1 MiB of random bytes each (a chunk of read_range() each), with
    a right MD5SUMS: a run that ignores a signal reads all 40."""
    folder = tmp_path_factory.mktemp("forty")
    pick = random.Random(40)
    files = {dicom(1, f"DEMO/P-{i}/2020-01-01-STUDY-1/1-SERIES-{i}"): pick.randbytes(MiB)
             for i in range(40)}
    streams = [fast_xz_stream([ustar(name, MiB),
                               Stored(data)]) for name, data in files.items()]
    return crafted_archive(folder / "DEMO.tar.xz", [*streams, closing_stream(files)])


@pytest.mark.parametrize("sig,expected", [("SIGINT", errors.EXIT_SIGINT),
                                          ("SIGTERM", errors.EXIT_SIGTERM)])
@pytest.mark.parametrize("command", ["--verify", "--extract"])
def test_a_signal_ends_verify_and_extract_promptly(forty_streams, tmp_path, sig, expected,
                                                   command):
    """Today StopControl's handler only sets events that --verify and --extract never look
    at: they read all 40 streams and exit 0 with ': OK'."""
    report = tmp_path / "report.json"
    args = ["--verify", str(forty_streams)] if command == "--verify" else \
        ["--extract", str(forty_streams), "--output", str(tmp_path / "x")]
    done = subprocess.run([sys.executable, "-c", SIGNALLED, str(ROOT), sig, str(report), *args,
                           "--cache_dir", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60)
    no_traceback(done.stdout, done.stderr)
    state = json.loads(report.read_text())
    assert state["sent"]
    assert done.returncode == expected, (done.returncode, done.stdout[-1000:])
    assert max(state["after"].values(), default=0) < 3, state["after"]
    assert not any(line.endswith(": OK") for line in done.stdout.splitlines()), done.stdout
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tcia-extract")] == []


# -- 7. extraction debris ---------------------------------------------------------------------

def test_members_that_clash_on_disk_are_named_and_leave_no_scratch(tmp_path, capsys):
    """A file over a folder (DEMO/a/b, then DEMO/a), a folder over a file (DEMO/f, then
    DEMO/f/g), and DEMO/. (the collection folder itself). Today the first clash's OSError
    ends the whole run ('cannot write ...', no summary line), the later members are never
    written and the clashing member's .tcia-extract scratch file stays behind."""
    clashing = {"DEMO/a/b": b"b under a", "DEMO/a": b"a over the folder a",
                "DEMO/f": b"f", "DEMO/f/g": b"g under the file f", "DEMO/.": b"dot",
                "DEMO/ok1": b"after the clashes"}
    later = {dicom(2): b"another stream"}
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [
        xz_stream(*(member(name, data) for name, data in clashing.items())),
        xz_stream(*(member(name, data) for name, data in later.items())),
        closing_stream({**clashing, **later})])
    into = tmp_path / "x"
    capsys.readouterr()
    code = cli.main(["--extract", str(archive), "--output", str(into),
                    "--cache_dir", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.out.splitlines()
    assert code == errors.EXIT_INCOMPLETE, captured
    assert summary_of(lines).endswith("problem(s)")
    for name in ("DEMO/a", "DEMO/f/g", "DEMO/."):
        assert any(line.startswith(f"{name}:") or f" {name}:" in line or f"{name};" in line
                   for line in lines[:-1]), (name, lines)
    assert (into / "DEMO/ok1").read_bytes() == b"after the clashes"
    assert (into / dicom(2)).read_bytes() == b"another stream"
    for name in ("DEMO/a/b", "DEMO/f"):                 # written first: kept whole, if kept
        path = into / name
        assert not path.exists() or path.read_bytes() == clashing[name]
    assert (into / "DEMO").is_dir()
    assert [p for p in into.rglob("*") if p.name.endswith(".tcia-extract")] == []


# -- 9. smaller things ------------------------------------------------------------------------

def test_16_mib_of_stream_padding_is_skipped_quickly(tmp_path, capsys):
    """NUL stream padding between streams is legal xz (xz -t accepts it). Today
    xz_stream_spans() steps back 4 bytes at a time, a seek and a read each: ~10 s."""
    name = dicom(1)
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [xz_stream(member(name, b"abc")),
                                                         bytes(16 * MiB),
                                                         closing_stream({name: b"abc"})])
    assert subprocess.run(["xz", "-t", str(archive)], timeout=30).returncode == 0
    started = time.monotonic()
    code, lines = verify(archive, capsys)
    elapsed = time.monotonic() - started
    assert code == errors.EXIT_OK, lines
    assert elapsed < 5, f"--verify took {elapsed:.1f} s"


def empty_members(names: list[str]) -> bytes:
    """ustar headers of empty regular files, patched into one template (tobuf() takes
    ~35 us a header; this ~1 us)."""
    template = bytearray(tarfile.TarInfo("").tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template)
    head, tail = bytes(template[:148]), bytes(template[156:])
    out = []
    for name in names:
        encoded = name.encode()
        assert len(encoded) < 100
        out += [encoded, head[len(encoded):], b"%06o\0 " % (base + sum(encoded)), tail]
    return b"".join(out)


def test_200000_empty_files_verify_in_bounded_memory(tmp_path):
    """200,000 empty members in one stream, MD5SUMS right: exit 0. Measured on the code
    this was written against: 79 MB for the interpreter and its imports (--verify of a
    one-file archive), 393-409 MB here, i.e. ~1.6 kB a file (a VerifiedMember each, the
    by-name dict and set of cross_check(), MD5SUMS decoded and split). The bound, 250 MB,
    leaves ~850 bytes a file: a name and an MD5 held once each fit easily."""
    names = [dicom(i, f"DEMO/P-{i // 1000}/2020-01-01-STUDY-1/1-SERIES-{i // 1000}")
             for i in range(200_000)]
    stream = lzma.compress(empty_members(names), format=lzma.FORMAT_XZ, preset=0)
    empty = hashlib.md5(b"").hexdigest()
    archive = crafted_archive(tmp_path / "DEMO.tar.xz", [
        stream, closing_stream({}, digests=dict.fromkeys(names, empty))])
    code, out, err, peak = measured(tmp_path, "--verify", str(archive), "--cache_dir",
                                    str(tmp_path / "c"))
    no_traceback(out, err)
    assert code == errors.EXIT_OK, out[-2000:]
    assert "200004 files" in out
    assert peak < 250 * 1000 * 1000, f"--verify peak RSS {peak / 1e6:.0f} MB"
