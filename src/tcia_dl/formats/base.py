"""The output contract: a format is a Target class (how a run writes it, and what is
decided about it before one opens it) and, for an archive, the Codec of its independent
compressed units (how they are written, found and read back by --verify and --extract)."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Protocol, TYPE_CHECKING

from ..errors import Interrupted
from ..journal import Journal
from ..storage import SpaceNeed, acquire_lock, claim_scratch, release_lock, release_scratch

if TYPE_CHECKING:
    from ..plan import PlannedSeries
    from ..sources.base import VerifiedSeries


class UnitCompressor(Protocol):
    """Makes one independent compressed unit: what compress() and flush() return, in that
    order, is one whole unit (an xz stream, a zstd frame) that decompresses on its own."""

    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


# -- incompressible units: the codec's cheapest setting --------------------------------------
#
# A slide (.svs, .tif) is JPEG or JPEG 2000 inside: compressing it again gains 0-3 %, yet at
# xz's default preset a core spends 7x as long on it as on CT. A unit whose first
# PROBE_BYTES zlib -1 cannot shrink below PROBE_RATIO of their size is made at its codec's
# cheapest setting (xz: preset 0). Measured for issue 21 (python 3.11, lzma / zstandard
# 0.25 / zlib, one core, process time, min of 2 runs, the shared 2-core machine under load;
# a 32 MiB unit; JPEG: Pillow-encoded 512x512 RGB tissue-like tiles back to back; CT-like:
# synthetic 16-bit slices, more compressible than real CT):
#
#   content            xz -1 s  xz -0 s  out/in -1 | -0    zstd 3 s  zstd 1 s  zlib -1 on 1 MiB
#   os.urandom         10.52    5.89     1.0001 | 1.0001   0.02      0.02      22 ms, 1.0003
#   JPEG q80 tiles      9.98    5.13     0.9679 | 0.9679   0.08      0.06      30 ms, 0.9795
#   JPEG 2000 tiles     9.78    5.66     1.0001 | 1.0001   0.06      0.03      24 ms, 1.0002
#   CT-like 16-bit      1.30    1.16     0.1362 | 0.1479   0.11      0.11       9 ms, 0.2049
#
# So at xz the probe pays: a JPEG unit takes 1.7-1.9x less time at preset 0 for the same
# bytes (a 2 GiB slide, 64 x 32 MiB: about 5 minutes of one core saved here; SplitPacker
# cuts a file larger than a unit into units, and each unit's first MiB decides for it),
# while the probe costs 10-30 ms a unit (under 1 % of a CT unit at -1). zstd needs none: it
# passes an incompressible unit through in 0.02-0.08 s, about what the probe would cost.
#
# A unit smaller than PROBE_BYTES is not probed: xz takes tens of milliseconds on it at any
# preset, and the probe cost as much. Measured (bench/run.py --only small, 416 series of
# 0.8 MB, a quiet 2-core machine): probing every unit took 6.6 of ours' 36 s of CPU.
#
# zlib gets PROBE_PIECES pieces of PROBE_PIECE bytes spread over that MiB, not all of it:
# on the bench collection's series (5 MB of CT each, every one probed) the whole MiB took
# 2.1 of ours' 94 s of CPU (cProfile, one core). On a CT unit's first MiB: 0.8 ms instead
# of 11.5 ms, ratio 0.48 instead of 0.44; random bytes 1.0004 instead of 1.0003. Spread,
# not one piece: a unit's first bytes are a tar header and a DICOM or TIFF header.
PROBE_BYTES = 1 << 20
PROBE_PIECES = 4
PROBE_PIECE = 16 << 10
PROBE_RATIO = 0.95           # zlib -1 saves less than 5 %: incompressible


def probe_sample(head: bytes) -> bytes:
    """PROBE_PIECES pieces of head, evenly spread from its start."""
    step = max(len(head) // PROBE_PIECES, 1)
    return b"".join(head[at:at + PROBE_PIECE] for at in range(0, step * PROBE_PIECES, step))


def incompressible(head: bytes) -> bool:
    """Whether zlib at level 1 (fast, in every Python) finds nothing to gain in pieces
    of head."""
    sample = probe_sample(head)
    return len(zlib.compress(sample, 1)) > PROBE_RATIO * len(sample)


class ProbingCompressor:
    """A unit's compressor chosen by the unit itself: its first PROBE_BYTES are held back
    and probed, then the codec's compressor for that kind of content (make(cheap)) gets
    them and the rest. Its output is the chosen compressor's: one whole unit."""

    def __init__(self, make: Callable[[bool], UnitCompressor]):
        self._make = make
        self._head = bytearray()
        self._inner: Optional[UnitCompressor] = None
        self.cheap: Optional[bool] = None        # decided: the cheapest setting or not

    def compress(self, data: bytes) -> bytes:
        if self._inner is not None:
            return self._inner.compress(data)
        self._head += data
        return self._choose() if len(self._head) >= PROBE_BYTES else b""

    def flush(self) -> bytes:
        if self._inner is None:       # a unit smaller than the probe: not worth one
            head, self._head = bytes(self._head), bytearray()
            self.cheap = False
            self._inner = self._make(False)
            return self._inner.compress(head) + self._inner.flush()
        return self._inner.flush()

    def _choose(self) -> bytes:
        head, self._head = bytes(self._head), bytearray()
        self.cheap = incompressible(head[:PROBE_BYTES])
        self._inner = self._make(self.cheap)
        return self._inner.compress(head)


