"""The journal beside an output: what is committed, written and read."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional, Sequence, TYPE_CHECKING
from urllib.parse import quote

from .errors import EXIT_USAGE, FatalRunError, JournalUnusable
from .logs import printable
from .storage import disk_full, no_space_left

if TYPE_CHECKING:
    from .plan import PlannedSeries
    from .sources.base import VerifiedSeries


# A series' folder, <Collection>/<path>, or the collection's own for an empty path (an Aspera
# package's root files).
FOLDER = "collection || CASE WHEN path = '' THEN '' ELSE '/' || path END"


def read_only(journal: Path) -> "contextlib.closing[sqlite3.Connection]":
    """A journal opened for reading only (--verify, --extract and checks that must not
    write to it), closed when the with-block ends. The path is quoted: a '?' or '#' in a
    folder name would end it in the URI."""
    return contextlib.closing(sqlite3.connect(f"file:{quote(str(journal))}?mode=ro", uri=True))


# The tables and columns a journal needs (stream_sha256 came in 0.4, unit_ends after it:
# they may be missing).
JOURNAL_TABLES = {
    "meta": {"key", "value"},
    "series": {"uid", "collection", "path", "archive_end", "tar_end", "files", "bytes",
               "record", "license", "committed_at"},
    "files": {"uid", "name", "md5", "size"},
    "requested": {"uid"},
}


def roll_back_hot_journal(path: Path) -> None:
    """A kill mid-commit left a hot journal: a read-only connection cannot roll it back
    (SQLITE_READONLY_ROLLBACK), a read-write one does so on its first read."""
    if Path(f"{path}-journal").exists():
        with contextlib.closing(sqlite3.connect(str(path))) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()


def journal_columns(db: sqlite3.Connection) -> dict[str, set[str]]:
    """table -> columns of the journal's tables that exist (a kill while it was being
    created leaves some out). JournalUnusable when they are not ours: a table of ours with
    other columns, or only other programs' tables."""
    tables = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite%'")]
    ours = {}
    for table in tables:
        if table in JOURNAL_TABLES:
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(JOURNAL_TABLES[table] - columns)
            if missing:
                raise JournalUnusable(f"its table {table} has no column {missing[0]}: it is "
                                      "not a journal of this tool")
            ours[table] = columns
    if tables and not ours:
        raise JournalUnusable(f"it is a database of another program (tables: "
                              f"{', '.join(sorted(tables)[:3])})")
    return ours


def read_journal(path: Path) -> tuple[dict[str, str], bool]:
    """({committed series UID: "<Collection>/<path>"}, finished?) of a journal, read-only;
    nothing if it is absent or was cut short before its tables existed (a kill right after
    it was created). For --dry-run and --update, which must not write, and before a run
    opens it: a journal that is not one of ours is one line, not a traceback later."""
    if not path.exists():
        return {}, False
    try:
        return read_committed(path)
    except JournalUnusable as exc:
        raise FatalRunError(f"the journal {path} is unusable ({exc}); move it away to start "
                            "over", EXIT_USAGE) from None


def says_finished(path: Path) -> bool:
    """Whether a journal says its output is finished, from its meta table alone: a cheap
    look before planning (a finished output needs no folder names). Anything unreadable is
    False here; read_journal then says what is wrong with it."""
    if not path.exists():
        return False
    try:
        with read_only(path) as db:
            if "meta" not in journal_columns(db):
                return False
            return db.execute("SELECT value FROM meta WHERE key = 'finished'").fetchone() \
                == ("yes",)
    except (sqlite3.Error, JournalUnusable):
        return False


