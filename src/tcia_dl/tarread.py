"""Tar members as GNU tar reads them, from a stream's fragment; the collection files
(MD5SUMS, metadata.csv) read back; a stream checked."""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import itertools
import re
import tarfile
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol, TYPE_CHECKING

from .findings import Findings, OWN_DIGEST, VerifiedMember
from .logs import human_bytes, printable
from .settings import TAR_BLOCK, usable_cores
from .formats import codec_of
from .formats.tarstreams import begins_member

if TYPE_CHECKING:
    from .findings import ProblemLines

# A pax record is "<length> <keyword>=<value>\n", length counting the whole record. A length
# of 0 (or one that does not reach a newline) is malformed, as GNU tar says; advancing by it
# once looped forever.
PAX_RECORD = re.compile(rb"(\d{1,20}) ")
PAX_APPLIED = {"path", "size", "mtime"}              # what changes how tar reads the member
PAX_IGNORED = {"atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset"}
PAX_LIMIT = 1 << 20             # our pax headers hold one long path; tar's limit is similar
TAR_TIME_LIMIT = 8 ** 11        # the largest mtime a ustar header holds (the year 2242)
MEMBER_BATCH = 4096             # members handed to the ledger at once


def pax_records(data: bytes) -> list[tuple[str, bytes]]:
    """(keyword, value) of every record of a pax extended header, in order; ValueError
    for a malformed one (GNU tar: "Malformed extended header")."""
    records, position = [], 0
    while position < len(data):
        match = PAX_RECORD.match(data, position)
        length = int(match[1]) if match else 0
        if not match or length < len(match[0]) + 2 or position + length > len(data) or \
                data[position + length - 1] != 0x0A:
            raise ValueError(f"malformed pax extended header (record at byte {position})")
        keyword, equals, value = data[match.end():position + length - 1].partition(b"=")
        if not equals or not keyword:
            raise ValueError(f"malformed pax extended header (record at byte {position})")
        records.append((keyword.decode("utf-8", "surrogateescape"), value))
        position += length
    return records


@dataclass
class TarEntry:
    """One tar member as GNU tar reads it: its pax records applied (size, mtime and path,
    the last of each winning), and why it must not be written, if it must not."""
    name: str
    size: int
    mtime: float
    type: bytes
    refusal: Optional[str] = None


def pax_overrides(records: list[tuple[str, bytes]]) -> tuple[dict[str, bytes], list[str]]:
    """The records that change how the member is read (the last of each keyword wins, as
    in tar), and the keywords this reader does not know."""
    applied: dict[str, bytes] = {}
    unknown: list[str] = []
    for keyword, value in records:
        if keyword in PAX_APPLIED:
            applied[keyword] = value
        elif keyword not in PAX_IGNORED:
            unknown.append(keyword)
    return applied, unknown


def tar_entry(info: tarfile.TarInfo, records: list[tuple[str, bytes]]) -> TarEntry:
    """The member a ustar header and the pax records before it describe."""
    applied, unknown = pax_overrides(records)
    entry = TarEntry(info.name, info.size, float(info.mtime), info.type)
    refusals = []
    if "path" in applied:
        entry.name = applied["path"].decode("utf-8", "surrogateescape")
    if "size" in applied:
        if not applied["size"].isdigit():
            raise ValueError(f"malformed pax extended header (size={applied['size'][:20]!r})")
        entry.size = int(applied["size"])
    if "mtime" in applied:
        try:
            entry.mtime = float(applied["mtime"])
        except ValueError:
            refusals.append("a pax mtime that is not a number")
    if unknown:
        refusals.append(f"pax records this tool never writes ({', '.join(sorted(unknown))})")
    reason = member_refusal(entry)
    entry.refusal = "; ".join(refusals + ([reason] if reason else [])) or None
    return entry


