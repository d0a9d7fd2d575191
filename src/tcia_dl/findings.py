"""What a check found: its problem lines, its ledger of members (on disk), its findings."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

#
# --verify and --extract read archives that may come from anywhere (a colleague's copy, a
# damaged disk, a crafted file), so the reader here trusts nothing it reads: every xz stream
# is bounded by checked headers, footers and indexes and must decompress to exactly its
# span; every tar header is read as GNU tar reads it (pax size, mtime and path, the last
# path winning) or the member is refused; output is decompressed in bounded pieces; what it
# learns goes to a temporary database on disk, not to lists in memory; and a signal stops
# it within a chunk.


@dataclass
class VerifiedMember:
    name: str
    size: int
    md5: str
    stream: int                  # which xz stream of the archive holds it (0 for a tree)


class ProblemLines:
    """The problems found, one line each. The first LIMIT are kept, the rest only counted:
    an archive crafted to hold millions of bad members must not cost a line of memory
    each."""

    LIMIT = 10_000

    def __init__(self, lines: Iterable[str] = ()):
        self._lines: list[str] = []
        self.count = 0
        self.extend(lines)

    def append(self, line: str) -> None:
        self.count += 1
        if len(self._lines) < self.LIMIT:
            self._lines.append(line)

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.append(line)

    def __iadd__(self, lines: Iterable[str]) -> "ProblemLines":
        self.extend(lines)
        return self

    def __iter__(self) -> Iterator[str]:
        yield from self._lines
        if self.count > len(self._lines):
            yield f"... and {self.count - len(self._lines)} more problem(s)"

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


LEDGER_SCHEMA = """
    PRAGMA journal_mode = OFF;
    PRAGMA synchronous = OFF;
    CREATE TABLE members (name TEXT, md5 TEXT, size INTEGER, stream INTEGER, folder TEXT);
    CREATE TABLE listed (name TEXT, md5 TEXT, source TEXT);  -- MD5SUMS lines, journal MD5s
    CREATE TABLE rows (folder TEXT, record TEXT);            -- metadata.csv, or the journal
    CREATE TABLE extracted (name TEXT, size INTEGER, folder TEXT);
    CREATE TABLE links (name TEXT);                         -- link members (refused)
"""
OWN_DIGEST = "own digest"        # a listed row that is an MD5SUMS' own MD5, as it was read


def series_folder(name: str) -> Optional[str]:
    """<Collection>/<patient>/<study>/<series> of a series file's name, else None."""
    return name.rsplit("/", 1)[0] if name.count("/") == 4 else None


# The collection files at the top of a collection folder (and what --verify reads as such).
COLLECTION_FILE_TOP = re.compile(r"^[^/]+/(license|citation|metadata|md5sums)[^/]*$",
                                 re.IGNORECASE)


def damaged_folder(name: str) -> Optional[str]:
    """The folder of the series a damaged file belongs to: an NBIA/IDC series' folder, else
    the file's own folder (a source that keeps its own layout: an Aspera package, whose root
    files are in the collection's folder), never for the collection files."""
    folder = series_folder(name)
    if folder is not None or "/" not in name or COLLECTION_FILE_TOP.match(name):
        return folder
    return name.rsplit("/", 1)[0]


