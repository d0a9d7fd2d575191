"""--mode aspera: TCIA's IBM Aspera Faspex packages (slides, NIfTI, tables) through IBM's
ascli, received part by part within --temp-limit, every file checked against the package's
.sums, packed under <name>/ with the package's own paths. Its registry entry, ASPERA (flags,
settings, opening, provenance, secrets), and AsperaSource."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TYPE_CHECKING

from ..errors import (EXIT_USAGE, FatalRunError, Interrupted, JournalUnusable,
                      SeriesUnavailable, TransientError, UsageError)
from ..formats import target_format
from ..journal import read_snapshot
from ..logs import human_bytes, log, printable
from ..plan import (PlannedSeries, clean_component, manifests_of, recorded_format,
                    selection_name)
from ..net import retry_policy
from ..settings import CHUNK_SIZE, DEFAULT_WEBSITE_API, FILTER_FLAGS
from ..storage import free_bytes, raise_if_disk_full
from .ascli import Ascli, find_ascli
from .aspera_package import (ASCP_OWN, Listing, PackageFile, PackageLink, Part, Sums,
                             add_items, build_tree, describe_folder, parse_link,
                             plan_parts, read_sums, relative_to, scratch_need)
from .base import Member, Selected, SourceEntry, VerifiedSeries
from .tcia_website import Download, WebsiteApi, check_website_api

if TYPE_CHECKING:
    from ..journal import JournalSnapshot
    from ..settings import NetworkSettings, Selection
    from .base import MemberSink, Packing, Served

NAME = "aspera"
HELP = "TCIA's IBM Aspera Faspex packages, e.g. pathology slides: --aspera-url; needs IBM's ascli"
# One part received while the one before it is packed: each FASP session may use the whole
# link, so more sessions add little, and each worker's part must fit the --temp-limit share.
DEFAULT_WORKERS = 2
LISTING_ATTEMPTS = 3              # of one browse or .sums receive, before the run stops
BROWSES_AT_ONCE = 4               # folder listings in flight when a recursive one failed
SUMS_LIMIT = 256 << 20            # a .sums of a million files is ~80 MB
LISTING_TIME_FLOOR = 5.0          # seconds a listing may take at least, whatever the flags


# -- the registry entry: flags, settings, opening, provenance -----------------------------


@dataclass(frozen=True)
class AsperaSettings:
    links: tuple[PackageLink, ...] = field(repr=False)
    name: Optional[str]
    ascli: Optional[str]
    temp_limit: Optional[int]          # bytes; None: half the free space at the start
    temp_dir: Path
    output: Path
    output_format: str                 # a name of formats.FORMATS: where the journal is
    workers: int
    # --collection NAME: its Faspex packages, as TCIA's website API lists its downloads
    # (the links are found when the source opens; links is empty until then).
    collection: Optional[str] = None
    website_api: str = DEFAULT_WEBSITE_API


def add_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--aspera-url", action="append", default=[], metavar="LINK",
                       help="--mode aspera: a Faspex public link as copied from a collection's "
                            "page (https://faspex.cancerimagingarchive.net/.../package?"
                            "context=...; repeatable); implies --mode aspera")
    group.add_argument("--name", metavar="NAME",
                       help="--mode aspera: the output's name (default: the stem of the "
                            "package's root .sums, else faspex-<package id>)")
    group.add_argument("--ascli", metavar="PATH",
                       help="--mode aspera: IBM's ascli to run (default: ascli on PATH)")
    group.add_argument("--website-api", metavar="URL",
                       default=os.environ.get("TCIA_WEBSITE_API", DEFAULT_WEBSITE_API),
                       help="TCIA's website API v1, where --list-downloads and --mode aspera "
                            "--collection find a collection's downloads (default: "
                            f"$TCIA_WEBSITE_API or {DEFAULT_WEBSITE_API})")


def settings(args: argparse.Namespace, origin: Mapping[str, str]) -> AsperaSettings:
    """The aspera flags checked (UsageError: one line). The link is never recorded (its
    passcode is a secret), so a --retry-failed needs --aspera-url again; a collection's
    packages are found again from the collection and the website API it recorded."""
    collection = None if args.aspera_url else \
        (args.collection or origin.get("aspera-collection") or None)
    if not args.aspera_url and not collection:
        raise UsageError("--mode aspera needs --aspera-url LINK (the Faspex link of the "
                         "collection's page) or --collection NAME" +
                         (" (links are not recorded in manifests: give it again)"
                          if origin else ""))
    if collection and any(getattr(args, flag[2:].replace("-", "_")) for flag in FILTER_FLAGS):
        raise UsageError("--mode aspera --collection fetches whole packages: filters such as "
                         "--patient do not apply")
    links = tuple(parse_link(url) for url in args.aspera_url)
    if len({link.package_id for link in links}) < len(links):
        raise UsageError("--aspera-url: the same package twice")
    name = args.name
    if name is not None and (not name or clean_component(name, 100) != name):
        raise UsageError(f"--name {printable(name)!r}: use letters, digits and ._+- only")
    if args.update:
        raise UsageError("--update is not available for --mode aspera; rerun the same "
                         "command, which fetches what is missing")
    in_job_array = os.environ.get("SLURM_ARRAY_TASK_ID") is not None
    if (args.shard or "").lower() != "none" and (args.shard or in_job_array):
        raise UsageError("--mode aspera writes one archive of a package, not shards: pass "
                         "--shard none (in a slurm job array too)")
    # Where the output goes, as the command line resolves it (cli's asked_format; a
    # --retry-failed goes back into the output its manifest names).
    output = Path(origin.get("output") or args.output).expanduser()
    output_format = recorded_format(origin) or args.format or \
        ("tar.xz" if args.compression else "dir")
    website_api = origin.get("website-api") if collection and not args.collection and \
        origin.get("website-api") else args.website_api
    check_website_api(website_api)
    return AsperaSettings(links=links, name=name, ascli=args.ascli,
                          temp_limit=args.temp_limit,
                          temp_dir=Path(args.temp_dir).expanduser() if args.temp_dir else output,
                          output=output, output_format=output_format, workers=args.workers,
                          collection=collection, website_api=website_api)


def open_source(settings: AsperaSettings, network: "NetworkSettings",
                stop: threading.Event) -> "AsperaSource":
    """ascli found and run once (--version) for each link; the temp limit fixed (half the
    free space of --temp_dir, measured now, unless --temp-limit). Of the run's network
    settings ascli heeds the stall window only (it has its own proxy and TLS settings)."""
    executable = find_ascli(settings.ascli)
    left_out: list[str] = []
    if settings.collection:
        settings, left_out = collection_packages(settings, network, stop)
    limit = settings.temp_limit
    if limit is None:
        settings.temp_dir.mkdir(parents=True, exist_ok=True)
        limit = free_bytes(settings.temp_dir) // 2
        log.info("--temp-limit: %s, half the free space of %s", human_bytes(limit),
                 settings.temp_dir)
    clients = [Ascli(executable, link.url, network.stall_timeout, stop)
               for link in settings.links]
    source = AsperaSource(settings, clients, limit, network.stall_timeout, stop)
    source.downloads_left_out = left_out
    try:
        version = clients[0].check_version()
        for client in clients[1:]:
            client.version = version
    except BaseException:
        source.close()
        raise
    return source


def collection_packages(settings: AsperaSettings, network: "NetworkSettings",
                        stop: threading.Event) -> tuple[AsperaSettings, list[str]]:
    """--collection NAME: the settings with the links of the collection's Faspex packages
    (its downloads whose link is a Faspex public link), named after the collection unless
    --name; and a line for each download left out. A link is never logged (its passcode)."""
    api = WebsiteApi(settings.website_api, network.transport(), network.timeout,
                     retry_policy(network), stop)
    try:
        title, downloads = api.downloads(str(settings.collection))
    finally:
        api.close()
    links: list[PackageLink] = []
    left_out: list[str] = []
    for download in downloads:
        link, why = package_link(download)
        if link is None:
            left_out.append(f"{title}: download {download.title or download.id!r} "
                            f"({download.type or 'no type'}, {download.size or 'no size'}): "
                            f"{why}; not fetched by --mode aspera")
        elif link.package_id not in {known.package_id for known in links}:
            links.append(link)
    if not links:
        raise FatalRunError(f"--collection {printable(title)}: none of its {len(downloads)} "
                            "downloads on TCIA's website is an Aspera Faspex package "
                            "(--list-downloads lists them)", EXIT_USAGE)
    log.info("%s: %d Aspera Faspex package(s) of its %d downloads on TCIA's website",
             printable(title), len(links), len(downloads))
    name = settings.name or clean_component(title, 100)
    return dataclasses.replace(settings, links=tuple(links), name=name,
                               collection=title), left_out


def package_link(download: Download) -> tuple[Optional[PackageLink], str]:
    """The download's package link, or why it has none that --mode aspera can fetch."""
    if not download.faspex:
        return None, "not an Aspera Faspex package"
    try:
        return parse_link(download.link), ""
    except UsageError:
        return None, "its Faspex link is not a public link naming a package"