TAR_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
             tarfile.DIRTYPE: "folder", tarfile.CHRTYPE: "character device",
             tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo",
             tarfile.CONTTYPE: "contiguous file", tarfile.GNUTYPE_SPARSE: "sparse file"}
# Types whose header says nothing of content; tar skips no data after them, so a size
# there means the reader and tar would disagree on where the next header is.
TAR_NO_CONTENT = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE,
                  tarfile.BLKTYPE, tarfile.FIFOTYPE)
# Headers that change the members after them (GNU long names, pax global headers): our
# archives never hold them, and reading past them as tar does is not worth the risk.
TAR_CHANGES_NEXT = {tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
                    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
                    tarfile.XGLTYPE: "a pax global header"}
UNSAFE_NAME_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def member_refusal(entry: TarEntry) -> Optional[str]:
    """Why a member must not be written under an extraction folder, or None. The rules of
    tarfile's `data` filter, stricter where our archives never need more: regular files
    only (no links, devices or modes to honour), relative paths of plain components (no
    `..`, `.`, empty or control characters), a modification time a ustar header can hold.
    --verify applies the same rules: an archive it calls whole extracts whole."""
    if entry.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"a {TAR_KINDS.get(entry.type, 'special file')}, not a regular file"
    name = entry.name
    if not name.strip("/") or name.startswith("/"):
        return "an absolute or empty path"
    if UNSAFE_NAME_CHARACTERS.search(name):
        return "a path with control characters"
    parts = name.split("/")
    if ".." in parts:
        return "a path that leaves the folder (..)"
    if any(part in ("", ".") for part in parts):
        return "a path with an empty or '.' component"
    if not 0 <= entry.mtime < TAR_TIME_LIMIT:
        return f"an implausible modification time ({entry.mtime:.0f})"
    return None


class MemberOutput(Protocol):
    """Where a TarFragmentReader puts the members it reads (--extract)."""

    def begin(self, entry: TarEntry) -> bool: ...    # False: not written

    def write(self, data: bytes) -> None: ...

    def end(self, member: VerifiedMember) -> None: ...

    def abort(self) -> None: ...


# Collection files are kept (on disk past 8 MiB) while they stream by, then read into the
# ledger: MD5SUMS, metadata.csv. Only at the top of a collection folder, where we write
# them, and at most COLLECTION_FILE_LIMIT each (an MD5SUMS line is about 130 bytes: 8
# million files); a larger one is a problem, not a reason to fill a disk.
COLLECTION_FILE = re.compile(r"^[^/]+/(MD5SUMS|metadata)[^/]*$")
COLLECTION_FILE_LIMIT = 1 << 30


