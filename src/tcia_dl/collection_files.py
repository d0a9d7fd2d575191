"""LICENSE, metadata.csv, MD5SUMS, CITATION.md, the DOI resolver."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, TYPE_CHECKING
from urllib.parse import quote

import requests

from . import __version__
from .logs import log, printable
from .net import watched_session
from .settings import DEFAULT_DOI_TIMEOUT

if TYPE_CHECKING:
    from .journal import Journal
    from .net import TransferWatchdog


class DoiResolver:
    """BibTeX for DOIs from doi.org by content negotiation: the one request of a run that
    is not to NBIA. Best effort and bounded: a cluster without a route to doi.org still
    finishes its archive, whose CITATION.md then gives the DOI links only.

    The budget is a deadline for all the lookups together. Socket timeouts cannot make one:
    they bound the silence between two bytes, so a resolver that sends a byte every few
    seconds (headers or body) would hold the run until the stall window cuts it (120 s by
    default). The lookups therefore run in a thread of their own, which is abandoned at the
    deadline: its transfer is cut and the run goes on with what had arrived."""

    LIMIT = 64 * 1024             # a BibTeX entry is a few hundred bytes

    def __init__(self, base_url: str, watchdog: TransferWatchdog, transport: dict[str, object],
                 timeout: tuple[float, float], budget: float = DEFAULT_DOI_TIMEOUT):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.budget = budget
        self._watchdog = watchdog
        self._session = watched_session(requests.Session(), watchdog,
                                        f"tcia_downloader/{__version__}")
        self._transport = transport
        self._connect_timeout, self._read_timeout = (min(t, 10.0) for t in timeout)
        self._lock = threading.Lock()
        self._found: dict[str, str] = {}
        self._abandoned = threading.Event()

    def bibtex(self, dois: list[str]) -> dict[str, str]:
        """doi -> its BibTeX entry, for those the resolver gave within the budget."""
        deadline = time.monotonic() + self.budget
        lookups = threading.Thread(target=self._look_up_all, args=(dois, deadline),
                                   name="bibtex", daemon=True)
        lookups.start()
        lookups.join(self.budget)
        if lookups.is_alive():
            self._abandon(lookups)
        self._session.close()
        with self._lock:
            return dict(self._found)

    def _abandon(self, lookups: threading.Thread) -> None:
        """The deadline has passed: cut the lookup's transfer, keep what had arrived. A
        lookup still in a connect or a TLS handshake ends by its own timeouts, harmlessly:
        its thread is a daemon and writes nothing but self._found, no longer read."""
        self._abandoned.set()
        self._watchdog.cut_threads({lookups.ident or 0}, "no more time for BibTeX")
        log.info("no more time for BibTeX from %s (%g s for all the DOIs); CITATION.md gives "
                 "links for the other DOIs", self.base_url, self.budget)

    def _look_up_all(self, dois: list[str], deadline: float) -> None:
        for doi in dois:
            left = deadline - time.monotonic()
            if left <= 0 or self._abandoned.is_set():
                return
            try:
                entry = self._entry(doi, min(self._connect_timeout, left),
                                    min(self._read_timeout, left))
            except requests.RequestException as exc:
                if not self._abandoned.is_set():
                    log.info("%s cannot be reached (%s): CITATION.md gives DOI links only",
                             self.base_url, type(exc).__name__)
                    log.debug("BibTeX request for %s failed", doi, exc_info=True)
                return
            if entry and not self._abandoned.is_set():
                with self._lock:
                    self._found[doi] = entry

    def _entry(self, doi: str, connect: float, read: float) -> Optional[str]:
        response = self._session.get(
            self.base_url + quote(doi, safe="/"), stream=True, timeout=(connect, read),
            headers={"Accept": "application/x-bibtex; charset=utf-8"}, **self._transport)
        with response:
            body = bytearray()
            for chunk in response.iter_content(8192):
                body += chunk
                if len(body) > self.LIMIT or self._abandoned.is_set():
                    break
        if self._abandoned.is_set():
            return None
        text = bytes(body).decode("utf-8", "replace").strip()
        if response.status_code != 200 or len(body) > self.LIMIT or not text.startswith("@"):
            log.info("no BibTeX for %s (HTTP %d); CITATION.md links it", doi,
                     response.status_code)
            return None
        # Server text inside a fenced Markdown block: no control characters, no fence.
        return CSV_UNSAFE.sub("", text).replace("```", "'''")


GET_SERIES_FIELDS = [
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag", "Collection",
    "Site", "PatientID", "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName", "LicenseURI",
    "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased", "StudyDesc", "StudyDate",
    "ThirdPartyAnalysis", "Authorized"]


def license_text(journal: Journal, collection: str) -> bytes:
    """Every distinct license of the collection's series: the LICENSE text the server sent
    with a series, or, for series fetched without one (getImageWithMD5Hash), the license
    its metadata names. Collections mix licenses (Pancreas-CT: CC BY 3.0 and 4.0)."""
    texts: set[str] = set()
    for sent, record in journal.licenses(collection):
        if sent:
            texts.add(sent)
        elif record.get("LicenseName") or record.get("LicenseURI"):
            where = record.get("LicenseURI") or record.get("DataDescriptionURI")
            texts.add(f"License Information. Data of the {collection} collection is distributed "
                      f"under the {record.get('LicenseName') or 'license'}"
                      f"{' at ' + where if where else ''}.")
    if not texts:
        texts.add(f"The server sent no license information for {collection}; see "
                  "https://www.cancerimagingarchive.net/ before you use or share this data.")
    return ("\n\n".join(sorted(texts)) + "\n").encode("utf-8")


# Control characters a server may put in metadata: csv refuses NUL on some Pythons (3.9,
# 3.10: "line contains NUL"), and no reader of metadata.csv wants the others. A value keeps
# its tab and line breaks (legal CSV: the writer quotes them); a key has none of them.
CSV_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# What makes a spreadsheet program read a cell as a formula (OWASP's "CSV injection"); a
# leading quote is prefixed too, so that a reader can undo the prefix without ambiguity.
FORMULA_START = re.compile("^[=+@\t\r']|^-(?!\\d+(?:\\.\\d+)?(?:[eE][+-]?\\d+)?$)")
# The ISO dates come last: NBIA's StudyDate and SeriesDate stay as served (MM-DD-YYYY), and
# the columns before keep their place, for readers of earlier archives' metadata.csv.
METADATA_TOOL_COLUMNS = ["Path", "FilesInArchive", "BytesInArchive", "StudyDateISO",
                         "SeriesDateISO"]
LINE_BREAKS = re.compile("\r\n?")


def spreadsheet_safe(text: str) -> str:
    """A cell no spreadsheet program executes: one that starts with =, +, @, a tab or a
    carriage return, or with - and is no number, gets a leading ' (OWASP's advice), as does
    one that starts with ' itself. Readers of metadata.csv (--extract) drop one leading '."""
    return "'" + text if FORMULA_START.match(text) else text


def csv_key(key: str) -> str:
    """A column name from a server's JSON key: control characters shown escaped (a NUL
    breaks csv readers, a newline the header line), then safe for a spreadsheet."""
    return spreadsheet_safe(printable(key))


def csv_value(value: object) -> object:
    """A cell from a server's value, whole however long (it is the server's data; readers
    raise csv.field_size_limit): without NUL and the other control characters but tab and
    newline, and safe for a spreadsheet. Numbers stay numbers. A carriage return becomes a
    newline: csv quotes a cell for the line terminator's characters only ("\n" here), and
    an unquoted CR ends the row for every reader."""
    if not isinstance(value, str):
        return value
    return spreadsheet_safe(CSV_UNSAFE.sub("", LINE_BREAKS.sub("\n", value)))


def metadata_csv(journal: Journal, collection: str) -> bytes:
    """One row per series: the server's record, each cell made safe (csv_key, csv_value),
    then the tool's own columns as they are. Path is made of letters, digits, ._+- and /
    only: no formula of consequence, and never a leading ', so the reader's rule (drop one
    leading ') holds for it too, and --verify and --extract find the folder it names."""
    rows = journal.series_rows(collection)
    extra = sorted({k for _, r, _, _ in rows for k in r} - set(GET_SERIES_FIELDS) -
                   set(METADATA_TOOL_COLUMNS))
    server_columns = GET_SERIES_FIELDS + extra
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_key(key) for key in server_columns] + METADATA_TOOL_COLUMNS)
    from .plan import iso_date        # (plan imports the formats, which import this module)
    for path, record, files, size in rows:
        writer.writerow([csv_value(record.get(key, "")) for key in server_columns] +
                        [path, files, size, iso_date(record.get("StudyDate")) or "",
                         iso_date(record.get("SeriesDate")) or ""])
    return buffer.getvalue().encode("utf-8")


