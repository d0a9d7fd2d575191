"""TCIA's website API v1 (WordPress, https://cancerimagingarchive.net/api/v1/): a collection's
downloads, for --list-downloads and --mode aspera --collection.

Built only on what shared/aspera.md documents (tcia_utils' `wordpress` module uses it): the
`collections/` and `downloads/` endpoints, the parameters `per_page`, `_fields`, `include`
and `search`, pages linked by the `Link: rel="next"` header, and the fields below. No real
answer was seen by us: the field names are as documented, not observed. Not built on v2
(`/api/v2/`, `{"results": ...}`): no documentation of its fields; tcia_utils does not use it.
"""

from __future__ import annotations

import difflib
import html
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, TYPE_CHECKING
from urllib.parse import urlsplit

import requests

from .. import __version__
from ..errors import (EXIT_OK, EXIT_USAGE, FatalRunError, Interrupted, RequestContext,
                      TransientError, UsageError, request_failure)
from ..logs import log, printable
from ..net import RetryPolicy, TransferWatchdog, retry_policy, watched_session
from ..settings import DEFAULT_WEBSITE_API

if TYPE_CHECKING:
    from ..settings import NetworkSettings
# WordPress answers per_page above 100 with HTTP 400 (rest_invalid_param); 100 is also the
# bound aspera.md gives for v2. tcia_utils asks 200 of downloads/: not relied upon.
PER_PAGE = 100
# Ids per `include=`: a collection has a few dozen downloads; 50 keeps a URL short.
IDS_PER_REQUEST = 50
MAX_PAGES = 200            # a server that links "next" forever ends here (20,000 rows)
ANSWER_LIMIT = 32 << 20    # bytes of one page; a page of 100 downloads is ~100 kB
COLLECTION_FIELDS = "id,slug,collection_short_title,collection_title,collection_downloads"
DOWNLOAD_FIELDS = ("id,download_title,download_type,download_url,download_file,"
                   "download_size,download_size_unit,download_access")


LIST_COLUMNS = ("title", "type", "size", "link")


def check_website_api(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--website-api {printable(url)!r}: give an http(s) URL such as "
                         f"{DEFAULT_WEBSITE_API}")


@dataclass(frozen=True)
class Download:
    """One of a collection's downloads, as the website lists it."""
    id: str
    title: str
    type: str            # download_type: one label, or several joined with "; "
    size: str            # download_size and download_size_unit, as given ("12.5 GB")
    link: str            # download_url (else download_file's URL); "" when neither is one
    access: str          # download_access, as given ("" when absent)

    @property
    def faspex(self) -> bool:
        """An Aspera package: its link contains `faspex`, as TCIA's own queries test
        (there is no separate "aspera" download_type)."""
        return "faspex" in self.link.lower()


def text_of(value: object) -> str:
    """A field's text: a string, a number, a list of labels ("; "), or a WordPress rendered
    object; HTML entities decoded, tags and control characters gone."""
    if isinstance(value, bool) or value is None:
        return ""                  # ACF writes an empty field as false
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "; ".join(t for t in (text_of(v) for v in value) if t)
    if isinstance(value, dict):
        for key in ("rendered", "label", "name", "title"):
            if key in value:
                return text_of(value[key])
        return ""
    text = html.unescape(re.sub(r"<[^>]*>", "", str(value)))
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def link_of(record: dict) -> str:
    """download_url; when it is empty, download_file when that is a URL (or a file object
    with one: tcia_utils looks a bare media id up elsewhere, which this does not)."""
    for value in (record.get("download_url"), record.get("download_file")):
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str) and urlsplit(value.strip()).scheme in ("http", "https"):
            return value.strip()
    return ""


def download_of(record: dict) -> Download:
    size = text_of(record.get("download_size"))
    unit = text_of(record.get("download_size_unit"))
    return Download(id=text_of(record.get("id")), title=text_of(record.get("download_title")),
                    type=text_of(record.get("download_type")),
                    size=f"{size} {unit}".strip() if size else "",
                    link=link_of(record), access=text_of(record.get("download_access")))


