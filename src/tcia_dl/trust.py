"""The journal --verify and --extract believe (one that describes the file beside it), and
what they read from it."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TYPE_CHECKING

from .errors import JournalUnusable
from .formats import archive_codecs, codec_of
from .formats.tree import is_collection_folder
from .formats.tarstreams import stream_sha256
from .journal import read_snapshot
from .logs import printable

if TYPE_CHECKING:
    from .findings import Findings
    from .journal import JournalSnapshot


def recovered_spans(path: Path) -> list[tuple[int, int]]:
    """The streams of a file whose streams cannot all be walked from its end (a .part cut
    in an append; damage). From its journal if it describes the file (every unit of every
    series; a finished archive gains its closing stream: from the last series to the
    end); else the whole streams from the start, found by their headers, and for a
    finished archive the streams walked from the end, with what lies between as one span
    (decompressing it says what is wrong): damage in one stream never hides the others."""
    size = path.stat().st_size
    finished = not path.name.endswith(".part")
    journal = journal_spans(path)
    if journal:
        if finished and journal[-1][1] < size:
            journal.append((journal[-1][1], size))
        return journal
    codec = codec_of(path)
    head = codec.spans_from_headers(path)
    if not finished:
        return head
    head_end = head[-1][1] if head else 0
    tail = [span for span in codec.spans_from_end(path)[0] if span[0] >= head_end]
    tail_start = tail[0][0] if tail else size
    return head + ([(head_end, tail_start)] if tail_start > head_end else []) + tail


def journal_series_ends(path: Path) -> dict[int, str]:
    """Where each committed series' last unit ends -> its <Collection>/<path>, from the
    journal beside the archive if it describes it (none at another site: then problems
    name streams only)."""
    journal, _ = trusted_journal(path)
    return {stream.end: stream.folder for stream in journal.streams} if journal else {}


@dataclass(frozen=True)
class SeriesRanges:
    """Where each committed series lies in an archive, to name the series of any of its
    units (a big series is several)."""
    ends: list[int]              # where each series' last unit ends, in archive order
    folders: list[str]           # its <Collection>/<path>

    def folder_of(self, start: int, end: int) -> Optional[str]:
        """The series whose bytes hold the span from start to end, or None (no series
        holds all of it: the closing unit, or a span across two series)."""
        index = bisect.bisect_left(self.ends, end)
        if index == len(self.ends):
            return None
        series_start = self.ends[index - 1] if index else 0
        return self.folders[index] if series_start <= start else None

    def end_of(self, start: int, end: int) -> Optional[int]:
        """Where the series whose bytes hold the span ends, or None (as folder_of)."""
        index = bisect.bisect_left(self.ends, end)
        if index == len(self.ends) or (index and self.ends[index - 1] > start):
            return None
        return self.ends[index]


def following_units(spans: list[tuple[int, int]], index: int, series: SeriesRanges,
                    closing: Optional[int]) -> Iterator[tuple[int, int]]:
    """The units a member begun in unit `index` may go on into (tarread.check_stream):
    the rest of its series' (a series' units are contiguous), or, with no journal to say
    where series end, every one before the closing unit. Lazily: an archive may have
    millions of units, and only a member cut across units is ever followed."""
    start, end = spans[index]
    limit = series.end_of(start, end) if series.ends else len(spans) and spans[-1][1]
    if limit is None:
        return
    for later in range(index + 1, len(spans) if closing is None else closing):
        if spans[later][1] > limit:
            return
        yield spans[later]


def uncommitted_tail(spans: list[tuple[int, int]], series: SeriesRanges) -> int:
    """How many of a .part's last units lie after its journal's last series: an append the
    journal does not record yet (killed before its row, or a run appending now), which a
    resume cuts off, as it does a torn one."""
    return sum(1 for _, end in spans if end > series.ends[-1]) if series.ends else 0


def journal_series_ranges(path: Path) -> SeriesRanges:
    """Each committed series' range, from the journal beside the archive if it describes
    it (none at another site: then problems name units only, and --extract reads each
    unit's series from its first member)."""
    journal, _ = trusted_journal(path)
    streams = journal.streams if journal else []
    return SeriesRanges([stream.end for stream in streams],
                        [stream.folder for stream in streams])


def journal_name_beside(path: Path) -> Path:
    """Where the journal of <name>.tar.xz(.part) is: <name>.tar.xz.journal."""
    name = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    return path.with_name(name + ".journal")


def journal_beside(path: Path) -> Optional[Path]:
    """<name>.tar.xz.journal beside <name>.tar.xz(.part), if it is there, readable, has
    committed series and describes that file (see journal_describes)."""
    journal, _ = trusted_journal(path)
    return journal.path if journal else None


def trusted_journal(path: Path, files: bool = False) -> tuple[Optional[JournalSnapshot],
                                                               Optional[str]]:
    """The journal beside an archive, read once, if it describes that archive; else None
    and, when there is a file at the journal's name, the one line that says why it is
    ignored. A journal that lists nothing is no journal (a run that just started)."""
    journal = journal_name_beside(path)
    if not journal.exists():
        return None, None
    try:
        snapshot = read_snapshot(journal, files)
    except JournalUnusable as exc:
        return None, f"{journal.name} is ignored: {exc}"
    if not snapshot.streams:
        return None, None
    why = journal_mismatch(path, snapshot)
    if why:
        return None, f"{journal.name} is ignored: {why}"
    return snapshot, None


def journal_describes(archive: Path, journal: Path) -> bool:
    """Whether a journal describes this archive (or .part), so that what it says of the
    archive's streams (which series, which MD5s) may be believed: see journal_mismatch."""
    try:
        return journal_mismatch(archive, read_snapshot(journal)) is None
    except JournalUnusable:
        return False


def journal_mismatch(archive: Path, journal: JournalSnapshot) -> Optional[str]:
    """Why the journal does not describe the archive, in words; None when it does. A
    journal beside a file may be another file's: a repair moves it onto the new .part
    while the old archive stays, and an earlier run of another selection may have left it.
    It describes the file when its committed units (each series' last, and the others of a
    series of several, which it records too) end exactly where the file's units do (a
    .part: its first ones, for an append may follow), a finished archive has the size
    it recorded, and the content is the one it recorded: the last committed stream's
    SHA-256 (or, that stream being damaged, the first's) is the file's. A few bytes a
    stream and one or two streams are read: cheap enough for --extract of one series."""
    part = archive.name.endswith(".part")
    ends = [end for _, end in journal.unit_spans()]
    if not ends:
        return None if part else "it lists no series"
    if not journal.units_inside():
        return "its rows put units outside their series: it is not one this tool writes"
    size = archive.stat().st_size
    if journal.meta.get("replacing") and archive.with_name(archive.name + ".part").exists():
        elsewhere = f"it describes {archive.name}.part, the repair in progress"
    else:
        elsewhere = "it describes another file (an earlier run's?)"
    closing = journal.meta.get("closing_end", "")
    # A finished archive shorter than it was is a copy cut short: damage that the journal
    # can name and repair, once what is left is what it recorded (checked below).
    cut = not part and closing.isdigit() and int(closing) > size
    if not part and closing.isdigit() and int(closing) != size and not cut:
        return f"{elsewhere}: a finished archive of {closing} bytes, not {size}"
    if ends[-1] > size and not cut:
        return f"{elsewhere}: its series run to byte {ends[-1]}, past the end ({size})"
    if not streams_end_at(archive, [end for end in ends if end <= size],
                          finished=not part and not cut):
        return (f"{elsewhere}: its {len(journal.streams)} series' streams do not end where "
                f"{archive.name}'s do")
    if not content_recorded(archive, journal):
        return f"{elsewhere}: the streams it names hold other bytes (SHA-256)"
    return None


def streams_end_at(archive: Path, ends: list[int], finished: bool) -> bool:
    """Whether the file's streams end at ends: exactly, followed by the closing stream in a
    finished archive, or followed by anything in a .part. Where the file's own streams
    cannot be walked from its end (a .part cut in an append, a damaged footer), each
    stream's header and footer magic must stand where ends put them."""
    codec = codec_of(archive)
    try:
        found = [end for _, end in codec.spans(archive)]
    except (ValueError, IndexError):
        starts = [0] + ends[:-1]
        misplaced = sum(not codec.in_place(archive, start, end)
                        for start, end in zip(starts, ends))
        return misplaced <= 1             # one damaged stream does not disown the journal
    return found[:-1] == ends if finished else found[:len(ends)] == ends


def content_recorded(archive: Path, journal: JournalSnapshot) -> bool:
    """The last committed stream's SHA-256 is the file's, or the first's is: one damaged
    stream does not disown the journal that can name its series. A journal of 0.3 kept
    none: its stream ends are all there is."""
    streams = journal.streams
    starts = [0] + [stream.end for stream in streams[:-1]]
    for index in dict.fromkeys((len(streams) - 1, 0)):
        if streams[index].sha256 is None or \
                stream_sha256(archive, starts[index], streams[index].end) == streams[index].sha256:
            return True
    return False


def journal_spans(path: Path) -> Optional[list[tuple[int, int]]]:
    """The committed units of an archive (every one of a series of several), from the
    journal beside it, if it describes it."""
    journal, _ = trusted_journal(path)
    return journal.unit_spans() if journal is not None else None


def journal_files(path: Path) -> Optional[dict[str, str]]:
    """name -> MD5 of every committed file, from the journal beside a .part (which has no
    MD5SUMS yet), if it describes it."""
    journal, _ = trusted_journal(path, files=True)
    return journal.reference(len(journal.streams)) if journal else None


def say_if_journal_ignored(archive: Path) -> None:
    """--extract: one line when a journal beside the archive is not used (unreadable, or
    another file's); the streams' series then come from the archive itself."""
    if archive.is_file():
        _, ignored = trusted_journal(archive)
        if ignored:
            print(printable(ignored))


def untrusted_journal_lines(path: Path, name: str, findings: Findings) -> list[str]:
    """A damaged archive whose journal is absent or describes another file (its problem
    was said already): no repair list, and an existing one is left as it is."""
    if not findings.problems or not journal_name_beside(path).exists():
        return []
    manifest = path.with_name(f"{name}.damaged.tcia")
    kept = f"; {manifest.name} (from an earlier --verify) is left as it is" \
        if manifest.exists() else ""
    return [f"no repair list is written: the journal beside {path.name} does not describe "
            f"it{kept}"]


def tree_journals(path: Path, files: bool = False
                  ) -> tuple[list[tuple[JournalSnapshot, str, str]], list[str]]:
    """The journals of a folder tree's output folder, read; or, if one cannot be used, no
    journal and the line that says which and why (no repair list from half the truth)."""
    journals = []
    for candidate in tree_journal_paths(tree_output_folder(path)):
        try:
            journals.append((read_snapshot(candidate, files), candidate.name[:-len(".journal")],
                             "dir"))
        except JournalUnusable as exc:
            return [], [f"{candidate.name} is ignored: {exc}; no repair list is written"]
    return journals, []


def tree_journal_paths(folder: Path) -> list[Path]:
    """The journals of folder trees in an output folder (an archive's journals aside)."""
    return [candidate for candidate in sorted(folder.glob("*.journal"))
            if not any(candidate.name.endswith(f"{codec.suffix}.journal")
                       for codec in archive_codecs())]


def tree_output_folder(path: Path) -> Path:
    """The output folder of a tree given as itself or as one of its collection folders (one
    with its MD5SUMS or its marker, or, for a tree stopped before the marker existed, one
    that a journal beside it names)."""
    if is_collection_folder(path) or path.name in journal_collections(path.parent):
        return path.parent
    return path


def journal_collections(folder: Path) -> set[str]:
    """The collection folders that the readable tree journals in folder name."""
    names: set[str] = set()
    for candidate in tree_journal_paths(folder):
        try:
            names |= {stream.folder.split("/", 1)[0]
                      for stream in read_snapshot(candidate).streams}
        except JournalUnusable:
            continue
    return names


def journal_records(path: Path) -> Optional[list[dict]]:
    """The getSeries record of every committed series, from the journal beside a .part, if
    it describes it."""
    journal, _ = trusted_journal(path)
    if journal is None:
        return None
    return [{**stream.record, "_folder": stream.folder} for stream in journal.streams]
