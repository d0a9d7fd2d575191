"""--extract: (part of) an archive into a folder tree."""

from __future__ import annotations

import errno
import io
import os
import sys
import tarfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, TYPE_CHECKING

from .errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from .findings import Findings, series_folder
from .formats import codec_of
from .formats.tarstreams import begins_member
from .logs import human_bytes, printable
from .settings import FILTER_FLAGS, TAR_BLOCK
from .tarread import (FollowedUnits, UnitsRead, bounded_map, check_stream, orphan_problem,
                      pax_records, tar_entry)
from .trust import (SeriesRanges, following_units, journal_files, journal_records,
                    journal_series_ranges, recovered_spans, uncommitted_tail)
from .verify import series_of

if TYPE_CHECKING:
    from .findings import VerifiedMember
    from .settings import Selection
    from .tarread import TarEntry


def inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def fatal_write_error(exc: OSError) -> bool:
    """A full disk or quota ends the extraction (main names the filesystem); any other
    failure to write one member is that member's problem."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class TreeWriter:
    """Writes the members of one stream under a folder. Each goes to a hidden file beside
    its place and is renamed into place only when its MD5 is the one MD5SUMS lists, so the
    folder never shows a file that was not verified, even after a kill. A member that
    cannot be written (a file where a folder is, a folder where a file is) is a problem of
    its own: the others are still written, and no hidden file stays behind."""

    def __init__(self, folder: Path, findings: Findings, stream: int,
                 allowed: Optional[set[str]] = None):
        self._folder = os.path.realpath(folder)
        self._findings = findings
        self._stream = stream
        self._allowed = allowed           # the series folders selected (None: every one)
        self._check_md5 = findings.ledger.has_listed()     # False: xz's own checks only
        self._file: Optional[io.BufferedWriter] = None
        self._target = self._scratch = Path()
        self._mtime = 0.0
        self._foreign = False

    def begin(self, entry: TarEntry) -> bool:
        name = entry.name
        reason = entry.refusal or self._not_selected(name)
        target = Path(self._folder, name)
        # realpath resolves the links that already exist on the way: a folder in DIR that
        # is a symbolic link elsewhere must not carry a member out (checked before mkdir).
        if reason is None and not inside(os.path.realpath(target.parent), self._folder):
            reason = "a path through a symbolic link that leaves the folder"
        if reason is not None:
            self._findings.problem(name, f"{printable(name)}: {reason}; refused")
            return False
        self._target, self._mtime = target, entry.mtime
        self._scratch = target.with_name(f".{target.name}.{self._stream}.tcia-extract")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self._scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                                 getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if fatal_write_error(exc):
                raise
            self._findings.problem(name, f"{printable(name)}: cannot be written "
                                         f"({exc.strerror}); not extracted")
            return False
        self._file = os.fdopen(descriptor, "wb")
        return True

    def _not_selected(self, name: str) -> Optional[str]:
        """Why a member of a selected stream is not written: it belongs to a series that
        was not selected, which means the journal that mapped streams to series does not
        describe this archive (said once a stream)."""
        folder = series_folder(name)
        if self._allowed is None or folder is None or folder in self._allowed:
            return None
        if not self._foreign:
            self._foreign = True
            self._findings.problems.append(
                f"stream {self._stream + 1} holds {folder}, which was not selected: the "
                "journal beside the archive does not describe it (move the journal away "
                "and extract again)")
        return "of a series that was not selected"

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def end(self, member: VerifiedMember) -> None:
        self._file.close()
        self._file = None
        expected = self._findings.ledger.expected_md5(member.name) if self._check_md5 else None
        if self._check_md5 and expected != member.md5:
            self._scratch.unlink()
            why = "in no MD5SUMS" if expected is None else \
                f"MD5 {member.md5}, but MD5SUMS says {expected}"
            self._findings.problem(member.name, f"{member.name}: {why}"
                                                f"{series_of(member.name)}; not extracted")
            return
        try:
            os.utime(self._scratch, (self._mtime, self._mtime))
            os.replace(self._scratch, self._target)
        except OSError as exc:
            self._scratch.unlink(missing_ok=True)
            if fatal_write_error(exc):
                raise
            self._findings.problem(member.name, f"{member.name}: cannot be written "
                                                f"({exc.strerror}); not extracted")
            return
        self._findings.ledger.add_extracted(member)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._scratch.unlink(missing_ok=True)


@dataclass
class ArchiveMap:
    """What --extract learns of an archive before it decompresses a series: where its
    streams are and the series folder of each; the rows of its metadata.csv (or journal)
    and the MD5 each file must have are in the ledger."""
    spans: list[tuple[int, int]]
    folders: dict[int, str]                   # stream -> <Collection>/<series path>
    series: SeriesRanges                      # from the journal (none: no ends)
    closing: Optional[int] = None             # the stream with LICENSE, metadata, MD5SUMS
    peeked: dict[int, int] = field(default_factory=dict)   # stream -> bytes read to map it
    problems: list[str] = field(default_factory=list)


def first_member_name(path: Path, start: int, end: int) -> tuple[Optional[str], int]:
    """The name of a unit's first member, decompressing only its first kilobytes (a pax
    header and a ustar one: a few kB; a pax header of a long name: up to 256 kB); and how
    many compressed bytes that took. None for a unit that does not start with a header
    (or one too short to hold one)."""
    codec = codec_of(path)
    for size in (8 * 1024, 256 * 1024):
        data, read = codec.head(path, start, end, size)
        if not begins_member(data):
            return None, read          # it goes on with a member of the unit before it
        name = tar_header_name(data)
        if name is not None or len(data) < size:
            break
    return name, read


def tar_header_name(data: bytes) -> Optional[str]:
    """The name the first (pax and) ustar header of data gives, once data holds them."""
    if len(data) < TAR_BLOCK:
        return None
    info = tarfile.TarInfo.frombuf(data[:TAR_BLOCK], "utf-8", "surrogateescape")
    if info.type != tarfile.XHDTYPE:
        return info.name
    header_end = TAR_BLOCK + info.size + -info.size % TAR_BLOCK
    if len(data) < header_end + TAR_BLOCK:
        return None
    following = tarfile.TarInfo.frombuf(data[header_end:header_end + TAR_BLOCK], "utf-8",
                                        "surrogateescape")
    return tar_entry(following, pax_records(data[TAR_BLOCK:TAR_BLOCK + info.size])).name


def map_archive(path: Path, findings: Findings,
                stop: Optional[threading.Event] = None) -> ArchiveMap:
    """Streams from the file itself (or its journal, for a .part cut inside an append; a
    .part's units after its journal's last series are left out, as a resume cuts them off);
    each stream's series from the journal beside it (the series whose range holds it: a big
    series is several units, all of them its), else from its first tar header (a unit
    that starts inside a member is of the series of the unit before it); the closing
    stream decompressed whole (it is small) for MD5SUMS and metadata.csv, read into
    findings' ledger."""
    problems: list[str] = []
    try:
        spans = codec_of(path).spans(path)
    except ValueError as exc:
        spans = recovered_spans(path)
        if not path.name.endswith(".part"):      # for a .part, a torn append is normal
            problems.append(f"{path.name}: {exc}; its {len(spans)} streams are extracted "
                            "one by one")
    series = journal_series_ranges(path)
    if path.name.endswith(".part"):              # and so is one its journal lacks yet
        spans = spans[:len(spans) - uncommitted_tail(spans, series)]
    archive = ArchiveMap(spans, {}, series, problems=problems)
    if spans and not path.name.endswith(".part"):
        archive.closing = len(spans) - 1
        # Its problems are said when it is extracted (always, with any selection).
        check_stream(path, archive.closing, *spans[-1], findings, stop, closing=True)
        findings.ledger.forget_members()
        findings.affected.clear()
        archive.peeked[archive.closing] = spans[-1][1] - spans[-1][0]
    else:
        findings.ledger.add_rows(journal_records(path) or [])
        reference = journal_files(path)
        if reference is not None:
            findings.ledger.add_listed(reference.items(), "journal")
    for index, (start, end) in enumerate(spans):
        if index == archive.closing:
            continue
        folder = series.folder_of(start, end)
        if folder is not None:
            archive.folders[index] = folder
            continue
        try:
            name, read = first_member_name(path, start, end)
        except (ValueError, tarfile.TarError) as exc:
            name, read = None, 0
            archive.problems.append(f"stream {index + 1} (bytes {start}-{end}) is damaged: "
                                    f"{printable(str(exc))}")
        archive.peeked[index] = read
        if name is not None:
            archive.folders[index] = name.rsplit("/", 1)[0]
        elif index - 1 in archive.folders:      # a member cut across units: the same series
            archive.folders[index] = archive.folders[index - 1]
    return archive