def download_ids(value: object) -> list[str]:
    """collection_downloads: download ids (numbers, or digit strings); false when empty."""
    if isinstance(value, bool) or value in (None, ""):
        return []
    if not isinstance(value, list):
        value = [value]
    ids = [str(v) for v in value if isinstance(v, int) and not isinstance(v, bool) or
           isinstance(v, str) and v.strip().isdigit()]
    if len(ids) < len(value):
        log.warning("collection_downloads: %d of %d entries are not download ids; ignored",
                    len(value) - len(ids), len(value))
    return [i.strip() for i in ids]


def same_name(record: dict, name: str) -> bool:
    """The collection a name means: its short title (Pancreas-CT), or its slug, exactly
    (case aside): `search` matches words anywhere in a collection's text."""
    wanted = name.strip().casefold()
    return text_of(record.get("collection_short_title")).casefold() == wanted or \
        text_of(record.get("slug")).casefold() == wanted


def close_names(name: str, names: list[str]) -> list[str]:
    """Up to 5 short titles that hold name, or look like it."""
    known = sorted(set(names) - {""})
    holding = [n for n in known if name.casefold() in n.casefold()]
    return (holding + [n for n in difflib.get_close_matches(name, known, n=5)
                       if n not in holding])[:5]


class WebsiteApi:
    """GETs of the website API: JSON lists, page after page, retried as NBIA's metadata
    requests are (5xx, 429, a broken connection), through the run's proxy and CA bundle."""

    def __init__(self, base_url: str, transport: dict[str, object],
                 timeout: tuple[float, float], retry: RetryPolicy, stop: threading.Event):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.retry = retry
        self.stop = stop
        self.timeout = timeout
        self.transport = transport
        self.watchdog = TransferWatchdog(timeout[1], stop)
        self.session = watched_session(requests.Session(), self.watchdog,
                                       f"tcia_downloader/{__version__}")

    def close(self) -> None:
        self.watchdog.close()
        self.session.close()

    def rows(self, endpoint: str, params: dict[str, str]) -> Iterator[dict]:
        """Every row of an endpoint: the first page, then each `Link: rel="next"` of the
        same server (never another host: a link elsewhere ends the listing, with a word)."""
        url: Optional[str] = self.base_url + endpoint
        query: Optional[dict[str, str]] = params
        for _ in range(MAX_PAGES):
            if url is None:
                return
            response = self.get(url, query)
            yield from self.page_rows(endpoint, response)
            url, query = self.next_page(response), None
        raise FatalRunError(f"{endpoint}: more than {MAX_PAGES} pages; is --website-api "
                            "TCIA's website API?")

    def next_page(self, response: requests.Response) -> Optional[str]:
        nxt = response.links.get("next", {}).get("url")
        if not nxt:
            return None
        here, there = urlsplit(self.base_url), urlsplit(nxt)
        if (there.scheme, there.netloc) != (here.scheme, here.netloc):
            log.warning("the website API's next page is on another server (%s); not followed",
                        printable(there.netloc))
            return None
        return nxt

    def page_rows(self, endpoint: str, response: requests.Response) -> list[dict]:
        try:
            rows = response.json()
        except ValueError:
            raise FatalRunError(f"{endpoint} answered with something that is not JSON; is "
                                "--website-api TCIA's website API (.../api/v1/)?",
                                EXIT_USAGE) from None
        if not isinstance(rows, list):
            raise FatalRunError(f"{endpoint} answered with a JSON {type(rows).__name__}, not "
                                "a list; is --website-api TCIA's website API v1?", EXIT_USAGE)
        return [row for row in rows if isinstance(row, dict)]

    def get(self, url: str, params: Optional[dict[str, str]]) -> requests.Response:
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            if self.stop.is_set():
                raise Interrupted()
            try:
                response = self.session.get(url, params=params, timeout=self.timeout,
                                            **self.transport)
                if len(response.content) > ANSWER_LIMIT:
                    raise FatalRunError(f"{printable(url)[:120]}: an answer larger than "
                                        f"{ANSWER_LIMIT >> 20} MB")
            except requests.RequestException as exc:
                failure = request_failure(exc, self.context())
                if not isinstance(failure, TransientError):
                    raise failure from None
                last = str(failure)
                self.pause(attempt, last)
                continue
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}"
            if response.status_code == 429 or response.status_code >= 500:
                self.pause(attempt, f"the website API answered {last}")
                continue
            raise FatalRunError(f"the website API answered {last} to "
                                f"{printable(urlsplit(url).path)}: "
                                f"{printable(response.text.strip())[:160]}; check "
                                "--website-api", EXIT_USAGE)
        raise FatalRunError(f"the website API kept failing ({last}) after "
                            f"{self.retry.attempts} attempts; try again later")

    def context(self) -> RequestContext:
        address = urlsplit(self.base_url)
        return RequestContext(host=str(address.hostname), server=address.netloc,
                              address_flag="--website-api", timeouts=self.timeout,
                              cut=self.watchdog.cut_reason(), stopped=self.stop.is_set())

    def pause(self, attempt: int, what: str) -> None:
        if attempt >= self.retry.attempts:
            return
        delay = self.retry.delay(attempt)
        log.warning("%s; retrying in %.0f s", what, delay)
        if self.stop.wait(delay):
            raise Interrupted()

    # -- what the tool asks -------------------------------------------------------------

    def collection(self, name: str) -> dict:
        """The collection whose short title (or slug) is name: searched, then matched
        exactly; when the search has none (WordPress searches a post's title and text,
        which need not hold the short title), every collection, matched the same way. A
        one-line error (exit 2) naming close ones when none is."""
        fields = {"per_page": str(PER_PAGE), "_fields": COLLECTION_FIELDS}
        found = list(self.rows("collections/", {"search": name, **fields}))
        exact = [record for record in found if same_name(record, name)]
        if not exact:
            found = list(self.rows("collections/", fields))
            exact = [record for record in found if same_name(record, name)]
        if len(exact) == 1:
            return exact[0]
        if exact:
            raise FatalRunError(f"--collection {printable(name)}: {len(exact)} collections "
                                "of TCIA's website have that name", EXIT_USAGE)
        close = close_names(name, [text_of(r.get("collection_short_title")) for r in found])
        raise FatalRunError(f"--collection {printable(name)}: no collection of that short "
                            "title on TCIA's website" + (f"; did you mean {', '.join(close)}?"
                                                         if close else ""), EXIT_USAGE)

    def downloads(self, name: str) -> tuple[str, list[Download]]:
        """The collection's short title and its downloads, in the collection's order."""
        record = self.collection(name)
        ids = download_ids(record.get("collection_downloads"))
        found: dict[str, Download] = {}
        for start in range(0, len(ids), IDS_PER_REQUEST):
            chunk = ids[start:start + IDS_PER_REQUEST]
            for row in self.rows("downloads/", {"include": ",".join(chunk),
                                                "per_page": str(PER_PAGE),
                                                "_fields": DOWNLOAD_FIELDS}):
                download = download_of(row)
                if download.id in chunk:
                    found[download.id] = download
        missing = [i for i in ids if i not in found]
        if missing:
            log.warning("%d of the collection's downloads are not in downloads/ (ids %s)",
                        len(missing), ", ".join(missing[:10]))
        title = text_of(record.get("collection_short_title")) or name
        return title, [found[i] for i in ids if i in found]


# -- --list-downloads ----------------------------------------------------------------------


def download_rows(downloads: list[Download]) -> Iterator[str]:
    """A header, then one tab-separated row per download (as --dry-run's rows): a server's
    value never breaks a row (text_of has taken control characters out)."""
    yield "\t".join(LIST_COLUMNS)
    for download in downloads:
        yield "\t".join(value or "-" for value in (download.title, download.type,
                                                   download.size, download.link))


def list_downloads(name: str, website_api: str, network: "NetworkSettings",
                   stop: threading.Event) -> int:
    """--list-downloads --collection NAME: the rows on stdout, a summary on stderr. The
    links are printed because the user asked for them; they are never logged."""
    api = WebsiteApi(website_api, network.transport(), network.timeout,
                     retry_policy(network), stop)
    try:
        title, downloads = api.downloads(name)
    finally:
        api.close()
    for row in download_rows(downloads):
        print(row, flush=True)
    packages = sum(download.faspex for download in downloads)
    log.info("%s: %d download(s) on TCIA's website, %d of them Aspera Faspex packages%s",
             printable(title), len(downloads), packages,
             f" (--mode aspera --collection {printable(title)} fetches those)" if packages
             else "")
    return EXIT_OK