def provenance(settings: AsperaSettings) -> dict[str, str]:
    """What the journal and a manifest of the output may record: the packages' ids and hosts,
    never the links (their passcodes); for --collection, the collection and the website
    API, which find the links again."""
    if settings.collection:
        return {"aspera-collection": settings.collection, "website-api": settings.website_api}
    return {"aspera-packages": " ".join(f"{link.host}/{link.package_id}"
                                        for link in settings.links)}


def link_secrets(settings: AsperaSettings) -> list[str]:
    return [secret for link in settings.links for secret in link.secrets]


# -- one package: its listing, names, files ---------------------------------------------


@dataclass
class Package:
    """A package as listed: the files to receive, what is left out and why."""
    link: PackageLink
    ascli: Ascli
    collection: str = ""
    files: list[PackageFile] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)     # (path, why)
    sums_names: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)

    def default_name(self) -> str:
        if len(self.sums_names) == 1:
            return clean_component(self.sums_names[0][:-len(".sums")], 100)
        return f"faspex-{clean_component(self.link.package_id, 60)}"


def with_attempts(what: str, action: Callable[[], object], stop: threading.Event) -> object:
    """A listing step, tried LISTING_ATTEMPTS times; what fails for good stops the run."""
    for attempt in range(1, LISTING_ATTEMPTS + 1):
        try:
            return action()
        except TransientError as exc:
            if attempt == LISTING_ATTEMPTS:
                raise FatalRunError(f"{what} failed {attempt} times ({exc}); rerun later")
            log.warning("%s failed (%s); trying again", what, exc)
            if stop.wait(2.0 * attempt):
                raise Interrupted() from None
    raise AssertionError("unreachable")