class Codec(Protocol):
    """How an archive's independent compressed units are made and read back. Every reading
    method raises ValueError (one sentence) for anything that is not a whole unit: damage
    is never a library's exception type, never a traceback."""

    name: str                  # as messages name it: "xz", "zstd"
    unit: str                  # what one unit is called: "stream", "frame"
    suffix: str                # of the archive: ".tar.xz"
    magic: bytes               # how a unit starts (to tell a renamed archive's codec)
    levels: tuple[int, int]    # --compression-level's range, on the codec's own scale
    default_level: int
    level_note: str            # for --help: what the scale means

    def missing(self) -> Optional[str]:
        """None when this Python can use it; else one line saying what to install."""

    def compressor(self, level: int) -> UnitCompressor: ...

    def ratio(self, level: int) -> float:
        """How much smaller CT-like DICOM gets at level (for the space estimate)."""

    def spans(self, path: Path) -> list[tuple[int, int]]:
        """(start, end) of every unit of the file, in order; ValueError where the file is
        not whole units (a .part cut in an append, damage)."""

    def spans_from_end(self, path: Path) -> tuple[list[tuple[int, int]], Optional[ValueError]]:
        """The whole units that can be found at the end of a file whose earlier bytes are
        damaged (damage in one unit never hides the ones after it), in file order, and why
        they do not cover the whole file (None: they do)."""

    def spans_from_headers(self, path: Path) -> list[tuple[int, int]]:
        """The whole units from byte 0 up to the first one that is not whole."""

    def in_place(self, path: Path, start: int, end: int) -> bool:
        """Cheap (small reads, none of the content): a unit starts at start, and a unit
        (the same one, or the last of several back to back) ends at end."""

    def decompressed(self, path: Path, start: int, end: int,
                     stop: Optional[threading.Event] = None) -> Iterator[bytes]:
        """The content of the one unit between start and end, in pieces of at most 1 MiB,
        its own checks passed; bytes after the unit within the span are damage.
        Interrupted when stop is set."""

    def intact(self, path: Path, start: int, end: int) -> bool:
        """decompressed() runs through without a complaint."""

    def head(self, path: Path, start: int, end: int, size: int) -> tuple[bytes, int]:
        """About the first `size` decompressed bytes of the unit at start, and how many
        compressed bytes that took (a few kB: --extract peeks at each unit's first tar
        header); ValueError when they cannot be read."""


# Modalities whose images are JPEG-compressed inside DICOM (slides, ultrasound, photos):
# they barely shrink, so the space estimate counts them whole.
PRECOMPRESSED_MODALITIES = {"SM", "US", "XC", "ES", "OP", "GM", "IVUS"}


