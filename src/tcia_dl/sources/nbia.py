"""NBIA as a source: its --mode entry (flags, NbiaSettings), NbiaSource, and a series' zip
verified file by file."""

from __future__ import annotations

import argparse
import csv
import getpass
import hashlib
import io
import lzma
import os
import sys
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from ..dicom import HEAD_SIZE, read_head, series_uid_in
from ..errors import (EXIT_USAGE, FatalRunError, Interrupted, Md5ParameterRefused, Md5TableMissing,
                      NotStreamable, TransientError, UsageError)
from ..inflate import entry_ends, open_entry
from ..logs import log, private_dir
from ..net import retry_policy
from ..plan import (records_for_filters, records_for_uids, unknown_collection_message,
                    wanted_of, without_credentials)
from ..settings import CHUNK_SIZE, DEFAULT_API_URL, LICENSE_ENTRY, MD5_TABLE, NLST_API_URL
from .base import (AttemptBytes, Member, Selected, SourceEntry, VerifiedSeries, safe_entry_name,
                   unique_file_name)
from .idc_index import IdcIndex, idc_install_hint, idc_installed
from .nbia_api import ImageEndpoint, TciaApi
from .zipstream import GrowingFile, zip_entries

if TYPE_CHECKING:
    from ..manifests import UuidLookup
    from ..formats.base import Prepared
    from ..plan import PlannedSeries
    from ..settings import NetworkSettings, Selection
    from .base import MemberSink, Packing, Served


# -- NBIA as a --mode: its flags and settings ------------------------------------------------


@dataclass(frozen=True)
class NbiaSettings:
    """Which NBIA v4 server, and the account on it."""
    api_url: str = DEFAULT_API_URL     # --api-url: the services/v4/ base URL, ending in "/"
    user: Optional[str] = None         # --user: an account on a private server (None: public)
    # --password, $TCIA_PASSWORD or the prompt. repr=False: the debug log prints the
    # options; and the log filter masks it wherever it appears (nbia_secrets).
    password: Optional[str] = field(default=None, repr=False)
    # --idc-index (or $TCIA_IDC_INDEX; None: idc-index-data's), read only to map the IDC
    # uuids of an s5cmd manifest to SeriesInstanceUIDs.
    idc_index: Optional[Path] = None
    # NBIA was the default because IDC's requirements are missing: the report says what
    # installing them would bring.
    idc_hint: bool = False


def add_nbia_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--api-url", metavar="URL",
                       help=f"NBIA v4 base URL (default: {DEFAULT_API_URL}; for --collection "
                            f"NLST: {NLST_API_URL})")
    group.add_argument("--user", metavar="NAME",
                       help="account on a private NBIA server (public TCIA needs none)")
    group.add_argument("--password", metavar="PASSWORD",
                       help="visible to other users in `ps`: prefer TCIA_PASSWORD or the prompt")


def nbia_settings(args: argparse.Namespace, origin: Mapping[str, str]) -> NbiaSettings:
    """--api-url as given, else as a --retry-failed list recorded it, else TCIA's (NLST's
    own host for --collection NLST); the password from the flag, the environment or a
    prompt."""
    api_url = args.api_url or origin.get("api-url") or default_api_url(args.collection)
    if urlsplit(api_url).scheme not in ("http", "https"):
        raise UsageError(f"--api-url {api_url!r} is not an http(s) URL")
    idc_index = getattr(args, "idc_index", None) or os.environ.get("TCIA_IDC_INDEX")
    by_default = not (getattr(args, "mode", None) or origin.get("mode") or
                      os.environ.get("TCIA_MODE"))
    return NbiaSettings(api_url=api_url if api_url.endswith("/") else api_url + "/",
                        user=args.user, password=resolve_password(args.user, args.password),
                        idc_index=Path(idc_index).expanduser() if idc_index else None,
                        idc_hint=by_default and not idc_installed())


def default_api_url(collection: Optional[str]) -> str:
    """NLST is served by a host of its own; TCIA's main host answers 400/500 for it
    (tcia_utils#21)."""
    return NLST_API_URL if (collection or "").strip().casefold() == "nlst" else DEFAULT_API_URL