# TCIA's data usage policy: cite each dataset's DOI, and TCIA's own paper.
TCIA_POLICY_URL = "https://www.cancerimagingarchive.net/data-usage-policies-and-restrictions/"
TCIA_CITATION = (
    "Clark K, Vendt B, Smith K, Freymann J, Kirby J, Koppel P, Moore S, Phillips S, Maffitt D, "
    "Pringle M, Tarbox L, Prior F. The Cancer Imaging Archive (TCIA): Maintaining and Operating "
    "a Public Information Repository. Journal of Digital Imaging 26(6), 1045-1057 (2013). "
    "https://doi.org/10.1007/s10278-013-9622-7")
DOI_IN_URI = re.compile(r"^\s*(?:https?://(?:dx\.)?doi\.org/|doi:)(10\.\d{4,9}/\S+?)\s*$", re.I)
CC_LICENSE = re.compile(r"^CC[ -]BY((?:[ -](?:NC|SA|ND))*)[ -](\d\.\d)$", re.I)


def doi_of(uri: object) -> Optional[str]:
    """The DOI in a DataDescriptionURI ("https://doi.org/10.7937/..."), lower case (DOIs
    are case-insensitive; NBIA spells the same one both ways)."""
    match = DOI_IN_URI.match(uri) if isinstance(uri, str) else None
    return match[1].lower() if match else None