class TarFragmentReader:
    """The tar members of one unit of our archives (a series, or a part of a big one; the
    closing unit adds the end-of-archive blocks), and of the units after it that a member
    cut across units goes on into (check_stream feeds them in order), hashed as they
    stream by, never kept whole in memory; with an output, written (--extract)."""

    def __init__(self, stream: int, findings: Findings, output: Optional[MemberOutput] = None):
        self._stream = stream
        self._findings = findings
        self._output = output
        self._writing = False
        self._buffer = bytearray()
        self._entry: Optional[TarEntry] = None              # the member being read
        self._pax: Optional[bytearray] = None               # a pax header being read
        self._records: list[tuple[str, bytes]] = []         # the pax records for the next
        self._content_left = self._padding_left = 0
        self._digest = hashlib.md5()
        self._text: Optional[tempfile.SpooledTemporaryFile] = None
        self._text_size = 0
        self._batch: list[VerifiedMember] = []
        self.ended = False                                  # end-of-archive blocks seen

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._entry is not None or self._pax is not None:
                if not self._take_content():
                    return
            elif len(self._buffer) >= TAR_BLOCK:
                block = bytes(self._buffer[:TAR_BLOCK])
                del self._buffer[:TAR_BLOCK]
                self._take_header(block)
            else:
                return

    def _take_header(self, block: bytes) -> None:
        if block == tarfile.NUL * TAR_BLOCK:
            if self._records:
                raise ValueError("a pax header before the end-of-archive blocks")
            self.ended = True                   # end-of-archive blocks and record padding
            return
        if self.ended:
            raise ValueError("data after the end-of-archive blocks")
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        if info.type in TAR_CHANGES_NEXT:
            raise ValueError(f"{TAR_CHANGES_NEXT[info.type]}, which no archive of this tool "
                             "holds")
        if info.type == tarfile.XHDTYPE:
            if self._records:
                raise ValueError("two pax headers in a row")
            if info.size > PAX_LIMIT:
                raise ValueError(f"a pax header of {info.size} bytes")
            self._pax = bytearray()
            self._content_left, self._padding_left = info.size, -info.size % TAR_BLOCK
            return
        entry = tar_entry(info, self._records)
        self._records = []
        if entry.type in TAR_NO_CONTENT and entry.size:
            raise ValueError(f"{entry.name}: a {TAR_KINDS[entry.type]} with {entry.size} "
                             "bytes of content")
        self._begin_member(entry)

    def _begin_member(self, entry: TarEntry) -> None:
        self._entry = entry
        size = 0 if entry.type in TAR_NO_CONTENT else entry.size
        self._content_left, self._padding_left = size, -size % TAR_BLOCK
        self._digest = hashlib.md5()
        self._text, self._text_size = None, 0
        if entry.type == tarfile.DIRTYPE and entry.refusal is not None and \
                member_refusal(TarEntry(entry.name, 0, entry.mtime, tarfile.REGTYPE)) is None:
            entry.refusal = "folder"            # a safe folder: its files' paths make it
        elif entry.refusal is None and self._output is None and \
                COLLECTION_FILE.match(entry.name):      # (--extract read them already)
            self._text = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        if entry.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            self._findings.ledger.add_link(entry.name)
        if self._output is not None and entry.refusal != "folder":
            self._writing = self._output.begin(entry)
        elif entry.refusal is not None and entry.refusal != "folder":
            self._findings.problem(entry.name, f"{printable(entry.name)}: {entry.refusal}; "
                                               "refused")

    def _take_content(self) -> bool:
        """Consume what the buffer holds of the current member; True when it is done."""
        piece = bytes(self._buffer[:self._content_left])
        del self._buffer[:len(piece)]
        self._content_left -= len(piece)
        if self._pax is not None:
            self._pax += piece
        else:
            self._take_member_piece(piece)
        padding = min(self._padding_left, len(self._buffer))
        del self._buffer[:padding]
        self._padding_left -= padding
        if self._content_left or self._padding_left:
            return False
        if self._pax is not None:
            self._records, self._pax = pax_records(bytes(self._pax)), None
        else:
            self._end_member()
        return True

    def _take_member_piece(self, piece: bytes) -> None:
        self._digest.update(piece)
        if self._writing:
            self._output.write(piece)
        if self._text is not None:
            self._text_size += len(piece)
            if self._text_size > COLLECTION_FILE_LIMIT:
                self._findings.problems.append(
                    f"{self._entry.name}: larger than any collection file this tool writes "
                    f"({human_bytes(COLLECTION_FILE_LIMIT)}); not read")
                self._text.close()
                self._text = None
            else:
                self._text.write(piece)

    def _end_member(self) -> None:
        entry, self._entry = self._entry, None
        if entry.refusal == "folder":
            return
        member = VerifiedMember(entry.name, entry.size, self._digest.hexdigest(), self._stream)
        if self._writing:
            self._writing = False
            self._output.end(member)
        self._batch.append(member)
        if len(self._batch) >= MEMBER_BATCH:
            self.flush()
        if self._text is not None:
            with self._text:
                self._text.seek(0)
                read_collection_file(member, self._text, self._findings)
            self._text = None

    def flush(self) -> None:
        """Hand the members read so far to the ledger."""
        if self._batch:
            self._findings.ledger.add_members(self._batch)
            self._batch = []

    @property
    def inside_member(self) -> bool:
        """The data fed so far ends inside a member (or its header)."""
        return self._entry is not None or self._pax is not None or bool(self._buffer)

    def close(self) -> None:
        self.flush()
        if self._entry is not None or self._pax is not None or self._records or \
                self._buffer.strip(b"\0"):
            raise ValueError("the stream ends inside a tar member")

    def abort(self) -> None:
        """The stream is damaged: a member being written is not kept."""
        self.flush()
        if self._text is not None:
            self._text.close()
            self._text = None
        if self._writing:
            self._writing = False
            self._output.abort()