def selection_value(row: dict, column: str) -> str:
    """A row's value as a selection compares it (collections without regard to case)."""
    value = row.get(column) or ""
    return value.lower() if column == "Collection" else value


def selected_folders(rows: Iterable[dict], selection: Selection) -> tuple[set[str], list[str]]:
    """The series folders a selection names, and what it names that the archive lacks;
    one pass over the rows (they may be more than fit in memory)."""
    wanted = {column: set(values) for column, values in selection.filters().items()}
    if selection.collection:
        wanted["Collection"] = {selection.collection.lower()}
    seen: dict[str, set[str]] = defaultdict(set)
    chosen: set[str] = set()
    for row in rows:
        values = {column: selection_value(row, column) for column in wanted}
        for column, value in values.items():
            if value in wanted[column]:
                seen[column].add(value)
        if all(value in wanted[column] for column, value in values.items()):
            chosen.add(row["_folder"])
    flags = {**{p: f for f, p in FILTER_FLAGS.items()}, "Collection": "--collection"}
    absent = [f"{flags[column]} {value}" for column, values in wanted.items()
              for value in sorted(values - seen[column])]
    return chosen, absent


def extract_output(path: Path, selection: Selection, folder: Path,
                   stop: Optional[threading.Event] = None) -> int:
    """--extract: the selected series (all without a selection) and the collection files,
    written under folder and verified; one line per problem, then a summary. 0 all
    written and verified, 1 a problem, 2 bad usage (no such archive, nothing selected)."""
    started = time.monotonic()
    if path.is_dir():
        print(f"tcia_downloader: error: --extract {path}: a folder, not an archive (a folder "
              "tree is already extracted; --verify checks it)", file=sys.stderr)
        return EXIT_USAGE
    if not path.is_file():
        print(f"tcia_downloader: error: --extract {path}: no such archive", file=sys.stderr)
        return EXIT_USAGE
    findings = Findings()
    try:
        return extract_mapped(path, selection, folder, findings, stop, started)
    finally:
        findings.ledger.close()