def list_package(package: Package, scratch: Path, time_limit: float,
                 stop: threading.Event) -> None:
    """The package's files from its listing and its root .sums: the root first (for the
    .sums), then one recursive listing; when that fails (TCIA's server: below the first
    level, or a timeout on a large package), folder by folder, with a leading slash."""
    ascli = package.ascli
    listing = Listing()
    root = with_attempts(f"the listing of package {package.link.package_id}",
                         lambda: ascli.browse("/", False, time_limit), stop)
    add_items(listing, root, "")                                # type: ignore[arg-type]
    package.sums_names = sorted(p for p, e in listing.files().items()
                                if "/" not in p and p.endswith(".sums"))
    if not package.sums_names:
        raise FatalRunError(f"package {package.link.package_id} has no .sums at its root: "
                            "there is nothing to verify its files against", EXIT_USAGE)
    try:
        complete = Listing()
        add_items(complete, ascli.browse("/", True, time_limit), "")
        listing = complete
    except TransientError as exc:
        log.info("package %s: the recursive listing failed (%s); listing folder by folder",
                 package.link.package_id, exc)
        walk_folders(package, listing, time_limit, stop)
    sums = read_root_sums(package, listing, scratch, stop)
    choose_files(package, listing, sums)


def walk_folders(package: Package, listing: Listing, time_limit: float,
                 stop: threading.Event) -> None:
    """Every folder below the root, level by level, a few at once."""
    frontier = listing.folders()

    def browse(folder: str) -> list[str]:
        items = with_attempts(f"the listing of /{folder}",
                              lambda: package.ascli.browse("/" + folder, False, time_limit),
                              stop)
        return add_items(listing, items, folder)                # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(BROWSES_AT_ONCE) as pool:
        while frontier:
            frontier = [found for folders in pool.map(browse, frontier) for found in folders]