def license_url(name: str, uri: Optional[str]) -> str:
    """The license's URL: the server's, else Creative Commons' for a "CC BY..." name."""
    if uri:
        return uri
    match = CC_LICENSE.match(name.strip())
    if not match:
        return ""
    kinds = "".join(f"-{kind.lower()}" for kind in re.findall(r"NC|SA|ND", match[1], re.I))
    return f"https://creativecommons.org/licenses/by{kinds}/{match[2]}/"


@dataclass
class Dataset:
    """One DOI (or description link) of a collection, as its series' metadata give it."""
    link: str                              # https://doi.org/<doi>, or the URI as sent
    doi: Optional[str]
    series: int = 0
    licenses: set[tuple[str, str]] = field(default_factory=set)    # (name, url)


def datasets(journal: Journal, collection: str) -> list[Dataset]:
    """The DOIs of the committed series of a collection, with their licenses; series
    without any DataDescriptionURI are one dataset with an empty link."""
    found: dict[str, Dataset] = {}
    for _, record, _, _ in journal.series_rows(collection):
        uri = str(record.get("DataDescriptionURI") or "").strip()
        doi = doi_of(uri)
        link = f"https://doi.org/{doi}" if doi else printable(uri)
        dataset = found.setdefault(link, Dataset(link, doi))
        dataset.series += 1
        name = str(record.get("LicenseName") or "").strip()
        if name:
            dataset.licenses.add((printable(name), printable(license_url(
                name, str(record.get("LicenseURI") or "").strip() or None))))
    return sorted(found.values(), key=lambda d: (not d.link, d.link))


# Markdown's own characters in text from a server: a backslash before each keeps it text (no
# HTML tag, entity, code span or link can start), and text never starts a line (newlines are
# escaped by printable), so no heading or list item can either.
MARKDOWN_SPECIAL = re.compile(r"([\\`<>&\[\]])")
# An http(s) URL that can stand between < and > as an autolink: nothing that ends it early.
LINKABLE_URL = re.compile(r"https?://[^\s<>\\`\x00-\x1f\x7f-\x9f]+", re.IGNORECASE)