def extract_mapped(path: Path, selection: Selection, folder: Path, findings: Findings,
                   stop: Optional[threading.Event], started: float) -> int:
    archive = map_archive(path, findings, stop)
    everything = not (selection.filters() or selection.collection)
    chosen, absent = selected_folders(findings.ledger.rows(), selection)
    if not everything and (absent or not chosen):
        why = ", ".join(absent) if absent else "the selection"
        source = "metadata.csv" if archive.closing is not None else "journal"
        rows = sum(1 for _ in findings.ledger.rows())
        print(f"tcia_downloader: error: {why}: no series of {path.name} matches (its "
              f"{source} lists {rows} series)", file=sys.stderr)
        return EXIT_USAGE
    streams = [i for i in range(len(archive.spans)) if everything or i == archive.closing
               or archive.folders.get(i) in chosen]
    findings.problems += archive.problems
    if not findings.ledger.has_listed():
        findings.problems.append(f"{path.name} has no MD5SUMS and no journal beside it: "
                                 f"files are checked by {codec_of(path).name}'s own "
                                 "checksum only")
    folder.mkdir(parents=True, exist_ok=True)
    findings.streams = len(streams)
    allowed = None if everything else chosen

    def extract(index: int) -> UnitsRead:
        return check_stream(path, index, *archive.spans[index], findings, stop,
                            output=lambda found: TreeWriter(folder, found, index, allowed),
                            closing=index == archive.closing,
                            following=following_units(archive.spans, index, archive.series,
                                                      archive.closing))
    followed = FollowedUnits()
    for index, read in zip(streams, bounded_map(extract, streams)):
        findings.problems += read.problems
        if followed.orphan(index, read):
            findings.problems.append(orphan_problem(codec_of(path).unit, index,
                                                    *archive.spans[index]))
    report_missing(findings, None if everything else chosen)
    # each byte once: a stream extracted is read whole, its earlier peek included
    whole = set(streams)
    read = sum(end - start if i in whole else archive.peeked.get(i, 0)
               for i, (start, end) in enumerate(archive.spans))
    return summarise_extract(path, folder, findings, archive, read, time.monotonic() - started)


def report_missing(findings: Findings, chosen: Optional[set[str]]) -> None:
    """Files MD5SUMS lists in the extracted series that no stream held; files twice."""
    findings.problems += [f"{name} is in the archive {count} times" for name, count in
                          findings.ledger.twice()]
    findings.problems += [f"{name}: listed in MD5SUMS, missing from the archive" for name, _
                          in findings.ledger.listed_missing(chosen)]


def summarise_extract(path: Path, folder: Path, findings: Findings, archive: ArchiveMap,
                      read: int, elapsed: float) -> int:
    for problem in findings.problems:
        print(printable(problem))
    files, size, series = findings.ledger.extracted_totals()
    verdict = "OK" if not findings.problems else f"{len(findings.problems)} problem(s)"
    total = archive.spans[-1][1] if archive.spans else 0
    print(f"{path} -> {folder.resolve()}: {series} series, {files} files, {human_bytes(size)} "
          f"from {findings.streams} of {len(archive.spans)} {codec_of(path).name} "
          f"{codec_of(path).unit}s (read "
          f"{human_bytes(read)} of {human_bytes(total)}) in {elapsed:.1f} s: {verdict}")
    return EXIT_OK if not findings.problems else EXIT_INCOMPLETE