@dataclass
class Prepared:
    """A series made ready in scratch by a worker: its compressed units, which start at
    `offset` in its file and run to its end, or a folder."""
    path: Path
    offset: int = 0
    tar_bytes: int = 0
    sha256: Optional[str] = None      # of all its units, as they were compressed
    # Where each of its units but the last ends, from `offset` (none: it is one unit).
    unit_ends: tuple[int, ...] = ()

    def discard(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


class Target:
    """An output format, and an output of it being written, with its journal, lock and
    scratch folder. The class says what is decided before a run opens one (its file
    names, whether a finished one is still whole, the space it needs); an instance is
    opened by a run, turns each verified series into output (packer: in a worker, in
    parallel), makes it durable (commit: one at a time, under commit_lock), checks what
    the journal says against the disk (audit), and finishes it (finalize)."""

    format_name: ClassVar[str]                 # as --format spells it
    suffix: ClassVar[str] = ""                 # of the output file; "" for a folder tree
    codec: ClassVar[Optional[Codec]] = None    # of an archive's units

    # -- the format, before an output is opened ---------------------------------------

    @classmethod
    def missing(cls) -> Optional[str]:
        """None when this Python can write the format; else one line of what to install."""
        return cls.codec.missing() if cls.codec else None

    @classmethod
    def journal_path(cls, output: Path, name: str) -> Path:
        return output / f"{name}{cls.suffix}.journal"

    @classmethod
    def lock_path(cls, output: Path, name: str) -> Path:
        return output / f"{name}{cls.suffix}.lock"

    @classmethod
    def final_path(cls, output: Path, name: str) -> Path:
        """Where the finished output is (for a folder tree: the folder that holds it)."""
        return output / f"{name}{cls.suffix}" if cls.suffix else output

    @classmethod
    def open(cls, name: str, output: Path, temp_dir: Path, level: Optional[int],
             file_suffix: str) -> "Target":
        """An output of this format for a run: locked, its journal open, resumed."""
        raise NotImplementedError

    @classmethod
    def still_on_disk(cls, output: Path, name: str, committed: dict[str, str],
                      finished: bool, file_suffix: str) -> tuple[dict[str, str], bool]:
        """What the journal says is in the output, less what the disk no longer has (a
        journal never outranks the output). Cheap: at most a stat per series."""
        raise NotImplementedError

    @classmethod
    def finished_damage(cls, output: Path, name: str) -> Optional[str]:
        """For a finished output, what is wrong with it from what is cheap to check on a
        rerun (None: nothing found; reading all of it is --verify's job)."""
        return None

    @classmethod
    def late_leftover(cls, output: Path, name: str) -> Optional[Path]:
        """What a run killed after the output was finished may leave beside it (a repair
        killed early), for the run that finds the output finished to remove."""
        return None

    @classmethod
    def space_needs(cls, todo: list[PlannedSeries], output: Path, temp_dir: Path,
                    parallel: int, level: Optional[int]) -> tuple[SpaceNeed, SpaceNeed]:
        """What the rest of a run puts on --output and on --temp_dir."""
        raise NotImplementedError

    @classmethod
    def scratch_need(cls, file_size: int) -> int:
        """The most --temp_dir a series of file_size bytes of DICOM holds while it is in
        flight (its download, and what it is packed into before the commit)."""
        raise NotImplementedError

    @classmethod
    def estimate_line(cls, series: list[PlannedSeries], level: Optional[int]) -> Optional[str]:
        """The plan's line on how big the output gets, if the format changes that."""
        return None

    # -- an output being written ------------------------------------------------------

    def __init__(self, name: str, output: Path, temp_dir: Path, file_suffix: str = ""):
        final, journal_path = self.final_path(output, name), self.journal_path(output, name)
        lock_path = self.lock_path(output, name)
        self.name = name
        self.file_suffix = file_suffix
        self.output = output
        self.final = final
        self.commit_lock = threading.Lock()
        self._closed = False
        self._scratch_numbers = itertools.count(1)
        output.mkdir(parents=True, exist_ok=True)
        self._lock_path = lock_path
        self._lock_file = acquire_lock(lock_path, f"{name} in {output}")
        try:
            self.journal = Journal(journal_path)
            self.scratch, self._scratch_owner = claim_scratch(temp_dir, name)
        except BaseException:
            release_lock(lock_path, self._lock_file)
            raise

    def close(self) -> None:
        """No commit after this; waits for one in progress."""
        with self.commit_lock:
            self._closed = True
            self.journal.close()
        release_scratch(self.scratch, self._scratch_owner)
        release_lock(self._lock_path, self._lock_file)

    def check_open(self) -> None:
        if self._closed:
            raise Interrupted()

    @property
    def complete(self) -> bool:
        return self.journal.get("finished") == "yes"

    def committed(self) -> dict[str, str]:
        return self.journal.committed()

    def scratch_path(self, suffix: str) -> Path:
        """A new name in this run's scratch, chosen here: no server text ever names a file."""
        return self.scratch / f"series-{next(self._scratch_numbers)}{suffix}"

    def audit(self, full: bool = True) -> list[str]:
        """Forget committed series the disk no longer holds intact; returns their UIDs."""
        raise NotImplementedError

    def discard_if_unused(self) -> bool:
        """After a run that failed before anything was committed, for a reason a rerun of
        the same command cannot cure (a host that does not exist, TLS that cannot pass:
        exit 2): take back what opening the output made, so that nothing looks resumable.
        True when it did; False when the output holds work (an earlier run's), which stays."""
        if self.journal.committed() or self.journal.get("finished") == "yes":
            return False
        with self.commit_lock:
            self._closed = True
            self.journal.close()
        self.journal.path.unlink(missing_ok=True)
        self._discard_empty_output()
        return True

    def _discard_empty_output(self) -> None:
        """What the format made when the output was opened, if it is still empty."""

    def replace_damaged(self, uids: list[str]) -> None:
        """--retry-failed of a <name>.damaged.tcia (written by --verify): take these series
        out of the output, keeping every other one, so that this run fetches them again and
        finishes the output anew (collection files too)."""
        raise NotImplementedError

    def packer(self, series: PlannedSeries, scratch: Path,
               cores: Optional[PackingCores] = None) -> "Packer":
        """Where a worker turns one verified series into output-to-be, in scratch (scratch
        is the series' download file, which the packer may append to). The worker holds
        one of cores (cores.own()); a packer may borrow more for the same series."""
        raise NotImplementedError

    def commit(self, series: PlannedSeries, verified: VerifiedSeries, prepared: Prepared) -> None:
        """Make a prepared series part of the output, durably, then journal it (a row never
        runs ahead of its data). One at a time, under commit_lock."""
        raise NotImplementedError

    def finalize(self) -> None:
        """The collection files (LICENSE, metadata.csv, MD5SUMS, CITATION.md) and whatever
        makes the output finished; the journal says "finished" last."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the output is, as the user sees it now (a .part until finished)."""
        raise NotImplementedError


class PackingCores:
    """The cores a run packs on. Each series being packed holds one of them (own(), for as
    long as it packs); a series packed as several units borrows idle ones for them, each
    for one unit (borrow(), give_back()). A borrow succeeds only while no series waits for
    a core of its own: small series never queue behind a big one for longer than one unit
    takes to compress. Every compressing thread holds a core: never more of them than
    there are cores."""

    def __init__(self, cores: int):
        self._free = cores
        self._waiting = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def own(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: self._free > 0)
            finally:
                self._waiting -= 1
            self._free -= 1
        try:
            yield
        finally:
            self.give_back()

    @contextlib.contextmanager
    def own_if_idle(self) -> Iterator[bool]:
        """A core of its own for a series now, if one is idle and no series waits for one
        (for a series that can do without: it then packs after its download)."""
        got = self.borrow()
        try:
            yield got
        finally:
            if got:
                self.give_back()

    def borrow(self) -> bool:
        with self._changed:
            if self._free > 0 and self._waiting == 0:
                self._free -= 1
                return True
            return False

    def give_back(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify()


class Packer(Protocol):
    """A MemberSink that becomes a Prepared series (finish), or nothing (discard)."""

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None: ...

    def finish(self) -> Prepared: ...

    def discard(self) -> None: ...


def estimated_bytes(series: list[PlannedSeries], ratio: float) -> int:
    """An archive's size, when CT-like images shrink by ratio and JPEG-compressed ones not."""
    return int(sum(s.file_size / (1.0 if s.record.get("Modality") in PRECOMPRESSED_MODALITIES
                                  else ratio) for s in series))