class Ledger:
    """What --verify and --extract learn of an output: its members, the MD5s its MD5SUMS
    (or journal) list, the rows of its metadata.csv. Held in a private temporary sqlite
    database, which keeps a 2 MB page cache and spills the rest to a file it deletes when
    closed: lists and dicts of these took about 1 kB of RAM per file (489 MB for 500,000
    files), and an archive of millions of empty members is a few MB. Threads share it
    under a lock; each reader hands it members in batches."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)
        self._db.executescript(LEDGER_SCHEMA)
        self._lock = threading.Lock()
        self._indexed = False

    def close(self) -> None:
        self._db.close()

    def add_members(self, members: list[VerifiedMember]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?)",
                                 [(m.name, m.md5, m.size, m.stream, series_folder(m.name))
                                  for m in members])
            self._indexed = False

    def add_listed(self, rows: Iterable[tuple[str, str]], source: str) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO listed VALUES (?, ?, ?)",
                                 ((name, md5, source) for name, md5 in rows))
            self._indexed = False

    def add_rows(self, rows: Iterable[dict]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO rows VALUES (?, ?)",
                                 ((row["_folder"], json.dumps(row)) for row in rows))

    def add_link(self, name: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO links VALUES (?)", (name,))

    def add_extracted(self, member: VerifiedMember) -> None:
        with self._lock:
            self._db.execute("INSERT INTO extracted VALUES (?, ?, ?)",
                             (member.name, member.size, series_folder(member.name)))

    def forget_members(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM members")

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        """Rows of a query; the indexes are built once, after the inserts (faster than
        keeping them up to date row by row)."""
        with self._lock:
            if not self._indexed:
                self._db.executescript(
                    "CREATE INDEX IF NOT EXISTS members_name ON members (name);"
                    "CREATE INDEX IF NOT EXISTS members_folder ON members (folder);"
                    "CREATE INDEX IF NOT EXISTS listed_name ON listed (name);")
                self._indexed = True
            return self._db.execute(sql, parameters).fetchall()

    def _iterate(self, sql: str) -> Iterator[tuple]:
        """Rows of a query one page at a time (a table may be larger than memory)."""
        last = 0
        while True:
            page = self._query(sql + " AND rowid > ? ORDER BY rowid LIMIT 1000", (last,))
            if not page:
                return
            yield from (row[1:] for row in page)
            last = page[-1][0]

    def expected_md5(self, name: str) -> Optional[str]:
        rows = self._query("SELECT md5 FROM listed WHERE name = ? LIMIT 1", (name,))
        return rows[0][0] if rows else None

    def has_listed(self) -> bool:
        return bool(self._query("SELECT 1 FROM listed LIMIT 1"))

    def rows(self) -> Iterator[dict]:
        return (json.loads(record) for (record,) in
                self._iterate("SELECT rowid, record FROM rows WHERE 1"))

    def member_totals(self) -> tuple[int, int, int]:
        """(files, bytes, series) of the members read."""
        files, size = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM members")[0]
        series = self._query("SELECT COUNT(DISTINCT folder) FROM members")[0][0]
        return files, size, series

    def extracted_totals(self) -> tuple[int, int, int]:
        return self._query("SELECT COUNT(*), COALESCE(SUM(size), 0), COUNT(DISTINCT folder) "
                           "FROM extracted")[0]

    def twice(self) -> list[tuple[str, int]]:
        return self._query("SELECT name, COUNT(*) FROM members GROUP BY name "
                           "HAVING COUNT(*) > 1 ORDER BY name")

    def files_over_folders(self) -> list[str]:
        """Members whose name is also a folder of another member's path: tar -x cannot
        write both (the second fails or replaces the first)."""
        return [name for (name,) in self._query(
            "SELECT DISTINCT m.name FROM members m WHERE EXISTS (SELECT 1 FROM members o "
            "WHERE o.name > m.name || '/' AND o.name < m.name || '0') ORDER BY m.name")]

    def through_links(self) -> list[tuple[str, str]]:
        """(member, link) where a member's path goes through a link member: tar -x would
        write it wherever the link points."""
        return self._query("SELECT m.name, l.name FROM members m JOIN links l ON "
                           "m.name > l.name || '/' AND m.name < l.name || '0' ORDER BY m.name")

    def md5sums_names(self) -> list[str]:
        return [name for (name,) in self._query(
            "SELECT DISTINCT name FROM listed WHERE source = 'own digest' ORDER BY name")]

    def listed_missing(self, folders: Optional[set[str]] = None) -> Iterator[tuple[str, str]]:
        """(name, source) of listed files that no member is, in folders if given."""
        for name, source in self._iterate(
                "SELECT rowid, name, source FROM listed l WHERE source != 'own digest' AND "
                "NOT EXISTS (SELECT 1 FROM members m WHERE m.name = l.name)"):
            if folders is None or series_folder(name) in folders:
                yield name, source

    def listed_differing(self) -> Iterator[tuple[str, str, str, str]]:
        """(name, MD5 read, MD5 listed, source) where a member differs from its line."""
        return self._iterate(
            "SELECT l.rowid, l.name, (SELECT m.md5 FROM members m WHERE m.name = l.name "
            "LIMIT 1) AS got, l.md5, l.source FROM listed l WHERE source != 'own digest' "
            "AND got IS NOT NULL AND got != l.md5")

    def unlisted(self) -> Iterator[str]:
        """Members no MD5SUMS line (or journal row) lists, MD5SUMS files aside."""
        return (name for (name,) in self._iterate(
            "SELECT rowid, name FROM members m WHERE NOT EXISTS (SELECT 1 FROM listed l "
            "WHERE l.name = m.name)"))

    def rows_without_files(self) -> Iterator[tuple[str, str]]:
        """(series folder, metadata file) of the rows no member belongs to: none in the
        series folder, nor below it (an Aspera package's part holds whole sub-folders, and
        its folder may be at any depth; its files are each checked against MD5SUMS)."""
        return ((folder, json.loads(record).get("_file", "metadata.csv"))
                for folder, record in self._iterate(
                    "SELECT rowid, folder, record FROM rows r WHERE NOT EXISTS (SELECT 1 "
                    "FROM members m WHERE m.folder = r.folder) AND NOT EXISTS (SELECT 1 "
                    "FROM members m WHERE m.name > r.folder || '/' AND "
                    "m.name < r.folder || '0')"))


@dataclass
class Findings:
    """What --verify (or --extract) found: the members (in the ledger), problems, notes."""
    ledger: Ledger = field(default_factory=Ledger)
    problems: ProblemLines = field(default_factory=ProblemLines)
    streams: int = 0
    affected: set[str] = field(default_factory=set)    # series folders with a problem
    notes: list[str] = field(default_factory=list)       # worth saying, not a problem
    whole_streams: Optional[list[tuple[int, int]]] = None   # the spans checked
    unit: str = "xz streams"                               # what the spans are, in words

    def problem(self, name: str, text: str) -> None:
        """A problem with one file; its series (if it is a series' file) is damaged."""
        self.problems.append(text)
        folder = damaged_folder(name)
        if folder is not None:
            self.affected.add(folder)