def read_root_sums(package: Package, listing: Listing, scratch: Path,
                   stop: threading.Event) -> tuple[Sums, dict[str, str]]:
    """The root .sums files, received into scratch and read; and each one's own MD5."""
    folder = Path(tempfile.mkdtemp(prefix=f".tcia_downloader-sums-{package.link.package_id}-",
                                   dir=scratch))
    try:
        with_attempts(f"the receive of {', '.join(package.sums_names)}",
                      lambda: package.ascli.receive(folder, ["/" + n for n in package.sums_names],
                                                    lambda n: None), stop)
        sums, own = Sums(), {}
        for name in package.sums_names:
            path = folder / name
            if not path.is_file() or path.is_symlink() or \
                    path.stat().st_size != listing.entries[name].size:
                raise FatalRunError(f"{name} did not arrive whole (its listing says "
                                    f"{listing.entries[name].size} bytes); rerun")
            if path.stat().st_size > SUMS_LIMIT:
                raise FatalRunError(f"{name} is larger than {human_bytes(SUMS_LIMIT)}: not "
                                    "read", EXIT_USAGE)
            data = path.read_bytes()
            own[name] = hashlib.md5(data).hexdigest()
            read_sums(data.decode("utf-8", "surrogateescape"), sums)
        if sums.bad_lines:
            log.warning("%s: %d line(s) are not '<md5> <path>'; ignored",
                        ", ".join(package.sums_names), sums.bad_lines)
        return sums, own
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def choose_files(package: Package, listing: Listing, found: tuple[Sums, dict[str, str]]) -> None:
    """Files both listed and in the .sums are received; the root .sums files too (checked
    against the copy the plan was made from); the rest is left out, with why."""
    sums, own = found
    package.left_out += [(path, why) for path, why in listing.refused + sums.refused]
    outputs: set[str] = set()
    for path, entry in sorted(listing.files().items()):
        md5 = own.get(path) or sums.md5.get(path)
        if md5 is None:
            package.left_out.append((path, "not in the package's .sums: nothing to verify it "
                                           "against"))
            continue
        file = PackageFile(path, entry.size, md5)
        if file.output.casefold() in outputs:
            package.left_out.append((path, f"its name in the output, {file.output}, is "
                                           "another file's"))
            continue
        outputs.add(file.output.casefold())
        package.files.append(file)
    package.left_out += [(path, "in the package's .sums, but not in the package")
                         for path in sorted(set(sums.md5) - set(listing.files()))]
    package.folders = listing.folders()


# -- receive slots: scratch within --temp-limit ------------------------------------------


@dataclass
class Holding:
    owner: threading.Thread
    uid: str
    folder: Path             # the part's receive folder (kept between its attempts)
    scratch: Path            # the attempt's scratch file: gone once the attempt is over
    done: bool = False       # the part verified and packed: free once scratch is gone


