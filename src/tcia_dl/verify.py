"""--verify, and the repair lists of a damaged output."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, TYPE_CHECKING

from .errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, Interrupted
from .formats import archive_format, archive_name, codec_of
from .formats.tree import UNFINISHED_NAME, is_collection_folder, unfinished_markers
from .findings import Findings, VerifiedMember, series_folder
from .logs import human_bytes, printable
from .plan import recorded_source, write_failed_manifest
from .storage import read_range
from .tarread import (COLLECTION_FILE, MEMBER_BATCH, FollowedUnits, UnitsRead, bounded_map,
                      check_stream, orphan_problem, read_collection_file)
from .trust import (following_units, journal_series_ranges, recovered_spans, tree_journals,
                    trusted_journal, uncommitted_tail, untrusted_journal_lines)

if TYPE_CHECKING:
    from .journal import JournalSnapshot


def verify_archive(path: Path, stop: Optional[threading.Event] = None) -> Findings:
    """Every unit, on all usable cores (they are independent; a member cut across units is
    read by one reader, unit after unit): its codec's checks, its tar headers, every
    member's MD5. A .part is checked up to its last whole unit."""
    findings = Findings()
    part = path.name.endswith(".part")
    codec = codec_of(path)
    findings.unit = f"{codec.name} {codec.unit}s"
    try:
        spans = codec.spans(path)
    except ValueError as exc:
        # Cut inside an append (a kill: normal for a .part) or damaged: the streams are
        # found from the journal, or else from their headers and from the end.
        spans = recovered_spans(path)
        whole_end = spans[-1][1] if spans else 0
        size = path.stat().st_size
        if part:
            findings.notes.append(f"{path.name}: {size - whole_end} bytes after byte "
                                  f"{whole_end} are an append cut short (a resume cuts them "
                                  f"off); the {len(spans)} whole streams before are checked")
        else:
            findings.problems.append(f"{path.name}: {exc}; its {len(spans)} streams are "
                                     "checked one by one")
    # Every unit is named by the series whose range holds it: a damaged first unit of a
    # series of several is that series' damage, and it goes on the repair list.
    series = journal_series_ranges(path)
    beyond = uncommitted_tail(spans, series) if part else 0
    if beyond:
        findings.notes.append(f"{path.name}: the last {beyond} {codec.unit}s, after byte "
                              f"{series.ends[-1]}, are an append its journal does not record "
                              "yet (a resume cuts them off); the ones before are checked")
        spans = spans[:-beyond]
    findings.streams, findings.whole_streams = len(spans), spans

    closing = len(spans) - 1 if spans and not part else None

    def check(item: tuple[int, tuple[int, int]]) -> UnitsRead:
        index, (start, end) = item
        return check_stream(path, index, start, end, findings, stop, closing=index == closing,
                            following=following_units(spans, index, series, closing))
    followed = FollowedUnits()
    for index, ((start, end), read) in enumerate(zip(spans, bounded_map(check,
                                                                        enumerate(spans)))):
        problems = read.problems
        if followed.orphan(index, read):
            problems.append(orphan_problem(codec.unit, index, start, end))
        folder = series.folder_of(start, end)
        findings.problems += [f"{problem} (series {folder}, from the journal)"
                              if folder else problem for problem in problems]
        if problems and folder:
            findings.affected.add(folder)
    return findings


