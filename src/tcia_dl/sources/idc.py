"""IDC as a source: its --mode entry (flags, IdcSettings), its public S3 buckets (S3Client),
IdcSource."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TYPE_CHECKING
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3

from .. import __version__
from ..dicom import dicom_naming_fields
from ..errors import (EXIT_USAGE, FatalRunError, Interrupted, SeriesAttemptAbandoned,
                      RequestContext, SeriesUnavailable, TransientError, UsageError,
                      request_failure)
from ..logs import log
from ..net import TransferWatchdog, WatchedAdapter, as_requests_error, parse_retry_after
from ..manifests import INDEX_UPGRADE, WantedSeries
from ..plan import as_count, suggest_collections, wanted_of, without_credentials
from ..settings import CHUNK_SIZE
from ..storage import pread_range, raise_if_disk_full
from .base import AttemptBytes, Member, Selected, SourceEntry, VerifiedSeries, unique_file_name
from .idc_index import IdcIndex, idc_record

if TYPE_CHECKING:
    from ..formats.base import Prepared
    from ..plan import PlannedSeries
    from ..settings import NetworkSettings, Selection
    from .base import MemberSink, Packing, Served

S3_NAMESPACE = re.compile(r"^\{[^}]*\}")
S3_OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
MULTIPART_SIZES = (8, 16, 5, 15, 32, 64, 100, 128)   # MiB: the AWS CLI's default first
OBJECTS_IN_FLIGHT = 8          # objects of one series fetched at once
OBJECT_ATTEMPTS = 3            # before the series' attempt fails (then it is retried whole)
MOST_OBJECTS = 100_000         # in a series whose index row has no instanceCount
# What a series' VerifiedSeries.counters hold, for the report.
BY_SIZE_ONLY = "files verified by size only"     # multipart ETags no usual part size makes
OBJECTS_RETRIED = "object downloads retried"     # failed tries of single objects


# -- IDC as a --mode: its flags and settings -------------------------------------------------


@dataclass(frozen=True)
class IdcSettings:
    """Which index of IDC's series, and which S3 endpoint serves their objects."""
    index: Optional[Path] = None       # --idc-index: another parquet of IDC's schema
    endpoint: Optional[str] = None     # --idc-endpoint: another S3 endpoint, path-style
    include_analysis_results: bool = False     # a collection's analysis-result series too


def add_idc_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--include-analysis-results", action="store_true",
                       help="--mode idc: also the series IDC files under a collection as "
                            "analysis results (NBIA serves only the original ones)")
    group.add_argument("--idc-index", metavar="FILE.parquet",
                       help="--mode idc: this index instead of idc-index-data's (same schema; "
                            "default: $TCIA_IDC_INDEX, else the installed one)")
    group.add_argument("--idc-endpoint", metavar="URL",
                       help="--mode idc: another S3-compatible endpoint, addressed path-style "
                            "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS's "
                            "public buckets)")


def idc_settings(args: argparse.Namespace, origin: Mapping[str, str]) -> IdcSettings:
    """--idc-endpoint and --idc-index as given; else, for --retry-failed, as its list
    recorded them (the series go back into an output made from there); else the
    environment's and the defaults."""
    endpoint = args.idc_endpoint or origin.get("idc-endpoint") or \
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise UsageError(f"--idc-endpoint {endpoint!r} is not an http(s) URL")
    index = args.idc_index or origin.get("idc-index") or os.environ.get("TCIA_IDC_INDEX")
    if index and not Path(index).expanduser().is_file():
        raise UsageError(f"--idc-index {index} (or $TCIA_IDC_INDEX): no such file")
    return IdcSettings(index=Path(index).expanduser() if index else None, endpoint=endpoint,
                       include_analysis_results=args.include_analysis_results)


def idc_provenance(settings: IdcSettings) -> dict[str, str]:
    return {"idc-endpoint": without_credentials(settings.endpoint) if settings.endpoint else "",
            "idc-index": str(settings.index.resolve()) if settings.index else ""}


