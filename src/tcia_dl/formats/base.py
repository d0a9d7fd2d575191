"""The output contract: a format is a Target class (how a run writes it, and what is
decided about it before one opens it) and, for an archive, the Codec of its independent
compressed units (how they are written, found and read back by --verify and --extract)."""

from __future__ import annotations

import itertools
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Protocol, TYPE_CHECKING

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
        """Cheap (a few small reads): a unit starts at start and ends at end."""

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
    """A series made ready in scratch by a worker: an xz stream, which starts at `offset`
    in its file, or a folder."""
    path: Path
    offset: int = 0
    tar_bytes: int = 0
    sha256: Optional[str] = None      # of the xz stream, as it was compressed

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

    def packer(self, series: PlannedSeries, scratch: Path) -> "Packer":
        """Where a worker turns one verified series into output-to-be, in scratch (scratch
        is the series' download file, which the packer may append to)."""
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


class Packer(Protocol):
    """A MemberSink that becomes a Prepared series (finish), or nothing (discard)."""

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None: ...

    def finish(self) -> Prepared: ...

    def discard(self) -> None: ...


def estimated_bytes(series: list[PlannedSeries], ratio: float) -> int:
    """An archive's size, when CT-like images shrink by ratio and JPEG-compressed ones not."""
    return int(sum(s.file_size / (1.0 if s.record.get("Modality") in PRECOMPRESSED_MODALITIES
                                  else ratio) for s in series))