def resolve_password(user: Optional[str], password: Optional[str]) -> Optional[str]:
    """--password, else $TCIA_PASSWORD, else a prompt on a terminal."""
    if user is None:
        if password is not None:
            raise UsageError("--password was given without --user")
        return None
    if password is not None:
        # Printed before logging starts on purpose: it is about this command line.
        print("warning: --password is visible to other users in `ps`; "
              "prefer TCIA_PASSWORD or the prompt", file=sys.stderr)
        return password
    if os.environ.get("TCIA_PASSWORD"):
        return os.environ["TCIA_PASSWORD"]
    if sys.stdin.isatty():
        return getpass.getpass(f"NBIA password for {user}: ")
    raise UsageError("--user needs a password: set TCIA_PASSWORD (stdin is not a terminal, "
                     "so there is no prompt)")


def nbia_provenance(settings: NbiaSettings) -> dict[str, str]:
    return {"api-url": without_credentials(settings.api_url)}


def nbia_secrets(settings: NbiaSettings) -> list[str]:
    return [settings.password] if settings.password else []


def open_nbia(settings: NbiaSettings, network: NetworkSettings,
              stop: threading.Event) -> NbiaSource:
    cache_path = private_dir(network.cache_dir) / "http_cache" if network.cache_dir else None
    api = TciaApi(settings.api_url, cache_path=cache_path,
                  cache_expiry=timedelta(hours=network.cache_expiry_hours),
                  user=settings.user, password=settings.password,
                  connect_timeout=network.connect_timeout, stall_timeout=network.stall_timeout,
                  retry=retry_policy(network), stop=stop, proxy=network.proxy,
                  ca_bundle=network.ca_bundle)
    return NbiaSource(api, settings.idc_index, settings.idc_hint)


# -- NBIA as a source of series ------------------------------------------------------------


def from_nbia(records: list[dict]) -> list[dict]:
    """metadata.csv says which source served each series (an archive may mix them)."""
    return [{**record, "Source": "nbia"} for record in records]


