"""An archive as a tar split into independent compressed units, one per series (several
for a big one, cut between its members and inside one larger than a unit), appended after
fsync; codec-neutral (formats.xz and formats.zstd bring the codec)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import os
import tarfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, TYPE_CHECKING

from ..collection_files import collection_files
from ..errors import EXIT_USAGE, FatalRunError, Interrupted, TransientError
from ..journal import read_only
from ..logs import human_bytes, log
from ..settings import CHUNK_SIZE, COMPRESS_BLOCK, TAR_BLOCK, TAR_RECORD, usable_cores
from ..storage import (SpaceNeed, fsync_directory, open_no_follow, raise_if_disk_full,
                       read_range, refuse_symlink)
from .base import (Codec, Packer, PackingCores, Prepared, Target, UnitCompressor,
                   estimated_bytes)

if TYPE_CHECKING:
    from ..plan import PlannedSeries
    from ..sources.base import VerifiedSeries


def stream_sha256(path: Path, start: int, end: int) -> str:
    digest = hashlib.sha256()
    for chunk in read_range(path, start, end):
        digest.update(chunk)
    return digest.hexdigest()


def first_damaged_unit(codec: Codec, path: Path,
                       streams: list[tuple[str, str, int, int, Optional[str]]],
                       full: bool = True) -> Optional[int]:
    """The index of the first series whose bytes are not what its journal row says, or
    None: by the SHA-256 of all its units, or (a row of 0.3, which kept none) by the one
    unit's own checks, as 0.3 wrote one unit per series; not full: its first unit's start
    and its last unit's end in place. On all usable cores: hashing releases the GIL."""
    def intact(stream: tuple[str, str, int, int, Optional[str]]) -> bool:
        _, _, start, end, sha256 = stream
        if not full:
            return codec.in_place(path, start, end)
        if sha256 is None:
            return codec.intact(path, start, end)
        return stream_sha256(path, start, end) == sha256
    with concurrent.futures.ThreadPoolExecutor(usable_cores()) as pool:
        for index, ok in enumerate(pool.map(intact, streams)):
            if not ok:
                return index
    return None


