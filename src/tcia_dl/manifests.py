"""The files --manifest (and --retry-failed) take, whatever TCIA handed out: a .tcia manifest
(NBIA's cart, and our own failure lists), an IDC s5cmd manifest (`cp s3://<bucket>/<uuid>/*
<dest>` lines, what TCIA's collection pages give since 2026), or a CSV/TSV spreadsheet with a
SeriesInstanceUID column (TCIA's cart export, what the Data Retriever takes). The kind is told
by the content (manifest_kind), each kind has one reader, and every reader gives a Manifest.
IDC's uuids become SeriesInstanceUIDs through IDC's index (wanted_series, given a lookup)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import EXIT_USAGE, FatalRunError, UsageError
from .logs import log, printable

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")
# IDC's crdc_series_uuid: a UUID (lower case in IDC's index and buckets).
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                          r"[0-9a-fA-F]{12}$")
# s3://<bucket>/<crdc_series_uuid>/* (gs:// on Google's mirror); idc-index writes the series'
# "/*", and a bare prefix ("/" or nothing after the uuid) names the same objects.
SERIES_URL = re.compile(r"^(?:s3|gs)://([a-z0-9][a-z0-9._-]{1,62})/([0-9a-fA-F-]{36})/?\*?$")
S5CMD_COMMANDS = ("cp", "sync")       # idc-index writes sync when the folder is not empty
S5CMD_LINE = re.compile(r"^(?:cp|sync)\s.*\b(?:s3|gs)://", re.IGNORECASE)
INDEX_UPGRADE = "pip install --upgrade idc-index-data"     # an index older than a manifest
FAILED_RUN_KEY = "tcia_downloader."      # header keys that say which run failed the series

MANIFEST_MARKER = "ListOfSeriesToDownload="
MANIFEST_HEADER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*=")     # key=value, before the list
MANIFEST_LINE = 1024       # longer lines are read in pieces, each a stray line
STRAY_SHOWN = 5            # stray lines quoted in the log
STRAY_LIMIT = 1000         # past this many stray lines, a file that is mostly not UIDs is refused
SNIFF_BYTES = 64 * 1024    # what manifest_kind reads of a file
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"      # an Excel 97-2003 .xls
SERIES_COLUMN = "seriesinstanceuid"       # a spreadsheet's column, compared squashed
KINDS_WE_READ = ("a .tcia manifest (ListOfSeriesToDownload=), an IDC s5cmd manifest (lines "
                 "cp s3://<bucket>/<crdc_series_uuid>/* <dest>) or a CSV/TSV/XLSX spreadsheet "
                 "whose header names a SeriesInstanceUID column")
# What each kind's file is usually called: cut from the output's name (cart.s5cmd -> cart).
KIND_SUFFIXES = {"tcia": (".tcia",), "s5cmd": (".s5cmd", ".txt"),
                 "spreadsheet": (".csv", ".tsv", ".txt", ".xlsx")}


def is_uid(text: object) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. A server's text
    must be one before it names anything."""
    return isinstance(text, str) and len(text) <= 64 and UID_PATTERN.match(text) is not None


@dataclass(frozen=True)
class Manifest:
    """What one --manifest file asks for: SeriesInstanceUIDs (.tcia, spreadsheet) or IDC
    crdc_series_uuids (s5cmd), once each in the file's order, and the lines that were
    neither (the first few quoted, all counted)."""
    path: Path
    basket: Optional[str]                  # databasketId, as the TCIA portal names the cart
    uids: list[str]
    stray: list[tuple[int, str]]           # (line number, text): the first lines not a UID
    stray_count: int = 0                   # how many lines were not a UID
    kind: str = "tcia"                     # tcia, s5cmd or spreadsheet
    uuids: list[str] = field(default_factory=list)     # IDC crdc_series_uuids (s5cmd)

    @property
    def stem(self) -> str:
        """The output's name this manifest gives: its databasketId, else its file name,
        without the usual suffix of its kind."""
        name = self.basket or self.path.name
        for suffix in KIND_SUFFIXES.get(self.kind, ()):
            if name.lower().endswith(suffix):
                return name[:-len(suffix)]
        return name


