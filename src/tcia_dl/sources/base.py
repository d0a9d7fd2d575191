"""The source contract: Source, Selected, AttemptBytes, Member, VerifiedSeries, MemberSink,
Packing."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, TYPE_CHECKING

from ..plan import clean_component

if TYPE_CHECKING:
    from ..formats.base import Prepared
    from ..net import TransferWatchdog
    from ..plan import Manifest, PlannedSeries
    from ..settings import Selection


@dataclass
class Selected:
    """A source's answer to a selection: the series records, the UIDs it does not know,
    and the manifests it read (their names name the output). A source that names its output
    and places its series itself (Aspera's packages: folders of their own, not NBIA's
    patient/study/series) gives the name and the planned series too; left_out: what the
    selection holds that the source will not deliver, one line each (the run then ends
    with exit 1, as for unknown UIDs)."""
    records: list[dict]
    unknown: list[str]
    manifests: list["Manifest"]
    name: Optional[str] = None
    planned: Optional[list["PlannedSeries"]] = None
    left_out: list[str] = field(default_factory=list)


class AttemptBytes:
    """Bytes received by one attempt: reported to the progress as they come, and taken
    back whole when the attempt is thrown away (a retry starts from zero). IDC's objects
    of one series arrive on several threads at once, hence the lock."""

    def __init__(self, report: Callable[[int], None]):
        self._report = report
        self._lock = threading.Lock()
        self.received = 0

    def __call__(self, n: int) -> None:
        with self._lock:
            self.received += n
        self._report(n)

    def take_back(self) -> None:
        with self._lock:
            taken, self.received = self.received, 0
        self._report(-taken)


class Source(Protocol):
    """Where series come from (NBIA, IDC). The planning asks it for the records of a
    selection; the per-series loop asks it to fetch one series, verified, into a sink, and
    hears back only TransientError (retry the series), SeriesUnavailable (skip it),
    FatalRunError or Interrupted (stop)."""

    name: str
    scratch_suffix: str             # of the one scratch file a series in flight gets
    watchdog: TransferWatchdog      # the run's network settings, for other requests
    transport: dict[str, object]
    timeout: tuple[float, float]

    def describe(self) -> str: ...

    def collections(self) -> list[str]: ...

    def records(self, selection: Selection) -> "Selected": ...

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]": ...

    def reach(self, series: "PlannedSeries") -> None:
        """--dry-run: one cheap request to each endpoint a fetch of series would use,
        raising what a fetch would (FatalRunError for a misconfiguration: a host that does
        not exist, TLS that cannot pass; TransientError for an outage)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Member:
    entry: str        # name inside the zip
    name: str         # file name in the output folder
    size: int
    md5: str


@dataclass
class VerifiedSeries:
    """A series as its source delivered it, every file verified: what the output records."""
    path: Path
    members: list[Member]
    license_text: Optional[str]
    dropped: list[tuple[str, str]]
    record: Optional[dict] = None      # the serving source's record, if not the plan's
    by_size_only: int = 0              # files whose checksum could not be checked
    retries: int = 0                   # downloads of single files tried again (IDC objects)

    @property
    def bytes(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def source(self) -> str:
        return str((self.record or {}).get("Source") or "")


def safe_entry_name(name: str) -> bool:
    """A plain file name: no directories, not absolute, no '..', no control characters."""
    return (bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
            and not any(ord(c) < 32 for c in name))


def unique_file_name(entry: str, used: set[str]) -> str:
    """The entry's name made safe; a clash after cleaning gets -2, -3... before the suffix."""
    name = clean_component(entry, 128)
    stem, dot, suffix = name.rpartition(".")
    candidate, n = name, 1
    while candidate.casefold() in used:
        n += 1
        candidate = f"{stem}-{n}.{suffix}" if dot else f"{name}-{n}"
    used.add(candidate.casefold())
    return candidate


class MemberSink(Protocol):
    """Where verify_zip streams each file it keeps (a tar/xz stream, a folder)."""

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None: ...


# What a source gets to verify a series into the output: pack(verify) makes the sink (the
# target's packer), runs verify(sink) on it and returns what the series became.
Packing = Callable[[Callable[[MemberSink], "VerifiedSeries"]], "tuple[VerifiedSeries, Prepared]"]