def markdown_text(text: str) -> str:
    """Server text as plain Markdown text: shown as sent, never read as markup."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def markdown_link(url: str) -> str:
    """<url> for an http(s) URL; anything else (javascript:, data:, text with markup in it)
    as plain text, never a link a reader could click."""
    return f"<{url}>" if LINKABLE_URL.fullmatch(url) else markdown_text(url)


def utc_day() -> str:
    """Days, not seconds, in CITATION.md: the same data fetched twice on a day (or resumed
    after a kill) gives the same archive, byte for byte."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def citation_text(journal: Journal, collection: str, file_suffix: str) -> bytes:
    """CITATION.md: what to cite (each DOI with its license and BibTeX when doi.org gave
    it, TCIA's paper) and how this copy was made. Markdown, because it is read by people:
    CITATION.cff describes one work of a software repository, and this lists several."""
    lines = [f"# Citing the {markdown_text(collection)} data in this copy", "",
             "TCIA's data usage policy asks everyone who uses these data to cite each dataset "
             "below and The Cancer Imaging Archive itself, and to follow each license:",
             f"<{TCIA_POLICY_URL}>", "", "## Datasets", ""]
    for dataset in datasets(journal, collection):
        licenses = "; ".join(markdown_text(name) + (f" {markdown_link(url)}" if url else "")
                             for name, url in sorted(dataset.licenses)) or "not stated"
        lines.append(f"- {markdown_link(dataset.link)}" if dataset.link else
                     "- (no DOI in the metadata)")
        lines += [f"  - series in this copy: {dataset.series}", f"  - license: {licenses}"]
        bibtex = journal.get(f"bibtex {dataset.doi}") if dataset.doi else None
        if bibtex:
            lines += ["", "  ```bibtex", *(f"  {line}" for line in bibtex.splitlines()),
                      "  ```"]
    lines += ["", "## The Cancer Imaging Archive", "", TCIA_CITATION, "",
              "## How this copy was made", "",
              f"- tool: tcia_downloader {__version__}",
              f"- source: {markdown_text(journal.get('made source') or 'not recorded')}",
              f"- selection: {markdown_text(journal.get('made selection') or 'not recorded')}"
              + (f" (this part: {file_suffix.lstrip('.')})" if file_suffix else ""),
              f"- started: {journal.get('made started') or 'not recorded'}, finished: "
              f"{utc_day()} (UTC)",
              "- every file was checked against the checksum its source gave for it (NBIA: "
              "its MD5 list; IDC: the object's ETag); MD5SUMS lists them all", ""]
    return "\n".join(lines).encode("utf-8")


def collection_files(journal: Journal, collection: str,
                     file_suffix: str = "") -> list[tuple[str, bytes]]:
    """(name relative to <Collection>/, content); MD5SUMS last and covering the others.
    A part's files (shard, update, selection) carry its suffix, so that parts extract side
    by side with each other and with the whole collection."""
    license_name, citation_name, metadata_name, md5sums_name = \
        collection_file_names(file_suffix)
    extras = [(license_name, license_text(journal, collection)),
              (citation_name, citation_text(journal, collection, file_suffix)),
              (metadata_name, metadata_csv(journal, collection))]
    lines = [f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in extras]
    lines += [f"{md5}  {name}\n" for name, md5 in journal.files(collection)]
    md5sums = "".join(sorted(lines, key=lambda line: line[34:])).encode("utf-8")
    return extras + [(md5sums_name, md5sums)]


def collection_file_names(file_suffix: str) -> tuple[str, str, str, str]:
    """LICENSE, CITATION.md, metadata.csv and MD5SUMS of a collection (or of a part: a
    shard, an update)."""
    return (f"LICENSE{file_suffix}", f"CITATION{file_suffix}.md", f"metadata{file_suffix}.csv",
            f"MD5SUMS{file_suffix}")