class StrayLines:
    """The lines of a file that are not what its kind lists, counted, the first few kept;
    a file that is mostly such lines (the wrong file, random bytes) is refused early
    instead of being read to its end."""

    def __init__(self, path: Path, expected: str):
        self.path, self.expected = path, expected
        self.shown: list[tuple[int, str]] = []
        self.count = 0

    def add(self, number: int, text: str, listed: int) -> None:
        self.count += 1
        if len(self.shown) < STRAY_SHOWN:
            self.shown.append((number, printable(text[:80])))
        if self.count > STRAY_LIMIT and self.count > listed:
            raise FatalRunError(f"{self.path} is mostly not {self.expected} ({self.count} of "
                                f"its first {number} lines): is it a manifest of that kind?",
                                EXIT_USAGE)

    def reset(self) -> None:
        self.shown, self.count = [], 0


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, stripped text) of each line: CRLF, a BOM and a missing last newline
    tolerated, a line longer than MANIFEST_LINE read in pieces."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for number, line in enumerate(iter(lambda: handle.readline(MANIFEST_LINE), ""),
                                          start=1):
                yield number, line.strip()
    except OSError as exc:
        raise FatalRunError(f"{path}: cannot read it ({exc.strerror})", EXIT_USAGE) from None


# -- what kind of file ------------------------------------------------------------------------