class NbiaSource:
    """NBIA v4 as a source of series, the one object the planning and the per-series loop
    talk to: the records of a selection, and "fetch this series, verified, into a sink",
    raising only TransientError (retry), SeriesUnavailable (skip) or FatalRunError / Interrupted
    (stop). Zips, endpoints and md5hashes.csv stay in here.

    Which image endpoint works is learnt without waiting and without a second download:
    fetches use getImage with IncludeMD5=Yes (MD5s in the zip, a LICENSE, NBIA's new file
    names). A server that refuses the parameter says so at once (400), and the run uses
    getImageWithMD5Hash from then on; a zip from one that ignores it (no md5hashes.csv) is
    verified as a whole against the series' getMD5Hierarchy hash, as long as those hashes
    prove usable (see ImageEndpoint). (The first fetch used to settle this while the other
    workers waited: a collection whose first series was big stalled every worker, and on a
    server that ignores IncludeMD5 that series was downloaded twice.)"""

    name = "nbia"
    scratch_suffix = ".zip"          # what it downloads into a series' scratch file

    def __init__(self, api: TciaApi, idc_index: Optional[Path] = None,
                 idc_hint: bool = False):
        self.api = api
        self._idc_hint = idc_hint
        self._endpoint = ImageEndpoint()
        self._idc_index = idc_index
        # An s5cmd manifest names IDC's uuids: IDC's index (opened only then) maps them to
        # the SeriesInstanceUIDs NBIA knows. --mode auto hands over the index it has open.
        self.uuid_lookup: Callable[[], UuidLookup] = lambda: self._series_of_uuids

    def _series_of_uuids(self, uuids: list[str]) -> dict[str, str]:
        """uuid -> SeriesInstanceUID by IDC's index, opened for this and closed."""
        try:
            index = IdcIndex(self._idc_index)
        except FatalRunError as exc:
            raise FatalRunError(f"an IDC s5cmd manifest names series by IDC's uuids, which "
                                f"IDC's index maps to SeriesInstanceUIDs: {exc}",
                                exc.exit_code) from None
        try:
            return index.series_of_uuids(uuids)
        finally:
            index.close()

    def reach(self, series: "PlannedSeries") -> None:
        """Nothing more to ask: the plan's getSeries reached the API, and images come from
        the same server."""

    def describe(self) -> str:
        """The server, without credentials (it goes into logs and CITATION.md)."""
        parts = urlsplit(self.api.base_url)
        server = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
        return f"NBIA v4 at {server}"

    def secrets(self) -> list[str]:
        return self.api.tokens.secrets()

    def report_lines(self, done: Sequence[Served]) -> list[str]:
        if not self._idc_hint:
            return []
        return [f"  IDC (NCI's Imaging Data Commons) now serves TCIA's public DICOM first, and "
                f"would serve this run first (--mode auto, the default once installed): "
                f"{idc_install_hint()}"]

    def collections(self) -> list[str]:
        return self.api.collections()

    def records(self, selection: Selection) -> Selected:
        """getSeries records for a manifest (or failure list), filters, or a collection."""
        if selection.manifests or selection.retry_failed:
            wanted = wanted_of(selection, self.uuid_lookup)
            records, unknown = records_for_uids(self.api, wanted.uids)
            log.info("%d series listed in %s; the server knows %d",
                     len(wanted.uids) + len(wanted.unknown_uuids),
                     ", ".join(str(m.path) for m in wanted.manifests), len(records))
            return Selected(from_nbia(records), unknown + wanted.unknown_uuids,
                            wanted.manifests)
        if selection.filters():
            records = records_for_filters(self.api, selection)
            listed = {r["SeriesInstanceUID"] for r in records}
            if not records:
                if selection.collection and not self.api.series(Collection=selection.collection):
                    raise FatalRunError(unknown_collection_message(self.api,
                                                                   selection.collection),
                                        EXIT_USAGE)
                raise FatalRunError("no series matches these filters: check the values (NBIA "
                                    "compares them exactly)", EXIT_USAGE)
            return Selected(from_nbia(records),
                            [u for u in selection.series_uids if u not in listed], [])
        records = self.api.series(Collection=selection.collection)
        if not records:
            raise FatalRunError(unknown_collection_message(self.api, selection.collection),
                                EXIT_USAGE)
        return Selected(from_nbia(records), [], [])

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        """Download the series' zip into scratch, then hand pack() the verification, which
        pack runs on the sink it makes (packing is the caller's: it chooses when a core is
        free). count(n) reports bytes received, and takes back those of a zip that is
        thrown away."""
        unconfirmed: Optional[str] = None      # a series hash that did not verify a zip
        while True:
            endpoint = "getImageWithMD5Hash" if unconfirmed else self._endpoint.name
            counted = AttemptBytes(count)
            try:
                if self._streams(series, unconfirmed):
                    fetched = self._fetch_while_arriving(endpoint, series, scratch, counted, pack,
                                                         stop)
                    if fetched is not None:
                        return fetched
                else:
                    self.api.download_zip(endpoint, series.uid, scratch, counted,
                                          series.byte_limit)
            except Md5ParameterRefused:
                self._endpoint.fall_back("refuses IncludeMD5 (a build older than 2025-11)")
                continue
            series_hash = None
            if endpoint == "getImage" and not zip_lists_md5_table(scratch):
                self._endpoint.zips_come_without_table()
                series_hash = self._series_hash(series)
                if series_hash is None:
                    counted.take_back()
                    continue
            try:
                fetched = pack(lambda sink: verify_zip(scratch, series, sink, stop,
                                                       series_hash=series_hash))
            except Md5TableMissing:
                raise TransientError("the zip has no md5hashes.csv (cut short)") from None
            except SeriesHashMismatch:
                # Damage, or a server whose series hashes are not what we take them for:
                # the zip with md5hashes.csv tells which.
                unconfirmed = series_hash
                counted.take_back()
                continue
            if unconfirmed is not None:
                self._judge_series_hash(unconfirmed, fetched[0])
            return fetched

    def _streams(self, series: "PlannedSeries", unconfirmed: Optional[str]) -> bool:
        """Whether to try verifying and packing the series while it downloads: a big one
        (not one downloaded again to judge a series hash: verify_zip judges that one)."""
        return series.file_size >= STREAM_FROM and unconfirmed is None

    def _hash_of_a_zip_without_table(self, endpoint: str,
                                     series: "PlannedSeries") -> Optional[str]:
        """What judges a zip of endpoint that came without md5hashes.csv, as fetch does."""
        if endpoint != "getImage":
            return None                   # getImageWithMD5Hash's: cut short
        self._endpoint.zips_come_without_table()
        return self._series_hash(series)

    def _fetch_while_arriving(self, endpoint: str, series: "PlannedSeries", scratch: Path,
                              counted: AttemptBytes, pack: "Packing",
                              stop: threading.Event) -> "Optional[tuple[VerifiedSeries, Prepared]]":
        """The zip downloaded on a thread of its own while pack.while_arriving verifies and
        packs what has arrived, if a core is idle. None: the zip is all in scratch (no core
        was idle, or it was NotStreamable), for verify_zip to judge as usual."""
        growing = GrowingFile(scratch)

        def on_bytes(n: int) -> None:
            counted(n)
            growing.grew(n)

        def download() -> None:
            error: Optional[BaseException] = None
            try:
                self.api.download_zip(endpoint, series.uid, scratch, on_bytes, series.byte_limit)
            except BaseException as exc:      # handed to the reader, raised there
                error = exc
            finally:
                self.api.close_thread_session()
                growing.ended(error)

        thread = threading.Thread(target=download, name=f"zip {series.uid}", daemon=True)
        thread.start()
        try:
            fetched = pack.while_arriving(lambda sink: verify_arriving_zip(
                growing, series, sink, stop,
                lambda: self._hash_of_a_zip_without_table(endpoint, series)))
        except NotStreamable as exc:
            log.debug("%s: verified after its download, not during it: %s", series.short_label,
                      exc)
            fetched = None
        except BaseException:
            # No second download of the series may start while this one can still write
            # scratch: it stops at its next chunk, its read timeout, or the stop.
            growing.abandon()
            thread.join()
            raise
        finally:
            growing.close()
        growing.wait_for_end()
        thread.join()
        return fetched

    def _series_hash(self, series: "PlannedSeries") -> Optional[str]:
        """getMD5Hierarchy's hash of the series, while the server's hashes are usable."""
        if not self._endpoint.series_hash_usable:
            return None
        expected = self.api.series_hash(series.uid)
        if expected is None:
            self._endpoint.distrust_series_hash("gives no series hash")
        return expected

    def _judge_series_hash(self, expected: str, verified: VerifiedSeries) -> None:
        """A zip that its series hash did not verify, downloaded again with md5hashes.csv
        and verified by it: if the series hash is not the one of those MD5s either, it is
        the server's hashes that are unusable (the formula of getMD5Hierarchy is
        unconfirmed on live data), not the first zip that was damaged."""
        if series_hash_of(verified.members) != expected:
            self._endpoint.distrust_series_hash("hashes a series otherwise than as the MD5 of "
                                                "its images' sorted MD5s")

    def close(self) -> None:
        self.api.close()