def read_committed(path: Path) -> tuple[dict[str, str], bool]:
    """read_journal's answer from the three columns it needs: a resume of a finished
    200,000-series journal spent a third of its time parsing every series' JSON record
    (read_snapshot), which the target checks when it opens the journal to write."""
    try:
        roll_back_hot_journal(path)
        with read_only(path) as db:
            db.execute("BEGIN")
            tables = journal_columns(db)
            meta = dict(db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            rows = db.execute("SELECT uid, collection, path FROM series").fetchall() \
                if "series" in tables else []
            not_json = first_record_not_json(db) if "series" in tables else None
    except sqlite3.Error as exc:
        raise JournalUnusable(f"it cannot be read as an sqlite journal ({exc})") from None
    if not_json is not None:
        raise JournalUnusable(f"the record of series {printable(str(not_json))[:80]} is not a "
                              "JSON object")
    committed = {}
    for uid, collection, where in rows:
        if not all(isinstance(v, str) for v in (uid, collection, where)):
            raise JournalUnusable(f"the row of series {printable(str(uid))[:80]} is not one "
                                  "this tool writes")
        committed[uid] = f"{collection}/{where}" if where else collection
    return committed, meta.get("finished") == "yes"


@dataclass(frozen=True)
class JournalStream:
    """A committed series as its journal row has it."""
    uid: str
    folder: str                  # <Collection>/<series path>
    end: int                     # where its last unit ends in the archive (0 in a folder tree)
    sha256: Optional[str]        # of all its units (None in a journal of 0.3, or a tree)
    record: dict                 # its getSeries record
    # Where each of its units but the last ends, from the series' start (none: one unit).
    unit_ends: tuple[int, ...] = ()


@dataclass(frozen=True)
class JournalSnapshot:
    """A journal read once, in one read transaction: a run that writes to it meanwhile
    cannot make one part of what was read disagree with another."""
    path: Path
    streams: list[JournalStream]               # in archive order
    meta: dict[str, str]
    files: dict[str, dict[str, str]]           # uid -> {<Collection>/<name>: MD5}, if read

    def reference(self, count: int) -> dict[str, str]:
        """name -> MD5 of the files of the first count series."""
        return {name: md5 for stream in self.streams[:count]
                for name, md5 in self.files.get(stream.uid, {}).items()}

    def reference_through(self, end: int) -> dict[str, str]:
        """name -> MD5 of the files of the series that end at or before byte end."""
        return self.reference(sum(1 for stream in self.streams if stream.end <= end))

    def units_inside(self) -> bool:
        """Every series' other units end inside its range, as this tool writes them."""
        start = 0
        for stream in self.streams:
            if stream.unit_ends and stream.unit_ends[-1] >= stream.end - start:
                return False
            start = stream.end
        return True

    def unit_spans(self) -> list[tuple[int, int]]:
        """(start, end) of every unit of every committed series, in archive order."""
        spans: list[tuple[int, int]] = []
        start = 0
        for stream in self.streams:
            ends = [start + inner for inner in stream.unit_ends] + [stream.end]
            spans += zip([start] + ends[:-1], ends)
            start = stream.end
        return spans


def read_snapshot(path: Path, files: bool = False) -> JournalSnapshot:
    """The journal at path (with its files' MD5s if asked: a large table), or
    JournalUnusable with why, in words."""
    try:
        roll_back_hot_journal(path)
        with read_only(path) as db:
            db.execute("BEGIN")                   # one snapshot for every SELECT below
            tables = journal_columns(db)
            meta = dict(db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            series_columns = tables.get("series", ())
            sha = "stream_sha256" if "stream_sha256" in series_columns else "NULL"
            units = "unit_ends" if "unit_ends" in series_columns else "NULL"
            rows = db.execute(f"SELECT uid, collection, path, archive_end, {sha}, record, "
                              f"{units} FROM series ORDER BY archive_end, uid").fetchall() \
                if "series" in tables else []
            listed = db.execute("SELECT f.uid, s.collection || '/' || f.name, f.md5 FROM files f "
                                "JOIN series s ON s.uid = f.uid").fetchall() \
                if files and {"series", "files"} <= set(tables) else []
    except sqlite3.Error as exc:
        raise JournalUnusable(f"it cannot be read as an sqlite journal ({exc})") from None
    by_uid: dict[str, dict[str, str]] = defaultdict(dict)
    for uid, name, md5 in listed:
        by_uid[uid][name] = md5
    return JournalSnapshot(path, [journal_stream(row) for row in rows],
                           {str(k): str(v) for k, v in meta.items()}, dict(by_uid))


def first_record_not_json(db: sqlite3.Connection) -> Optional[object]:
    """The uid of the first series whose record is not a JSON object, or None: checked by
    sqlite's JSON functions where it has them (in C: 200,000 records in a fraction of
    json.loads' time), else record by record."""
    try:
        row = db.execute("SELECT uid FROM series WHERE record IS NULL OR NOT json_valid(record) "
                         "OR json_type(record) != 'object' LIMIT 1").fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:          # an sqlite built without JSON1
        for uid, record in db.execute("SELECT uid, record FROM series"):
            try:
                if not isinstance(json.loads(record), dict):
                    return uid
            except (TypeError, ValueError):
                return uid
        return None


def journal_stream(row: tuple) -> JournalStream:
    """One series row, checked: what this tool writes, or JournalUnusable."""
    uid, collection, where, end, sha256, record, unit_ends = row
    try:
        parsed = json.loads(record)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise JournalUnusable(f"the record of series {printable(str(uid))[:80]} is not a JSON "
                              "object")
    inner = parsed_unit_ends(unit_ends)
    if not isinstance(end, int) or not all(isinstance(v, str) for v in (uid, collection, where)) \
            or inner is None:
        raise JournalUnusable(f"the row of series {printable(str(uid))[:80]} is not one this "
                              "tool writes")
    return JournalStream(uid, f"{collection}/{where}" if where else collection, end, sha256,
                         parsed, inner)


def parsed_unit_ends(text: object) -> Optional[tuple[int, ...]]:
    """A row's unit_ends (a JSON list of rising positive integers, or NULL: one unit), or
    None when it is not what this tool writes."""
    if text is None:
        return ()
    try:
        ends = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(ends, list) or not all(type(end) is int for end in ends) or \
            any(end <= before for before, end in zip([0] + ends, ends)):
        return None
    return tuple(ends)


class Journal:
    """sqlite3 record of committed series: what is in the output and where the archive
    ends after each one. A row is written only after the data it describes is fsynced."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS series (
            uid TEXT PRIMARY KEY, collection TEXT NOT NULL, path TEXT NOT NULL,
            archive_end INTEGER NOT NULL, tar_end INTEGER NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL,
            record TEXT NOT NULL, license TEXT, committed_at TEXT NOT NULL,
            stream_sha256 TEXT);
        CREATE TABLE IF NOT EXISTS files (
            uid TEXT NOT NULL, name TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL);
        CREATE INDEX IF NOT EXISTS files_uid ON files(uid);
        CREATE TABLE IF NOT EXISTS requested (uid TEXT PRIMARY KEY);
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(self.SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(series)")}
            if "stream_sha256" not in columns:      # a journal of version 0.3
                self._db.execute("ALTER TABLE series ADD COLUMN stream_sha256 TEXT")
            self._has_unit_ends = "unit_ends" in columns
        except sqlite3.Error as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: sqlite3.Error) -> FatalRunError:
        """One line for a journal that cannot be read or written; a full disk says so."""
        if getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13) \
                or no_space_left(self.path.parent):
            return disk_full(self.path)
        if isinstance(exc, sqlite3.OperationalError):
            return FatalRunError(f"the journal {self.path} cannot be written ({exc}); check "
                                 "the folder and the filesystem, then rerun to resume")
        return FatalRunError(f"the journal {self.path} is unreadable ({exc}); move it away to "
                             "start over", EXIT_USAGE)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing, even under kill -9. The connection is in autocommit mode
        (isolation_level=None), where `with connection:` would NOT open a transaction and
        every statement would commit on its own. sqlite rolls back by itself on some errors
        (a full disk): then there is no transaction left to roll back."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._failure(exc) from None

    def get(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def committed(self) -> dict[str, str]:
        """series uid -> path of every committed series."""
        return dict(self._db.execute("SELECT uid, path FROM series"))

    def locations(self) -> dict[str, str]:
        """series uid -> <Collection>/<path> of every committed series."""
        return dict(self._db.execute(f"SELECT uid, {FOLDER} FROM series"))

    def request(self, uids: list[str], replace: bool) -> None:
        """What the output must hold before it is finished: this run's series, or (for
        --retry-failed, which asks for a part) these on top of what earlier runs asked."""
        with self._transaction():
            if replace:
                self._db.execute("DELETE FROM requested")
            self._db.executemany("INSERT OR IGNORE INTO requested VALUES (?)",
                                 [(uid,) for uid in uids])

    def missing_requested(self) -> list[str]:
        return [uid for (uid,) in self._db.execute(
            "SELECT uid FROM requested WHERE uid NOT IN (SELECT uid FROM series) ORDER BY uid")]

    def ends(self) -> tuple[int, int]:
        """(archive bytes, tar bytes) after the last committed series."""
        row = self._db.execute(
            "SELECT archive_end, tar_end FROM series ORDER BY archive_end DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def forget_beyond(self, archive_size: int) -> list[str]:
        """Drop series whose stream is not wholly in an archive of this size."""
        with self._transaction():
            gone = [u for (u,) in self._db.execute(
                "SELECT uid FROM series WHERE archive_end > ?", (archive_size,))]
            self._forget(gone)
        return gone

    def forget(self, uids: list[str]) -> None:
        with self._transaction():
            self._forget(uids)

    def _forget(self, uids: list[str]) -> None:
        for uid in uids:
            self._db.execute("DELETE FROM files WHERE uid=?", (uid,))
            self._db.execute("DELETE FROM series WHERE uid=?", (uid,))
        if uids:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('finished', 'no')")

    def streams(self) -> list[tuple[str, str, int, int, Optional[str]]]:
        """(uid, path, start, end, sha256 or None before 0.4) of every committed series (the
        range of all its units), in archive order; each starts where the one before ends."""
        rows = self._db.execute(f"SELECT uid, {FOLDER}, archive_end, "
                                "stream_sha256 FROM series ORDER BY archive_end").fetchall()
        starts = [0] + [end for _, _, end, _ in rows[:-1]]
        return [(uid, label, start, end, sha)
                for (uid, label, end, sha), start in zip(rows, starts)]

    def layout(self) -> list[tuple[str, str, int, int, int, Optional[str]]]:
        """(uid, path, start, end, tar bytes, sha256) of every series' range, in archive
        order."""
        rows = self._db.execute(f"SELECT uid, {FOLDER}, archive_end, tar_end, "
                                "stream_sha256 FROM series ORDER BY archive_end").fetchall()
        before = [(0, 0)] + [(end, tar) for _, _, end, tar, _ in rows[:-1]]
        return [(uid, label, start, end, tar - tar_start, sha)
                for (uid, label, end, tar, sha), (start, tar_start) in zip(rows, before)]

    def rearrange(self, kept: list[tuple[str, int, int]], gone: list[str],
                  replacing: int) -> None:
        """After a repair built a new .part: the kept series' new (archive end, tar end)
        (their unit_ends count from their own start: they move with them),
        the damaged ones forgotten, and the old archive marked as being replaced (it stays
        until the new one is renamed over it). One transaction: a kill leaves the journal
        describing the old archive or the new .part, never a mix."""
        with self._transaction():
            self._forget(gone)
            self._db.executemany("UPDATE series SET archive_end=?, tar_end=? WHERE uid=?",
                                 [(end, tar, uid) for uid, end, tar in kept])
            self._db.execute("DELETE FROM meta WHERE key='closing_end'")
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [("finished", "no"), ("replacing", str(replacing))])

    def record(self, series: PlannedSeries, verified: VerifiedSeries, archive_end: int,
               tar_end: int, stream_sha256: Optional[str] = None,
               unit_ends: Sequence[int] = ()) -> None:
        """A committed series: where its last unit ends (archive_end), the SHA-256 of all
        its units, where its other units end (from its start; none: it is one unit)."""
        values = [series.uid, series.collection, series.path, archive_end, tar_end,
                  len(verified.members), verified.bytes,
                  json.dumps(verified.record or series.record),
                  (verified.license_text or "").strip() or None,
                  datetime.now().isoformat(timespec="seconds"), stream_sha256]
        # Only a journal that holds a big series gets the column: one that never did stays
        # the one that 0.4.0 reads and resumes.
        add_column = bool(unit_ends) and not self._has_unit_ends
        if add_column or self._has_unit_ends:
            values.append(json.dumps(list(unit_ends)) if unit_ends else None)
        with self._transaction():  # one transaction: the series and its files, or nothing
            if add_column:
                self._db.execute("ALTER TABLE series ADD COLUMN unit_ends TEXT")
            self._db.execute(f"INSERT OR REPLACE INTO series VALUES "
                             f"({','.join('?' * len(values))})", values)
            self._db.execute("DELETE FROM files WHERE uid=?", (series.uid,))
            self._db.executemany(
                "INSERT INTO files VALUES (?,?,?,?)",
                [(series.uid, series.member_path(m.name), m.md5, m.size)
                 for m in verified.members])
        self._has_unit_ends = self._has_unit_ends or add_column

    def total_bytes(self) -> int:
        return self._db.execute("SELECT coalesce(sum(bytes), 0) FROM series").fetchone()[0]

    def collections(self) -> list[str]:
        return [c for (c,) in self._db.execute("SELECT DISTINCT collection FROM series "
                                               "ORDER BY collection")]

    def files(self, collection: str) -> Iterator[tuple[str, str]]:
        yield from self._db.execute(
            "SELECT f.name, f.md5 FROM files f JOIN series s ON s.uid = f.uid "
            "WHERE s.collection=? ORDER BY f.name", (collection,))

    def member_names(self, uid: str) -> list[str]:
        """<Collection>/<name> of each file of a committed series."""
        return [name for (name,) in self._db.execute(
            "SELECT s.collection || '/' || f.name FROM files f JOIN series s ON s.uid = f.uid "
            "WHERE f.uid=? ORDER BY f.name", (uid,))]

    def series_rows(self, collection: str) -> list[tuple[str, dict, int, int]]:
        return [(path, json.loads(record), files, size) for path, record, files, size in
                self._db.execute("SELECT path, record, files, bytes FROM series "
                                 "WHERE collection=? ORDER BY path", (collection,))]

    def licenses(self, collection: str) -> list[tuple[Optional[str], dict]]:
        """(LICENSE text the server sent, or None; the getSeries record) per series."""
        return [(text, json.loads(record)) for text, record in self._db.execute(
            "SELECT license, record FROM series WHERE collection=?", (collection,))]