def manifest_kind(path: Path) -> str:
    """tcia, s5cmd or spreadsheet, by what the file holds (its first SNIFF_BYTES), then by
    its suffix when the content says nothing (an empty .csv is a spreadsheet without its
    header); one line (exit 2) for a workbook or a file that is none of them."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise FatalRunError(f"{path}: cannot read it ({exc.strerror})", EXIT_USAGE) from None
    suffix = path.suffix.lower()
    if head.startswith(b"PK\x03\x04") or suffix == ".xlsx":
        return "workbook"
    if head.startswith(OLE2_MAGIC) or suffix == ".xls":
        raise FatalRunError(f"{path} is an Excel 97-2003 workbook (.xls), which this tool "
                            "does not read: save it as .xlsx or CSV (a SeriesInstanceUID "
                            "column, with its header) and pass that", EXIT_USAGE)
    text = head.decode("utf-8-sig", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    first = next((line for line in lines if line and not line.startswith("#")), "")
    if S5CMD_LINE.match(first):
        return "s5cmd"
    if MANIFEST_MARKER in text or is_uid(first) or MANIFEST_HEADER.match(first):
        return "tcia"
    header = next((line for line in lines if line), "")
    if any(squash(cell) == SERIES_COLUMN for cell in split_row(header)):
        return "spreadsheet"
    by_suffix = {".tcia": "tcia", ".s5cmd": "s5cmd", ".csv": "spreadsheet",
                 ".tsv": "spreadsheet"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise FatalRunError(f"{path} is none of the files --manifest reads: {KINDS_WE_READ}",
                        EXIT_USAGE)


def squash(text: str) -> str:
    """A column name as compared: any case, without spaces, underscores or quotes."""
    return re.sub(r"[\s_\"']+", "", text).casefold()


def split_row(line: str) -> list[str]:
    """A header line's cells, by its delimiter: tab, else comma, else semicolon (a CSV
    written by a spreadsheet program set to a language whose decimal mark is a comma)."""
    delimiter = spreadsheet_delimiter(line)
    return next(csv.reader([line], delimiter=delimiter), []) if delimiter else [line]


def spreadsheet_delimiter(line: str) -> Optional[str]:
    return next((d for d in ("\t", ",", ";") if d in line), None)


def read_manifest(path: Path) -> Manifest:
    """Any --manifest file, by its kind."""
    kind = manifest_kind(path)
    readers: dict[str, Callable[[Path], Manifest]] = {
        "tcia": read_tcia, "s5cmd": read_s5cmd, "spreadsheet": read_spreadsheet,
        "workbook": read_workbook}
    return readers[kind](path)


# -- one reader per kind ------------------------------------------------------------------------

def read_tcia(path: Path) -> Manifest:
    """A .tcia manifest: key=value lines, then one SeriesInstanceUID per line after
    ListOfSeriesToDownload=. CRLF, blank lines, a missing last newline and stray lines
    (one official test file has one) are tolerated; a bare list of UIDs is too."""
    basket = None
    uids: dict[str, None] = {}
    stray = StrayLines(path, "SeriesInstanceUIDs")
    in_list = False
    for number, candidate in numbered_lines(path):
        if not in_list and candidate.startswith(MANIFEST_MARKER):
            # What came before was the header: UIDs there are not in the list.
            in_list, uids = True, {}
            stray.reset()
            candidate = candidate[len(MANIFEST_MARKER):].strip()
        key, _, value = candidate.partition("=")
        if not in_list and key == "databasketId" and value.strip():
            basket = value.strip()
        if not candidate:
            continue
        if is_uid(candidate):
            uids[candidate] = None
        elif in_list or not MANIFEST_HEADER.match(candidate):
            stray.add(number, candidate, len(uids))
    if not uids and failed_run_origin(path).get("repair") != "yes":
        # (A repair manifest may list none: only the collection files were damaged.)
        raise FatalRunError(f"{path} lists no SeriesInstanceUID: is it a .tcia manifest?",
                            EXIT_USAGE)
    return Manifest(path, basket, list(uids), stray.shown, stray.count)


def read_s5cmd(path: Path) -> Manifest:
    """IDC's s5cmd manifest: `cp s3://<bucket>/<crdc_series_uuid>/* <dest>` per line (URLs
    quoted or not, s3:// or gs://, any of IDC's buckets, old ones too: the uuid names the
    series, the index says where it is now), `#` comments, blank lines, CRLF."""
    uuids: dict[str, None] = {}
    stray = StrayLines(path, "s5cmd cp lines")
    for number, line in numbered_lines(path):
        if not line or line.startswith("#"):
            continue
        uuid = series_uuid_of(line)
        if uuid is None:
            stray.add(number, line, len(uuids))
        else:
            uuids[uuid] = None
    if not uuids:
        raise FatalRunError(f"{path} lists no series: an IDC s5cmd manifest has lines "
                            "cp s3://<bucket>/<crdc_series_uuid>/* <dest>", EXIT_USAGE)
    return Manifest(path, None, [], stray.shown, stray.count, kind="s5cmd", uuids=list(uuids))


def series_uuid_of(line: str) -> Optional[str]:
    """The crdc_series_uuid a `cp <url> <dest>` line copies (lower case), else None."""
    words = shell_words(line)
    if len(words) < 2 or words[0].lower() not in S5CMD_COMMANDS:
        return None
    urls = [word for word in words[1:] if not word.startswith("-")]
    match = SERIES_URL.match(urls[0]) if urls else None
    if match is None or not UUID_PATTERN.match(match[2]):
        return None
    return match[2].lower()


# A word of a command line: quoted ("..." or '...'), bare, or a # comment to the line's end.
SHELL_WORD = re.compile(r"\"([^\"]*)\"|'([^']*)'|([^\s\"'#]\S*)|(#.*)")


def shell_words(line: str) -> list[str]:
    """The words of a line as s5cmd reads its commands (quotes removed, a comment dropped).
    A regular expression, not shlex: with shlex, reading a manifest took 0.3 ms a line (30 s
    for 100,000 series); with this, 100,000 lines take 2.3 s (both measured on a loaded
    2-core machine)."""
    words = []
    for match in SHELL_WORD.finditer(line):
        if match[4] is not None:
            break
        words.append(next(group for group in match.groups()[:3] if group is not None))
    return words


def read_spreadsheet(path: Path) -> Manifest:
    """A CSV or TSV file whose first row names a SeriesInstanceUID column (any case, with
    or without spaces), as TCIA's cart exports it; the other columns are ignored."""
    uids: dict[str, None] = {}
    stray = StrayLines(path, "SeriesInstanceUIDs")
    rows = numbered_lines(path)
    header_number, header = next(((n, line) for n, line in rows if line), (0, ""))
    cells = split_row(header)
    column = next((i for i, cell in enumerate(cells) if squash(cell) == SERIES_COLUMN), None)
    if column is None:
        what = "it is empty" if not header else \
            f"its first row is {printable(header[:80])!r}"
        raise FatalRunError(f"{path}: a spreadsheet needs a header row naming a "
                            f"SeriesInstanceUID column; {what}", EXIT_USAGE)
    delimiter = spreadsheet_delimiter(header) or ","
    try:
        for number, line in rows:
            if not line:
                continue
            row = next(csv.reader([line], delimiter=delimiter), [])
            value = row[column].strip() if column < len(row) else ""
            if is_uid(value):
                uids[value] = None
            else:
                stray.add(number, line, len(uids))
    except csv.Error as exc:
        raise FatalRunError(f"{path}: not a CSV/TSV file this tool can read ({exc})",
                            EXIT_USAGE) from None
    if not uids:
        raise FatalRunError(f"{path}: its SeriesInstanceUID column (row {header_number}) "
                            "holds no SeriesInstanceUID", EXIT_USAGE)
    return Manifest(path, None, list(uids), stray.shown, stray.count, kind="spreadsheet")


