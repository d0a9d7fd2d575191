"""What a run is asked to do (Selection, NetworkSettings, Options, Shard), shared defaults."""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DEFAULT_API_URL = "https://nbia.cancerimagingarchive.net/nbia-api/services/v4/"
DEFAULT_DOI_RESOLVER = "https://doi.org/"
DEFAULT_DOI_TIMEOUT = 30.0      # seconds for all the BibTeX lookups of a run
NLST_API_URL = "https://nlst.cancerimagingarchive.net/nbia-api/services/v4/"
# TCIA's website API v1 (WordPress): a collection's downloads, Faspex links among them
# (--list-downloads, --mode aspera --collection; shared/aspera.md).
DEFAULT_WEBSITE_API = "https://cancerimagingarchive.net/api/v1/"
DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "tcia_downloader")
CHUNK_SIZE = 1 << 20
COMPRESS_BLOCK = 4 << 20   # bytes of tar handed to the xz compressor at once
TAR_BLOCK = tarfile.BLOCKSIZE           # 512
TAR_RECORD = tarfile.RECORDSIZE         # 10240: GNU tar pads archives to whole records
MD5_TABLE = "md5hashes.csv"
LICENSE_ENTRY = "LICENSE"


# --temp-limit SIZE, as sbatch --mem writes sizes (500M, 20G, 1.5T), but a plain number is
# bytes; K, M, G, T are powers of 1024, as slurm's are.
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 500M, 20G, 1.5T or 1048576; ValueError for anything else
    (a fraction of a byte, zero, a unit slurm does not know)."""
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is no size: give e.g. 500M, 20G or 1.5T (K/M/G/T: powers "
                         "of 1024; a plain number: bytes)")
    unit = SIZE_UNITS[match[2].upper()]
    if "." in match[1] and unit == 1:
        raise ValueError(f"{text!r}: a number of bytes is whole")
    size = int(float(match[1]) * unit) if "." in match[1] else int(match[1]) * unit
    if size <= 0:
        raise ValueError(f"{text!r}: a size above zero")
    return size


def usable_cores() -> int:
    """The cores this job may use: slurm's grant, else the process's CPU affinity."""
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, int(slurm_cpus) if slurm_cpus.isdigit() else len(os.sched_getaffinity(0)))


def default_workers() -> int:
    """Series in flight: four per usable core, at most 16. Each core packs one series at a
    time (about 12 MB/s of DICOM at preset 1), and at the 2-3 MB/s per connection users see
    from TCIA it takes two downloads to keep a core fed: the sweep (bench/run.py --only
    sweep, 2 cores, 40 series, medians of 2) at 2.5 MB/s per connection: 2 workers 20.5 s,
    4 to 16 level at 10.6-11.3 s; at 10 MB/s, 2 to 16 level at 8.7-9.4 s. Four per core
    keep a core fed at half that speed, by the same count; more only adds scratch (8
    workers: 43 MB at the peak, 16: 76 MB). At most 16: TCIA's own client opens 10
    connections."""
    return min(4 * usable_cores(), 16)


@dataclass(frozen=True)
class Selection:
    """What to download: a collection, filters on getSeries, manifests, or a failure list."""
    collection: Optional[str] = None
    manifests: tuple[Path, ...] = ()
    patients: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    retry_failed: Optional[Path] = None
    retry_name: Optional[str] = None       # the output's name, as that manifest records it

    def filters(self) -> dict[str, tuple[str, ...]]:
        """getSeries parameter (exact NBIA v4 spelling) -> the values asked for."""
        pairs = (("PatientID", self.patients), ("StudyInstanceUID", self.study_uids),
                 ("SeriesInstanceUID", self.series_uids), ("Modality", self.modalities),
                 ("BodyPartExamined", self.body_parts))
        return {parameter: values for parameter, values in pairs if values}


@dataclass(frozen=True)
class NetworkSettings:
    """How a run's requests go out, whichever source (or the DOI resolver) they are for:
    --proxy, --ca-bundle, the timeouts, the retries of a series, the HTTP metadata cache."""
    proxy: Optional[str] = None            # for every request (None: $HTTPS_PROXY/$HTTP_PROXY)
    ca_bundle: Optional[Path] = None       # CA certificates to trust, e.g. a site proxy's
    connect_timeout: float = 30.0          # seconds for one connection attempt
    # Seconds in which a transfer must deliver 64 kB (the watchdog's window), and the read
    # timeout: a silent or trickling transfer is cut and retried, a slow real one is not.
    stall_timeout: float = 120.0
    retries: int = 6                       # attempts per series before it is reported failed
    retry_wait: float = 2.0                # first wait before a retry; doubles per attempt
    cache_dir: Optional[Path] = None       # --cache-dir: metadata answers in its http_cache
    cache_expiry_hours: float = 6.0        # how long a cached metadata answer stays fresh
    doi_resolver: Optional[str] = DEFAULT_DOI_RESOLVER    # None: no BibTeX in CITATION.md
    doi_timeout: float = DEFAULT_DOI_TIMEOUT   # for all the BibTeX lookups of a run

    @property
    def timeout(self) -> tuple[float, float]:
        """requests' (connect, read): the read timeout is the stall window, which bounds the
        silence between two bytes, never a whole transfer."""
        return (self.connect_timeout, self.stall_timeout)

    def transport(self) -> dict[str, object]:
        """proxies and verify for each request: given per request, because requests lets
        $HTTPS_PROXY and $REQUESTS_CA_BUNDLE override what a session says, while the user's
        flags must win."""
        transport: dict[str, object] = {}
        if self.proxy:
            transport["proxies"] = {"http": self.proxy, "https": self.proxy}
        if self.ca_bundle:
            transport["verify"] = str(self.ca_bundle)
        return transport


@dataclass(frozen=True)
class Options:
    """Everything a run is asked to do, one field or settings dataclass per concern."""
    selection: Selection
    output: Path
    temp_dir: Path
    cache_dir: Path                    # logs (and, as network.cache_dir, the HTTP cache)
    network: NetworkSettings
    # The settings of the source --mode names, as its registry entry (sources.registry)
    # made them from its flags: NbiaSettings, IdcSettings, AutoSettings... A password in
    # them has repr=False, for the debug log prints these options.
    source: Any
    format: str                    # a name in formats.FORMATS: dir, tar.xz, ...
    compression_level: Optional[int]   # on the format's codec's scale; None: its default
    workers: int
    stop_grace: float
    shard: Optional["Shard"]
    update: bool
    dry_run: bool
    force: bool
    list_collections: bool
    log_level: str
    progress: bool
    summary_interval: float
    verify: Optional[Path] = None      # --verify: check this output instead of downloading
    extract: Optional[Path] = None     # --extract: write (part of) this archive into output
    repair: bool = False               # --retry-failed of a .damaged.tcia: replace them
    mode: str = "nbia"                 # where series come from: a name in sources.registry
    temp_limit: Optional[int] = None   # bytes of scratch a run may use (--temp-limit)
    list_downloads: bool = False       # print --collection's downloads from the website
    website_api: str = DEFAULT_WEBSITE_API     # where --list-downloads asks


# The filters on a selection: flag -> the getSeries parameter (and metadata.csv column).
FILTER_FLAGS = {"--patient": "PatientID", "--study-uid": "StudyInstanceUID",
                "--series-uid": "SeriesInstanceUID", "--modality": "Modality",
                "--body-part": "BodyPartExamined"}


@dataclass(frozen=True)
class Shard:
    index: int      # 0-based
    count: int

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"