MD5SUMS_LINE = re.compile(r"^([0-9a-f]{32})  (.+)$")
MD5SUMS_LINE_LIMIT = 64 * 1024        # a line longer than any path is not an MD5SUMS line
# A metadata.csv value can be long (a server's free text: 200,000 characters were seen);
# the csv module's default limit is 128 kB.
CSV_FIELD_LIMIT = 16 << 20


def read_collection_file(member: VerifiedMember, text: io.BufferedIOBase,
                         findings: Findings) -> None:
    """An MD5SUMS or metadata.csv of an output, into the ledger, a line at a time."""
    if re.search(r"(^|/)MD5SUMS[^/]*$", member.name):
        findings.ledger.add_listed([(member.name, member.md5)], OWN_DIGEST)
        findings.ledger.add_listed(md5sums_lines(member.name, text, findings), member.name)
    elif member.name.endswith(".csv"):
        findings.ledger.add_rows(metadata_csv_rows(member.name, text, findings))


def md5sums_lines(name: str, text: io.BufferedIOBase,
                  findings: Findings) -> Iterator[tuple[str, str]]:
    """(file name as in the archive, MD5) of every line of an MD5SUMS; one problem per line
    that is not an MD5SUMS line."""
    folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    number = 0
    while True:
        raw = text.readline(MD5SUMS_LINE_LIMIT)
        if not raw:
            return
        number += 1
        if len(raw) == MD5SUMS_LINE_LIMIT and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):           # the rest of the long line
                raw = text.readline(MD5SUMS_LINE_LIMIT)
            findings.problems.append(f"{name} line {number} is not an MD5SUMS line")
            continue
        match = MD5SUMS_LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
        if not match:
            findings.problems.append(f"{name} line {number} is not an MD5SUMS line")
            continue
        yield folder + match[2], match[1]


def as_written(cell: str) -> str:
    """A metadata.csv cell as the server sent it: the file puts a ' before a cell that a
    spreadsheet would run as a formula (and before one that starts with '), so one goes."""
    return cell[1:] if cell.startswith("'") else cell


def bounded_lines(text: io.BufferedIOBase, limit: int) -> Iterator[str]:
    """The lines of a UTF-8 text, NULs dropped; ValueError for a line longer than limit
    (a file of 64 MiB of one line once took 200 MB to read)."""
    while True:
        raw = text.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit:
            raise csv.Error(f"a line longer than {human_bytes(limit)}")
        yield raw.decode("utf-8", "replace").replace("\0", "")


def metadata_csv_rows(name: str, text: io.BufferedIOBase, findings: Findings) -> Iterator[dict]:
    """The rows of a metadata.csv, each with its series folder as "_folder". A NUL (which
    Python 3.9's csv refuses and later ones keep) is dropped, so that every Python reads the
    same rows; a row the csv module cannot read ends the file with one problem."""
    collection = name.split("/")[0]
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(bounded_lines(text, CSV_FIELD_LIMIT))
    try:
        for row in reader:
            path = row.get("Path")
            path = path if isinstance(path, str) else ""
            yield {**{as_written(str(k)): as_written(v) for k, v in row.items()
                      if isinstance(v, str)},
                   "_folder": f"{collection}/{path}" if path else collection,
                   "_file": name}
    except csv.Error as exc:
        findings.problems.append(f"{name} line {reader.line_num} cannot be read as CSV: {exc}")