def open_idc(settings: IdcSettings, network: NetworkSettings,
             stop: threading.Event) -> IdcSource:
    index = IdcIndex(settings.index)
    watchdog = TransferWatchdog(network.stall_timeout, stop)
    s3 = S3Client(settings.endpoint, watchdog, network.transport(), network.timeout, stop)
    return IdcSource(index, s3, settings.include_analysis_results, watchdog)


# -- its buckets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str                     # without quotes: <md5 hex> or <hex>-<parts>


@dataclass(frozen=True)
class Route:
    """How an endpoint is reached: requests' urllib3 pool for it (its proxy, TLS settings
    and watched sockets), and whether the request line names the whole URL (plain HTTP
    through a proxy) or only its path."""
    pool: "urllib3.connectionpool.HTTPConnectionPool"
    absolute: bool


class S3Client:
    """Anonymous S3 REST: ListObjectsV2 of a prefix, and GET of an object into a file at
    an offset. The one place where S3's answers become TransientError (retry) or
    SeriesUnavailable (refused). Against AWS the bucket is in the host name; against
    another endpoint (--idc-endpoint) in the path, as s5cmd and the AWS CLI address it.

    Requests go to urllib3's pool of the endpoint directly: a GET of a 130 kB object
    through requests' Session.get cost 1.39 ms of CPU, this way 0.93 ms (per object in a
    run of 3,182, `bench/idc_cpu.py --breakdown`; on one thread, 1.04 against 0.60 ms).
    requests still decides the route once per host (proxies, CA bundle: _route) and names
    the failures (net.as_requests_error)."""

    LIST_LIMIT = 16 * 1024 * 1024          # one page of 1,000 keys is ~300 kB of XML
    # Connections kept open for reuse: every GET that can be in flight at once (--workers
    # at most 64, cli.MAX_WORKERS, times OBJECTS_IN_FLIGHT), so none is closed and opened
    # again (a TLS handshake each against AWS).
    CONNECTIONS_KEPT = 64 * OBJECTS_IN_FLIGHT

    def __init__(self, endpoint: Optional[str], watchdog: TransferWatchdog,
                 transport: dict[str, object], timeout: tuple[float, float],
                 stop: threading.Event):
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self._watchdog = watchdog
        self._transport = transport
        self._timeout = timeout
        self._stop = stop
        self._adapter = WatchedAdapter(watchdog, pool_maxsize=self.CONNECTIONS_KEPT)
        self._routes: dict[str, Route] = {}
        self._routes_lock = threading.Lock()
        # What requests sends with every request (Accept-Encoding and the rest), and ours.
        self._headers = dict(requests.utils.default_headers())
        self._headers["User-Agent"] = f"tcia_downloader/{__version__}"
        self._retries = urllib3.util.Retry(0, read=False)     # requests' own: no retries
        self._limits = urllib3.util.Timeout(connect=timeout[0], read=timeout[1])

    def _request_settings(self, url: str) -> dict[str, object]:
        """proxies and verify for a request to url: the flags', else the environment's
        (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE), as requests would merge them."""
        with requests.Session() as probe:
            merged = probe.merge_environment_settings(
                url, dict(self._transport.get("proxies") or {}), True,  # type: ignore
                self._transport.get("verify"), None)
        return {"proxies": merged["proxies"], "verify": merged["verify"]}

    def _route(self, url: str) -> Route:
        """The route to url's host, as requests' HTTPAdapter.send would take it, decided
        once per host: the environment (proxies, CA bundle) and ~/.netrc are not read for
        every object, which cost more than the GET itself."""
        host = "://".join(urlsplit(url)[:2])
        with self._routes_lock:
            route = self._routes.get(host)
            if route is None:
                settings = self._request_settings(url)
                verify, proxies = settings["verify"], settings["proxies"]
                request = requests.Request("GET", url).prepare()
                connect = getattr(self._adapter, "get_connection_with_tls_context", None)
                pool = connect(request, verify, proxies=proxies) if connect else \
                    self._adapter.get_connection(url, proxies)      # requests < 2.32.2
                self._adapter.cert_verify(pool, url, verify, None)
                absolute = not self._adapter.request_url(request, proxies).startswith("/")
                route = self._routes[host] = Route(pool, absolute)
        return route

    @contextlib.contextmanager
    def _response(self, url: str) -> "Iterator[urllib3.response.HTTPResponse]":
        """The answer to a GET of url, its status checked, its body still to read (read()):
        the connection goes back to the pool once the body has been read to its end, and
        is closed otherwise. Failures are requests' exceptions."""
        route = self._route(url)
        target = url if route.absolute else url[len("://".join(urlsplit(url)[:2])):]
        try:
            response = route.pool.urlopen(
                "GET", target, headers=self._headers, redirect=False, assert_same_host=False,
                preload_content=False, decode_content=False, retries=self._retries,
                timeout=self._limits)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise as_requests_error(exc, in_body=False) from None
        try:
            self._raise_for_status(response)
            yield response
        finally:
            # Read to its end, the answer has already given its connection back (urllib3
            # does on the body's last byte) and this closes nothing; else it is closed.
            response.close()
            response.release_conn()

    @staticmethod
    def read(response: "urllib3.response.HTTPResponse", size: int) -> bytes:
        """Up to size bytes of the body (b"": its end), decoded as requests would."""
        try:
            return response.read(size, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise as_requests_error(exc, in_body=True) from None

    def close(self) -> None:
        self._adapter.close()

    def url(self, bucket: str, key: str = "") -> str:
        if self.endpoint:
            return f"{self.endpoint}/{bucket}/{quote(key)}"
        return f"https://{bucket}.s3.amazonaws.com/{quote(key)}"

    def list(self, bucket: str, prefix: str, most: Optional[int] = None) -> list[S3Object]:
        """Every object under prefix, page by page; more than `most` objects, or a page that
        says "more" but lists nothing, is a listing to distrust (and would never end)."""
        objects: list[S3Object] = []
        token: Optional[str] = None
        while True:
            params = {"list-type": "2", "prefix": prefix,
                      **({"continuation-token": token} if token else {})}
            body = self._get(self.url(bucket), params, self.LIST_LIMIT)
            page, token = parse_list_page(body)
            objects += page
            if most is not None and len(objects) > most:
                raise TransientError(f"the listing of {prefix} goes on beyond {most} objects")
            if not token:
                return objects
            if not page:
                raise TransientError(f"a listing page of {prefix} that lists nothing but "
                                     "says there is more")

    def peek(self, bucket: str, prefix: str) -> None:
        """One listing page of at most one object under prefix: whether the endpoint
        answers (--dry-run), at the cost of one small request."""
        parse_list_page(self._get(self.url(bucket), {"list-type": "2", "prefix": prefix,
                                                     "max-keys": "1"}, self.LIST_LIMIT))

    def _get(self, url: str, params: dict[str, str], limit: int) -> bytes:
        try:
            with self._response(f"{url}?{urlencode(params)}") as response:
                body = bytearray()
                while True:
                    chunk = self.read(response, CHUNK_SIZE)
                    if not chunk:
                        return bytes(body)
                    body += chunk
                    if len(body) > limit:
                        raise TransientError(f"a listing page of more than {limit} bytes")
        except requests.RequestException as exc:
            raise self._transfer_error(exc, 0, url) from None

    def download(self, bucket: str, item: S3Object, handle: int, offset: int,
                 on_bytes: Callable[[int], None], abandon: threading.Event) -> "hashlib._Hash":
        """The object's bytes written at offset of the open file, hashed as they come:
        exactly its listed size, or TransientError (whose text does not name the object:
        the caller does, once). Returns the MD5 of what was written.
        abandon: the series' attempt has failed elsewhere; this object no longer matters."""
        digest = hashlib.md5()
        written = 0
        url = self.url(bucket, item.key)
        try:
            with self._response(url) as response:
                while True:
                    chunk = self.read(response, CHUNK_SIZE)
                    if not chunk:
                        break
                    if self._stop.is_set():
                        raise Interrupted()
                    if abandon.is_set():
                        raise SeriesAttemptAbandoned()
                    if written + len(chunk) > item.size:
                        raise TransientError(f"more bytes than its listed {item.size}")
                    os.pwrite(handle, chunk, offset + written)
                    digest.update(chunk)
                    written += len(chunk)
                    on_bytes(len(chunk))
        except requests.RequestException as exc:
            raise self._transfer_error(exc, written, url) from None
        if written != item.size:
            raise TransientError(f"{written} of its {item.size} bytes arrived")
        return digest

    def _raise_for_status(self, response: "urllib3.response.HTTPResponse") -> None:
        status = response.status
        if status in (200, 206):
            return
        head = self.read(response, 4096)                    # an error body, never all of it
        code = re.search(r"<Code>([^<]{1,64})</Code>", head.decode("utf-8", "replace"))
        what = f"HTTP {status}" + (f" {code[1]}" if code else "")
        if status == 403 or (code and code[1] == "NoSuchBucket"):
            raise SeriesUnavailable(f"{what}: the bucket refuses anonymous reading")
        if status in (429, 500, 502, 503, 504) or status == 404:
            # 503 SlowDown is S3 throttling; 404 means the listing changed under us.
            raise TransientError(what, parse_retry_after(response.headers.get("Retry-After")))
        raise TransientError(what)

    def _transfer_error(self, exc: requests.RequestException, written: int,
                        url: str) -> Exception:
        return request_failure(exc, RequestContext(
            host=str(urlsplit(url).hostname), server=urlsplit(url).netloc,
            address_flag="--idc-endpoint",
            timeouts=self._timeout, cut=self._watchdog.cut_reason(), written=written,
            stopped=self._stop.is_set()))


def parse_list_page(body: bytes) -> tuple[list[S3Object], Optional[str]]:
    """The objects of a ListObjectsV2 page, and the token of the next page (None: last)."""
    import xml.etree.ElementTree as ElementTree
    refuse_dtd(body)
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"a listing that is not S3's XML ({exc})") from None

    def text(element: ElementTree.Element, name: str) -> str:
        for child in element:
            if S3_NAMESPACE.sub("", child.tag) == name:
                return (child.text or "").strip()
        return ""
    objects = []
    for element in root:
        if S3_NAMESPACE.sub("", element.tag) != "Contents":
            continue
        size = as_count(text(element, "Size"))
        if size is None:
            raise TransientError(f"a listing with no size for {text(element, 'Key')!r}")
        objects.append(S3Object(text(element, "Key"), size, text(element, "ETag").strip('"')))
    truncated = text(root, "IsTruncated").lower() == "true"
    token = text(root, "NextContinuationToken") if truncated else ""
    if truncated and not token:
        raise TransientError("a truncated listing without a continuation token")
    return objects, token or None