def read_workbook(path: Path) -> Manifest:
    """An .xlsx workbook (TCIA's cart exports one too): the first sheet whose first non-empty
    row names a SeriesInstanceUID column, read by openpyxl (requirements-xlsx.txt), imported
    only here; values only, never formulas run."""
    try:
        import openpyxl
    except ImportError:
        raise FatalRunError(f"{path} is an Excel workbook: reading it needs openpyxl (pip "
                            "install -r requirements-xlsx.txt), or save it as CSV",
                            EXIT_USAGE) from None
    # A file object, not the path: openpyxl refuses a path whose suffix is not an Excel one,
    # and the kind was told by the content.
    with open(path, "rb") as handle:
        try:
            book = openpyxl.load_workbook(handle, read_only=True, data_only=True)
        except Exception as exc:      # openpyxl raises many kinds for a file it cannot read
            raise FatalRunError(f"{path}: not an .xlsx workbook this tool can read "
                                f"({type(exc).__name__}); save it as CSV", EXIT_USAGE) from None
        try:
            for sheet in book.worksheets:
                found = workbook_column(sheet.iter_rows(values_only=True))
                if found is not None:
                    return sheet_manifest(path, sheet.title, *found)
        finally:
            book.close()
    raise FatalRunError(f"{path}: no sheet has a header row naming a SeriesInstanceUID "
                        "column", EXIT_USAGE)


def workbook_column(rows: Iterator[tuple]) -> Optional[tuple[int, int, Iterator[tuple]]]:
    """(header row number, the SeriesInstanceUID column, the rows after it), or None."""
    for number, row in enumerate(rows, start=1):
        cells = ["" if cell is None else str(cell) for cell in row]
        if not any(cell.strip() for cell in cells):
            continue
        column = next((i for i, cell in enumerate(cells) if squash(cell) == SERIES_COLUMN),
                      None)
        return None if column is None else (number, column, rows)
    return None


