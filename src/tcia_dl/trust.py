"""The journal --verify and --extract believe (one that describes the file beside it), and
what they read from it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, TYPE_CHECKING

from .errors import JournalUnusable
from .formats import archive_codecs, codec_of
from .formats.tarstreams import stream_sha256
from .journal import read_snapshot
from .logs import printable

if TYPE_CHECKING:
    from .findings import Findings
    from .journal import JournalSnapshot


def recovered_spans(path: Path) -> list[tuple[int, int]]:
    """The streams of a file whose streams cannot all be walked from its end (a .part cut
    in an append; damage). From its journal if it describes the file (a finished archive
    gains its closing stream: from the last series to the end); else the whole streams
    from the start, found by their headers, and for a finished archive the streams walked
    from the end, with what lies between as one span (decompressing it says what is
    wrong): damage in one stream never hides the others."""
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
    """Where each committed series' stream ends -> its <Collection>/<path>, from the journal
    beside the archive if it describes it (none at another site: then problems name
    streams only)."""
    journal, _ = trusted_journal(path)
    return {stream.end: stream.folder for stream in journal.streams} if journal else {}


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
    It describes the file when its committed streams end exactly where the file's streams
    do (a .part: its first ones, for an append may follow), a finished archive has the size
    it recorded, and the content is the one it recorded: the last committed stream's
    SHA-256 (or, that stream being damaged, the first's) is the file's. A few bytes a
    stream and one or two streams are read: cheap enough for --extract of one series."""
    part = archive.name.endswith(".part")
    ends = [stream.end for stream in journal.streams]
    if not ends:
        return None if part else "it lists no series"
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
        return f"{elsewhere}: its {len(ends)} series' streams do not end where {archive.name}'s do"
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
    """The committed streams of an archive, from the journal beside it, if it describes it."""
    journal, _ = trusted_journal(path)
    if journal is None:
        return None
    ends = [stream.end for stream in journal.streams]
    return list(zip([0] + ends[:-1], ends))


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


def tree_journals(path: Path) -> tuple[list[tuple[JournalSnapshot, str, str]], list[str]]:
    """The journals of a folder tree's output folder, read; or, if one cannot be used, no
    journal and the line that says which and why (no repair list from half the truth)."""
    folder = path.parent if list(path.glob("MD5SUMS*")) else path
    journals = []
    for candidate in sorted(folder.glob("*.journal")):
        if any(candidate.name.endswith(f"{codec.suffix}.journal") for codec in archive_codecs()):
            continue
        try:
            journals.append((read_snapshot(candidate), candidate.name[:-len(".journal")], "dir"))
        except JournalUnusable as exc:
            return [], [f"{candidate.name} is ignored: {exc}; no repair list is written"]
    return journals, []


def journal_records(path: Path) -> Optional[list[dict]]:
    """The getSeries record of every committed series, from the journal beside a .part, if
    it describes it."""
    journal, _ = trusted_journal(path)
    if journal is None:
        return None
    return [{**stream.record, "_folder": stream.folder} for stream in journal.streams]
