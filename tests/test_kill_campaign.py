"""A kill -9 campaign: the downloader is SIGKILLed again and again at random instants spread
over whole runs (start-up, downloads, commits, finalize and the rename), and after every kill
the promises that hold "at any instant" are checked; a last rerun must then give the
uninterrupted result, verified with standard tools.

The kill instants come from random.Random(seed). The seed is TCIA_KILL_SEED when set, else
DEFAULT_SEED, and every failure message names it: rerun with

    TCIA_KILL_SEED=<seed> python3 -m pytest -q tests/test_kill_campaign.py -s

to replay the same schedule (the same fractions of a run; where exactly a kill lands still
depends on the machine's speed). -s also prints where each kill landed.

Delays are fractions of an uninterrupted run timed at the start of each test: the only use
of a clock here, to scale kill points, never to wait for something to happen.

When a kill lands after a run finished its output, that "life" is completed by a rerun,
verified like the final one, and the campaign goes on in an emptied output: the rounds left
then hit start-up and downloads again instead of a finished archive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import lzma
import os
import random
import shutil
import site
import sqlite3
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tcia_dl import errors as errors_module
from fakes.fake_nbia import Faults
from helpers import (SCRIPT, archive_members, expected_folders, md5, pyz_env, pyz_interpreter,
                     series_folders, tree_members, verify_with_standard_tools)

DEFAULT_SEED = 20240611
SEED = int(os.environ.get("TCIA_KILL_SEED", DEFAULT_SEED))

# 18 small series through 120 kB/s connections: about 3 s per uninterrupted run; rare
# 500s, resets and truncated zips so that kills also land in retries.
FAKE_CONFIG = dict(demo_series=18, instances=4, image_size=64, conn_bandwidth=120_000,
                   faults=Faults(p500=0.04, reset=0.04, truncate=0.02))
WORKERS = 2
COLLECTION_FILES = {"DEMO/LICENSE", "DEMO/CITATION.md", "DEMO/metadata.csv", "DEMO/MD5SUMS"}


@dataclass(frozen=True)
class Mode:
    name: str
    compression: bool
    rounds: int
    journal: str                       # file name in --output
    allowed: frozenset[str]            # what may be in --output at any instant
    finished: tuple[str, ...]          # what --output holds after a complete run


TAR = Mode("tar", True, 12, "DEMO.tar.xz.journal",
           frozenset({"DEMO.tar.xz", "DEMO.tar.xz.part", "DEMO.tar.xz.journal",
                      "DEMO.tar.xz.journal-journal", "DEMO.tar.xz.lock", "DEMO.failed.tcia",
                      "DEMO.failed.tcia.incoming"}),
           ("DEMO.tar.xz", "DEMO.tar.xz.journal"))
FOLDER = Mode("folder", False, 6, "DEMO.journal",
              frozenset({"DEMO", "DEMO.journal", "DEMO.journal-journal", "DEMO.lock",
                         "DEMO.failed.tcia", "DEMO.failed.tcia.incoming"}),
              ("DEMO", "DEMO.journal"))


class Layout:
    """The folders of one run: --output, --temp_dir, --cache_dir, and a HOME and TMPDIR
    that must stay empty (nothing may be written outside the three folders given)."""

    FOLDERS = ("out", "scratch", "cache", "home", "tmp")

    def __init__(self, base: Path):
        self.base = base
        self.output, self.scratch, self.cache = base / "out", base / "scratch", base / "cache"
        self.home, self.tmp = base / "home", base / "tmp"
        self.home.mkdir(parents=True)
        self.tmp.mkdir()

    def start(self, fake, mode: Mode, *extra: str,
              stderr=subprocess.DEVNULL) -> subprocess.Popen:
        argv = [sys.executable, str(SCRIPT), "--collection", "DEMO", *extra,
                "--output", str(self.output), "--temp_dir", str(self.scratch),
                "--cache_dir", str(self.cache), "--api-url", fake.url, "--no-progress",
                "--workers", str(WORKERS), "--retry-wait", "0.05", "--stall-timeout", "5",
                *(["--compression"] if mode.compression else [])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        # packages installed with pip --user stay importable with another HOME
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), PYTHONUSERBASE=site.getuserbase())
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)

    def complete_run(self, fake, mode: Mode, *extra: str) -> tuple[int, str, float]:
        """A run without a kill: (exit code, stderr, seconds)."""
        started = time.monotonic()
        process = self.start(fake, mode, *extra, stderr=subprocess.PIPE)
        _, errors = process.communicate(timeout=120)
        return process.returncode, errors, time.monotonic() - started

    def last_log(self, lines: int = 12) -> str:
        logs = sorted(self.cache.glob("logs/*-info.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return "(no log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    def scratch_files(self) -> list[Path]:
        return [p for p in self.scratch.rglob("*") if p.is_file()] if self.scratch.exists() else []

    def scratch_snapshot(self) -> set[tuple[str, int, int]]:
        return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.scratch_files()}

    def reset(self) -> None:
        """A new life: empty --output and --temp_dir; keep the metadata cache."""
        shutil.rmtree(self.output, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class JournalState:
    """What a journal says, read from a copy (a hot rollback journal is rolled back there,
    as the next run would)."""
    meta: dict[str, str] = field(default_factory=dict)
    rows: list[tuple[str, str, str, int]] = field(default_factory=list)  # uid, coll, path, end
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # uid -> path/name -> md5

    @property
    def committed_end(self) -> int:
        return max((end for *_, end in self.rows), default=0)

    def folders(self) -> dict[str, str]:
        """series folder -> uid"""
        return {f"{collection}/{path}": uid for uid, collection, path, _ in self.rows}

    def listed_files(self, uid: str) -> dict[str, str]:
        """<collection>/<series path>/<file> -> md5 of what the journal says a series holds"""
        collection = next(c for u, c, _, _ in self.rows if u == uid)
        return {f"{collection}/{name}": digest for name, digest in self.files.get(uid, {}).items()}


def read_journal_copy(journal: Path, where: Path) -> JournalState | None:
    if not journal.exists():
        return None
    where.mkdir(parents=True)
    shutil.copyfile(journal, where / journal.name)
    hot = journal.with_name(journal.name + "-journal")
    if hot.exists():
        shutil.copyfile(hot, where / hot.name)
    state = JournalState()
    with contextlib.closing(sqlite3.connect(where / journal.name)) as db:
        try:
            state.meta = dict(db.execute("SELECT key, value FROM meta"))
            state.rows = db.execute(
                "SELECT uid, collection, path, archive_end FROM series").fetchall()
            for uid, name, digest in db.execute("SELECT uid, name, md5 FROM files"):
                state.files.setdefault(uid, {})[name] = digest
        except sqlite3.OperationalError as exc:       # created, schema not there yet
            assert "no such table" in str(exc), exc
    return state


def visible_members(root: Path) -> dict[str, str]:
    """root-relative name -> md5 of every file whose path has no hidden component."""
    found = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found[str(relative)] = md5(path.read_bytes())
    return found


def tar_names_and_members(data: bytes) -> tuple[list[str], dict[str, str]]:
    """Member names (with repeats) and name -> md5 of an uncompressed tar, which may lack
    its end-of-archive blocks (a .part holds none)."""
    names, members = [], {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            names.append(member.name)
            if member.isfile():
                members[member.name] = md5(tar.extractfile(member).read())
    return names, members


class Campaign:
    def __init__(self, mode: Mode, tmp_path: Path, fake):
        self.mode, self.tmp_path, self.fake = mode, tmp_path, fake
        self.rng = random.Random(f"{SEED}-{mode.name}")
        self.history: list[str] = []
        self.lives = 0
        self.expected = expected_folders(fake)
        self.total = len(self.expected)
        self.check = tmp_path / "check"            # the test's own scratch: journal copies...
        self.check.mkdir()
        self.inspections = 0
        self.scratch_before: set[tuple[str, int, int]] = set()
        # An uninterrupted run, a rerun with nothing to do and a run of the one series that
        # goes first and alone: they scale the kill points.
        self.ref = Layout(tmp_path / "ref")
        code, errors, self.full_seconds = self.ref.complete_run(fake, mode)
        assert code == errors_module.EXIT_OK, self.context(errors)
        self.reference = self.result_members(self.ref)
        code, errors, self.idle_seconds = self.ref.complete_run(fake, mode)
        assert code == errors_module.EXIT_OK, self.context(errors)
        smallest = min(fake.series("DEMO"), key=lambda s: (s["FileSize"], s["SeriesInstanceUID"]))
        code, errors, self.single_seconds = self.ref.complete_run(
            fake, mode, "--series-uid", smallest["SeriesInstanceUID"])
        assert code == errors_module.EXIT_OK, self.context(errors)
        self.single_seconds = min(max(self.single_seconds, self.idle_seconds), self.full_seconds)
        self.assert_nothing_stray()
        self.run = Layout(tmp_path / "run")

    # -- reporting --------------------------------------------------------------------------

    def context(self, extra: str = "", log: bool = True) -> str:
        lines = [f"kill campaign, {self.mode.name} mode, seed {SEED} "
                 f"(reproduce: TCIA_KILL_SEED={SEED} python3 -m pytest -s "
                 f"tests/test_kill_campaign.py -k {self.mode.name})"]
        if hasattr(self, "full_seconds"):
            lines.append(f"uninterrupted run {self.full_seconds:.2f} s, idle rerun "
                         f"{self.idle_seconds:.2f} s, one series {self.single_seconds:.2f} s")
        lines += self.history
        if log and hasattr(self, "run"):
            lines += ["last log lines of the run:", self.run.last_log()]
        if extra:
            lines.append(extra)
        return "\n".join(lines)

    # -- invariants at any instant ----------------------------------------------------------

    def assert_nothing_stray(self) -> None:
        """Nothing outside --output, --temp_dir and --cache_dir (HOME and TMPDIR empty)."""
        top = {p.name for p in self.tmp_path.iterdir()}
        assert top <= {"ref", "run", "check"}, self.context(f"stray in tmp_path: {top}")
        for layout in (self.tmp_path / "ref", self.tmp_path / "run"):
            if layout.exists():
                inside = {p.name for p in layout.iterdir()}
                assert inside <= set(Layout.FOLDERS), self.context(f"stray in {layout}: {inside}")
                for empty in ("home", "tmp"):
                    written = sorted(str(p) for p in (layout / empty).rglob("*"))
                    assert written == [], self.context(f"written outside the folders: {written}")

    def inspect(self) -> JournalState | None:
        self.inspections += 1
        return read_journal_copy(self.run.output / self.mode.journal,
                                 self.check / f"journal-{self.inspections}")

    def assert_instant_tar(self, state: JournalState | None) -> str:
        output = self.run.output
        present = set(os.listdir(output)) if output.exists() else set()
        assert present <= self.mode.allowed, self.context(f"unexpected in --output: {present}")
        final, part = output / "DEMO.tar.xz", output / "DEMO.tar.xz.part"
        if final.exists():
            test = subprocess.run(["xz", "-t", str(final)], capture_output=True, text=True)
            assert test.returncode == 0, self.context(f"xz -t {final}: {test.stderr}")
            # only a whole archive is ever called .tar.xz
            names, members = tar_names_and_members(lzma.decompress(final.read_bytes()))
            assert len(names) == len(set(names)), self.context("repeated members in .tar.xz")
            assert series_folders(members) == self.expected, self.context(".tar.xz not whole")
        if state is None:
            return "before the journal existed"
        data = final if final.exists() else part
        rows_end = state.committed_end
        if state.rows:
            # a journal row never runs ahead of its data, and what it covers is intact
            assert data.exists(), self.context(f"{len(state.rows)} series journaled, no archive")
            assert data.stat().st_size >= rows_end, self.context(
                f"{data.name} is {data.stat().st_size} bytes, the journal says {rows_end}")
            with open(data, "rb") as handle:
                committed = handle.read(rows_end)
            try:
                names, members = tar_names_and_members(lzma.decompress(committed))
            except (lzma.LZMAError, tarfile.TarError) as exc:
                raise AssertionError(self.context(f"committed part of {data.name} is "
                                                  f"damaged: {exc}")) from None
            assert len(names) == len(set(names)), self.context("a series was appended twice")
            journaled = {folder: self.expected.get(folder) for folder in state.folders()}
            assert series_folders(members) == journaled, self.context(
                "the committed streams do not hold exactly the journaled series")
            for folder, uid in state.folders().items():
                listed = state.listed_files(uid)
                assert listed and {n: members.get(n) for n in listed} == listed, \
                    self.context(f"{folder}: the journal's files are not in the archive")
        done = f"{len(state.rows)}/{self.total} committed"
        size = part.stat().st_size if part.exists() else 0
        if final.exists():
            return ("finished" if state.meta.get("finished") == "yes"
                    else "renamed, not yet journaled as finished") + f" ({done})"
        if state.meta.get("closing_end") == str(size) and size > rows_end:
            return f"finalize: closing stream appended, not renamed ({done})"
        if size > rows_end:
            what = "closing stream" if len(state.rows) == self.total else "series"
            return f"commit: torn append of a {what} ({done})"
        if len(state.rows) == self.total:
            return f"finalize: writing the closing stream ({done})"
        if self.scratch_before and self.run.scratch_snapshot() == self.scratch_before:
            return f"start-up, before scratch was cleaned ({done})"
        if self.run.scratch_files():
            return f"downloading/packing ({done})"
        return f"start-up or between steps ({done})"

    def assert_instant_folder(self, state: JournalState | None) -> str:
        output = self.run.output
        present = set(os.listdir(output)) if output.exists() else set()
        assert present <= self.mode.allowed, self.context(f"unexpected in --output: {present}")
        root = output / "DEMO"
        visible = {f"DEMO/{name}": digest for name, digest in
                   (visible_members(root).items() if root.exists() else ())}
        folders = series_folders(visible)
        # a series folder under --output is whole or absent
        for folder, digests in folders.items():
            assert self.expected.get(folder) == digests, self.context(f"{folder} is not whole")
        series_dirs = {str(p.relative_to(output)) for p in output.glob("DEMO/*/*/*")
                       if p.is_dir() and not any(s.startswith(".") for s in
                                                 p.relative_to(output).parts)}
        assert series_dirs == set(folders), self.context(
            f"empty series folders: {series_dirs - set(folders)}")
        # a tree without its UNFINISHED.txt looks finished, so it must be: every series and
        # every collection file there (#23: a stopped tree once looked finished)
        if folders and not (root / "UNFINISHED.txt").exists():
            assert folders == self.expected, self.context("no UNFINISHED.txt, series missing")
            assert COLLECTION_FILES <= set(visible), self.context(
                "no UNFINISHED.txt, collection files missing")
        if state is None:
            return "before the journal existed"
        for folder, uid in state.folders().items():
            assert folder in folders, self.context(f"journaled {folder} is missing")
            listed = state.listed_files(uid)
            assert listed and {n: visible.get(n) for n in listed} == listed, \
                self.context(f"{folder}: the journal's files are not in the folder")
        done = f"{len(state.rows)}/{self.total} committed"
        if state.meta.get("finished") == "yes":
            check = subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=root,
                                   capture_output=True, text=True)
            assert check.returncode == 0, self.context(f"md5sum -c: {check.stdout}{check.stderr}")
            assert folders == self.expected, self.context("finished but not whole")
            return f"finished ({done})"
        hidden = [p for p in output.glob("DEMO/**/.*.incoming")]
        if len(state.rows) == self.total:
            return f"finalize ({done})"
        if hidden:
            return f"commit: moving a series in ({done})"
        if set(folders) - set(state.folders()):
            return f"commit: moved in, not yet journaled ({done})"
        if self.scratch_before and self.run.scratch_snapshot() == self.scratch_before:
            return f"start-up, before scratch was cleaned ({done})"
        if self.run.scratch_files():
            return f"downloading/extracting ({done})"
        return f"start-up or between steps ({done})"

    # -- complete runs ----------------------------------------------------------------------

    def result_members(self, layout: Layout) -> dict[str, str]:
        if self.mode.compression:
            return archive_members(layout.output / "DEMO.tar.xz")
        return {f"DEMO/{k}": v for k, v in tree_members(layout.output / "DEMO").items()}

    def finish_and_verify(self, why: str) -> None:
        """Rerun to completion, then check the result as standard tools and users see it."""
        code, errors, seconds = self.run.complete_run(self.fake, self.mode)
        self.history.append(f"  rerun to completion ({why}): exit {code} after {seconds:.2f} s")
        assert code == errors_module.EXIT_OK, self.context(errors)
        self.assert_nothing_stray()
        output = self.run.output
        if self.mode.compression:
            archive = output / "DEMO.tar.xz"
            where = self.check / f"extract-life-{self.lives}"
            where.mkdir()
            try:
                verify_with_standard_tools(archive, where)   # xz -t, tar -t, tar -x, md5sum -c
            except subprocess.CalledProcessError as exc:
                raise AssertionError(self.context(f"{exc}")) from None
            with tarfile.open(archive, "r:xz") as tar:
                names = tar.getnames()
            assert len(names) == len(set(names)), self.context(
                f"repeated members: {sorted({n for n in names if names.count(n) > 1})}")
        else:
            root = output / "DEMO"
            check = subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=root,
                                   capture_output=True, text=True)
            assert check.returncode == 0, self.context(f"md5sum -c: {check.stdout}{check.stderr}")
            hidden = [str(p) for p in output.rglob(".*")]
            assert hidden == [], self.context(f"leftovers: {hidden}")
        members = self.result_members(self.run)
        folders = series_folders(members)
        assert folders == self.expected, self.context("series missing, extra or not whole")
        assert len(folders) == self.total == len(self.fake.series("DEMO")), self.context(
            f"{len(folders)} series folders")
        assert set(members) - {n for n in members if n.rsplit("/", 1)[0] in folders} == \
            COLLECTION_FILES, self.context("collection files")
        assert members == self.reference, self.context("differs from the uninterrupted run")
        assert sorted(os.listdir(output)) == sorted(self.mode.finished), self.context(
            f"left in --output: {sorted(os.listdir(output))}")
        assert self.run.scratch_files() == [], self.context(f"scratch: {self.run.scratch_files()}")
        assert list(self.run.scratch.iterdir()) == [], self.context("scratch not emptied")

    # -- the campaign -----------------------------------------------------------------------

    def delay(self, kind: str, committed: int) -> float:
        """Seconds until the kill: a fraction of the time this run should take, from the
        measured runs and what is still to do (the first series goes alone, the others
        share the time of the rest of an uninterrupted run)."""
        idle, single, full = self.idle_seconds, self.single_seconds, self.full_seconds
        remaining = max(self.total - committed, 1)
        expected = single + (full - single) * (remaining - 1) / (self.total - 1)
        busy = expected - idle
        if kind == "start":                  # interpreter, plan, journal, scratch clean-up
            return self.rng.uniform(0.0, 1.0) * idle
        if kind == "mid":                    # downloads, packing, commits
            return idle + self.rng.uniform(0.05, 0.8) * busy
        if kind == "late":                   # the last series and their commits
            return idle + self.rng.uniform(0.8, 1.0) * busy
        return self.rng.uniform(0.85, 1.1) * expected         # finalize, rename, exit

    def play(self) -> None:
        kinds = [("start", "mid", "late", "end")[i % 4] for i in range(self.mode.rounds)]
        self.rng.shuffle(kinds)
        check = self.assert_instant_tar if self.mode.compression else self.assert_instant_folder
        committed = 0
        for number, kind in enumerate(kinds, 1):
            delay = self.delay(kind, committed)
            self.scratch_before = self.run.scratch_snapshot()
            process = self.run.start(self.fake, self.mode)
            try:
                code = process.wait(timeout=delay)   # the random kill instant
                landed = f"after the run ended by itself (exit {code})"
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code, landed = None, "killed"
            self.history.append(f"  round {number:2} [{kind:5}] {delay:5.2f} s "
                                f"({delay / self.full_seconds:4.2f} of a run): {landed}")
            assert code in (None, errors_module.EXIT_OK), self.context(f"the run ended with exit {code}")
            self.assert_nothing_stray()
            state = self.inspect()
            where = check(state)
            self.history[-1] += f", {where}"
            committed = len(state.rows) if state else 0
            if state and state.meta.get("finished") == "yes":
                self.finish_and_verify(f"life {self.lives + 1} was finished")
                self.lives += 1
                self.run.reset()
                committed = 0
        self.finish_and_verify("after the last round")
        self.lives += 1
        print(self.context(log=False))


@pytest.mark.parametrize("mode", [TAR, FOLDER], ids=lambda m: m.name)
def test_kill_9_at_random_instants_never_breaks_the_promises(tmp_path, fake_nbia_factory, mode):
    fake = fake_nbia_factory(seed=SEED % 1000, **FAKE_CONFIG)
    campaign = Campaign(mode, tmp_path, fake)
    try:
        campaign.play()
    except AssertionError:
        raise
    except Exception as exc:         # anything unforeseen still names the seed and the rounds
        raise AssertionError(campaign.context(f"{type(exc).__name__}: {exc}")) from exc


# -- the same, through the .pyz ------------------------------------------------------------

class PyzLayout(Layout):
    """The kill campaign's folders, with the tool run from the .pyz."""
    pyz: Path
    shiv_root: Path

    def start(self, fake, mode, *extra: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
        argv = [*pyz_interpreter(), str(self.pyz), "--collection", "DEMO", *extra,
                "--output", str(self.output), "--temp_dir", str(self.scratch),
                "--cache_dir", str(self.cache), "--api-url", fake.url, "--no-progress",
                "--workers", str(WORKERS), "--retry-wait", "0.05",
                "--stall-timeout", "5", *(["--compression"] if mode.compression else [])]
        env = {k: v for k, v in pyz_env(self.shiv_root).items() if not k.startswith("XDG_")}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp))
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def test_kill_9_and_rerun_through_the_pyz(pyz, shiv_root, tmp_path, fake_nbia_factory,
                                          monkeypatch):
    """Four rounds of tests/test_kill_campaign.py (one at start-up, in the downloads, near the
    end, at the finish) and a rerun to completion, every run from the .pyz."""
    monkeypatch.setattr(PyzLayout, "pyz", pyz, raising=False)
    monkeypatch.setattr(PyzLayout, "shiv_root", shiv_root, raising=False)
    monkeypatch.setattr(sys.modules[__name__], "Layout", PyzLayout)
    fake = fake_nbia_factory(seed=SEED % 1000,
                             **FAKE_CONFIG)
    campaign = Campaign(
        dataclasses.replace(TAR, rounds=4), tmp_path, fake)
    campaign.play()