# A document type declaration, or an entity or other declaration of one. expat expands
# internal entities within its own limits only (a 16 MiB page may grow a hundredfold), so a
# page is refused before it is parsed: S3 never sends a DTD.
XML_DECLARATION = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)", re.IGNORECASE)


def refuse_dtd(body: bytes) -> None:
    if XML_DECLARATION.search(body):
        raise TransientError("the listing declares a DTD (DOCTYPE or ENTITY), which S3 never "
                             "sends; not parsed")


def multipart_etag_matches(etag: str, handle: int, offset: int, size: int) -> Optional[int]:
    """The part size (MiB) that reproduces a multipart ETag (<md5 of part MD5s>-<parts>)
    from the bytes, or None: S3 does not store the part size, so the usual ones are tried."""
    digest, _, parts = etag.partition("-")
    for mib in MULTIPART_SIZES:
        part = mib * 1024 * 1024
        if -(-size // part) != int(parts):
            continue
        combined = hashlib.md5()
        for start in range(0, size, part):
            piece = hashlib.md5()
            for at in range(start, min(start + part, size), CHUNK_SIZE):
                piece.update(os.pread(handle, min(CHUNK_SIZE, start + part - at, size - at),
                                      offset + at))
            combined.update(piece.digest())
        if combined.hexdigest() == digest:
            return mib
    return None


@dataclass
class FetchedObject:
    item: S3Object
    offset: int
    md5: str
    by_size_only: bool = False
    retries: int = 0               # failed tries before this one (throttling, resets, ...)


class IdcSource:
    """IDC as a source of series: the records of a selection from its offline index, and a
    series fetched from its bucket, one object per instance, into one scratch file (one
    inode per series in flight), every object checked against its ETag and as DICOM of
    this series, then handed to the sink in InstanceNumber order under the names NBIA's
    NewFileNames gives, so the same series lands in the same place from either source."""

    name = "idc"
    scratch_suffix = ".objects"

    def __init__(self, index: IdcIndex, s3: S3Client, include_analysis_results: bool,
                 watchdog: TransferWatchdog):
        self.index = index
        self.s3 = s3
        self.include_analysis_results = include_analysis_results
        self.watchdog = watchdog           # S3Client's: it cuts a failed series' objects
        self.notes: list[str] = []         # of the selection planned: for the report

    def describe(self) -> str:
        where = self.s3.endpoint or "AWS S3 (public buckets)"
        return f"IDC (index {self.index.version}) at {where}"

    def secrets(self) -> list[str]:
        return []                          # anonymous: its buckets are public

    def report_lines(self, done: Sequence[Served]) -> list[str]:
        """Whenever a series came from IDC (a 0 there is worth reading too): how many files
        only their size vouches for (multipart ETags can defeat the checksum), and how many
        object downloads were tried again (many: S3 throttles, or the link is poor)."""
        index = f"  IDC's index:                 {self.index.version}"
        if not any(o.source == self.name for o in done):
            return [index, *self.notes]
        return [index, *self.notes, f"  files verified by size only:  "
                f"{sum(o.counters.get(BY_SIZE_ONLY, 0) for o in done)} (the others by their MD5)",
                f"  object downloads retried:     "
                f"{sum(o.counters.get(OBJECTS_RETRIED, 0) for o in done)}"]

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.index.collections.values())

    def records(self, selection: Selection) -> Selected:
        conditions: list[tuple[str, list[str]]] = []
        wanted = WantedSeries([], [])
        if selection.manifests or selection.retry_failed:
            wanted = wanted_of(selection, lambda: self.index.series_of_uuids,
                               f"IDC's index {self.index.version}")
            conditions.append(("SeriesInstanceUID", wanted.uids))
        if selection.collection:
            collection = self.index.collection(selection.collection)
            if collection is None:
                raise FatalRunError(self._unknown_collection(selection.collection), EXIT_USAGE)
            conditions.append(("collection_id", [collection.id]))
        conditions += [(column, list(values)) for column, values in selection.filters().items()]
        # Named series are fetched whatever they are; a collection means what NBIA serves
        # for it: its original data, not the analysis results IDC files beside it.
        uids = wanted.uids
        original_only = not (wanted.manifests or selection.series_uids or
                             self.include_analysis_results)
        rows = self.index.rows(conditions, original_only)
        records = [idc_record(row, self.index.collections[row["collection_id"]])
                   for row in rows]
        found = {r["SeriesInstanceUID"] for r in records}
        unknown = [u for u in (uids or list(selection.series_uids)) if u not in found]
        if wanted.manifests:
            log.info("%d series listed in %s; IDC's index has %d", len(uids) +
                     len(wanted.unknown_uuids), ", ".join(str(m.path) for m in wanted.manifests),
                     len(records))
            if unknown:
                log.warning("%d SeriesInstanceUID(s) of the manifest are not in IDC's index "
                            "(%s): series newer than the index? %s", len(unknown),
                            self.index.version, INDEX_UPGRADE)
        elif not records:
            raise FatalRunError("no series of IDC's index matches these filters: check the "
                                "values (compared exactly)", EXIT_USAGE)
        self.notes = self.left_out_note(conditions) if original_only else []
        return Selected(records, unknown + wanted.unknown_uuids, wanted.manifests,
                        notes=self.notes)

    def left_out_note(self, conditions: list[tuple[str, list[str]]]) -> list[str]:
        """One line on the analysis-result series of the selection left out by default
        (IDC files them under the collection; NBIA does not serve them), if any."""
        if self.include_analysis_results:
            return []
        left_out = self.index.analysis_results(conditions)
        if not left_out:
            return []
        kinds = ", ".join(f"{name} {count}" for name, count in left_out.items())
        return [f"  left out: {sum(left_out.values())} analysis-result series that IDC files "
                f"under this selection ({kinds}); --include-analysis-results adds them"]

    def selection_note(self, selection: Selection) -> list[str]:
        """left_out_note of a collection and filters another source planned (auto)."""
        collection = self.index.collection(selection.collection or "")
        if collection is None or selection.manifests or selection.retry_failed or \
                selection.series_uids:
            return []
        self.notes = self.left_out_note(
            [("collection_id", [collection.id]),
             *((column, list(values)) for column, values in selection.filters().items())])
        return self.notes

    def _unknown_collection(self, name: str) -> str:
        names = self.collections()
        close = suggest_collections(name, names)
        return (f"IDC's index has no collection {name!r}" +
                (f"; did you mean: {', '.join(close)}?" if close else
                 "; --mode idc --list-collections prints its names"))

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        bucket = str(series.record.get("aws_bucket") or "")
        uuid = str(series.record.get("crdc_series_uuid") or "")
        if not bucket or not uuid:
            raise SeriesUnavailable("IDC's index gives no bucket for it")
        listed = self._listing(series, bucket, uuid)
        fetched = self._download_all(series, bucket, listed, scratch, count, stop)
        return pack(lambda sink: self._verify_into(series, scratch, fetched, sink, stop))

    def reach(self, series: "PlannedSeries") -> None:
        """One listing of at most one object of the series: the plan came from the offline
        index, and the bucket's endpoint was never asked."""
        bucket = str(series.record.get("aws_bucket") or "")
        uuid = str(series.record.get("crdc_series_uuid") or "")
        if bucket and uuid:
            self.s3.peek(bucket, f"{uuid}/")

    def _listing(self, series: "PlannedSeries", bucket: str, uuid: str) -> list[S3Object]:
        """The series' objects: exactly instanceCount of them, named like instances, and no
        more bytes than the index's size allows. A series prefix never changes in IDC (a
        revision gets a new uuid): anything else is a listing to distrust."""
        objects = self.s3.list(bucket, f"{uuid}/", series.image_count or MOST_OBJECTS)
        if len({item.key for item in objects}) != len(objects):
            raise TransientError(f"the listing of {uuid}/ names an object twice")
        for item in objects:
            inside = item.key.startswith(f"{uuid}/")
            name = item.key[len(uuid) + 1:] if inside else item.key
            if not inside or not S3_OBJECT_NAME.match(name):
                raise TransientError(f"the listing of {uuid}/ holds {name[:80]!r}, not an "
                                     "instance of the series")
        if series.image_count is not None and len(objects) != series.image_count:
            raise TransientError(f"the bucket lists {len(objects)} objects for it, IDC's "
                                 f"index {series.image_count}")
        total = sum(item.size for item in objects)
        if series.byte_limit is not None and total > series.byte_limit:
            raise TransientError(f"the listing adds up to {total} bytes, more than the index's "
                                 "size for the series allows")
        return objects

    def _download_all(self, series: "PlannedSeries", bucket: str, listed: list[S3Object],
                      scratch: Path, count: Callable[[int], None],
                      stop: threading.Event) -> list[FetchedObject]:
        """All objects at once (OBJECTS_IN_FLIGHT), each at its own offset of scratch, each
        retried a few times before the series' attempt fails. The first object that fails
        for good ends the attempt at once: the others stop mid-body, the queued never start."""
        offsets = list(itertools.accumulate([0] + [item.size for item in listed[:-1]]))
        abandon = threading.Event()
        threads: set[int] = set()
        handle = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            def fetch_one(pair: tuple[S3Object, int]) -> FetchedObject:
                threads.add(threading.get_ident())
                return self._download_one(series, bucket, pair[0], handle, pair[1], count,
                                          stop, abandon)
            with concurrent.futures.ThreadPoolExecutor(OBJECTS_IN_FLIGHT) as pool:
                futures = [pool.submit(fetch_one, pair) for pair in zip(listed, offsets)]
                done, _ = concurrent.futures.wait(
                    futures, return_when=concurrent.futures.FIRST_EXCEPTION)
                failed = next((f for f in futures if f in done and f.exception()), None)
                if failed is not None:
                    abandon.set()
                    for future in futures:
                        future.cancel()
                    self.watchdog.cut_threads(threads, "another object of the series failed")
                    raise failed.exception()       # type: ignore[misc]
                return [future.result() for future in futures]
        except OSError as exc:
            raise_if_disk_full(exc, scratch.parent)
            raise
        finally:
            os.close(handle)

    def _download_one(self, series: "PlannedSeries", bucket: str, item: S3Object, handle: int,
                      offset: int, count: Callable[[int], None], stop: threading.Event,
                      abandon: threading.Event) -> FetchedObject:
        for attempt in range(1, OBJECT_ATTEMPTS + 1):
            counted = AttemptBytes(count)
            try:
                digest = self.s3.download(bucket, item, handle, offset, counted, abandon)
                fetched = self._checked(item, handle, offset, digest.hexdigest())
                fetched.retries = attempt - 1
                return fetched
            except TransientError as exc:
                counted.take_back()
                if abandon.is_set():
                    raise SeriesAttemptAbandoned() from None
                if attempt == OBJECT_ATTEMPTS or stop.is_set():
                    raise TransientError(f"{item.key}: {exc}") from None
                log.debug("%s: %s: attempt %d failed: %s", series.label, item.key, attempt, exc)
                # The wait ends at once on a stop; an abandoned series waits out this pause
                # (2 s at most) rather than poll two events.
                if stop.wait(min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)):
                    raise Interrupted() from None
                if abandon.is_set():
                    raise SeriesAttemptAbandoned() from None
            except BaseException:
                counted.take_back()
                raise
        raise AssertionError("unreachable")

    def _checked(self, item: S3Object, handle: int, offset: int, md5: str) -> FetchedObject:
        """The bytes against the ETag: an MD5 for a single-part upload; a multipart ETag is
        recomputed with the usual part sizes, and only where none reproduces it is the
        object trusted by its size, which is logged and counted in the report."""
        if re.fullmatch(r"[0-9a-f]{32}", item.etag):
            if md5 != item.etag:
                raise TransientError(f"MD5 {md5}, but its ETag says {item.etag}")
            return FetchedObject(item, offset, md5)
        if re.fullmatch(r"[0-9a-f]{32}-[0-9]{1,5}", item.etag):
            if multipart_etag_matches(item.etag, handle, offset, item.size) is not None:
                return FetchedObject(item, offset, md5)
        return FetchedObject(item, offset, md5, by_size_only=True)

    def _verify_into(self, series: "PlannedSeries", scratch: Path, fetched: list[FetchedObject],
                     sink: "MemberSink", stop: threading.Event) -> "VerifiedSeries":
        """Every object must be DICOM of this series (header only); then, in InstanceNumber
        order, into the sink as <acquisition>-<instance>.dcm."""
        with open(scratch, "rb") as handle:
            headers = self._headers_of(series, fetched, handle)
            log_size_only(series, [f.item for f in fetched if f.by_size_only])
            width = len(str(len(fetched)))
            used: set[str] = set()
            members = []
            ordered = sorted(headers, key=lambda h: (h[0], h[2].item.key))
            for instance, acquisition, item in ordered:
                if stop.is_set():
                    raise Interrupted()
                name = unique_file_name(f"{acquisition}-{instance:0{width}d}.dcm", used)
                sink.add(name, item.item.size, pread_range(handle.fileno(), item.offset,
                                                           item.offset + item.item.size))
                members.append(Member(item.item.key, name, item.item.size, item.md5))
        return VerifiedSeries(scratch, members, None, [], counters={
            BY_SIZE_ONLY: sum(f.by_size_only for f in fetched),
            OBJECTS_RETRIED: sum(f.retries for f in fetched)})

    @staticmethod
    def _headers_of(series: "PlannedSeries", fetched: list[FetchedObject],
                    handle: io.BufferedReader) -> list[tuple[int, int, FetchedObject]]:
        """(InstanceNumber, AcquisitionNumber, object) of every object, each DICOM of this
        series and each a different instance."""
        headers = []
        instances: set[str] = set()
        for number, item in enumerate(fetched):
            fields = dicom_naming_fields(io.BufferedReader(
                FileRegion(handle, item.offset, item.item.size)))
            if fields is None or fields.series_uid != series.uid or not fields.sop_uid:
                raise TransientError(f"{item.item.key} is not DICOM of this series")
            if fields.sop_uid in instances:      # one instance under two keys: twice in the
                raise TransientError(f"{item.item.key} repeats the instance "      # output
                                     f"{fields.sop_uid[:64]}")
            instances.add(fields.sop_uid)
            headers.append((fields.instance if fields.instance is not None else number + 1,
                            fields.acquisition if fields.acquisition is not None else 1,
                            item))
        return headers

    def close(self) -> None:
        self.s3.close()
        self.index.close()
        self.watchdog.close()