NBIA: SourceEntry[NbiaSettings] = SourceEntry(
    name="nbia", help="TCIA's NBIA v4", title="NBIA", add_flags=add_nbia_flags,
    settings=nbia_settings, open=open_nbia, provenance=nbia_provenance, secrets=nbia_secrets)


# -- Per-series work: download, verify, clean ----------------------------------------------


LICENSE_LIMIT = 1024 * 1024          # TCIA's LICENSE is a paragraph
MD5_ROW_LIMIT = 512                  # bytes per md5hashes.csv row: a name and 32 hex digits


def read_small_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A zip entry that is read whole (LICENSE, md5hashes.csv), at most limit bytes: a
    series whose small files are absurdly large is a bad transfer, not a reason to run out
    of memory. The bytes read decide, not the size the zip claims."""
    with archive.open(name) as entry:
        data = entry.read(limit + 1)
    if len(data) > limit:
        raise TransientError(f"{name} in the zip is larger than {limit} bytes; refused")
    return data


def read_md5_table(archive: zipfile.ZipFile) -> dict[str, str]:
    limit = md5_table_limit(len(archive.infolist()))
    return parse_md5_table(read_small_entry(archive, MD5_TABLE, limit))


def md5_table_limit(entries: int) -> int:
    return MD5_ROW_LIMIT * entries + 64 * 1024


def parse_md5_table(data: bytes) -> dict[str, str]:
    text = data.decode("utf-8", "replace")
    table: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or row[0].strip() == "Filename":
            continue
        table[row[0].strip()] = row[1].strip().lower()
    return table


def zip_lists_md5_table(path: Path) -> bool:
    """Whether the zip's central directory names md5hashes.csv (a zip that cannot be read
    says yes: verify_zip says what is wrong with it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return MD5_TABLE in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return True


