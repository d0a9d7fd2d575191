"""Which series, and where each goes: records, names, the manifests' series (manifests.py
reads them; the .failed.tcia/.damaged.tcia ones are written here), shards, updates, space."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Optional, TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from .errors import ApiError, EXIT_USAGE, FatalRunError
from .formats import target_format
from .journal import read_journal, says_finished
from .logs import human_bytes, log
from . import manifests as manifest_files
from .manifests import (FAILED_RUN_KEY, Manifest, UuidLookup, WantedSeries, is_uid,
                        wanted_series)
from .settings import NLST_API_URL
from .storage import (SpaceNeed, existing_ancestor, filesystem_of, free_bytes,
                      write_file_atomically)

if TYPE_CHECKING:
    from .settings import Options, Selection, Shard
    from .sources.base import Source
    from .sources.nbia_api import TciaApi


# -- Planning: which series, and where each goes -------------------------------------------


@dataclass(frozen=True)
class PlannedSeries:
    uid: str
    collection: str
    path: str                      # <PatientID>/<date>-<StudyDesc>-<uid5>/<No>-<Desc>-<uid5>
    record: dict                   # the getSeries object as served
    image_count: Optional[int]
    file_size: int

    @property
    def label(self) -> str:
        return self.folder

    @property
    def folder(self) -> str:
        """<Collection>/<path>: where its files go in the output. A path may be empty (an
        Aspera package's root): then the collection's folder itself."""
        return f"{self.collection}/{self.path}" if self.path else self.collection

    def member_path(self, name: str) -> str:
        """A file's path under the collection folder (its MD5SUMS line)."""
        return f"{self.path}/{name}" if self.path else name

    @property
    def short_label(self) -> str:
        """<Collection>/<patient>/<series folder>: enough to find it, short enough for the
        lines of a slurm .out file read in a 100-column terminal (the study is in label)."""
        parts = self.path.split("/")
        return f"{self.collection}/{parts[0]}/{parts[-1]}" if len(parts) > 2 else self.folder

    @property
    def byte_limit(self) -> Optional[int]:
        """The most bytes a zip of this series may hold, inflated or not: twice its FileSize
        plus room for zip headers, LICENSE and md5hashes.csv. None when the server gave no
        FileSize. A server that sends more is cut off instead of filling the disk."""
        if self.file_size <= 0:
            return None
        return 2 * self.file_size + 4096 * (self.image_count or 0) + 16 * 1024 * 1024


SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
# Names of the collection files (LICENSE, metadata.csv, MD5SUMS, with a part's suffix): no
# patient folder may take one of them.
COLLECTION_FILE_NAME = re.compile(r"^(license|md5sums|metadata|citation)(\..*)?$",
                                  re.IGNORECASE)


def as_count(value: object) -> Optional[int]:
    """A non-negative whole number from a JSON value (NBIA sends numbers; a hostile or
    broken server may send "12.5MB"), else None."""
    if type(value) is int:      # what NBIA sends: 400,000 calls planning 200,000 series
        return value if 0 <= value < 2 ** 63 else None
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and 0 <= number < 2 ** 63 else None


def usable_records(rows: list[dict], endpoint: str) -> list[dict]:
    """The getSeries rows that can be planned: a valid SeriesInstanceUID, scalar values,
    FileSize and ImageCount as numbers (or left out). The rest is counted in one warning."""
    usable: list[dict] = []
    bad: list[object] = []
    for row in rows:
        if not is_uid(row.get("SeriesInstanceUID")):
            bad.append(row.get("SeriesInstanceUID"))
            continue
        # Rows are almost always flat already: copied as they are, they plan a
        # 200,000-series collection in a fraction of the time of a rebuilt dict each.
        if PLAIN_VALUES.issuperset(map(type, row.values())) and STR_ONLY.issuperset(map(type, row)):
            record = dict(row)
        else:
            record = {str(key): value if value is None or isinstance(value, (str, int, float))
                      else json.dumps(value) for key, value in row.items()}
        for key in ("FileSize", "ImageCount"):
            if key in record and as_count(record[key]) is None:
                log.debug("%s: %s %r of %s is no number; ignored", endpoint, key, record[key],
                          record["SeriesInstanceUID"])
                del record[key]
        usable.append(record)
    if bad:
        log.warning("%s: skipped %d row(s) without a valid SeriesInstanceUID (first: %.80r)",
                    endpoint, len(bad), bad[0])
    return usable


NBIA_DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")
# The value types a record keeps as they are (anything else becomes its JSON text).
PLAIN_VALUES = frozenset({str, int, float, bool, type(None)})
STR_ONLY = frozenset({str})


def clean_component(text: object, max_length: int = 64) -> str:
    """One safe path component: ASCII letters, digits and ._+- only, no leading dots
    (so never hidden, never '..'), capped in length; empty becomes NA."""
    ascii_text = str(text) if text is not None else ""
    if not ascii_text.isascii():      # (most values are ASCII: NFKD is the slow part)
        ascii_text = unicodedata.normalize("NFKD", ascii_text)
        ascii_text = ascii_text.encode("ascii", "ignore").decode("ascii")
    cleaned = SAFE_CHARS.sub("_", ascii_text).strip("._-")
    cleaned = cleaned[:max_length].rstrip("._-")
    return cleaned or "NA"


def iso_date(nbia_date: Optional[str]) -> Optional[str]:
    """NBIA v4 dates are MM-DD-YYYY; folders use YYYY-MM-DD so they sort."""
    match = NBIA_DATE.match(nbia_date or "")
    if not match:
        return None
    month, day, year = match.groups()
    return f"{year}-{month}-{day}"


def study_date(records: list[dict]) -> str:
    """StudyDate, else the study's earliest SeriesDate, else unknown_date: one folder per
    study even when its series were acquired on different days."""
    for record in records:
        date = iso_date(record.get("StudyDate"))
        if date:
            return date
    series_dates = sorted(d for d in (iso_date(r.get("SeriesDate")) for r in records) if d)
    return series_dates[0] if series_dates else "unknown_date"


def unique_names(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """entries: (key, stem, uid) -> key: f"{stem}-{uid suffix}", lengthening the UID suffix
    of colliding names until they differ. Names compare case-insensitively, because the
    archive may be extracted on macOS or Windows."""
    width = {key: 5 for key, _, _ in entries}
    info = {key: (stem, uid) for key, stem, uid in entries}

    def name_of(key: str) -> str:
        stem, uid = info[key]
        return f"{stem}-{clean_component(uid[-width[key]:], 64)}"

    named = {key: name_of(key) for key in info}
    while True:
        groups: dict[str, list[str]] = defaultdict(list)
        for key, name in named.items():
            groups[name.casefold()].append(key)
        clashes = [keys for keys in groups.values() if len(keys) > 1]
        if not clashes:
            return named
        grew = False
        for keys in clashes:
            for key in keys:
                if width[key] < len(info[key][1]):
                    width[key] += 1
                    named[key] = name_of(key)     # only a clashing name changes
                    grew = True
        if not grew:
            # Whole UIDs still clash (e.g. identical UIDs): number them, deterministically.
            for keys in clashes:
                for n, key in enumerate(sorted(keys)[1:], start=2):
                    named[key] = f"{named[key]}-{n}"
            return named


def plan_collection(collection: str, records: list[dict]) -> list[PlannedSeries]:
    """Give every series its folder: <PatientID>/<date>-<StudyDesc>-<uid5>/<No>-<Desc>-<uid5>."""
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_patient[str(record.get("PatientID", ""))].append(record)
    patient_dirs = _unique_patient_dirs(sorted(by_patient))

    planned: list[PlannedSeries] = []
    # Descriptions and numbers repeat from series to series: each distinct one cleaned once
    # (a 200,000-series plan spent a third of its time cleaning the same few texts).
    cleaned: dict[tuple[type, object, int], str] = {}

    def clean(text: object, max_length: int = 64) -> str:
        key = (type(text), text, max_length)        # (True == 1, yet "True" != "1")
        if key not in cleaned:
            cleaned[key] = clean_component(text, max_length)
        return cleaned[key]
    for patient_id, patient_records in sorted(by_patient.items()):
        by_study: dict[str, list[dict]] = defaultdict(list)
        for record in patient_records:
            by_study[str(record.get("StudyInstanceUID") or "")].append(record)
        study_dirs = unique_names([
            (study_uid, f"{study_date(rs)}-{clean(rs[0].get('StudyDesc'))}", study_uid)
            for study_uid, rs in by_study.items()])
        for study_uid, study_records in by_study.items():
            series_dirs = unique_names([
                (r["SeriesInstanceUID"],
                 f"{clean(r.get('SeriesNumber'), 16)}-{clean(r.get('SeriesDescription'))}",
                 r["SeriesInstanceUID"])
                for r in study_records])
            for record in study_records:
                uid = record["SeriesInstanceUID"]
                count = as_count(record.get("ImageCount"))
                planned.append(PlannedSeries(
                    uid=uid, collection=collection,
                    path=f"{patient_dirs[patient_id]}/{study_dirs[study_uid]}/{series_dirs[uid]}",
                    record=record, image_count=count or None,
                    file_size=as_count(record.get("FileSize")) or 0))
    return planned


def _unique_patient_dirs(patient_ids: list[str]) -> dict[str, str]:
    """Two IDs that clean to the same folder ('A/B', 'A_B') get -2, -3... in sorted order;
    an ID named like a collection file (MD5SUMS, LICENSE, CITATION, metadata) gets -patient."""
    taken: dict[str, int] = defaultdict(int)
    dirs = {}
    for patient_id in patient_ids:
        base = clean_component(patient_id, 64)
        if COLLECTION_FILE_NAME.match(base):
            base = f"{base}-patient"
        taken[base.casefold()] += 1
        n = taken[base.casefold()]
        dirs[patient_id] = base if n == 1 else f"{base}-{n}"
    return dirs


# Where callers have read them from (manifests.py reads every kind of manifest now).
read_manifest = manifest_files.read_manifest
failed_run_origin = manifest_files.failed_run_origin


def manifests_of(selection: Selection) -> tuple[list[Manifest], list[str]]:
    """The manifests (or failure list) of a selection, read, and their UIDs once each (for
    a source that cannot map IDC's uuids: an s5cmd manifest gets one line saying so)."""
    wanted = wanted_of(selection)
    return wanted.manifests, wanted.uids


def wanted_of(selection: Selection, lookup: Optional[Callable[[], UuidLookup]] = None,
              index_name: str = "IDC's index") -> WantedSeries:
    """The same, with lookup() mapping the IDC uuids of s5cmd manifests to their
    SeriesInstanceUIDs (the uuids it lacks are in unknown_uuids)."""
    paths = selection.manifests or ((selection.retry_failed,) if selection.retry_failed else ())
    return wanted_series(paths, lookup, index_name)


def records_for_uids(api: TciaApi, uids: list[str]) -> tuple[list[dict], list[str]]:
    """getSeries records of these UIDs, in their order, and the UIDs the server does not
    know. getSeriesMetadata (thousands of UIDs per call) says which collections they are in;
    each collection's getSeries (cached) then gives the same records a collection run uses."""
    collections: set[str] = set()
    try:
        for start in range(0, len(uids), 1000):
            for row in api.series_metadata(uids[start:start + 1000]):
                # NBIA's own column is "Project"; the documented form says "Collection".
                name = row.get("Collection") or row.get("Project")
                if name:
                    collections.add(str(name))
    except ApiError as exc:
        log.warning("getSeriesMetadata is unavailable (%s); asking getSeries per series", exc)
    wanted = set(uids)
    found: dict[str, dict] = {}
    for collection in sorted(collections):
        for record in api.series(Collection=collection):
            if record.get("SeriesInstanceUID") in wanted:
                found[record["SeriesInstanceUID"]] = record
    for uid in [u for u in uids if u not in found]:
        for record in api.series(SeriesInstanceUID=uid):
            found[uid] = record
    return [found[u] for u in uids if u in found], [u for u in uids if u not in found]


def records_for_filters(api: TciaApi, selection: Selection) -> list[dict]:
    """One getSeries call per combination of filter values (NBIA takes one value per
    parameter), united by SeriesInstanceUID."""
    filters = selection.filters()
    combinations: list[dict[str, str]] = [{}]
    for parameter, values in filters.items():
        combinations = [{**c, parameter: v} for c in combinations for v in dict.fromkeys(values)]
    base = {"Collection": selection.collection} if selection.collection else {}
    found: dict[str, dict] = {}
    for combination in combinations:
        for record in api.series(**base, **combination):
            found.setdefault(record["SeriesInstanceUID"], record)
    return list(found.values())


def selection_name(selection: Selection, manifests: list[Manifest]) -> str:
    """The archive's name: the collection; a manifest's databasketId or file name; for
    filters the collection plus what was filtered, so that a part never poses as the whole."""
    if selection.retry_name:
        return selection.retry_name
    if selection.retry_failed:
        stem = selection.retry_failed.name
        for ending in (".failed.tcia", ".damaged.tcia", ".tcia"):
            if stem.endswith(ending):
                return stem[:-len(ending)]
        return clean_component(stem, 100)
    if manifests:
        stem = manifests[0].stem
        more = f"-and-{len(manifests) - 1}-more" if len(manifests) > 1 else ""
        return clean_component(stem, 100) + more
    filters = selection.filters()
    if not filters:
        return clean_component(selection.collection, 100)
    described = "_".join(f"{parameter}-{'+'.join(values)}" for parameter, values in filters.items())
    name = f"{selection.collection or 'TCIA'}.{described}"
    if len(name) > 100:
        digest = hashlib.sha1(described.encode()).hexdigest()[:10]
        name = f"{selection.collection or 'TCIA'}.selection-{digest}"
    return clean_component(name, 120)


def plan_records(records: list[dict]) -> list[PlannedSeries]:
    """Folders for series of one or more collections (each collection planned on its own)."""
    return [series for collection, group in by_collection(records)
            for series in plan_collection(collection, group)]


def unnamed_records(records: list[dict]) -> list[PlannedSeries]:
    """plan_records' series without their folders (path ""), for an output whose journal
    says it is finished: naming is most of planning (a finished 200,000-series archive's
    rerun spent a third of its time on it), and a finished output needs no names. Plan.
    name_series() names them if the output turns out not to be finished after all."""
    return [PlannedSeries(uid=r["SeriesInstanceUID"], collection=collection, path="", record=r,
                          image_count=as_count(r.get("ImageCount")) or None,
                          file_size=as_count(r.get("FileSize")) or 0)
            for collection, group in by_collection(records) for r in group]


def by_collection(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """The records once each (by SeriesInstanceUID), grouped by their collection's folder
    name, in order."""
    unique = {}
    for record in records:
        unique.setdefault(record["SeriesInstanceUID"], record)
    if len(unique) < len(records):
        log.warning("the server listed %d series twice; each is downloaded once",
                    len(records) - len(unique))
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in unique.values():
        groups[str(record.get("Collection", "NA"))].append(record)
    return [(clean_component(collection, 100), group)
            for collection, group in sorted(groups.items())]


def shard_of(planned: list[PlannedSeries], shard: Shard) -> list[PlannedSeries]:
    """Part shard.index of a partition balanced by FileSize: largest series first, each to
    the lightest part so far. Every array task computes the same partition on its own."""
    loads = [0] * shard.count
    mine: list[PlannedSeries] = []
    for series in sorted(planned, key=lambda s: (-s.file_size, s.uid)):
        lightest = min(range(shard.count), key=lambda i: (loads[i], i))
        loads[lightest] += max(series.file_size, 1)   # a size-less series still counts
        if lightest == shard.index:
            mine.append(series)
    return mine


def suggest_collections(name: str, known: list[str]) -> list[str]:
    """Close names: case and punctuation differences are the usual mistake."""
    def squash(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.casefold())
    exact = [k for k in known if squash(k) == squash(name)]
    if exact:
        return exact
    by_squash = {squash(k): k for k in known}
    close = difflib.get_close_matches(squash(name), list(by_squash), n=5, cutoff=0.6)
    return [by_squash[c] for c in close]


# -- workers, failures and signals ---------------------------------------------------------


# The settings that say where an output's series come from (--mode and its source's
# provenance, sources.base.SourceEntry), as the journal records them ("made <flag>", their
# names under RECORDED_FLAGS) and a manifest of its series carries them
# (tcia_downloader.<flag>), so that --retry-failed fetches from the same place without
# being told again.
RECORDED_FLAGS = "made flags"
# What a journal recorded before it listed its flags (0.4.0).
FLAGS_RECORDED_UNLISTED = ("api-url", "mode", "idc-endpoint", "idc-index")


def write_failed_manifest(path: Path, uids: list[str], format_name: str, name: str,
                          source: Optional[dict[str, str]] = None, repair: bool = False) -> None:
    """Series as a .tcia manifest, the format TCIA's portal hands out, with header keys of
    our own (other readers skip unknown keys): the output it belongs to (its folder and
    its name, for the manifest may be saved under another name), where its series came
    from, and for damaged series (--verify) that --retry-failed must replace them, not add
    them. downloadServerUrl names TCIA's servlet only when its series came from TCIA."""
    source = source or {}
    servlet = download_servlet(source.get("api-url", ""), source.get("mode", ""))
    ours = {"output": str(path.parent.resolve()), "name": name, "format": format_name,
            **old_format_key(format_name), **source,
            **({"repair": "yes"} if repair else {})}
    lines = [*([f"downloadServerUrl={servlet}"] if servlet else []),
             "includeAnnotation=true", "noOfrRetry=4", f"databasketId={path.name}",
             "manifestVersion=3.0",
             *(f"{FAILED_RUN_KEY}{key}={value}" for key, value in ours.items()
               if value and value.isprintable()),
             "ListOfSeriesToDownload=", *uids]
    write_file_atomically(path, ("\n".join(lines) + "\n").encode())


def old_format_key(format_name: str) -> dict[str, str]:
    """The key 0.4.0 read instead of format (yes: a .tar.xz, no: a folder tree), written
    too while it can say the format, so that such a version puts the series back into the
    right output."""
    known = {"tar.xz": "yes", "dir": "no"}
    return {"compression": known[format_name]} if format_name in known else {}


def recorded_format(origin: dict[str, str]) -> Optional[str]:
    """The format a failure or repair list records: its format key, else 0.4.0's
    compression key, else None (then --format decides)."""
    if origin.get("format"):
        return origin["format"]
    if origin.get("compression") in ("yes", "no"):
        return "tar.xz" if origin["compression"] == "yes" else "dir"
    return None


def download_servlet(api_url: str, mode: str) -> Optional[str]:
    """The NBIA Data Retriever's download servlet of the server the series came from, by
    NBIA's layout (.../nbia-api/services/v4/ -> .../nbia-download/servlet/DownloadServlet);
    None when they came from IDC, or from a server of another layout."""
    if mode not in ("nbia", "auto") or "/nbia-api/" not in api_url:
        return None
    return api_url.split("/nbia-api/", 1)[0] + "/nbia-download/servlet/DownloadServlet"


def without_credentials(url: str) -> str:
    """A URL as it may be written down: no user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def recorded_source(meta: Callable[[str], Optional[str]]) -> dict[str, str]:
    """flag -> value of the source settings a journal recorded (none before 0.4), from its
    meta table's getter."""
    listed = meta(RECORDED_FLAGS)
    flags = listed.split() if listed is not None else FLAGS_RECORDED_UNLISTED
    values = {flag: meta(f"made {flag}") for flag in flags}
    return {flag: value for flag, value in values.items() if value}


def unknown_collection_message(api: TciaApi, name: str) -> str:
    known = api.collections()
    message = f"unknown collection {name!r}"
    suggestions = suggest_collections(name, known)
    if suggestions:
        message += f"; did you mean: {', '.join(suggestions)}?"
    elif known:
        message += "; --list-collections prints the names this server knows"
    if "nlst" in name.casefold():
        message += f". NLST is on its own server: add --api-url {NLST_API_URL}"
    return message


# -- planning a run ------------------------------------------------------------------------


@dataclass
class Plan:
    name: str                          # of the archive (or journal, for a folder tree)
    series: list[PlannedSeries]        # what this run must have in its output
    unknown: list[str]                 # manifest UIDs the server does not know
    file_suffix: str                   # on LICENSE, metadata.csv, MD5SUMS of a part
    left_out: list[str] = field(default_factory=list)  # what the source will not deliver
    notes: list[str] = field(default_factory=list)     # the source's lines on the selection
    # The records of series left unnamed (unnamed_records: the journal said finished);
    # None once they are named.
    unnamed: Optional[list[dict]] = None

    def name_series(self) -> None:
        """Give series left unnamed their folders (the output was not finished after all)."""
        if self.unnamed is not None:
            by_uid = {s.uid: s for s in plan_records(self.unnamed)}
            self.series = [by_uid[s.uid] for s in self.series]
            self.unnamed = None

    @property
    def incomplete(self) -> bool:
        """The output cannot hold all that was asked for: exit 1 even when it is whole."""
        return bool(self.unknown or self.left_out)

    def journal(self, options: Options) -> Path:
        return target_format(options.format).journal_path(options.output, self.name)


def make_plan(source: Source, options: Options) -> Plan:
    """Which series, named how, into which archive: selection, then --update, then --shard."""
    selection = options.selection
    selected = source.records(selection)
    records, unknown, manifests = selected.records, selected.unknown, selected.manifests
    name = selection_name(selection, manifests)
    served = {str(r.get("Collection")) for r in records}
    if selected.name and not selection.retry_failed:
        name = selected.name
    elif not selection.filters() and not manifests and len(served) == 1:
        name = clean_component(served.pop(), 100)      # the server's spelling of the name
    unnamed = None
    if selected.planned is not None:
        planned = selected.planned
    elif not (options.update or options.shard or options.repair) and says_finished(
            target_format(options.format).journal_path(options.output, name)):
        planned = unnamed_records(records)
        unnamed = [s.record for s in planned]        # once each: named later without a warning
    else:
        planned = plan_records(records)
    base = name
    if options.update:
        planned, name = updates_only(planned, options, name)
    if options.shard:
        everything = planned
        planned = shard_of(planned, options.shard)
        name += options.shard.suffix
        log.info("shard %d of %d (0-based): %d of %d series, %s of %s", options.shard.index,
                 options.shard.count, len(planned), len(everything),
                 human_bytes(sum(s.file_size for s in planned)),
                 human_bytes(sum(s.file_size for s in everything)))
    collections = {s.collection for s in planned} or {base}
    suffix = name[len(base):] if collections == {base} else f".{name}"
    return Plan(name, planned, unknown, suffix, selected.left_out, selected.notes, unnamed)


def updates_only(planned: list[PlannedSeries], options: Options,
                 name: str) -> tuple[list[PlannedSeries], str]:
    """--update: the series no finished archive of this name (whole, shards, earlier
    updates) holds yet, and the name of today's update archive."""
    ending = f"{target_format(options.format).suffix}.journal"
    bases = [p for p in (options.output / f"{name}{ending}",
                         *options.output.glob(f"{name}.shard-*{ending}")) if p.exists()]
    if not bases or not all(read_journal(p)[1] for p in bases):
        raise FatalRunError(f"--update needs a finished {name}{ending[:-8] or ''} in "
                            f"{options.output}: run without --update first", EXIT_USAGE)
    had: set[str] = set()
    for path in [*bases, *options.output.glob(f"{name}.update-*{ending}")]:
        had |= set(read_journal(path)[0])
    listed = {s.uid for s in planned}
    vanished = had - listed
    if vanished:
        log.warning("%d series in the archives are no longer listed by the server (kept): %s",
                    len(vanished), ", ".join(sorted(vanished)[:10]))
    new = [s for s in planned if s.uid not in had]
    log.info("--update: %d series already archived, %d new", len(had & listed), len(new))
    day = datetime.now().strftime("%Y-%m-%d")
    update_name, n = f"{name}.update-{day}", 1
    while read_journal(options.output / f"{update_name}{ending}")[1]:
        n += 1
        update_name = f"{name}.update-{day}-{n}"
    return new, update_name


# -- before anything is written: space -----------------------------------------------------


def space_needs(todo: list[PlannedSeries], options: Options) -> list[SpaceNeed]:
    """What the rest of the run will put on each filesystem: the output on --output, what
    the workers hold on --temp_dir; one need when both are on one filesystem."""
    if not todo:
        return []
    parallel = min(options.workers, len(todo))
    output, scratch = target_format(options.format).space_needs(
        todo, options.output, options.temp_dir, parallel, options.compression_level)
    if filesystem_of(options.output) == filesystem_of(options.temp_dir):
        return [SpaceNeed("--output and --temp_dir", options.output,
                          output.bytes + scratch.bytes, output.inodes + scratch.inodes)]
    return [output, scratch]


def temp_limit(todo: list[PlannedSeries], options: Options) -> tuple[int, str]:
    """The most scratch the run's series in flight may hold together, and where that figure
    comes from: --temp-limit, else half the free space of --temp_dir measured now (half of
    what the output's estimate leaves, when both share a filesystem), never less than what
    --workers series in flight need (the space check above covers that much)."""
    if options.temp_limit is not None:
        return options.temp_limit, "--temp-limit"
    target = target_format(options.format)
    parallel = min(options.workers, len(todo)) or 1
    largest = max((s.file_size for s in todo), default=0)
    floor = parallel * target.scratch_need(largest)
    free = free_bytes(options.temp_dir)
    if filesystem_of(options.output) == filesystem_of(options.temp_dir) and todo:
        output, _ = target.space_needs(todo, options.output, options.temp_dir, parallel,
                                       options.compression_level)
        spare = max(0, free - output.bytes) // 2
        why = "half the free space of --temp_dir beside the output's estimate"
    else:
        spare, why = free // 2, "half the free space of --temp_dir"
    if spare < floor:
        return floor, f"what {parallel} series in flight need"
    return spare, why


def space_shortfalls(needs: list[SpaceNeed]) -> list[tuple[str, bool]]:
    """One line per need (what it needs, what is free, what is missing), and whether
    something is missing."""
    lines = []
    for need in needs:
        stats = os.statvfs(existing_ancestor(need.folder))
        free = stats.f_bavail * stats.f_frsize
        inodes = stats.f_favail if stats.f_files else None     # some filesystems don't say
        line = (f"{need.what} {need.folder}: needs about {human_bytes(need.bytes)} and "
                f"{need.inodes} inodes; free: {human_bytes(free)}"
                + (f" and {inodes} inodes" if inodes is not None else ""))
        missing = []
        if free < need.bytes:
            missing.append(f"{human_bytes(need.bytes - free)} missing")
        if inodes is not None and inodes < need.inodes:
            missing.append(f"{need.inodes - inodes} inodes missing")
        lines.append((line + (": " + ", ".join(missing) if missing else ": enough"),
                      bool(missing)))
    return lines


DRY_RUN_COLUMNS = ["PatientID", "StudyDate", "Modality", "SeriesDescription",
                   "SeriesInstanceUID", "Files", "Bytes", "Source", "Status", "Folder"]


def dry_run_rows(plan: "Plan", todo: list[PlannedSeries], mode: str) -> Iterator[str]:
    """--dry-run's listing for stdout, tab-separated (a header, then a row per series of the
    plan, in its order): what each series is, where it would go, and whether it is to be
    downloaded or already in the output. A server's value never breaks a row: tabs, line
    breaks and other control characters become spaces."""
    def cell(value: object) -> str:
        return re.sub(r"[\x00-\x1f\x7f]+", " ", str(value if value is not None else ""))
    pending = {series.uid for series in todo}
    yield "\t".join(DRY_RUN_COLUMNS)
    for series in plan.series:
        record = series.record
        study_date = series.path.split("/")[1][:10] if series.path.count("/") >= 1 else ""
        yield "\t".join(cell(value) for value in (
            record.get("PatientID"), study_date, record.get("Modality"),
            record.get("SeriesDescription"), series.uid, series.image_count,
            series.file_size, record.get("Source") or mode,
            "to download" if series.uid in pending else "present", series.label))


def describe_plan(plan: Plan, todo: list[PlannedSeries], options: Options) -> list[str]:
    series = plan.series
    patients = {(s.collection, s.record.get("PatientID")) for s in series}
    studies = {s.record.get("StudyInstanceUID") for s in series}
    total = sum(s.file_size for s in series)
    lines = [f"{plan.name}: {len(series)} series of {len({s.collection for s in series})} "
             f"collection(s), {len(patients)} patients, {len(studies)} studies, "
             f"{human_bytes(total)} of DICOM ({sum(s.image_count or 0 for s in series)} files)",
             f"  already in the output: {len(series) - len(todo)} series; to download: "
             f"{len(todo)} series, {human_bytes(sum(s.file_size for s in todo))}"]
    estimate = target_format(options.format).estimate_line(series, options.compression_level)
    if estimate:
        lines.append(estimate)
    lines += plan.notes
    if plan.unknown:
        lines.append(f"  unknown to the server: {len(plan.unknown)} series "
                     f"({', '.join(plan.unknown[:5])}{', ...' if len(plan.unknown) > 5 else ''})")
    return lines