def log_size_only(series: "PlannedSeries", objects: list[S3Object]) -> None:
    """One line per series in the .out file; every name and ETag in the debug log."""
    for item in objects:
        log.debug("%s: %s has the ETag %s, which no usual part size reproduces",
                  series.label, item.key, item.etag)
    if objects:
        log.warning("%s: %d file(s) verified by their size only (multipart ETags that no "
                    "usual part size reproduces)", series.short_label, len(objects))


class FileRegion(io.RawIOBase):
    """A read-only view of bytes [offset, offset + size) of an open file, for pydicom: a
    header is read as far as it goes (a SEG's per-frame groups run to megabytes), never
    beyond the object, and nothing is copied into memory first."""

    def __init__(self, handle: io.BufferedReader, offset: int, size: int):
        super().__init__()
        self._handle, self._offset, self._size, self._at = handle, offset, size, 0
        self.name = f"{handle.name}@{offset}"      # pydicom names its dataset after it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = min(max(base + position, 0), self._size)
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer: bytearray) -> int:
        wanted = min(len(buffer), self._size - self._at)
        data = os.pread(self._handle.fileno(), wanted, self._offset + self._at) if wanted else b""
        buffer[:len(data)] = data
        self._at += len(data)
        return len(data)


IDC: SourceEntry[IdcSettings] = SourceEntry(
    name="idc", help="NCI's Imaging Data Commons: public S3 buckets and an offline index; "
                     "needs requirements-idc.txt",
    title="IDC", add_flags=add_idc_flags, settings=idc_settings, open=open_idc,
    provenance=idc_provenance)
