"""--mode auto: NBIA first, IDC where NBIA cannot serve."""

from __future__ import annotations

import argparse
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TYPE_CHECKING

from ..errors import FatalRunError, SeriesUnavailable, TransientError
from ..logs import log
from ..plan import as_count
from .base import SourceEntry, no_flags
from .idc import IDC, IdcSettings
from .idc_index import idc_record
from .nbia import NBIA, NbiaSettings

if TYPE_CHECKING:
    from ..formats.base import Prepared
    from ..plan import PlannedSeries
    from ..settings import NetworkSettings, Selection
    from .base import Packing, Selected, Served, VerifiedSeries
    from .idc import IdcSource
    from .nbia import NbiaSource


@dataclass(frozen=True)
class AutoSettings:
    """Both sources' settings, from their flags: auto has none of its own."""
    nbia: NbiaSettings
    idc: IdcSettings


def auto_settings(args: argparse.Namespace, origin: Mapping[str, str]) -> AutoSettings:
    # IDC's first: a wrong --idc-index is said before NBIA's password is asked for.
    idc = IDC.settings(args, origin)
    return AutoSettings(nbia=NBIA.settings(args, origin), idc=idc)


def open_auto(settings: AutoSettings, network: NetworkSettings,
              stop: threading.Event) -> AutoSource:
    nbia = NBIA.open(settings.nbia, network, stop)
    try:
        return AutoSource(nbia, IDC.open(settings.idc, network, stop))
    except BaseException:
        nbia.close()               # IDC cannot open (no duckdb): NBIA's watchdog must stop
        raise


class AutoSource:
    """NBIA first; a series NBIA refuses, or every series once NBIA looks down, comes from
    IDC when IDC's index has it, into the same archive under the same folder. NBIA gone
    before the run could plan: the plan comes from IDC's index."""

    name = "auto"
    DOWN_AFTER = 3        # NBIA attempts failing in a row, across series, that make it "down"

    def __init__(self, nbia: NbiaSource, idc: IdcSource):
        self.nbia, self.idc = nbia, idc
        self.scratch_suffix = ".download"
        self._idc_records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._nbia_failures = 0
        self.nbia_down = False

    def describe(self) -> str:
        return f"{self.nbia.describe()}, else {self.idc.describe()}"

    def secrets(self) -> list[str]:
        return self.nbia.secrets() + self.idc.secrets()

    def report_lines(self, done: Sequence[Served]) -> list[str]:
        return self.nbia.report_lines(done) + self.idc.report_lines(done)

    def collections(self) -> list[str]:
        try:
            return self.nbia.collections()
        except FatalRunError as exc:
            log.warning("NBIA cannot list its collections (%s): IDC's index does", exc)
            return self.idc.collections()

    def records(self, selection: Selection) -> "Selected":
        try:
            selected = self.nbia.records(selection)
        except FatalRunError as exc:
            log.warning("NBIA cannot plan this run (%s); planning from IDC's index", exc)
            self.nbia_down = True
            selected = self.idc.records(selection)
            self._idc_records = {r["SeriesInstanceUID"]: r for r in selected.records}
            return selected
        uids = [r["SeriesInstanceUID"] for r in selected.records] + selected.unknown
        rows = self.idc.index.rows([("SeriesInstanceUID", uids)], original_only=False)
        self._idc_records = {row["SeriesInstanceUID"]: idc_record(
            row, self.idc.index.collections[row["collection_id"]]) for row in rows}
        log.info("IDC's index has %d of these %d series, for what NBIA cannot serve",
                 len(self._idc_records), len(uids))
        return selected

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        if not self.nbia_down:
            try:
                fetched = self.nbia.fetch(series, scratch, count, pack, stop)
                self._nbia_answered(True)
                return fetched
            except SeriesUnavailable as exc:
                if series.uid not in self._idc_records:
                    raise
                log.info("%s: NBIA refuses it (%s); fetching it from IDC", series.short_label,
                         exc)
            except TransientError:
                self._nbia_answered(False)
                if not self.nbia_down or series.uid not in self._idc_records:
                    raise
        record = self._idc_records.get(series.uid)
        if record is None:
            raise SeriesUnavailable("NBIA cannot serve it and IDC's index does not have it")
        from_idc = dataclasses.replace(series, record=record,
                                       image_count=as_count(record.get("ImageCount")),
                                       file_size=as_count(record.get("FileSize")) or 0)
        verified, prepared = self.idc.fetch(from_idc, scratch, count, pack, stop)
        verified.record = record
        return verified, prepared

    def reach(self, series: "PlannedSeries") -> None:
        """NBIA's endpoint (if it planned) and IDC's bucket, which serves what NBIA cannot."""
        if not self.nbia_down:
            self.nbia.reach(series)
        record = self._idc_records.get(series.uid)
        if record is not None:
            self.idc.reach(dataclasses.replace(series, record=record))

    def _nbia_answered(self, ok: bool) -> None:
        with self._lock:
            self._nbia_failures = 0 if ok else self._nbia_failures + 1
            if self._nbia_failures >= self.DOWN_AFTER and not self.nbia_down:
                self.nbia_down = True
                log.warning("NBIA failed %d times in a row: the rest of the run comes from "
                            "IDC", self._nbia_failures)

    def close(self) -> None:
        self.nbia.close()
        self.idc.close()


def auto_provenance(settings: AutoSettings) -> dict[str, str]:
    return {**NBIA.provenance(settings.nbia), **IDC.provenance(settings.idc)}


def auto_secrets(settings: AutoSettings) -> list[str]:
    return NBIA.secrets(settings.nbia) + IDC.secrets(settings.idc)


AUTO: SourceEntry[AutoSettings] = SourceEntry(
    name="auto", help="NBIA, and IDC for what NBIA cannot serve", title="",
    add_flags=no_flags, settings=auto_settings, open=open_auto, provenance=auto_provenance,
    secrets=auto_secrets)