class ReceiveSlots:
    """At most `count` parts hold scratch at once, each at most a budget of bytes. A worker
    keeps its slot, and the part's receive folder (ascp resumes from it), between the
    attempts of one part; the slot is free again once that part is packed and committed (its
    scratch file is gone), or when its worker moves on to another part or has ended. No
    other thread tells the source when a commit is over: a waiting worker looks."""

    POLL = 0.1

    def __init__(self, count: int):
        self._slots: list[Optional[Holding]] = [None] * count
        self._lock = threading.Lock()

    def acquire(self, uid: str, folder: Path, scratch: Path, stop: threading.Event) -> Holding:
        me = threading.current_thread()
        while True:
            with self._lock:
                for number, holding in enumerate(self._slots):
                    if holding is not None and holding.owner is me:
                        return self._take(number, uid, folder, scratch)
                for number, holding in enumerate(self._slots):
                    if holding is None or holding_free(holding):
                        return self._take(number, uid, folder, scratch)
            if stop.wait(self.POLL):
                raise Interrupted()

    def _take(self, number: int, uid: str, folder: Path, scratch: Path) -> Holding:
        before = self._slots[number]
        if before is not None and before.uid != uid:
            shutil.rmtree(before.folder, ignore_errors=True)    # a part given up: its bytes
        holding = Holding(threading.current_thread(), uid, folder, scratch)
        self._slots[number] = holding
        return holding


def holding_free(holding: Holding) -> bool:
    return not holding.owner.is_alive() or (holding.done and not holding.scratch.exists())


# -- the source ----------------------------------------------------------------------------