def copy_unit(codec: Codec, path: Path, start: int, end: int, out: io.BufferedWriter,
              sha256: Optional[str]) -> bool:
    """Append one committed unit of path to out if it is the one its journal row
    describes (by its sha256; a 0.3 row has none: by the codec's own checks). False: not
    copied whole, and out must be cut back."""
    if sha256 is None and not codec.intact(path, start, end):
        return False
    digest = hashlib.sha256()
    for chunk in read_range(path, start, end):
        digest.update(chunk)
        out.write(chunk)
    return sha256 is None or digest.hexdigest() == sha256


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """A ustar header, preceded by a pax header only where a name is too long for ustar."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_padding(size: int) -> bytes:
    return tarfile.NUL * (-size % TAR_BLOCK)


def passing_on(chunks: Iterator[bytes]) -> Callable[[Callable[[bytes], None]], None]:
    """What UnitWriter.add_file fills a member with: every chunk, passed on."""
    def fill(write: Callable[[bytes], None]) -> None:
        for chunk in chunks:
            write(chunk)
    return fill


class UnitWriter:
    """One complete compressed unit in a file: tar fragments go in, compressed bytes come
    out. With after_existing, the unit goes after what the file already holds, from
    `start`, to `end` once closed."""

    def __init__(self, path: Path, compressor: UnitCompressor, after_existing: bool = False):
        self._file = open(path, "r+b" if after_existing else "wb")
        self.start = self.end = self._file.seek(0, os.SEEK_END)
        self._compressor = compressor
        self.tar_bytes = 0
        self.digest = hashlib.sha256()    # of the compressed bytes, as produced
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        # The compressor gets a block at a time, not each header, padding and small chunk:
        # every call lets go of the GIL and must win it back from the downloading threads,
        # a wait of up to the switch interval (5 ms) each time (an IDC run of 1,200 small
        # objects: 10.9 s -> 10.3 s). The output is the same: a compressor's does not
        # depend on how its input is cut.
        self.tar_bytes += len(data)
        self._pending += data
        if len(self._pending) >= COMPRESS_BLOCK:
            self._compress_pending()

    def _compress_pending(self) -> None:
        pending, self._pending = self._pending, bytearray()
        self._emit(self._compressor.compress(pending))

    def _emit(self, compressed: bytes) -> None:
        self.digest.update(compressed)
        self._file.write(compressed)

    def add_file(self, name: str, size: int, mtime: int,
                 fill: Callable[[Callable[[bytes], None]], None]) -> None:
        """A tar member whose size bytes fill() passes to the callable it is given."""
        self.write(tar_header(name, size, mtime))
        before = self.tar_bytes
        fill(self.write)
        if self.tar_bytes - before != size:
            raise TransientError(f"{name}: {self.tar_bytes - before} bytes instead of {size}")
        self.write(tar_padding(size))

    def close(self) -> None:
        self._compress_pending()
        self._emit(self._compressor.flush())
        self.end = self._file.tell()
        self._file.close()

    def abort(self) -> None:
        """Close after a failure; a full disk must not fail the flush again and hide why."""
        with contextlib.suppress(OSError):
            self._file.close()


class UnitPacker:
    """A MemberSink that turns a series into one tar fragment in one compressed unit,
    compressed on the worker's thread and written after the series' download in its own
    scratch file: one file per series in flight (inode quotas), and the download is read,
    never rewritten, while the unit grows. What every series the server says is smaller
    than UNIT_TAR_BYTES becomes (most series: a few MB)."""

    def __init__(self, zip_path: Path, compressor: UnitCompressor, prefix: str, scratch: Path):
        self._writer = UnitWriter(zip_path, compressor, after_existing=True)
        self.prepared = Prepared(zip_path, offset=self._writer.start)
        self._prefix = prefix
        self._scratch = scratch
        self._mtime = int(time.time())

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        try:
            self._writer.add_file(self._prefix + name, size, self._mtime, passing_on(chunks))
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise

    def finish(self) -> Prepared:
        try:
            self._writer.close()
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise
        self.prepared.tar_bytes = self._writer.tar_bytes
        self.prepared.sha256 = self._writer.digest.hexdigest()
        return self.prepared

    def discard(self) -> None:
        self._writer.abort()
        self.prepared.discard()


# A series whose server-given size (FileSize) is UNIT_TAR_BYTES or more is cut into units of
# about this much tar (between members; inside a member larger than a unit: SplitPacker),
# compressed at once on every core it can borrow; it also lets --verify and --extract read
# the series on all cores. The units a series has in flight are held in memory whole (a
# unit is filled far faster than a core compresses it), so the size sets a big series'
# memory, and nothing else measured here depends on it.
# Measured on 2 cores, one 420 MB CT-like series at xz -1, unlimited bandwidth
# (bench/run.py --only ours --series 1 --instances 800, with the size patched in; 9 runs
# each, interleaved; median wall (range), CPU, peak RSS):
#
#   unit     wall s             CPU s   peak RSS MB
#   8 MiB    19.4 (18.4-20.2)   36      129
#   16 MiB   17.9 (16.9-20.0)   34      162
#   32 MiB   19.5 (18.2-21.4)   36      220
#   64 MiB   19.6 (18.7-19.9)   36      339
#
# Size, one stream of 160 MiB of the bench's CT-like tar against independent units (each
# starts with an empty dictionary): xz -1 (1 MiB dictionary) +0.05 % with 8 MiB units,
# +0.01 % with 32; xz -6 (8 MiB) +0.35 % with 8, +0.17 % with 16, +0.08 % with 32.
# So 8 MiB: 90 MB less than 32 for the same time, at a cost in size too small to weigh.
# A file larger than a unit was one unit on one core; now it is cut into units too (#21).
# One 256 MiB file, SplitPacker alone (xz -1, 2 cores, PackingCores(2), 32 MiB units), the
# shared machine at load 5-12, median of 3 runs, before -> after: random bytes (preset 0 by
# the probe) 1 -> 9 units, wall 108 -> 123 s, CPU 50 -> 60 s, peak RSS 52 -> 229 MB;
# CT-like 16-bit (4.6x) wall 32 -> 24 s, CPU 15.5 -> 17.1 s, RSS 53 -> 183 MB; a 300 MB
# file: 221 MB RSS (flat: units in flight, not the file). The load hides the second
# core's gain in wall time; the CPU time is 10-20 % more when two units compress at once
# (shared caches).
UNIT_TAR_BYTES = 8 << 20
# Units of one series in memory at once: compressing, or compressed and waiting for those
# before them to be written. Each holds at most UNIT_TAR_BYTES of tar (its input, less as
# it is compressed, plus its output), and a compressor (xz: about 10 MB at -1, 94 MB at
# -6), so a series takes at most (UNITS_IN_FLIGHT + 1) x UNIT_TAR_BYTES of tar (the unit
# being filled too) beside its compressors; a series uses at most this many cores.
UNITS_IN_FLIGHT = 4


class UnitTar:
    """The tar of the unit being filled, in blocks of COMPRESS_BLOCK: the compressor gets
    a block at a time (see UnitWriter.write)."""

    def __init__(self) -> None:
        self.blocks: list[bytearray] = []
        self.tar_bytes = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self.tar_bytes += len(data)
        self._pending += data
        if len(self._pending) >= COMPRESS_BLOCK:
            self.blocks.append(self._pending)
            self._pending = bytearray()

    def sealed(self) -> list[bytearray]:
        if self._pending:
            self.blocks.append(self._pending)
            self._pending = bytearray()
        return self.blocks


class UnitCores:
    """The cores one series' units compress on: the one its worker holds, and idle ones of
    the run borrowed one unit at a time (each given back as a unit ends, so that a small
    series waiting for a core waits one unit at most)."""

    def __init__(self, shared: Optional[PackingCores]):
        self._shared = shared
        self._lock = threading.Lock()
        self._running = 0
        self._borrowed = 0
        self.most_running = 0

    def claim(self) -> bool:
        """A core for one more unit: the series' own if no unit runs on it, else a borrowed
        one; False when there is none."""
        with self._lock:
            if self._running <= self._borrowed:
                self._running += 1
            elif self._shared is not None and self._shared.borrow():
                self._borrowed += 1
                self._running += 1
            else:
                return False
            self.most_running = max(self.most_running, self._running)
            return True

    def release(self) -> None:
        with self._lock:
            self._running -= 1
            if self._borrowed:
                self._borrowed -= 1
                self._shared.give_back()


class UnitJob:
    """One unit's tar compressed on a thread of its own, into memory (lzma and zstandard
    let go of the GIL: threads are enough). A daemon thread: a stopping run never waits for
    it, and cancel ends it at its next block. done() is called when it ends, however."""

    def __init__(self, blocks: list[bytearray], tar_bytes: int, compressor: UnitCompressor,
                 cancel: threading.Event, done: Callable[[], None]):
        self.tar_bytes = tar_bytes
        self._blocks = blocks[::-1]           # popped from the end: freed once compressed
        self._compressor = compressor
        self._cancel = cancel
        self._done = done
        self._pieces: list[bytes] = []
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="unit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._blocks:
                if self._cancel.is_set():
                    raise Interrupted()
                self._pieces.append(self._compressor.compress(self._blocks.pop()))
            self._pieces.append(self._compressor.flush())
        except BaseException as exc:      # raised where the unit is collected (result)
            self._error = exc
        finally:
            self._done()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> list[bytes]:
        """The whole unit, compressed; what went wrong, raised."""
        self.wait()
        if self._error is not None:
            raise self._error
        return self._pieces


def begins_member(block: bytes) -> bool:
    """Whether a unit whose tar starts with this block starts with a member's header (a
    ustar header whose checksum holds); else it goes on with the member of the unit before
    it (SplitPacker never cuts a member where its content would pass for a header)."""
    if len(block) < TAR_BLOCK or block[:TAR_BLOCK] == tarfile.NUL * TAR_BLOCK:
        return False
    try:
        tarfile.TarInfo.frombuf(block[:TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


class SplitPacker:
    """A MemberSink that turns a big series into several independent units of about
    UNIT_TAR_BYTES of tar each, compressed at once on the cores the series can hold
    (UnitCores), and written in order after the series' download in its own scratch file
    (one file per series in flight, as UnitPacker). A member that fits in a unit is never
    cut (a reader reads a unit that starts with a header on its own); a larger one is cut
    at tar blocks, so a 2 GB slide is 256 units on all free cores, not one on one core: a
    unit that does not start with a header goes on with the member of the one before it
    (begins_member; tarread follows it across). What finish() returns is one series: one
    range of the file, one SHA-256 over all of it, and where its units end."""

    def __init__(self, zip_path: Path, compressor: Callable[[], UnitCompressor], prefix: str,
                 scratch: Path, unit_bytes: int, cores: Optional[PackingCores]):
        self._path = zip_path
        self._compressor = compressor
        self._prefix = prefix
        self._scratch = scratch
        # whole blocks: a cut inside a member falls between two of its content's blocks
        self._unit_bytes = max(TAR_BLOCK, unit_bytes // TAR_BLOCK * TAR_BLOCK)
        self._cores = UnitCores(cores)
        self._cancel = threading.Event()
        self._mtime = int(time.time())
        self._digest = hashlib.sha256()
        self._jobs: deque[UnitJob] = deque()
        self._filling = UnitTar()
        self._unit_ends: list[int] = []        # from the start of the first unit
        self._tar_bytes = 0
        self.prepared = Prepared(zip_path, offset=zip_path.stat().st_size)

    @property
    def most_units_at_once(self) -> int:
        """The most units that compressed at the same time (what a test observes)."""
        return self._cores.most_running

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        header = tar_header(self._prefix + name, size, self._mtime)
        member_tar = len(header) + size + len(tar_padding(size))
        room = self._unit_bytes - self._filling.tar_bytes
        try:
            if member_tar > room and (member_tar <= self._unit_bytes or len(header) >= room):
                self._seal()
            self._filling.write(header)
            got = self._fill_cutting(chunks)
            if got != size:
                raise TransientError(f"{self._prefix + name}: {got} bytes instead of {size}")
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise

    def _fill_cutting(self, chunks: Iterator[bytes]) -> int:
        """A member's content and padding into the units, whole blocks at a time, a unit
        sealed wherever it is full and the block after would not pass for a header.
        Returns the content's length."""
        got = 0
        held = bytearray()
        for chunk in chunks:
            got += len(chunk)
            held += chunk
            if len(held) >= COMPRESS_BLOCK:
                held = self._fill_blocks(held)
        held += tar_padding(got)
        self._fill_blocks(held)            # content and padding: whole blocks, none left
        return got

    def _fill_blocks(self, held: bytearray) -> bytearray:
        """The whole blocks of held into the units; the part of a block left over."""
        position = 0
        whole = len(held) // TAR_BLOCK * TAR_BLOCK
        while position < whole:
            room = self._unit_bytes - self._filling.tar_bytes
            if room <= 0:
                # Cut here unless the next block would read as a header: then it stays in
                # this unit (a unit grows by a block, rarely more: a tar inside a file).
                if not begins_member(held[position:position + TAR_BLOCK]):
                    self._seal()
                    continue
                room = TAR_BLOCK
            take = min(room, whole - position)
            self._filling.write(held[position:position + take])
            position += take
        return held[whole:]

    def _seal(self, even_empty: bool = False) -> None:
        """The unit being filled goes to a core: its own, once one is free (the units
        before it are written meanwhile, as they finish)."""
        if not self._filling.tar_bytes and not even_empty:
            return
        unit, self._filling = self._filling, UnitTar()
        self._write_finished()
        while len(self._jobs) >= UNITS_IN_FLIGHT or not self._cores.claim():
            self._write(self._jobs.popleft())
        self._jobs.append(UnitJob(unit.sealed(), unit.tar_bytes, self._compressor(),
                                  self._cancel, self._cores.release))

    def _write_finished(self) -> None:
        while self._jobs and self._jobs[0].finished:
            self._write(self._jobs.popleft())

    def _write_all(self) -> None:
        while self._jobs:
            self._write(self._jobs.popleft())

    def _write(self, job: UnitJob) -> None:
        """A unit behind the ones before it, once compressed."""
        pieces = job.result()
        with open_no_follow(self._path, "ab") as out:
            for piece in pieces:
                self._digest.update(piece)
                out.write(piece)
            end = out.tell()
        self._tar_bytes += job.tar_bytes
        self._unit_ends.append(end - self.prepared.offset)

    def finish(self) -> Prepared:
        try:
            self._seal(even_empty=not (self._jobs or self._unit_ends))
            self._write_all()
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise
        self.prepared.tar_bytes = self._tar_bytes
        self.prepared.sha256 = self._digest.hexdigest()
        self.prepared.unit_ends = tuple(self._unit_ends[:-1])
        return self.prepared

    def discard(self) -> None:
        """After a failure: the units being compressed stop at their next block (and give
        their cores back) before the scratch file goes."""
        self._cancel.set()
        for job in self._jobs:
            job.wait()
        self._jobs.clear()
        self.prepared.discard()