def verify_tree(path: Path, stop: Optional[threading.Event] = None
                ) -> tuple[Findings, TreeScope]:
    """Every file of a collection folder (PATH itself, or the collection folders of an
    output), hashed on all usable cores; names as in an archive: <Collection>/... A folder
    not finished yet is checked as far as its journal has committed it, as a .part is."""
    findings = Findings()
    scope = tree_scope(path, findings)

    def files() -> Iterator[tuple[Path, Path]]:
        """(collection folder, file), hidden names (scratch, extraction) left out."""
        for folder in scope.collections:
            for root, folders, names in os.walk(folder):
                folders[:] = sorted(f for f in folders if not f.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    if Path(root, name).is_file() and scope.checked(folder, Path(root, name)):
                        yield folder, Path(root, name)

    def hashed(item: tuple[Path, Path]) -> tuple[VerifiedMember, Path]:
        folder, file = item
        digest, size = hashlib.md5(), file.stat().st_size
        for chunk in read_range(file, 0, size):
            if stop is not None and stop.is_set():
                raise Interrupted()
            digest.update(chunk)
        return VerifiedMember(str(file.relative_to(folder.parent)), size, digest.hexdigest(),
                              0), file
    batch: list[VerifiedMember] = []
    for member, file in bounded_map(hashed, files()):
        batch.append(member)
        if COLLECTION_FILE.match(member.name):
            with open(file, "rb") as text:
                read_collection_file(member, text, findings)
        if len(batch) >= MEMBER_BATCH:
            findings.ledger.add_members(batch)
            batch = []
    findings.ledger.add_members(batch)
    findings.notes += scope.notes()
    return findings, scope


# A finished part's collection files in a collection folder that another part (a shard, an
# update) has not finished: they are no journal's files, and are checked as in any tree.
COLLECTION_FILE_NAME = re.compile(r"^(LICENSE|CITATION|metadata|MD5SUMS)[^/]*$")


@dataclass
class TreeScope:
    """What --verify reads of a folder tree: its collection folders, and in those not
    finished (their marker says so, or a journal that names them, from before the marker)
    only the files their journals have committed, whose MD5s stand in for the MD5SUMS they
    do not have yet."""
    collections: list[Path]
    unfinished: dict[Path, str]            # folder -> why it is not finished, in words
    committed: dict[str, str]     # <Collection>/<name> -> MD5, in the folders not finished
    series: dict[str, int]        # <Collection> -> series its journals committed (the same)
    skipped: dict[Path, int] = field(default_factory=dict)   # folder -> files not checked

    def checked(self, folder: Path, file: Path) -> bool:
        """Whether a file of a collection folder is read: in a folder not finished, not
        its markers, nor what no journal has committed yet (a series folder moved in by a
        run stopped before its journal row, which a rerun replaces)."""
        if folder not in self.unfinished:
            return True
        if file.parent == folder and UNFINISHED_NAME.match(file.name):
            return False                       # a marker: no file of the output
        if file.parent == folder and COLLECTION_FILE_NAME.match(file.name):
            return True                        # a finished part's
        if f"{folder.name}/{file.relative_to(folder).as_posix()}" in self.committed:
            return True
        self.skipped[folder] = self.skipped.get(folder, 0) + 1
        return False

    def reference(self) -> Optional[dict[str, str]]:
        """The committed files of the folders not finished (None: all are finished)."""
        return self.committed if self.unfinished else None

    def notes(self) -> list[str]:
        lines = []
        for folder, why in sorted(self.unfinished.items()):
            skipped = self.skipped.get(folder, 0)
            lines.append(f"{folder.name}: not finished ({why}): the "
                         f"{self.series.get(folder.name, 0)} series its journal has committed "
                         "are checked against it" + (f"; {skipped} files that no journal "
                                                     "records yet are not (a rerun replaces "
                                                     "them)" if skipped else "")
                         + "; rerun the command that made it to finish it")
        return lines


def tree_scope(path: Path, findings: Findings) -> TreeScope:
    """The collection folders of PATH (itself, or those in it) and what their journals,
    beside them, say of those not finished (their files' MD5s are read only then: a large
    table)."""
    # (a journal that cannot be used is said once, by repair_manifests)
    journals = [snapshot for snapshot, _, _ in tree_journals(path)[0]]
    named: dict[str, list[JournalSnapshot]] = {}
    for snapshot in journals:
        for collection in {stream.folder.split("/", 1)[0] for stream in snapshot.streams}:
            named.setdefault(collection, []).append(snapshot)
    if is_collection_folder(path) or path.name in named:
        candidates = [path]
    else:
        candidates = sorted(d for d in path.iterdir() if d.is_dir() and not
                            d.name.startswith("."))
    collections, unfinished = [], {}
    for folder in candidates:
        markers = unfinished_markers(folder)
        open_journals = [snapshot.path.name for snapshot in named.get(folder.name, [])
                         if snapshot.meta.get("finished") != "yes"]
        if markers:
            unfinished[folder] = ", ".join(marker.name for marker in markers)
        elif not any(folder.glob("MD5SUMS*")):
            if not open_journals:
                continue                      # not a collection folder of this tree
            unfinished[folder] = (f"no MD5SUMS, and {', '.join(open_journals)} "
                                  f"{'is' if len(open_journals) == 1 else 'are'} not finished")
        collections.append(folder)
    names = {folder.name for folder in unfinished}
    if names:
        journals = [snapshot for snapshot, _, _ in tree_journals(path, files=True)[0]]
    committed: dict[str, str] = {}
    series: dict[str, int] = {}
    for snapshot in journals:
        for stream in snapshot.streams:
            collection = stream.folder.split("/", 1)[0]
            if collection in names:
                series[collection] = series.get(collection, 0) + 1
                committed.update(snapshot.files.get(stream.uid, {}))
    for folder in unfinished:
        if not series.get(folder.name):
            findings.problems.append(f"{folder.name}: not finished, and no journal beside it "
                                     "records a series of it: nothing to check its files "
                                     "against; rerun the command that made it, where its "
                                     "journal is")
    return TreeScope(collections, unfinished, committed, series)


def cross_check(findings: Findings, reference: Optional[Iterable[tuple[str, str]]] = None,
                whole: bool = True) -> None:
    """Members against every MD5SUMS (each line has its member with that MD5, each member
    its line, nothing twice, no file where another's folder is) and every metadata.csv's
    series against the series present. A .part has no MD5SUMS yet (whole=False): its
    journal's (name, MD5) stand in, if given."""
    ledger = findings.ledger
    if reference is not None:
        ledger.add_listed(reference, "journal")
    for name, count in ledger.twice():
        findings.problem(name, f"{name} is in the archive {count} times")
    for name, link in ledger.through_links():
        findings.problem(name, f"{name}: a path through a symbolic or hard link of the archive "
                               f"({link}); refused")
    for name in ledger.files_over_folders():
        findings.problem(name, f"{name} is a file and a folder of other files: tar -x "
                               "cannot write both")
    md5sums = ledger.md5sums_names()
    if not md5sums and whole:
        findings.problems.append("no MD5SUMS: the output is not whole (cut short?)")
    for name, source in ledger.listed_missing():
        findings.problem(name, f"{name}: committed in the journal, missing" if source ==
                         "journal" else f"{name}: listed in {source}, missing")
    for name, got, listed, source in ledger.listed_differing():
        says = "the journal" if source == "journal" else source
        findings.problem(name, f"{name}: MD5 {got}, but {says} says {listed}{series_of(name)}")
    if md5sums or reference is not None:
        for name in ledger.unlisted():
            findings.problem(name, f"{name}: in the output but in no MD5SUMS")
    for folder, csv_name in ledger.rows_without_files():
        findings.problems.append(f"{folder}: listed in {csv_name}, no file of it is in the "
                                 "output")


def series_of(name: str) -> str:
    folder = series_folder(name)
    return f" (series {folder})" if folder else ""


def verify_output(path: Path, stop: Optional[threading.Event] = None) -> int:
    """--verify: one line per problem on stdout, then a summary; 0 whole, 1 a problem,
    2 nothing that can be checked."""
    started = time.monotonic()
    journal: Optional[JournalSnapshot] = None
    if path.is_dir():
        findings, scope = verify_tree(path, stop)
        kind = "unfinished folder tree" if scope.unfinished else "folder tree"
        reference = scope.reference()
        cross_check(findings, reference.items() if reference is not None else None,
                    whole=reference is None)
    elif path.is_file():
        part = path.name.endswith(".part")
        findings, kind = verify_archive(path, stop), "unfinished archive" if part else "archive"
        # Read once, after the streams were found: a download appending to a .part adds
        # rows for streams beyond those checked, which are not missing.
        journal, ignored = trusted_journal(path, files=part)
        findings.notes += [ignored] if ignored else []
        checked_end = findings.whole_streams[-1][1] if findings.whole_streams else 0
        reference = journal.reference_through(checked_end) if part and journal else None
        cross_check(findings, reference.items() if reference is not None else None,
                    whole=not part)
    else:
        print(f"tcia_downloader: error: --verify {path}: no such file or folder",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        for problem in findings.problems:
            print(printable(problem))
        for note in findings.notes:
            print(printable(note))
        for line in repair_manifests(path, findings, journal):
            print(line)
        files, size, series = findings.ledger.member_totals()
    finally:
        findings.ledger.close()
    elapsed = time.monotonic() - started
    verdict = "OK" if not findings.problems else f"{len(findings.problems)} problem(s)"
    print(f"{path}: {kind}, {series} series, {files} files, "
          f"{human_bytes(size)}" + (f" in {findings.streams} {findings.unit}" if findings.streams
                                    else "")
          + f"; checked in {elapsed:.1f} s ({human_bytes(size / max(elapsed, 1e-6))}/s): "
          + verdict)
    return EXIT_OK if not findings.problems else EXIT_INCOMPLETE


def repair_manifests(path: Path, findings: Findings,
                     journal: Optional[JournalSnapshot] = None) -> list[str]:
    """For a finished output whose journal is beside it (for an archive: the journal,
    read by verify_output, that describes it): its damaged series as <name>.damaged.tcia,
    which --retry-failed turns into a repaired output (intact series kept, the damaged ones
    fetched again, the collection files written anew). An old one goes when the output is
    whole again. A journal that does not describe the output writes nothing and removes
    nothing: an earlier, right list stays. Returns what to tell the user."""
    if path.name.endswith(".part"):
        return ["the resume of this .part checks every stream against its journal: rerun "
                "the command that made it"] if findings.problems else []
    if path.is_file():
        name = archive_name(path) or path.stem
        if journal is None:
            return untrusted_journal_lines(path, name, findings)
        journals = [(journal, name, archive_format(path).format_name)]
    else:
        journals, lines = tree_journals(path)
        if lines:
            return lines
    lines = []
    for snapshot, name, format_name in journals:
        manifest = snapshot.path.with_name(f"{name}.damaged.tcia")
        where: dict[str, list[str]] = {}
        for stream in snapshot.streams:      # (an Aspera package's parts may share a folder)
            where.setdefault(stream.folder, []).append(stream.uid)
        uids = sorted({uid for folder in findings.affected for uid in where.get(folder, [])})
        if not findings.problems or (not uids and len(journals) > 1):
            manifest.unlink(missing_ok=True)
            continue
        try:
            write_failed_manifest(manifest, uids, format_name, name,
                                  recorded_source(snapshot.meta.get), repair=True)
        except OSError as exc:
            lines.append(f"cannot write {manifest} ({exc.strerror}): copy the output where "
                         "it can be repaired")
            continue
        what = f"{len(uids)} damaged series are listed in {manifest.resolve()}" if uids else \
            f"only collection files are damaged ({manifest.resolve()})"
        lines.append(f"{what}; --retry-failed {manifest.resolve()} fetches them again and "
                     "rebuilds the output around its intact series")
    return lines