class SeriesHashMismatch(TransientError):
    """The files of a zip without md5hashes.csv are not the ones getMD5Hierarchy hashed."""


def series_hash_of(members: list[Member]) -> str:
    """getMD5Hierarchy's hash of a series: the MD5 of its images' MD5 hex strings, sorted
    and concatenated (shared/nbia-v4.md)."""
    return hashlib.md5("".join(sorted(m.md5 for m in members)).encode()).hexdigest()


def verify_zip(path: Path, series: PlannedSeries, sink: Optional[MemberSink] = None,
               stop: Optional[threading.Event] = None,
               series_hash: Optional[str] = None) -> VerifiedSeries:
    """Check every listed file's MD5 and keep what belongs to the series, streaming what is
    kept into sink in the same pass: each entry is inflated and hashed once. md5hashes.csv
    is the zip's last entry, but the central directory gives it first. A zip without one
    is verified as a whole against series_hash (getMD5Hierarchy's), if given: the series'
    files kept must be exactly the ones the server hashed.

    Raises TransientError (truncated, mismatching, incomplete: download again; what went
    into sink must then be discarded; SeriesHashMismatch for a series hash that does not
    match) or Md5TableMissing (the server sent no md5hashes.csv, and no series_hash)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TransientError(f"truncated or unreadable zip ({exc})") from None
    with archive:
        names = archive.namelist()
        if MD5_TABLE not in names and series_hash is None:
            raise Md5TableMissing()
        try:
            table = read_md5_table(archive) if MD5_TABLE in names else None
            missing = sorted(set(table or ()) - set(names))
            if missing:
                raise TransientError(f"{len(missing)} file(s) listed in md5hashes.csv are "
                                     f"missing from the zip (first: {missing[0]})")
            check_entry_sizes(archive, series)
            verified = _check_entries(archive, path, series, table, sink, stop)
        except (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, OSError,
                csv.Error) as exc:
            raise TransientError(f"damaged zip entry ({exc})") from None
        except (RuntimeError, NotImplementedError) as exc:    # encrypted, unknown method
            raise TransientError(f"unreadable zip entry ({exc})") from None
    if table is None and series_hash_of(verified.members) != series_hash:
        raise SeriesHashMismatch("the zip's files are not the ones getMD5Hierarchy hashed")
    return verified


def check_entry_sizes(archive: zipfile.ZipFile, series: PlannedSeries) -> None:
    """What the zip would inflate to must fit the series' FileSize (a zip bomb, or a
    gigantic entry listed in md5hashes.csv, is a bad series). zipfile and inflate's
    InflatedEntry stop reading an entry at its declared size and check its CRC, so the
    declared sizes bound the reads."""
    limit = series.byte_limit
    declared = sum(info.file_size for info in archive.infolist())
    if limit is not None and declared > limit:
        raise TransientError(f"the zip would inflate to {declared} bytes, far more than the "
                             f"server's FileSize of {series.file_size}; refused")


def _check_entries(archive: zipfile.ZipFile, path: Path, series: PlannedSeries,
                   table: Optional[dict[str, str]], sink: Optional[MemberSink],
                   stop: Optional[threading.Event]) -> VerifiedSeries:
    """Each entry once: LICENSE read, the series' DICOM files kept (hashed, and checked
    against the table when there is one), everything else dropped with its reason."""
    with open(path, "rb") as zip_file:     # deflated entries' bytes, read by inflate
        return _check_entries_of(archive, zip_file, path, series, table, sink, stop)


def _check_entries_of(archive: zipfile.ZipFile, zip_file: BinaryIO, path: Path,
                      series: PlannedSeries, table: Optional[dict[str, str]],
                      sink: Optional[MemberSink],
                      stop: Optional[threading.Event]) -> VerifiedSeries:
    members: list[Member] = []
    dropped: list[tuple[str, str]] = []
    license_text: Optional[str] = None
    names_used: set[str] = set()
    ends = entry_ends(archive)
    for info in archive.infolist():
        entry = info.filename
        if entry == MD5_TABLE:
            continue
        if entry == LICENSE_ENTRY:
            license_text = read_small_entry(archive, entry, LICENSE_LIMIT).decode("utf-8",
                                                                                  "replace")
            continue
        if info.is_dir() or not safe_entry_name(entry):
            dropped.append((entry, "unsafe name (a directory, an absolute path or '..')"))
            continue
        if table is not None and entry not in table:
            dropped.append((entry, "not listed in md5hashes.csv"))
            continue
        with open_entry(archive, zip_file, info, ends) as stream:
            keep, why, md5 = _take_entry(stream, info.file_size, series, sink,
                                         lambda: unique_file_name(entry, names_used), stop)
        if table is not None and md5 != table[entry]:
            raise TransientError(f"MD5 mismatch for {entry}")
        if keep is None:
            dropped.append((entry, why))
        else:
            members.append(Member(entry=entry, name=keep, size=info.file_size, md5=md5))
    if series.image_count is not None and len(members) != series.image_count:
        raise TransientError(f"{len(members)} DICOM files, but the server's ImageCount is "
                             f"{series.image_count}")
    if not members:
        raise TransientError("the zip holds no DICOM file of this series")
    return VerifiedSeries(path=path, members=members, license_text=license_text, dropped=dropped)


def _take_entry(stream: io.BufferedIOBase, size: int, series: PlannedSeries,
                sink: Optional[MemberSink], name_for: Callable[[], str],
                stop: Optional[threading.Event]) -> tuple[Optional[str], str, str]:
    """Read one listed entry once: decide from its head whether it belongs to the series,
    stream it into sink if so, and hash all of it. Returns (output name or None, why it was
    dropped, md5)."""
    digest = hashlib.md5()
    head = read_head(stream, size)
    uid = None
    if head[128:132] == b"DICM":
        uid = series_uid_in(head)
        while uid is None and len(head) < size:   # a header longer than the head
            more = stream.read(max(len(head), HEAD_SIZE))
            if not more:
                break
            head += more
            uid = series_uid_in(head)
    digest.update(head)

    def chunks() -> Iterator[bytes]:
        yield head
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            if stop is not None and stop.is_set():
                raise Interrupted()
            digest.update(chunk)
            yield chunk

    if head[128:132] != b"DICM":
        keep, why = None, "not a DICOM file"
    elif uid is None:
        keep, why = None, "not a readable DICOM file"
    elif uid != series.uid:
        keep, why = None, f"belongs to another series ({uid})"
    else:
        keep, why = name_for(), ""
    if keep is not None and sink is not None:
        sink.add(keep, size, chunks())
    else:
        for _ in chunks():     # dropped files are hashed too: a mismatch means a bad transfer
            pass
    return keep, why, digest.hexdigest()


# -- A big series verified and packed while its zip arrives -----------------------------------

# A series of at least this many bytes is packed while it downloads, when a core is idle
# (bench/ "bigspeed": 420 MB took 21 s to download, then 19 s to pack). Below it, the core
# it would hold through the download (and its first-byte latency) is better left to the
# series already in scratch: bench/ "small", 416 series of 3 MB, gains nothing from overlap
# within a series, only from the pipeline across series. Two units of the archive: from
# there, a series' packing is as long as the wait for its first unit.
STREAM_FROM = 64 * 1024 * 1024
# An entry is held whole while streaming (a tar header needs its size, which a data
# descriptor gives only after the data): a CT or MR image is well under a megabyte; a
# bigger entry (an enhanced multi-frame file) sends the series to verify_zip instead.
ENTRY_HELD_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Taken:
    entry: str
    keep: Optional[str]     # its output name, or None if it was dropped
    why: str                # why it was dropped
    md5: Optional[str]      # None: dropped unread (an unsafe name)


def verify_arriving_zip(growing: GrowingFile, series: PlannedSeries, sink: MemberSink,
                        stop: Optional[threading.Event],
                        series_hash: Callable[[], Optional[str]]) -> VerifiedSeries:
    """verify_zip's checks on a zip while it arrives: each entry is inflated, CRC-checked,
    hashed and (if kept) packed as soon as it is in, then md5hashes.csv (the last entry)
    judges them all (a zip without one: series_hash(), getMD5Hierarchy's hash, judges it
    as a whole, if it gives one), and the central directory must list exactly the entries
    read, with the same CRCs and sizes. Whatever only verify_zip may decide (no table, an entry it
    would drop as unlisted, a mismatch, a count that is off, anything zipstream does not
    read) raises NotStreamable: the caller then runs verify_zip on the complete file, so
    every verdict on a zip is still verify_zip's, and only good zips end here sooner."""
    listed: list[tuple[str, int, int]] = []           # name, CRC-32, size: as read
    taken: list[_Taken] = []
    license_text: Optional[str] = None
    table_bytes: Optional[bytes] = None
    names_used: set[str] = set()
    inflated = 0
    for entry in zip_entries(growing.read, ENTRY_HELD_LIMIT):
        listed.append((entry.name, entry.crc, len(entry.data)))
        inflated += len(entry.data)
        if series.byte_limit is not None and inflated > series.byte_limit:
            raise NotStreamable("it inflates to more than its FileSize allows")
        if entry.name == MD5_TABLE:
            table_bytes = entry.data
        elif entry.name == LICENSE_ENTRY:
            if len(entry.data) > LICENSE_LIMIT:
                raise NotStreamable("its LICENSE is too large")
            license_text = entry.data.decode("utf-8", "replace")
        elif not safe_entry_name(entry.name):
            taken.append(_Taken(entry.name, None,
                                "unsafe name (a directory, an absolute path or '..')", None))
        else:
            keep, why, md5 = _take_entry(io.BytesIO(entry.data), len(entry.data), series, sink,
                                         lambda: unique_file_name(entry.name, names_used), stop)
            taken.append(_Taken(entry.name, keep, why, md5))
    growing.wait_for_end()
    if central_directory(growing.path) != listed:
        raise NotStreamable("its central directory does not list the entries read")
    sizes = {name: size for name, _, size in listed}
    if table_bytes is None:
        expected = series_hash()
        if expected is None:
            raise NotStreamable("no md5hashes.csv, and no series hash")
        verified = _judged(growing.path, series, taken, None, license_text, sizes)
        if series_hash_of(verified.members) != expected:
            raise NotStreamable("its files are not the ones getMD5Hierarchy hashed")
        return verified
    if len(table_bytes) > md5_table_limit(len(listed)):
        raise NotStreamable("its md5hashes.csv is too large")
    return _judged(growing.path, series, taken, parse_md5_table(table_bytes), license_text,
                   sizes)


