"""The source contract: SourceEntry (a --mode), Source, Selected, AttemptBytes, Member,
VerifiedSeries, Served, MemberSink, Packing."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Callable, Generic, Iterator, Mapping, Optional, Protocol, Sequence,
                    TYPE_CHECKING, TypeVar)

from ..plan import clean_component

if TYPE_CHECKING:
    from ..formats.base import Prepared
    from ..plan import Manifest, PlannedSeries
    from ..settings import NetworkSettings, Selection


@dataclass
class Selected:
    """A source's answer to a selection: the series records, the UIDs it does not know,
    and the manifests it read (their names name the output). A source that names its output
    and places its series itself (Aspera's packages: folders of their own, not NBIA's
    patient/study/series) gives the name and the planned series too; left_out: what the
    selection holds that the source will not deliver, one line each (the run then ends
    with exit 1, as for unknown UIDs); notes: what the plan, the dry run and the report
    should say of the selection (what a default left out, and how to include it)."""
    records: list[dict]
    unknown: list[str]
    manifests: list["Manifest"]
    name: Optional[str] = None
    planned: Optional[list["PlannedSeries"]] = None
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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

    def describe(self) -> str:
        """The source, for logs and CITATION.md: never a credential."""

    def secrets(self) -> list[str]:
        """What the log filter must never let through, now (a password, current tokens):
        asked again for every line written."""

    def report_lines(self, done: Sequence["Served"]) -> list[str]:
        """Lines of its own in the run's report, of the series that succeeded (those it
        served have its name as their source), from the counters it put in VerifiedSeries."""

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
    # What the serving source counted of this series (IDC: files verified by their size
    # only), for its report lines; the run only carries them there.
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def source(self) -> str:
        return str((self.record or {}).get("Source") or "")


class Served(Protocol):
    """A series that succeeded, as a source's report_lines read it (the run's Outcome)."""
    source: str                    # which source served it: a Source.name
    counters: dict[str, int]       # VerifiedSeries.counters


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


class Packing(Protocol):
    """What a source gets to verify a series into the output. Calling it makes the sink
    (the target's packer), runs verify(sink) on it and returns what the series became. A
    source calls it once what it downloads for the attempt is all in scratch: the run then
    hands the series' connection on to the next series while this one waits for a core and
    packs (and takes one again if it raises, for a source that then downloads again).
    while_arriving is for a source that can verify while it downloads: it runs verify on a
    core that is idle now, keeping the connection until verify returns, or returns None at
    once when no core is idle (the source then downloads first)."""

    def __call__(self, verify: Callable[[MemberSink], "VerifiedSeries"]
                 ) -> "tuple[VerifiedSeries, Prepared]": ...

    def while_arriving(self, verify: Callable[[MemberSink], "VerifiedSeries"]
                       ) -> "Optional[tuple[VerifiedSeries, Prepared]]": ...


# -- a source as one registry entry (sources.registry lists them) ---------------------------

SettingsT = TypeVar("SettingsT")


def no_flags(group: "argparse._ArgumentGroup") -> None:
    """For a source whose flags are other sources' (auto)."""


def no_secrets(settings: object) -> list[str]:
    return []


@dataclass(frozen=True)
class SourceEntry(Generic[SettingsT]):
    """One --mode: what the command line and a run need of a source, defined in the source's
    own module, so that adding a source touches that module and one line of the registry.
    SettingsT is the source's own settings dataclass (documented where it is defined)."""
    name: str                      # the --mode value
    help: str                      # what it is, for --mode's help: "name (help)"
    title: str                     # of the --help group of its flags ("NBIA"; auto has none)
    add_flags: Callable[["argparse._ArgumentGroup"], None]     # its flags, into that group
    # Its settings from the parsed flags, each checked with a one-line UsageError; origin is
    # what a --retry-failed list recorded (provenance's keys), used for flags not given.
    settings: Callable[[argparse.Namespace, Mapping[str, str]], SettingsT]
    # The source, opened with the run's network settings; stop ends its transfers.
    open: Callable[[SettingsT, "NetworkSettings", threading.Event], Source]
    # flag -> value (no "--") that the journal records ("made <flag>") and failure and
    # repair lists carry, so that --retry-failed fetches from the same place. Never a
    # password or a token: URLs lose their user part.
    provenance: Callable[[SettingsT], dict[str, str]]
    # The secrets among its settings (a password), kept out of the logs from the start,
    # before the source is open and can say its own (Source.secrets).
    secrets: Callable[[SettingsT], list[str]] = no_secrets
    # Its own default for --workers, when a series in flight costs more than a connection
    # (None: 4 per usable core, at most 16).
    workers: Optional[int] = None
    # The dest of a flag of its own that names what to download and so chooses this --mode
    # when --mode is not given (aspera: --aspera-url LINK); None: it has none.
    selects: Optional[str] = None
    # True: the source keeps its own scratch within --temp-limit and admits its own series
    # (Aspera sizes its parts to it, and a worker keeps a receive slot between attempts):
    # the run neither counts its series against that limit a second time nor bounds its
    # connections, and runs no series ahead of them.
    bounds_own_scratch: bool = False