def sheet_manifest(path: Path, title: str, header_number: int, column: int,
                   rows: Iterator[tuple]) -> Manifest:
    uids: dict[str, None] = {}
    stray = StrayLines(path, "SeriesInstanceUIDs")
    for number, row in enumerate(rows, start=header_number + 1):
        value = str(row[column]).strip() if column < len(row) and row[column] is not None \
            else ""
        if is_uid(value):
            uids[value] = None
        elif any(cell is not None and str(cell).strip() for cell in row):
            stray.add(number, "\t".join("" if c is None else str(c) for c in row), len(uids))
    if not uids:
        raise FatalRunError(f"{path}: the SeriesInstanceUID column of sheet "
                            f"{printable(title)!r} holds no SeriesInstanceUID", EXIT_USAGE)
    return Manifest(path, None, list(uids), stray.shown, stray.count, kind="spreadsheet")


def failed_run_origin(path: Path) -> dict[str, str]:
    """The tcia_downloader.* keys of a <name>.failed.tcia header (none in other manifests)."""
    origin: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for line in iter(lambda: handle.readline(MANIFEST_LINE), ""):
                if line.strip().startswith(MANIFEST_MARKER):
                    break
                key, _, value = line.strip().partition("=")
                if key.startswith(FAILED_RUN_KEY):
                    origin[key[len(FAILED_RUN_KEY):]] = value.strip()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    return origin


# -- from manifests to series ---------------------------------------------------------------------

# uuid -> SeriesInstanceUID of the uuids IDC's index has (the others are left out).
UuidLookup = Callable[[list[str]], "dict[str, str]"]


@dataclass
class WantedSeries:
    """What the manifests of a selection ask for, once each: SeriesInstanceUIDs (those of
    the IDC uuids included, in the files' order) and the uuids IDC's index does not have."""
    manifests: list[Manifest]
    uids: list[str]
    unknown_uuids: list[str] = field(default_factory=list)


def warn_stray_lines(manifest: Manifest) -> None:
    one, many = ("an s5cmd cp line", "s5cmd cp lines") if manifest.kind == "s5cmd" else \
        ("a SeriesInstanceUID", "SeriesInstanceUIDs")
    for number, text in manifest.stray:
        log.warning("%s line %d is not %s; skipped: %r", manifest.path, number, one, text)
    if manifest.stray_count > len(manifest.stray):
        log.warning("%s: %d more lines are not %s; skipped", manifest.path,
                    manifest.stray_count - len(manifest.stray), many)


def read_all(paths: tuple[Path, ...]) -> list[Manifest]:
    manifests = [read_manifest(path) for path in paths]
    for manifest in manifests:
        warn_stray_lines(manifest)
    return manifests


def wanted_series(paths: tuple[Path, ...], lookup: Optional[Callable[[], UuidLookup]],
                  index_name: str = "IDC's index") -> WantedSeries:
    """The manifests read and their series once each. lookup() gives the uuid lookup, and
    is called only when an s5cmd manifest is among them (it may open IDC's index); None:
    this source cannot map uuids (one line saying so)."""
    manifests = read_all(paths)
    uuids = list(dict.fromkeys(u for m in manifests for u in m.uuids))
    by_uuid: dict[str, str] = {}
    if uuids:
        if lookup is None:
            raise FatalRunError(f"{next(m.path for m in manifests if m.uuids)} is an IDC s5cmd "
                                "manifest: use --mode idc or auto, or nbia with IDC's index "
                                "installed", EXIT_USAGE)
        by_uuid = lookup()(uuids)
    unknown = [u for u in uuids if u not in by_uuid]
    if unknown:
        log.warning("%d crdc_series_uuid(s) of the manifest are not in %s (e.g. %s): series "
                    "newer than the index? %s", len(unknown), index_name, unknown[0],
                    INDEX_UPGRADE)
    uids: list[str] = []
    for manifest in manifests:
        uids += manifest.uids + [by_uuid[u] for u in manifest.uuids if u in by_uuid]
    return WantedSeries(manifests, list(dict.fromkeys(uids)), unknown)