@dataclass
class UnitsRead:
    """What check_stream read from a unit on: its problems, how many of the units after it
    it went on into (one member across them), or that it goes on with a member of the unit
    before it, which reads it (nothing of it was read here but its first block)."""
    problems: ProblemLines
    followed: int = 0
    continuation: bool = False


def first_block(pieces: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """A unit's first tar block (less if it is shorter), and all of its pieces again."""
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= TAR_BLOCK:
            break
    return head[:TAR_BLOCK], itertools.chain([head], pieces)


def check_stream(path: Path, index: int, start: int, end: int, findings: Findings,
                 stop: Optional[threading.Event] = None,
                 output: Optional[Callable[[Findings], MemberOutput]] = None,
                 closing: bool = False,
                 following: Iterable[tuple[int, int]] = ()) -> UnitsRead:
    """Decompress one unit (its codec's own checks passed, and that it ends where its span
    does) and read its members into findings' ledger; with output, also write them
    (--extract). A member that goes on past the unit's end (SplitPacker cuts one larger
    than a unit) is followed into the units of `following` (the spans after it, of the
    same series), each checked on its own too. A unit that does not start with a header
    (begins_member) is not read here but by the one before it. Only the closing unit (the
    archive's last) may hold the end-of-archive blocks."""
    found = Findings(ledger=findings.ledger)
    reader = TarFragmentReader(index, found, output(found) if output else None)
    codec = codec_of(path)
    result = UnitsRead(found.problems)
    spans = itertools.chain([(start, end)], following)
    number, (unit_start, unit_end) = index, (start, end)
    try:
        for number, (unit_start, unit_end) in enumerate(spans, index):
            if number > index and not reader.inside_member:
                break
            head, pieces = first_block(codec.decompressed(path, unit_start, unit_end, stop))
            if begins_member(head) == (number > index) and not (closing or head == b""):
                if number == index:
                    result.continuation = True
                    return result
                break           # a member begins: the unit before ended inside one
            result.followed = number - index
            for piece in pieces:
                reader.feed(piece)
        reader.close()
    except (EOFError, ValueError, tarfile.TarError) as exc:
        reader.abort()
        found.problems.append(f"{codec.unit} {number + 1} (bytes {unit_start}-{unit_end}) is "
                              f"damaged: {printable(str(exc))}")
    except BaseException:
        reader.abort()                  # --extract cannot write: no half file stays behind
        raise
    if reader.ended and not closing:
        found.problems.append(f"{codec.unit} {index + 1} (bytes {start}-{end}) holds "
                              "end-of-archive blocks, but is not the last: tar stops there")
    findings.affected |= found.affected
    return result


class FollowedUnits:
    """Whether every unit that goes on with a member of the one before it was read by a
    reader that began before it (results taken in archive order)."""

    def __init__(self) -> None:
        self._read_through = -1

    def orphan(self, index: int, read: UnitsRead) -> bool:
        """True for a unit no reader went on into: a member's beginning is missing."""
        if not read.continuation:
            self._read_through = max(self._read_through, index + read.followed)
            return False
        return index > self._read_through


def orphan_problem(unit: str, index: int, start: int, end: int) -> str:
    return (f"{unit} {index + 1} (bytes {start}-{end}) is damaged: it does not start with a "
            f"tar header, and no {unit} before it ends inside a member")


def bounded_map(function: Callable, items: Iterable, window: int = 0) -> Iterator:
    """function over items on all usable cores, results in order, at most window (twice
    the cores) in flight: pool.map would queue every item at once (a tree of millions of
    files). Items not started when the caller stops (an exception) are cancelled."""
    cores = usable_cores()
    window = window or 2 * cores
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