def central_directory(path: Path) -> list[tuple[str, int, int]]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [(i.filename, i.CRC, i.file_size) for i in archive.infolist()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise NotStreamable(f"unreadable as a whole ({exc})") from None


def _judged(path: Path, series: PlannedSeries, taken: list[_Taken],
            table: Optional[dict[str, str]], license_text: Optional[str],
            sizes: dict[str, int]) -> VerifiedSeries:
    """The entries read, judged by md5hashes.csv (if any) as _check_entries judges them."""
    if table is None:
        table = {t.entry: t.md5 for t in taken if t.md5 is not None}   # nothing to judge by
    elif set(table) - set(sizes):
        raise NotStreamable("md5hashes.csv lists files the zip does not hold")
    members: list[Member] = []
    dropped: list[tuple[str, str]] = []
    for t in taken:
        if t.md5 is None:
            dropped.append((t.entry, t.why))
        elif t.entry not in table:
            if t.keep is not None:
                raise NotStreamable(f"{t.entry} would be kept, but md5hashes.csv omits it")
            dropped.append((t.entry, "not listed in md5hashes.csv"))
        elif t.md5 != table[t.entry]:
            raise NotStreamable(f"MD5 mismatch for {t.entry}")
        elif t.keep is None:
            dropped.append((t.entry, t.why))
        else:
            members.append(Member(entry=t.entry, name=t.keep, size=sizes[t.entry], md5=t.md5))
    if not members or (series.image_count is not None and len(members) != series.image_count):
        raise NotStreamable("not the series' files")
    return VerifiedSeries(path=path, members=members, license_text=license_text, dropped=dropped)
