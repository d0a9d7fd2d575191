"""--verify, and the repair lists of a damaged output."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, TYPE_CHECKING

from .errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, Interrupted
from .formats import archive_format, archive_name, codec_of
from .findings import Findings, VerifiedMember, series_folder
from .logs import human_bytes, printable
from .plan import recorded_source, write_failed_manifest
from .storage import read_range
from .tarread import COLLECTION_FILE, MEMBER_BATCH, bounded_map, check_stream, read_collection_file
from .trust import (journal_series_ranges, recovered_spans, tree_journals, trusted_journal,
                    uncommitted_tail, untrusted_journal_lines)

if TYPE_CHECKING:
    from .findings import ProblemLines
    from .journal import JournalSnapshot


def verify_archive(path: Path, stop: Optional[threading.Event] = None) -> Findings:
    """Every unit, on all usable cores (they are independent): its codec's checks, its tar
    headers, every member's MD5. A .part is checked up to its last whole unit."""
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

    def check(item: tuple[int, tuple[int, int]]) -> ProblemLines:
        index, (start, end) = item
        return check_stream(path, index, start, end, findings, stop,
                            closing=index == len(spans) - 1 and not part)
    for (start, end), problems in zip(spans, bounded_map(check, enumerate(spans))):
        folder = series.folder_of(start, end)
        findings.problems += [f"{problem} (series {folder}, from the journal)"
                              if folder else problem for problem in problems]
        if problems and folder:
            findings.affected.add(folder)
    return findings


def verify_tree(path: Path, stop: Optional[threading.Event] = None) -> Findings:
    """Every file of a collection folder (PATH itself, or the folders with an MD5SUMS in
    an output), hashed on all usable cores; names as in an archive: <Collection>/..."""
    findings = Findings()
    collections = [path] if any(path.glob("MD5SUMS*")) else \
        sorted(d for d in path.iterdir() if d.is_dir() and any(d.glob("MD5SUMS*")))

    def files() -> Iterator[tuple[Path, Path]]:
        """(collection folder, file), hidden names (scratch, extraction) left out."""
        for folder in collections:
            for root, folders, names in os.walk(folder):
                folders[:] = sorted(f for f in folders if not f.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    if Path(root, name).is_file():
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
    return findings


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
        findings, kind = verify_tree(path, stop), "folder tree"
        cross_check(findings)
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