class TarStreamsTarget(Target):
    """<output>/<name><suffix> written as one compressed unit per committed series.

    xz and zstd readers, and tar through them, accept concatenated units, so each series
    is compressed on its own by a worker (a big one into several units, on several cores:
    SplitPacker) and appended whole; only the closing unit carries the collection files
    and tar's end-of-archive blocks. Until then the file is
    <name><suffix>.part, and the journal holds its length after every series.
    A format of this kind is a subclass that names its codec (formats.xz, formats.zstd)."""

    codec: ClassVar[Codec]

    @classmethod
    def part_path(cls, output: Path, name: str) -> Path:
        return output / f"{name}{cls.suffix}.part"

    @classmethod
    def open(cls, name: str, output: Path, temp_dir: Path, level: Optional[int],
             file_suffix: str) -> "TarStreamsTarget":
        return cls(name, output, temp_dir, cls.codec.default_level if level is None else level,
                   file_suffix)

    @classmethod
    def still_on_disk(cls, output: Path, name: str, committed: dict[str, str],
                      finished: bool, file_suffix: str) -> tuple[dict[str, str], bool]:
        if cls.final_path(output, name).exists():
            return committed, finished
        if cls.part_path(output, name).exists():
            return committed, False
        if committed:
            log.warning("%s%s and its .part are gone: its journal is set aside and the "
                        "archive starts over", name, cls.suffix)
        return {}, False

    @classmethod
    def finished_damage(cls, output: Path, name: str) -> Optional[str]:
        """Its size, and its last series' units (all of them: one SHA-256) against the
        journal (an archive cut short, or overwritten at its end)."""
        final, journal = cls.final_path(output, name), cls.journal_path(output, name)
        if not journal.exists():
            return None
        with read_only(journal) as db:
            closing = db.execute("SELECT value FROM meta WHERE key='closing_end'").fetchone()
            last = db.execute("SELECT archive_end, stream_sha256 FROM series "
                              "ORDER BY archive_end DESC LIMIT 2").fetchall()
        size = final.stat().st_size
        if closing and int(closing[0]) != size:
            return f"{final} is {size} bytes, but its journal says {closing[0]}: it changed"
        if last and last[0][1]:
            start = last[1][0] if len(last) > 1 else 0
            if stream_sha256(final, start, last[0][0]) != last[0][1]:
                return (f"the last series' {cls.codec.unit} in {final} is not the one that "
                        "was appended")
        return None

    @classmethod
    def late_leftover(cls, output: Path, name: str) -> Optional[Path]:
        return cls.part_path(output, name)

    @classmethod
    def space_needs(cls, todo: list[PlannedSeries], output: Path, temp_dir: Path,
                    parallel: int, level: Optional[int]) -> tuple[SpaceNeed, SpaceNeed]:
        """The archive on --output; one download and its compressed unit per worker in
        scratch, in one file each."""
        largest = max(s.file_size for s in todo)
        archive = estimated_bytes(todo, cls.codec.ratio(cls._level(level)))
        return (SpaceNeed("--output", output, int(archive * 1.05), 4),
                SpaceNeed("--temp_dir", temp_dir, parallel * cls.scratch_need(largest),
                          parallel + 1))

    @classmethod
    def scratch_need(cls, file_size: int) -> int:
        """The zip (DICOM plus zip's headers, a few per cent) and its compressed units,
        which are smaller than the DICOM: 1.5 times the DICOM bounds both."""
        return int(file_size * 1.5)

    @classmethod
    def estimate_line(cls, series: list[PlannedSeries], level: Optional[int]) -> Optional[str]:
        level = cls._level(level)
        ratio = cls.codec.ratio(level)
        return (f"  estimated archive: about {human_bytes(estimated_bytes(series, ratio))} "
                f"({cls.codec.name} level {level}; CT-like images shrink about {ratio}x, "
                "JPEG-compressed ones barely)")

    @classmethod
    def _level(cls, level: Optional[int]) -> int:
        return cls.codec.default_level if level is None else level

    def __init__(self, name: str, output: Path, temp_dir: Path, level: int,
                 file_suffix: str = ""):
        super().__init__(name, output, temp_dir, file_suffix)
        self.part = self.part_path(output, name)
        self.level = level
        self.archive_end = self.tar_end = 0
        self._resume()

    @property
    def complete(self) -> bool:
        return self.final.exists() and self.journal.get("finished") == "yes"

    def _resume(self) -> None:
        refuse_symlink(self.part)
        repairing = bool(self.journal.get("replacing")) and self.part.exists()
        if self.final.exists() and not repairing:
            closing_end = self.journal.get("closing_end")
            if closing_end and int(closing_end) == self.final.stat().st_size:
                self.journal.put("finished", "yes")   # killed between rename and journal
                self.journal.put("replacing", "")
                return
            if closing_end and int(closing_end) > self.final.stat().st_size and \
                    self.journal.get("finished") == "yes":
                return      # cut short since: damage, which --verify names and a repair mends
            raise FatalRunError(f"{self.final} exists but its journal "
                                f"{self.journal.path.name} does not describe it; move one of "
                                "them away", EXIT_USAGE)
        if repairing and self.final.exists():
            log.info("repairing %s: it stays as it is until %s replaces it", self.final.name,
                     self.part.name)
        self.journal.put("finished", "no")
        if not self.part.exists():
            if self.journal.forget_beyond(0):
                log.info("%s is gone: starting the archive over", self.part)
            open_no_follow(self.part, "ab").close()
        size = self.part.stat().st_size
        lost = self.journal.forget_beyond(size)
        if lost:
            log.warning("%s is shorter than its journal says: %d series will be downloaded again",
                        self.part, len(lost))
        self.archive_end, self.tar_end = self.journal.ends()
        if size > self.archive_end:
            log.info("cutting %d bytes of an unfinished append from %s",
                     size - self.archive_end, self.part.name)
            self._cut_back()
        if self.archive_end:
            started = time.monotonic()
            self.audit()
            log.info("checked the %s of committed streams in %s against the journal in %.1f s",
                     human_bytes(self.archive_end), self.part.name, time.monotonic() - started)

    def _discard_empty_output(self) -> None:
        if self.part.is_file() and self.part.stat().st_size == 0:
            self.part.unlink()

    def audit(self, full: bool = True) -> list[str]:
        """Check every committed stream against the sha256 its row keeps (a stream of 0.3,
        without one, against its own xz checks); not full: only that each stream still
        starts and ends where its row says (two small reads a stream), enough before the
        rename, as every stream was read back when it was appended. At the first damaged
        stream the archive is cut back: that series and the ones after it are fetched
        again, for a stream cannot stay behind a gap."""
        self._check_size()
        streams = self.journal.streams()
        damaged = first_damaged_unit(self.codec, self.part, streams, full)
        if damaged is None:
            return []
        _, label, start, _, _ = streams[damaged]
        lost = self.journal.forget_beyond(start)
        self.archive_end, self.tar_end = self.journal.ends()
        self._cut_back()
        log.warning("%s: the stream of %s does not match the journal (changed on disk); it "
                    "and the %d series after it will be downloaded again", self.part.name,
                    label, len(lost) - 1)
        return lost

    def _check_size(self) -> None:
        if self.part.stat().st_size != self.archive_end:
            raise FatalRunError(f"{self.part} changed size while this run wrote it; rerun "
                                "to check and resume it")

    def _cut_back(self) -> None:
        """Cut the .part back to the end of the last committed stream."""
        with open_no_follow(self.part, "r+b") as handle:
            handle.truncate(self.archive_end)
            os.fsync(handle.fileno())

    def replace_damaged(self, uids: list[str]) -> None:
        """A new .part of the intact streams of the finished archive, each checked against
        its journal row as it is copied (a stream found damaged here is dropped too), and
        the journal moved onto it in one transaction. The damaged archive stays, readable,
        until finalize renames the repaired one over it. A kill anywhere leaves either the
        old archive, finished, or a resumable repair."""
        if not self.complete:
            return            # a .part: its resume check already cut off what is damaged
        bad = set(uids)
        building = self.part.with_name(self.part.name + ".repair")
        kept: list[tuple[str, int, int]] = []
        end = tar_end = 0
        building.unlink(missing_ok=True)      # a link planted there goes; "x" never follows one
        with open(building, "xb") as out:
            for uid, label, start, stop, tar_bytes, sha256 in self.journal.layout():
                if uid in bad:
                    continue
                if not copy_unit(self.codec, self.final, start, stop, out, sha256):
                    log.warning("%s: the stream of %s is damaged too; it is fetched again",
                                self.final.name, label)
                    out.seek(end)
                    out.truncate()
                    bad.add(uid)
                    continue
                end, tar_end = end + stop - start, tar_end + tar_bytes
                kept.append((uid, end, tar_end))
            out.flush()
            os.fsync(out.fileno())
        os.replace(building, self.part)
        fsync_directory(self.output)
        gone = sorted(bad & set(self.journal.committed()))
        self.journal.rearrange(kept, gone, replacing=self.final.stat().st_size)
        self.archive_end, self.tar_end = self.journal.ends()
        log.info("repairing %s: %d intact series copied into %s (%s), %d to fetch again",
                 self.final.name, len(kept), self.part.name, human_bytes(end), len(gone))

    def packer(self, series: PlannedSeries, zip_path: Path,
               cores: Optional[PackingCores] = None) -> Packer:
        """Compresses the series into its own unit in scratch (in a worker, in parallel),
        or a big one into several, on the cores it can borrow too."""
        prefix = f"{series.folder}/"
        if series.file_size < UNIT_TAR_BYTES:
            return UnitPacker(zip_path, self.codec.compressor(self.level), prefix, self.scratch)
        return SplitPacker(zip_path, lambda: self.codec.compressor(self.level), prefix,
                           self.scratch, UNIT_TAR_BYTES, cores)

    def commit(self, series: PlannedSeries, verified: VerifiedSeries, prepared: Prepared) -> None:
        """Append the series' units, fsync, then journal them in one row (its range, one
        SHA-256 over all of it, where its units end): a row never runs ahead of its data."""
        with self.commit_lock:
            self.check_open()
            new_end, sha256 = self._append(prepared)
            self.journal.record(series, verified, new_end, self.tar_end + prepared.tar_bytes,
                                sha256, prepared.unit_ends)
            self.archive_end, self.tar_end = new_end, self.tar_end + prepared.tar_bytes

    def _append(self, prepared: Prepared) -> tuple[int, str]:
        """Copy the stream behind the committed ones, fsync, and read it back: what the
        archive now holds must be what was compressed, so that a torn write, or another
        process writing to the .part or to scratch, is caught before a row describes it.
        Returns the archive's new end and the stream's sha256."""
        # The bytes copied are hashed only when the packer kept no hash of what it produced:
        # with one, the read-back compared with it catches everything the copy's own hash
        # would (a pass of SHA-256 over the archive less; 350 MB on the bench collection).
        copied = hashlib.sha256() if prepared.sha256 is None else None
        try:
            with open_no_follow(self.part, "r+b") as out, open(prepared.path, "rb") as stream:
                out.seek(self.archive_end)
                stream.seek(prepared.offset)
                for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
                    if copied is not None:
                        copied.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                end = out.tell()
            written = stream_sha256(self.part, self.archive_end, end)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._cut_back()                   # no half stream behind a live run
            raise_if_disk_full(exc, self.output)
            raise
        expected = prepared.sha256 if copied is None else copied.hexdigest()
        if written != expected:
            self._cut_back()
            raise TransientError("the stream in the archive is not the one compressed "
                                 "(did another process write to the .part or to scratch?)")
        return end, written

    def finalize(self) -> None:
        """Closing unit (collection files, end-of-archive), fsync, rename to <name><suffix>."""
        closing = Prepared(self.scratch / f"closing{self.suffix}")
        writer = UnitWriter(closing.path, self.codec.compressor(self.level))
        mtime = int(time.time())
        for collection in self.journal.collections():
            for name, data in collection_files(self.journal, collection, self.file_suffix):
                writer.add_file(f"{collection}/{name}", len(data), mtime,
                                lambda sink, d=data: sink(d))
        writer.write(tarfile.NUL * (2 * TAR_BLOCK))
        writer.write(tarfile.NUL * (-(self.tar_end + writer.tar_bytes) % TAR_RECORD))
        writer.close()
        closing.sha256 = writer.digest.hexdigest()
        with self.commit_lock:
            self.check_open()
            self._check_size()
            end, _ = self._append(closing)
            self.journal.put("closing_end", str(end))
            os.replace(self.part, self.final)
            fsync_directory(self.output)
            self.journal.put("finished", "yes")
            self.journal.put("replacing", "")
        closing.discard()

    def describe(self) -> str:
        return str(self.final if self.complete else self.part)
