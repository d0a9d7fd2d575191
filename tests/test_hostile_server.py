"""The downloader end to end against a hostile or broken server, and against a hostile disk:
rows whose UIDs are paths, duplicate rows, patients named like collection files, trickles,
endless and bomb-like zips, unreadable entries, escape sequences in names, garbage metadata
and manifests, signals while a request hangs or series are in flight, a tampered .part,
deleted outputs, a foreign --cache_dir and runs that share --temp_dir.

The unit tests of the same features are in test_data_safety.py; these go through td.main
(in process, see Run) or a real process (start_subprocess) against tests/fakes/fake_nbia.py."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tcia_dl import errors as errors_module, plan, storage
from fakes.fake_nbia import Faults
from helpers import (Run, archive_members, expected_folders, journal_uids, md5,
                     series_folders, start_subprocess, tool_arguments, tree_members,
                     verify_with_standard_tools, wait_until)


# -- helpers --------------------------------------------------------------------------------

def uids_of(fake, collection: str = "DEMO") -> list[str]:
    return [s["SeriesInstanceUID"] for s in fake.series(collection)]


def expected_from(fake, records: list[dict], collection: str = "DEMO") -> dict[str, list[str]]:
    """expected_folders for the rows a hook made the server send instead of its own."""
    return {f"{collection}/{p.path}": sorted(md5(data) for _, data in fake.instances(p.uid))
            for p in plan.plan_collection(collection, records)}


def label_of(fake, uid: str, collection: str = "DEMO") -> str:
    """How the per-series log lines name the series."""
    planned = {p.uid: p for p in plan.plan_collection(collection, fake.series(collection))}
    return planned[uid].short_label


def attempt_lines(log: str, label: str) -> list[str]:
    return [line for line in log.splitlines() if f"{label}: attempt " in line]


def tree_folders(root: Path, collection: str = "DEMO") -> dict[str, list[str]]:
    return series_folders({f"{collection}/{k}": v for k, v in tree_members(root).items()})


def md5sum_check(folder: Path) -> None:
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=folder, check=True)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# Runs the tool, then writes its own peak RSS: the kernel's high-water mark of the memory
# the process has had since its exec (VmHWM). wait4's ru_maxrss would also count the copy of
# this test process a fork makes before the exec: hundreds of MB once moto and duckdb are in.
MEASURED = """import runpy, sys
path, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(path, run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    sys.stderr.write(f"\\nPEAK-KB {peak}\\n")
"""


def start_measured(fake, output: Path, cache: Path) -> subprocess.Popen:
    """start_subprocess, with the child's peak RSS written last on its stderr."""
    argv = [sys.executable, "-c", MEASURED, *tool_arguments(fake, output, cache)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_exit(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in kB) of this child alone: from its PEAK-KB line when
    started by start_measured, else wait4's ru_maxrss. A child still running after timeout
    seconds is killed."""
    killer = threading.Timer(timeout, process.kill)
    killer.start()
    try:
        errors = process.stderr.read()       # until EOF: the child has closed stderr
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    peak = re.search(r"\nPEAK-KB (\d+)\n$", errors)
    if peak:
        return process.returncode, errors[:peak.start()], int(peak[1])
    return process.returncode, errors, usage.ru_maxrss


@contextlib.contextmanager
def deadline(seconds: float):
    """An in-process run that would hang (a guard that broke) is ended as SIGTERM ends it:
    td.main returns 143 and the test fails instead of hanging."""
    previous = signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGTERM))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """stderr of a process that must end within timeout; killed if it does not."""
    try:
        return process.communicate(timeout=timeout)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def scratch_folders(temp_dir: Path) -> list[Path]:
    return list(temp_dir.glob(f"{storage.SCRATCH_PREFIX}*.tmp")) if temp_dir.is_dir() else []


# -- what the server lists ------------------------------------------------------------------

def test_rows_whose_uid_is_a_path_are_skipped_and_nothing_is_written_outside(tmp_path,
                                                                             fake_nbia_factory):
    important = tmp_path / "important"
    rewritten: list[str] = []

    def hook(rows: list[dict]) -> list[dict]:
        rewritten[:] = [rows[1]["SeriesInstanceUID"], rows[2]["SeriesInstanceUID"]]
        rows[1]["SeriesInstanceUID"] = str(important)
        rows[2]["SeriesInstanceUID"] = "../../../x"
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    (tmp_path / "important.zip").write_bytes(b"precious, not a zip")
    # every folder "../../../x" could reach from the output's depths or the working folder
    ancestors = set((tmp_path / "out" / "DEMO" / "patient" / "study").parents) | \
        set(Path.cwd().parents) | {Path.cwd()}
    ancestors -= {tmp_path, tmp_path / "out", tmp_path / "out" / "DEMO"}
    before = {p: set(os.listdir(p)) for p in [tmp_path, *ancestors] if p.is_dir()}

    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert run.log.count("skipped 2 row(s) without a valid SeriesInstanceUID") == 1
    kept = [s for s in fake.series("DEMO") if s["SeriesInstanceUID"] not in rewritten]
    assert len(kept) == len(fake.series("DEMO")) - 2
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == \
        expected_from(fake, kept)
    assert (tmp_path / "important.zip").read_bytes() == b"precious, not a zip"
    assert not important.exists()
    assert set(os.listdir(tmp_path)) == before[tmp_path] | {"out", "cache"}
    assert sorted(os.listdir(run.output)) == ["DEMO.tar.xz", "DEMO.tar.xz.journal"]
    for folder, names in before.items():
        if folder != tmp_path:
            assert not {n for n in set(os.listdir(folder)) - names if n.startswith("x")}, folder
    # the server's rows never reached the server again as a request either
    assert fake.counters.requests("getImage", 400) == 0
    assert fake.counters.requests("getImageWithMD5Hash", 400) == 0


def test_duplicate_rows_are_downloaded_once(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(series_rows_hook=lambda rows: rows + [dict(r) for r in rows[2:5]])
    n = len(fake.series("DEMO"))
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert "the server listed 3 series twice" in run.log
    assert f"report for DEMO: {n} series requested" in run.log
    assert run.log.count(" done DEMO/") == n
    with tarfile.open(run.output / "DEMO.tar.xz", "r:xz") as tar:
        names = tar.getnames()
    assert len(names) == len(set(names))
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)


def test_patients_named_like_collection_files_get_folders_of_their_own(tmp_path,
                                                                       fake_nbia_factory):
    names = ["MD5SUMS", "LICENSE", "metadata.csv"]

    def hook(rows: list[dict]) -> list[dict]:
        for row, name in zip(rows[::4], names):         # three rows, three patients
            row["PatientID"] = name
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    expected = expected_from(fake, hook(fake.series("DEMO")))
    assert {folder.split("/")[1] for folder in expected} >= {f"{n}-patient" for n in names}

    tar_run = Run(tmp_path / "tar", fake)
    assert tar_run.code == errors_module.EXIT_OK, tar_run.log
    archive = tar_run.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected
    verify_with_standard_tools(archive, tmp_path / "tar")

    tree_run = Run(tmp_path / "tree", fake, compression=False)
    assert tree_run.code == errors_module.EXIT_OK, tree_run.log
    root = tree_run.output / "DEMO"
    md5sum_check(root)
    for name in names:
        assert (root / f"{name}-patient").is_dir()
        assert (root / name).is_file()
    assert tree_folders(root) == expected


# -- the disk outranks the journal ----------------------------------------------------------

def test_a_folder_tree_is_checked_against_the_disk_not_the_journal(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour")       # one zip per series: exact counts
    output = tmp_path / "out"
    first = Run(tmp_path / "1", fake, output=output, compression=False)
    assert first.code == errors_module.EXIT_OK, first.log
    root = output / "DEMO"
    planned = plan.plan_collection("DEMO", fake.series("DEMO"))
    victim = planned[5]
    downloads = {p.uid: fake.counters.complete_downloads(p.uid) for p in planned}

    shutil.rmtree(root / victim.path)
    again = Run(tmp_path / "2", fake, output=output, compression=False)
    assert again.code == errors_module.EXIT_OK, again.log
    assert (root / victim.path).is_dir()
    md5sum_check(root)
    assert tree_folders(root) == expected_folders(fake)
    assert {p.uid: fake.counters.complete_downloads(p.uid) for p in planned} == \
        {**downloads, victim.uid: downloads[victim.uid] + 1}

    shutil.rmtree(root)
    third = Run(tmp_path / "3", fake, output=output, compression=False)
    assert third.code == errors_module.EXIT_OK, third.log
    md5sum_check(root)
    assert tree_folders(root) == expected_folders(fake)
    assert {(root / name).is_file() for name in ("LICENSE", "CITATION.md", "metadata.csv",
                                               "MD5SUMS")} == {True}


def test_a_deleted_archive_is_rebuilt_though_its_journal_says_finished(tmp_path,
                                                                       fake_nbia_factory):
    fake = fake_nbia_factory()
    n = len(fake.series("DEMO"))
    output = tmp_path / "out"
    assert Run(tmp_path / "1", fake, output=output).code == errors_module.EXIT_OK
    (output / "DEMO.tar.xz").unlink()
    assert (output / "DEMO.tar.xz.journal").exists()

    dry = Run(tmp_path / "2", fake, "--dry-run", output=output)
    assert dry.code == errors_module.EXIT_OK, dry.log
    assert f"already in the output: 0 series; to download: {n} series" in dry.log
    assert "nothing to do" not in dry.log

    again = Run(tmp_path / "3", fake, output=output)
    assert again.code == errors_module.EXIT_OK, again.log
    assert f"downloaded and verified now: {n}" in again.log
    assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)


# -- transfers that never end ---------------------------------------------------------------

def test_a_trickling_series_is_cut_as_a_stall_and_retried(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(faults=Faults(trickle_rate=1.0))
    victim = uids_of(fake)[4]
    fake.script_faults(victim, ["trickle"])
    started = time.monotonic()
    # a process, so that a trickle nobody cuts fails the test instead of hanging it;
    # argparse takes the last --stall-timeout
    process = start_subprocess(fake, tmp_path / "out", tmp_path / "cache", "--stall-timeout", "2")
    errors = finish(process, 40)
    assert process.returncode == errors_module.EXIT_OK, errors
    assert time.monotonic() - started < 40
    lines = attempt_lines(errors, label_of(fake, victim))
    assert len(lines) == 1 and "stalled" in lines[0], lines
    assert series_folders(archive_members(tmp_path / "out" / "DEMO.tar.xz")) == \
        expected_folders(fake)


@pytest.mark.parametrize("hang", ["silent", "trickle"])
def test_sigterm_during_a_hung_metadata_request_exits_promptly(tmp_path, fake_nbia_factory,
                                                               hang):
    fake = fake_nbia_factory(metadata_hang=hang)
    # A stall timeout far beyond the bound: only the signal can end the request in time.
    process = start_subprocess(fake, tmp_path / "out", tmp_path / "cache",
                               "--stall-timeout", "60")

    def request_in_flight() -> bool:
        if hang == "trickle":          # its answer has begun, at a byte per second
            return fake.counters.requests("getSeries") >= 1
        return bool(fake._connections)

    elapsed, errors = sigterm_once(process, request_in_flight, "the hung request")
    assert process.returncode == errors_module.EXIT_SIGTERM, errors
    assert elapsed < 5, elapsed
    no_traceback(errors)


def sigterm_once(process, ready, what: str) -> tuple[float, str]:
    """SIGTERM once ready() holds: (seconds from the signal to the exit, stderr)."""
    try:
        wait_until(ready, 60, what)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
    finally:
        errors = finish(process, 30)
    return time.monotonic() - sent, errors


def test_sigterm_with_several_series_in_flight_is_clean(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=8, image_size=128, conn_bandwidth=100_000)
    output = tmp_path / "out"
    process = start_subprocess(fake, output, tmp_path / "cache", "--workers", "4")
    # the metadata connection stays open (keep-alive): 3 means 2 or more zips in flight
    elapsed, errors = sigterm_once(
        process, lambda: len(journal_uids(output)) >= 2 and len(fake._connections) >= 3,
        "two commits and downloads in flight")
    assert process.returncode == errors_module.EXIT_SIGTERM, errors
    assert elapsed < 10, elapsed
    no_traceback(errors)
    assert "internal error" not in errors
    assert "unexpected error" not in errors
    assert "report for DEMO" in errors
    assert not [line for line in errors.splitlines() if "FAILED" in line], errors
    failed = [line for line in errors.splitlines() if "  failed:" in line]
    assert failed and all(line.rstrip().endswith(" 0") for line in failed), failed
    assert len(journal_uids(output)) < len(fake.series("DEMO"))     # it really was cut short


# -- zips no NBIA would send ----------------------------------------------------------------

def test_a_64_mib_license_is_refused_without_holding_it_in_memory(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(faults=Faults(huge_entry_bytes=64 << 20))
    # the same run without the fault: what the process needs anyway
    control = start_measured(fake, tmp_path / "control", tmp_path / "cache-control")
    control_code, control_errors, control_kb = wait_for_exit(control)
    assert control_code == errors_module.EXIT_OK, control_errors
    victim = uids_of(fake)[4]
    fake.script_faults(victim, ["huge_license"])
    process = start_measured(fake, tmp_path / "out", tmp_path / "cache")
    code, errors, peak_kb = wait_for_exit(process)
    assert code == errors_module.EXIT_OK, errors
    no_traceback(errors)
    lines = attempt_lines(errors, label_of(fake, victim))
    # Both guards refuse it before a byte of it is inflated: the cap on LICENSE, or the
    # bound on what the whole zip may inflate to (FileSize), which is checked first.
    assert len(lines) == 1 and ("LICENSE in the zip is larger than" in lines[0]
                                or "would inflate to" in lines[0]), lines
    # Holding the LICENSE would take 64 MiB more (its text another 64 MiB).
    assert peak_kb < 400 * 1024 and peak_kb < control_kb + 32 * 1024, \
        f"peak RSS {peak_kb} kB; without the fault {control_kb} kB"
    assert series_folders(archive_members(tmp_path / "out" / "DEMO.tar.xz")) == \
        expected_folders(fake)


# kind, FakeConfig overrides, what the log says of the first attempt
ZIP_FAULTS = {
    # a LICENSE over its 1 MiB cap, yet small enough for the FileSize bound: the cap decides
    "huge_license": ({"faults": Faults(huge_entry_bytes=4 << 20)},
                     "LICENSE in the zip is larger than"),
    "huge_md5_table": ({"faults": Faults(huge_entry_bytes=8 << 20)},
                       "md5hashes.csv in the zip is larger than"),
    "endless": ({}, "more than the series' FileSize allows"),
    "huge_dicom": ({"include_md5": "honour"}, "would inflate to"),
    "encrypted_entry": ({}, "unreadable zip entry"),
    "unsupported_method": ({}, "unreadable zip entry"),
}


@pytest.mark.parametrize("kind", list(ZIP_FAULTS))
def test_a_hostile_zip_is_refused_and_the_series_retried(tmp_path, fake_nbia_factory, kind):
    overrides, symptom = ZIP_FAULTS[kind]
    fake = fake_nbia_factory(**overrides)
    victim = uids_of(fake)[4]
    fake.script_faults(victim, [kind])
    with deadline(60):
        run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    lines = attempt_lines(run.log, label_of(fake, victim))
    assert len(lines) == 1 and "attempt 1/6 failed" in lines[0] and symptom in lines[0], lines
    archive = run.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    # scratch is gone: whatever the server sent is not left on disk
    assert sorted(os.listdir(run.output)) == ["DEMO.tar.xz", "DEMO.tar.xz.journal"]
    if kind == "huge_dicom":
        largest = max(len(data) for uid in uids_of(fake) for _, data in fake.instances(uid))
        with tarfile.open(archive, "r:xz") as tar:
            assert max(m.size for m in tar.getmembers() if m.name.count("/") == 4) <= largest


def test_a_retry_after_date_is_honoured(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(faults=Faults(retry_after=3))
    victim = uids_of(fake)[4]
    fake.script_faults(victim, ["retry_after_date"])
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    lines = attempt_lines(run.log, label_of(fake, victim))
    assert len(lines) == 1 and "429" in lines[0], lines
    waited = re.search(r"retrying in (\d+) s", lines[0])
    assert waited and int(waited.group(1)) >= 2, lines[0]
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)


def test_escape_sequences_in_entry_names_never_reach_a_terminal_or_a_log(tmp_path,
                                                                         fake_nbia_factory,
                                                                         capsys):
    fake = fake_nbia_factory()
    victim = uids_of(fake)[4]
    fake.script_faults(victim, ["control_names"])
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    err = capsys.readouterr().err
    logs = list((tmp_path / "cache" / "logs").glob("*.log"))
    assert len(logs) == 2
    for text in [err, *(p.read_text(encoding="utf-8", errors="replace") for p in logs)]:
        assert "\x1b" not in text and "\x07" not in text
    dropped = [line for line in run.log.splitlines() if ": dropped " in line]
    assert len(dropped) == 1 and f"{label_of(fake, victim)}: dropped 1 file(s)" in dropped[0]
    debug = next(p for p in logs if p.name.endswith("-debug.log")).read_text()
    named = [line for line in debug.splitlines() if ": dropped " in line and "red" in line]
    assert len(named) == 1 and "\\x1b[31mred" in named[0] and "\\x07bell" in named[0]
    members = archive_members(run.output / "DEMO.tar.xz")
    assert not any("\x1b" in name or "\x07" in name for name in members)
    assert series_folders(members) == expected_folders(fake)


# -- metadata no NBIA would send ------------------------------------------------------------

def test_a_json_object_instead_of_rows_is_one_error_line(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    fake.override_metadata("getSeries", 200, b'{"a": 1}', [("Content-Type", "application/json")])
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_INCOMPLETE
    err = capsys.readouterr().err
    no_traceback(err)
    assert err.count("answered with a JSON dict") == 1
    assert len([line for line in err.splitlines() if " ERROR " in line]) == 1, err
    assert not (run.output / "DEMO.tar.xz.part").exists()


def test_a_list_of_strings_is_no_collection(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    fake.override_metadata("getSeries", 200, b'["a", "b"]', [("Content-Type", "application/json")])
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_USAGE
    err = capsys.readouterr().err
    no_traceback(err)
    assert "unknown collection 'DEMO'" in err


def test_rows_without_a_uid_are_skipped_and_the_rest_downloaded(tmp_path, fake_nbia_factory):
    dropped: list[str] = []

    def hook(rows: list[dict]) -> list[dict]:
        dropped[:] = [rows[3].pop("SeriesInstanceUID"), rows[7].pop("SeriesInstanceUID")]
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert run.log.count("skipped 2 row(s) without a valid SeriesInstanceUID") == 1
    kept = [s for s in fake.series("DEMO") if s["SeriesInstanceUID"] not in dropped]
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == \
        expected_from(fake, kept)


def test_a_file_size_that_is_no_number_is_ignored(tmp_path, fake_nbia_factory):
    def hook(rows: list[dict]) -> list[dict]:
        rows[2]["FileSize"] = "12.5MB"
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)


# -- paths and files the user gives ---------------------------------------------------------

def test_an_output_path_with_the_word_missing_works(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    output = tmp_path / "missing" / "out"
    run = Run(tmp_path, fake, "--temp_dir", str(tmp_path / "missing" / "tmp"), output=output)
    assert run.code == errors_module.EXIT_OK, run.log
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)


def test_a_zero_byte_journal_is_a_fresh_start(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    output = tmp_path / "out"
    output.mkdir()
    (output / "DEMO.tar.xz.journal").touch()          # a kill between create and schema
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)


def test_a_cache_dir_of_another_user_is_refused(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)       # the tests run as root in CI
    cache.chmod(0o777)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_USAGE
    err = capsys.readouterr().err
    no_traceback(err)
    assert len(err.strip().splitlines()) == 1, err
    assert "belongs to another user" in err
    assert fake.counters.snapshot()["requests"] == {}
    assert list(cache.iterdir()) == []                  # nothing written into it


def test_a_garbage_manifest_is_refused_before_any_request(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    manifest = tmp_path / "garbage.tcia"
    manifest.write_bytes(random.Random(20240611).randbytes(2 << 20))
    started = time.monotonic()
    run = Run(tmp_path, fake, "--manifest", str(manifest), collection=None)
    assert run.code == errors_module.EXIT_USAGE
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    no_traceback(err)
    assert len([line for line in err.splitlines() if "mostly not SeriesInstanceUIDs" in line]) == 1
    assert fake.counters.requests("getSeries") == 0
    assert fake.counters.requests("getSeriesMetadata") == 0


# -- a tampered archive ---------------------------------------------------------------------

def test_a_tampered_part_is_noticed_and_the_damage_fetched_again(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour")
    victim = uids_of(fake)[6]
    fake.script_faults(victim, ["500"] * 2)      # as many as --retries: none left for the rerun
    output = tmp_path / "out"
    first = Run(tmp_path / "1", fake, "--retries", "2", output=output)
    assert first.code == errors_module.EXIT_INCOMPLETE, first.log
    part = output / "DEMO.tar.xz.part"
    assert part.exists() and not (output / "DEMO.tar.xz").exists()
    with open(part, "r+b") as handle:            # 16 bytes flipped in a committed stream
        handle.seek(part.stat().st_size // 2)
        data = handle.read(16)
        handle.seek(-len(data), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in data))

    again = Run(tmp_path / "2", fake, output=output)
    assert again.code == errors_module.EXIT_OK, again.log
    assert "does not match the journal" in again.log
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)
    assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)


# -- runs that share --temp_dir -------------------------------------------------------------

def test_two_archives_of_one_collection_share_a_temp_dir(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=8, conn_bandwidth=60_000)
    scratch = tmp_path / "scratch"
    outputs = [tmp_path / "out1", tmp_path / "out2"]
    processes = [start_subprocess(fake, output, tmp_path / f"cache{n}", "--temp_dir",
                                  str(scratch)) for n, output in enumerate(outputs)]
    try:
        wait_until(lambda: len(scratch_folders(scratch)) >= 2, 60, "both runs' scratch at once")
    finally:
        results = [finish(p, 120) for p in processes]
    for process, errors in zip(processes, results):
        assert process.returncode == errors_module.EXIT_OK, errors
    for n, output in enumerate(outputs):
        (tmp_path / f"v{n}").mkdir()
        verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path / f"v{n}")
        assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)
    assert scratch_folders(scratch) == []


def test_an_archive_and_a_folder_tree_share_an_output_and_a_temp_dir(tmp_path,
                                                                     fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=8, conn_bandwidth=60_000)
    output, scratch = tmp_path / "out", tmp_path / "scratch"
    archive_run = start_subprocess(fake, output, tmp_path / "cache-tar", "--temp_dir",
                                   str(scratch))
    try:
        wait_until(lambda: scratch_folders(scratch), 60, "the archive run's scratch")
        assert archive_run.poll() is None
        tree_run = Run(tmp_path / "tree", fake, "--temp_dir", str(scratch), output=output,
                       compression=False)
    finally:
        errors = finish(archive_run, 120)
    assert tree_run.code == errors_module.EXIT_OK, tree_run.log
    assert archive_run.returncode == errors_module.EXIT_OK, errors
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)
    md5sum_check(output / "DEMO")
    assert tree_folders(output / "DEMO") == expected_folders(fake)
    assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)
    assert scratch_folders(scratch) == []
