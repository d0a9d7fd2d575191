"""The download/pack pipeline: a series hands its connection on once it is in scratch, so
connections never wait for a core; --workers bounds the downloads at once; --temp-limit
bounds the scratch the series in flight hold, first come first served; a series that cannot
fit it alone is one line and exit 2 before anything is fetched."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcia_dl import cli, errors, pipeline
from tcia_dl.errors import Interrupted
from tcia_dl.pipeline import ConnectionSlots, ScratchBudget
from tcia_dl.sources import registry
from tcia_dl.sources.base import Member, Selected, SourceEntry, VerifiedSeries
from helpers import archive_members, wait_until

# -- the two bounds on their own ---------------------------------------------------------------


def test_scratch_is_granted_first_come_first_served_and_a_lone_series_always_fits():
    stop = threading.Event()
    budget = ScratchBudget(100, stop)
    granted: list[str] = []
    release = {name: threading.Event() for name in "ABC"}

    def hold(name: str, need: int) -> None:
        with budget.reserved(need):
            granted.append(name)
            release[name].wait(10)

    threads = {"A": threading.Thread(target=hold, args=("A", 60))}
    threads["A"].start()
    wait_until(lambda: granted == ["A"], 10, "A's scratch")
    threads["B"] = threading.Thread(target=hold, args=("B", 60))
    threads["B"].start()
    wait_until(lambda: budget.waiting == 1, 10, "B waiting")
    threads["C"] = threading.Thread(target=hold, args=("C", 10))
    threads["C"].start()
    wait_until(lambda: budget.waiting == 2, 10, "C waiting")
    # C would fit beside A, but B came first: a big series is not overtaken for ever.
    assert granted == ["A"] and budget.held == 60
    release["A"].set()
    wait_until(lambda: granted == ["A", "B", "C"], 10, "B, then C")
    assert budget.held == 70
    release["B"].set(), release["C"].set()
    for thread in threads.values():
        thread.join(10)
    assert budget.held == 0
    with budget.reserved(250):          # more than the limit, but nothing else holds any
        assert budget.held == 250


def test_a_stop_ends_the_waits_for_scratch_and_for_a_connection():
    stop = threading.Event()
    budget, slots = ScratchBudget(10, stop), ConnectionSlots(1, stop)
    outcomes: list[str] = []

    def wait_for_scratch() -> None:
        try:
            with budget.reserved(10):
                outcomes.append("scratch granted")
        except Interrupted:
            outcomes.append("scratch interrupted")

    def wait_for_connection() -> None:
        try:
            slots.take()
            outcomes.append("connection granted")
        except Interrupted:
            outcomes.append("connection interrupted")

    with budget.reserved(10):
        slots.take()
        waiters = [threading.Thread(target=wait_for_scratch),
                   threading.Thread(target=wait_for_connection)]
        for thread in waiters:
            thread.start()
        wait_until(lambda: budget.waiting == 1, 10, "a series waiting for scratch")
        stop.set()
        for thread in waiters:
            thread.join(10)
    # (the connection's waiter is only known to wait once it has looked at the stop event)
    assert sorted(outcomes) == ["connection interrupted", "scratch interrupted"]


def test_a_connection_handed_on_is_taken_by_the_next_series_and_taken_again_by_a_retry():
    stop = threading.Event()
    slots = ConnectionSlots(1, stop)
    slots.take()
    slots.take()                       # a thread holds one slot at most
    other_took = threading.Event()

    def other() -> None:
        slots.take()
        other_took.set()
        slots.hand_on()
    thread = threading.Thread(target=other)
    thread.start()
    slots.hand_on()
    assert other_took.wait(10)
    thread.join(10)
    slots.take()
    assert slots.held()


# -- in a run: a source that is a registry entry and records when it downloads ----------------


@dataclass(frozen=True)
class TimedSettings:
    records: Path


class TimedSource:
    """Serves each series as one small file. Each fetch "downloads" (writes scratch), then
    packs; the first series to pack waits (at most 10 s) until something the test names
    has happened meanwhile, which only a pipeline makes possible."""

    name = "timed"
    scratch_suffix = ".timed"

    def __init__(self, path: Path, packing_waits_for):
        self._records = [{**r, "Source": "timed"} for r in json.loads(path.read_text())]
        self._lock = threading.Lock()
        self.downloads_started = 0
        self.downloading = self.most_downloading = 0
        self.in_flight = self.most_in_flight = 0
        self.first_packing_saw_it: list[bool] = []
        self._packing_waits_for = packing_waits_for

    def describe(self) -> str:
        return "timed test source"

    def secrets(self) -> list[str]:
        return []

    def report_lines(self, done) -> list[str]:
        return []

    def collections(self) -> list[str]:
        return ["TIMED"]

    def records(self, selection) -> Selected:
        return Selected(self._records, [], [])

    def reach(self, series) -> None:
        pass

    def close(self) -> None:
        pass

    def fetch(self, series, scratch, count, pack, stop):
        data = f"series {series.uid}".encode() * 50
        with self._lock:
            self.downloads_started += 1
            self.downloading += 1
            self.most_downloading = max(self.most_downloading, self.downloading)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        scratch.write_bytes(data)
        count(len(data))
        with self._lock:
            self.downloading -= 1
        try:
            return pack(lambda sink: self._verify(series, data, sink))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _verify(self, series, data: bytes, sink) -> VerifiedSeries:
        with self._lock:
            first = not self.first_packing_saw_it
            if first:
                self.first_packing_saw_it.append(False)
        if first:
            try:
                wait_until(lambda: self._packing_waits_for(self), 10, "the pipeline")
                self.first_packing_saw_it[0] = True
            except AssertionError:
                pass
        sink.add("1-1.dcm", len(data), iter([data]))
        member = Member("1-1.dcm", "1-1.dcm", len(data), hashlib.md5(data).hexdigest())
        return VerifiedSeries(path=Path(series.uid), members=[member], license_text=None,
                              dropped=[])


RECORDS = [{"Collection": "TIMED", "PatientID": f"P{n}", "StudyInstanceUID": f"1.2.{n}",
            "SeriesInstanceUID": f"1.2.{n}.1", "Modality": "CT", "SeriesDescription": "x",
            "StudyDate": "2003-02-01", "ImageCount": 1, "FileSize": 1000} for n in range(8)]


def run_timed(tmp_path: Path, monkeypatch, packing_waits_for, *extra: str) -> tuple[int, TimedSource]:
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    sources: list[TimedSource] = []

    def open_timed(settings, network, stop) -> TimedSource:
        sources.append(TimedSource(settings.records, packing_waits_for))
        return sources[-1]
    entry = SourceEntry(
        name="timed", help="a test source", title="timed",
        add_flags=lambda group: group.add_argument("--timed-records"),
        settings=lambda args, origin: TimedSettings(Path(args.timed_records)),
        open=open_timed, provenance=lambda settings: {})
    monkeypatch.setattr(registry, "SOURCES", (*registry.SOURCES, entry))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")          # one core packs
    code = cli.main(["--mode", "timed", "--timed-records", str(records), "--collection",
                     "TIMED", "--output", str(tmp_path / "out"), "--cache_dir",
                     str(tmp_path / "cache"), "--no-progress", "--format", "tar.xz", *extra])
    return code, sources[0]


def test_a_connection_does_not_wait_while_its_series_packs(tmp_path, monkeypatch):
    """One connection, one core: the second series downloads while the first packs (before,
    the worker that downloaded a series packed it before its next download)."""
    code, source = run_timed(tmp_path, monkeypatch, lambda s: s.downloads_started >= 2,
                             "--workers", "1")
    assert code == errors.EXIT_OK
    assert source.first_packing_saw_it == [True]
    assert source.most_downloading == 1                 # --workers 1: one download at once
    members = archive_members(tmp_path / "out" / "TIMED.tar.xz")
    assert sum(name.endswith("/1-1.dcm") for name in members) == len(RECORDS)


def test_temp_limit_bounds_the_series_in_flight(tmp_path, monkeypatch):
    """--temp-limit of two series' scratch (1.5 times their 1000 bytes in a .tar.xz run):
    with four connections, a third series waits for scratch instead of downloading."""
    budgets: list[ScratchBudget] = []

    class Recorded(ScratchBudget):
        def __init__(self, *args):
            super().__init__(*args)
            budgets.append(self)
    monkeypatch.setattr(pipeline, "ScratchBudget", Recorded)
    monkeypatch.setattr("tcia_dl.run.ScratchBudget", Recorded)
    code, source = run_timed(
        tmp_path, monkeypatch,
        lambda s: s.downloads_started >= 3 or (budgets and budgets[0].waiting > 0),
        "--workers", "4", "--temp-limit", "3000")
    assert code == errors.EXIT_OK
    assert source.first_packing_saw_it == [True]
    assert source.most_in_flight == 2
    assert budgets[0].limit == 3000 and budgets[0].held == 0


def test_a_series_larger_than_temp_limit_is_one_line_before_anything_is_fetched(
        tmp_path, monkeypatch, capsys):
    code, source = run_timed(tmp_path, monkeypatch, lambda s: True, "--temp-limit", "1K")
    assert code == errors.EXIT_USAGE
    assert source.downloads_started == 0
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1
    assert "needs about 1.5 kB of scratch, more than --temp-limit 1.0 kB: raise --temp-limit" \
        in error_lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("size", ["0", "1.5", "20X", "-3G"])
def test_a_temp_limit_that_is_no_size_is_one_line(tmp_path, size, capsys):
    assert cli.main(["--collection", "X", "--output", str(tmp_path),
                     f"--temp-limit={size}"]) == errors.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tcia_downloader: error: --temp-limit")