class AsperaSource:
    """Faspex packages as a source: a record per part, a part received by ascli into scratch,
    checked file by file against the .sums, then packed (each file deleted once packed)."""

    name = NAME
    scratch_suffix = ".aspera"

    def __init__(self, settings: AsperaSettings, clients: list[Ascli], temp_limit: int,
                 stall_timeout: float, stop: threading.Event):
        self.settings = settings
        self.temp_limit = temp_limit
        self.stall_timeout = stall_timeout
        self.packages = [Package(link, client) for link, client in
                         zip(settings.links, clients)]
        self._stop = stop
        self._parts: dict[str, tuple[Package, Part]] = {}
        self._slots = ReceiveSlots(1)
        self.budget = temp_limit
        # --collection: its downloads that are no Faspex package, one line each. Not the
        # selection's left_out (which makes a run incomplete, exit 1): --mode aspera was not
        # asked for them, and no rerun could fetch them.
        self.downloads_left_out: list[str] = []

    def describe(self) -> str:
        ascli = self.packages[0].ascli
        packages = ", ".join(f"{p.link.package_id}" for p in self.packages)
        return (f"IBM Aspera Faspex at {self.packages[0].link.host} (package "
                f"{packages}) via ascli {ascli.version} ({ascli.executable})")

    def collections(self) -> list[str]:
        raise FatalRunError("--list-collections is not available for --mode aspera: the "
                            "links come from each collection's page", EXIT_USAGE)

    def secrets(self) -> list[str]:
        return link_secrets(self.settings)

    def reach(self, series: PlannedSeries) -> None:
        """--dry-run: the listing has asked the server already."""

    # -- the plan -----------------------------------------------------------------------

    def records(self, selection: "Selection") -> Selected:
        scratch = self.settings.temp_dir
        scratch.mkdir(parents=True, exist_ok=True)
        time_limit = max(self.stall_timeout, LISTING_TIME_FLOOR)
        for package in self.packages:
            list_package(package, scratch, time_limit, self._stop)
        self._name_collections()
        name = self._output_name(selection)
        journal = target_format(self.settings.output_format).journal_path(
            self.settings.output, name)
        committed = committed_streams(journal)
        self._size_parts([f for p in self.packages for f in p.files])
        planned = []
        for package in self.packages:
            planned += self._plan_package(package, committed)
        manifests, uids = manifests_of(selection) if selection.retry_failed or \
            selection.manifests else ([], [])
        unknown: list[str] = []
        if uids:
            wanted = set(uids)
            unknown = [uid for uid in uids if uid not in {s.uid for s in planned}]
            planned = [s for s in planned if s.uid in wanted]
        left_out = [f"{package.collection}/{path}: {why}; not received"
                    for package in self.packages for path, why in package.left_out]
        self._log_plan(planned, left_out)
        return Selected([s.record for s in planned], unknown, manifests,
                        name=None if selection.retry_failed else name, planned=planned,
                        left_out=left_out)

    def _name_collections(self) -> None:
        """One package: the output's name; several, or a --collection's: each its default
        name, made unique (each package under its own folder)."""
        if len(self.packages) == 1 and not self.settings.collection:
            package = self.packages[0]
            package.collection = self.settings.name or package.default_name()
            return
        taken: set[str] = set()
        for package in self.packages:
            base = package.default_name()
            candidate, n = base, 1
            while candidate.casefold() in taken:
                n += 1
                candidate = f"{base}-{n}"
            taken.add(candidate.casefold())
            package.collection = candidate

    def _output_name(self, selection: "Selection") -> str:
        if selection.retry_failed:
            return selection_name(selection, [])
        if self.settings.name or len(self.packages) == 1:
            return self.packages[0].collection if not self.settings.name else self.settings.name
        return f"{self.packages[0].collection}-and-{len(self.packages) - 1}-more"

    def _size_parts(self, files: list[PackageFile]) -> None:
        """How many parts may hold scratch at once, and how large each may be: --workers
        parts of --temp-limit / --workers, fewer and larger when the largest file needs it.
        A file that cannot fit --temp-limit at all stops the run here: nothing is received."""
        largest = max(files, key=lambda f: f.size, default=None)
        need = scratch_need([largest]) if largest else 0
        if need > self.temp_limit:
            package = next(p for p in self.packages if largest in p.files)
            raise FatalRunError(f"{package.collection}/{largest.path} is "
                                f"{human_bytes(largest.size)}: more than --temp-limit "
                                f"{human_bytes(self.temp_limit)} allows (the file and its "
                                "packing); raise --temp-limit (free space in --temp_dir)",
                                EXIT_USAGE)
        slots = max(1, min(self.settings.workers, self.temp_limit // max(need, 1)))
        self._slots = ReceiveSlots(slots)
        self.budget = self.temp_limit // slots
        if largest is not None:
            log.info("largest file: %s (%s); parts of at most %s, %d at a time, within "
                     "--temp-limit %s", largest.path, human_bytes(largest.size),
                     human_bytes(self.budget), slots, human_bytes(self.temp_limit))

    def _plan_package(self, package: Package,
                      committed: "Optional[JournalSnapshot]") -> list[PlannedSeries]:
        """The package's committed parts (as the journal has them), then parts of the files
        not yet in the output."""
        done: list[PlannedSeries] = []
        in_output: set[str] = set()
        by_output = {f.output: f for f in package.files}
        for stream in committed.streams if committed else []:
            record = stream.record
            if record.get("Collection") != package.collection or \
                    record.get("FaspexPackage") != package.link.package_id:
                continue
            folder = str(record.get("PackageFolder") or "/").lstrip("/")
            names = [relative_to(n, package.collection)
                     for n in committed.files.get(stream.uid, {})]    # type: ignore[union-attr]
            in_output.update(names)
            files = [by_output[n] for n in names if n in by_output]
            items = sorted({relative_to(f.path, folder).split("/")[0] for f in files})
            self._parts[stream.uid] = (package, Part(folder, items, files))
            done.append(planned_series(stream.uid, package, folder, record))
        fresh = [f for f in package.files if f.output not in in_output]
        tree = build_tree(fresh, [p for p, _ in package.left_out] +
                          [f.path for f in package.files if f.output in in_output],
                          package.folders)
        parts = []
        for part in plan_parts(tree, self.budget):
            uid = part.uid(package.link.package_id)
            self._parts[uid] = (package, part)
            record = part_record(uid, package, part)
            parts.append(planned_series(uid, package, part.folder, record))
        return done + parts

    def _log_plan(self, planned: list[PlannedSeries], left_out: list[str]) -> None:
        for line in self.downloads_left_out:
            log.info("%s", printable(line))
        for package in self.packages:
            total = sum(f.size for f in package.files)
            log.info("package %s (%s): %d files, %s, in %d folders", package.link.package_id,
                     package.collection, len(package.files), human_bytes(total),
                     len(package.folders))
        for line in left_out[:20]:
            log.warning("%s", printable(line))
        if len(left_out) > 20:
            log.warning("... and %d more files not received (all in the debug log)",
                        len(left_out) - 20)
        for line in left_out[20:]:
            log.debug("%s", printable(line))
        for series in planned:
            package, part = self._parts[series.uid]
            log.debug("part %s: %s, %d files, %s: %s", series.uid,
                      describe_folder(part.folder), len(part.files), human_bytes(part.bytes),
                      ", ".join(printable(item) for item in part.items)[:1000])

    # -- one part -----------------------------------------------------------------------

    def fetch(self, series: PlannedSeries, scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, object]":
        found = self._parts.get(series.uid)
        if found is None or not found[1].files:
            raise SeriesUnavailable("its files are no longer in the package as listed now")
        package, part = found
        folder = scratch.parent / f"receive-{series.uid}"
        holding = self._slots.acquire(series.uid, folder, scratch, stop)
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            package.ascli.receive(folder, part.remote_paths(), count)
            problems = check_received(part, folder)
        except OSError as exc:
            raise_if_disk_full(exc, folder)
            raise
        if problems:
            for problem in problems:
                log.debug("%s: %s", series.label, printable(problem))
            raise TransientError(f"{len(problems)} problem(s) with the files received, e.g. "
                                 f"{printable(problems[0])}; received again (ascp resumes "
                                 "what it can)")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)                        # the packed stream goes into it (formats.tarxz)
        verified, prepared = pack(lambda sink: pack_part(part, folder, scratch, sink, stop))
        shutil.rmtree(folder, ignore_errors=True)
        holding.done = True
        return verified, prepared

    def report_lines(self, done: Sequence["Served"]) -> list[str]:
        """Each package: its files, and those left out (named in the log above)."""
        lines = [f"  package {package.link.package_id} ({package.collection}): "
                 f"{len(package.files)} files to receive, {len(package.left_out)} left out"
                 for package in self.packages]
        if self.downloads_left_out:
            lines.append(f"  {len(self.downloads_left_out)} download(s) of the collection "
                         "are no Aspera Faspex package, not fetched (listed above; "
                         "--list-downloads shows their links)")
        return lines

    def close(self) -> None:
        for package in self.packages:
            package.ascli.close()


def planned_series(uid: str, package: Package, folder: str, record: dict) -> PlannedSeries:
    return PlannedSeries(uid=uid, collection=package.collection, path=folder, record=record,
                         image_count=int(record.get("ImageCount") or 0) or None,
                         file_size=int(record.get("FileSize") or 0))


def part_record(uid: str, package: Package, part: Part) -> dict:
    """The part's row of the journal and of metadata.csv (no secret: the package's id, not
    its link)."""
    return {"SeriesInstanceUID": uid, "Collection": package.collection,
            "SeriesDescription": f"{describe_folder(part.folder)}: {len(part.files)} file(s)",
            "ImageCount": len(part.files), "FileSize": part.bytes, "Source": NAME,
            "FaspexPackage": package.link.package_id,
            "PackageFolder": "/" + part.folder}


def committed_streams(path: Path) -> "Optional[JournalSnapshot]":
    """The output's journal, read-only, with its files: the parts already committed."""
    if not path.exists():
        return None
    try:
        return read_snapshot(path, files=True)
    except JournalUnusable as exc:
        raise FatalRunError(f"the journal {path} is unusable ({exc}); move it away to start "
                            "over", EXIT_USAGE) from None


# -- a part received: checked, then packed -------------------------------------------------


def check_received(part: Part, folder: Path) -> list[str]:
    """Every file of the part, whole and with its .sums MD5; nothing else but ascp's own
    unfinished files (.partial, .aspera-ckpt: kept, ascp resumes them). A file that does
    not match, and anything that is no file of the part, is deleted: received again."""
    expected = {part.received_at(f): f for f in part.files}
    problems, seen = [], set()
    for root, folders, names in os.walk(folder):
        for name in folders + names:
            local = Path(root, name)
            relative = str(local.relative_to(folder))
            if local.is_symlink() or not (local.is_dir() or local.is_file()):
                problems.append(f"{relative}: not a regular file; deleted")
                local.unlink()
            elif local.is_file() and relative not in expected:
                if name.endswith(ASCP_OWN):
                    problems.append(f"{relative}: an unfinished file of ascp")
                else:
                    problems.append(f"{relative}: not a file of the package's .sums; deleted")
                    local.unlink()
        folders[:] = [f for f in folders if Path(root, f).is_dir() and
                      not Path(root, f).is_symlink()]
    for relative, file in sorted(expected.items()):
        local = folder / relative
        if not local.is_file() or local.is_symlink():
            problems.append(f"{file.path}: missing")
            continue
        seen.add(relative)
        size = local.stat().st_size
        if size != file.size:
            problems.append(f"{file.path}: {size} bytes, its listing says {file.size}; "
                            "deleted")
            local.unlink()
        elif md5_of_file(local) != file.md5:
            problems.append(f"{file.path}: its MD5 is not the .sums'; deleted")
            local.unlink()
    return problems


def md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb", opener=no_follow) as handle:
        for chunk in iter(lambda: handle.read(4 * CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def no_follow(name: str, flags: int) -> int:
    return os.open(name, flags | getattr(os, "O_NOFOLLOW", 0))


def pack_part(part: Part, folder: Path, scratch: Path, sink: "MemberSink",
              stop: threading.Event) -> VerifiedSeries:
    """The part's files into the sink under their paths below the part's folder, in name
    order, each hashed again as it goes in and deleted once in, so that scratch holds the
    part once (received, or packed), never twice."""
    members = []
    for file in sorted(part.files, key=part.member):
        if stop.is_set():
            raise Interrupted()
        local = folder / part.received_at(file)
        digest = hashlib.md5()
        sink.add(part.member(file), file.size, hashed_chunks(local, digest, stop))
        if digest.hexdigest() != file.md5:
            raise TransientError(f"{file.path} changed in scratch after it was checked")
        local.unlink()
        members.append(Member(file.path, part.member(file), file.size, file.md5))
    return VerifiedSeries(scratch, members, None, [])


def hashed_chunks(path: Path, digest: "hashlib._Hash",
                  stop: threading.Event) -> Iterator[bytes]:
    with open(path, "rb", opener=no_follow) as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            if stop.is_set():
                raise Interrupted()
            digest.update(chunk)
            yield chunk


ASPERA: SourceEntry[AsperaSettings] = SourceEntry(
    name=NAME, help=HELP, title="Aspera (TCIA's Faspex packages)", add_flags=add_flags,
    settings=settings, open=open_source, provenance=provenance, secrets=link_secrets,
    workers=DEFAULT_WORKERS, selects="aspera_url", bounds_own_scratch=True)
