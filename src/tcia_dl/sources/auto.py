"""--mode auto: IDC first, NBIA as the fallback."""

from __future__ import annotations

import argparse
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TYPE_CHECKING

from ..errors import FatalRunError, SeriesUnavailable, TransientError
from ..logs import log
from ..plan import as_count
from .base import AttemptBytes, SourceEntry, no_flags
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
    """IDC first, NBIA as the fallback, as TCIA routes its downloads since 2026. The plan is
    NBIA's list when NBIA answers, IDC's index's when it does not. A series comes from IDC
    when the index has it with the same SeriesInstanceUID and instance count, else from
    NBIA; one IDC fails for good (its bucket refuses it, an object fails all its tries, a
    listing to distrust) comes from NBIA in the same attempt. NBIA refusing a series IDC
    has but counts otherwise, or NBIA looking down, sends it to IDC all the same: better
    IDC's version than none."""

    name = "auto"
    DOWN_AFTER = 3        # NBIA attempts failing in a row, across series, that make it "down"

    def __init__(self, nbia: NbiaSource, idc: IdcSource):
        self.nbia, self.idc = nbia, idc
        # An s5cmd manifest's uuids: NBIA's planning maps them with the index IDC has open.
        nbia.uuid_lookup = lambda: idc.index.series_of_uuids
        self.scratch_suffix = ".download"
        self._idc_records: dict[str, dict] = {}
        self._idc_first: set[str] = set()      # the series IDC serves as NBIA lists them
        self._lock = threading.Lock()
        self._nbia_failures = 0
        self.nbia_down = False
        self.planned_by = ""                   # whose list the plan is, for the report

    def describe(self) -> str:
        return f"{self.idc.describe()}, else {self.nbia.describe()}"

    def secrets(self) -> list[str]:
        return self.nbia.secrets() + self.idc.secrets()

    def report_lines(self, done: Sequence[Served]) -> list[str]:
        return [f"  plan:                        {self.planned_by}",
                *self.nbia.report_lines(done), *self.idc.report_lines(done)]

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
            self._idc_first = set(self._idc_records)
            self.planned_by = "IDC's index (NBIA did not answer)"
            return selected
        uids = [r["SeriesInstanceUID"] for r in selected.records] + selected.unknown
        rows = self.idc.index.rows([("SeriesInstanceUID", uids)], original_only=False)
        self._idc_records = {row["SeriesInstanceUID"]: idc_record(
            row, self.idc.index.collections[row["collection_id"]]) for row in rows}
        self._idc_first = {r["SeriesInstanceUID"] for r in selected.records
                           if same_series(r, self._idc_records.get(r["SeriesInstanceUID"]))}
        for record in selected.records:       # the dry run's Source: where it comes from first
            if record["SeriesInstanceUID"] in self._idc_first:
                record["Source"] = IDC.name
        log.info("IDC's index has %d of these %d series as NBIA lists them (same instance "
                 "count): they come from IDC, the others from NBIA", len(self._idc_first),
                 len(selected.records))
        self.planned_by = (f"NBIA's list; {len(self._idc_first)} of its "
                           f"{len(selected.records)} series as IDC's index has them")
        selected.notes += self.idc.selection_note(selection)
        return selected

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        tried_idc = series.uid in self._idc_first
        if tried_idc:
            counted = AttemptBytes(count)
            try:
                return self._from_idc(series, scratch, counted, pack, stop)
            except (SeriesUnavailable, TransientError) as exc:
                counted.take_back()
                if self.nbia_down:
                    raise
                log.info("%s: IDC fails it (%s); fetching it from NBIA", series.short_label,
                         exc)
        if not self.nbia_down:
            try:
                verified, prepared = self.nbia.fetch(series, scratch, count, pack, stop)
                self._nbia_answered(True)
                if verified.record is None:   # the plan's record may say IDC (planned first)
                    verified.record = {**series.record, "Source": NBIA.name}
                return verified, prepared
            except SeriesUnavailable as exc:
                if tried_idc or series.uid not in self._idc_records:
                    raise
                log.info("%s: NBIA refuses it (%s); fetching it from IDC", series.short_label,
                         exc)
            except TransientError:
                self._nbia_answered(False)
                if tried_idc or not self.nbia_down or series.uid not in self._idc_records:
                    raise
        if tried_idc:
            raise SeriesUnavailable("NBIA is down and IDC failed it")
        return self._from_idc(series, scratch, count, pack, stop)

    def _from_idc(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
                  pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
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


def same_series(nbia_record: dict, idc: Optional[dict]) -> bool:
    """IDC's copy is the series NBIA lists: the same SeriesInstanceUID (the lookup's key)
    and as many instances (a series NBIA has more of, or fewer, is not IDC's version)."""
    return idc is not None and as_count(nbia_record.get("ImageCount")) is not None and \
        as_count(nbia_record.get("ImageCount")) == as_count(idc.get("ImageCount"))


def auto_provenance(settings: AutoSettings) -> dict[str, str]:
    return {**NBIA.provenance(settings.nbia), **IDC.provenance(settings.idc)}


def auto_secrets(settings: AutoSettings) -> list[str]:
    return NBIA.secrets(settings.nbia) + IDC.secrets(settings.idc)


AUTO: SourceEntry[AutoSettings] = SourceEntry(
    name="auto", help="IDC first, NBIA for what IDC cannot serve", title="",
    add_flags=no_flags, settings=auto_settings, open=open_auto, provenance=auto_provenance,
    secrets=auto_secrets)
