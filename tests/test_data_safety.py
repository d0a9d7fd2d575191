"""Data safety without a server (issue: hostile servers, shared scratch, tampering): scratch
that belongs to one run, locks that admit one writer, committed streams checked against
their journal, journals and disks that fail, and log lines that neither leak secrets nor
carry escape sequences. Each test fails on version 0.3.0."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from email.utils import formatdate
from pathlib import Path

import pytest

import tcia_dl
from tcia_dl import collection_files, errors, journal as journal_module, logs, net, plan, storage
from tcia_dl.formats import base as formats_base, tarstreams, tree, xz as tarxz
from tcia_dl.sources import base as sources_base, nbia
from helpers import (Run, commit_series, dicom_bytes, member_md5s, planned, two_file_series,
                     write_series_zip)


def tar_target(out: Path, scratch: Path, name: str = "COLL") -> tarxz.TarXzTarget:
    out.mkdir(parents=True, exist_ok=True)
    return tarxz.TarXzTarget(name, out, scratch, level=0)


def abandon(target: formats_base.Target) -> None:
    """What kill -9 leaves of a run: its files, and none of its locks."""
    target.journal.close()
    target._lock_file.close()
    target._scratch_owner.close()


# -- scratch belongs to one run ---------------------------------------------------------------

def test_runs_sharing_a_temp_dir_never_touch_each_others_scratch(tmp_path):
    """Two outputs of one collection, one --temp_dir: 0.3 gave both the same scratch folder
    and each emptied it at start, truncating the zip the other was compressing."""
    first = tar_target(tmp_path / "out1", tmp_path / "scratch")
    in_flight = first.scratch_path(".zip")
    in_flight.write_bytes(b"a zip being compressed")
    second = tar_target(tmp_path / "out2", tmp_path / "scratch")
    assert second.scratch != first.scratch
    assert in_flight.read_bytes() == b"a zip being compressed"
    second.close()
    assert in_flight.exists(), "closing one run removed the other's scratch"
    first.close()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_killed_runs_scratch_is_swept_and_a_live_ones_is_not(tmp_path):
    live = tar_target(tmp_path / "out1", tmp_path / "scratch")
    killed = tar_target(tmp_path / "out2", tmp_path / "scratch")
    (live.scratch_path(".zip")).write_bytes(b"live")
    (killed.scratch_path(".zip")).write_bytes(b"dead")
    abandon(killed)
    third = tar_target(tmp_path / "out3", tmp_path / "scratch")
    assert not killed.scratch.exists()
    assert [p.read_bytes() for p in live.scratch.iterdir()] == [b"live"]
    third.close()
    live.close()


def test_scratch_files_are_named_by_the_tool_not_by_the_server(tmp_path):
    target = tar_target(tmp_path / "out", tmp_path / "scratch")
    names = {target.scratch_path(".zip").name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith("series-") for n in names)
    target.close()


# -- one writer per output --------------------------------------------------------------------

def test_a_lock_file_unlinked_by_a_finishing_run_admits_only_one_new_writer(tmp_path,
                                                                            monkeypatch):
    """A waiter that opened the lock file just before its owner finished (and unlinked
    it) must not hold a lock on the dead file while a third run locks a new one."""
    out = tmp_path / "out"
    owner = tar_target(out, tmp_path / "scratch")
    real_flock = fcntl.flock
    state = {"armed": True}

    def flock_after_owner_finishes(handle, flags):
        if state["armed"]:
            state["armed"] = False
            owner.close()            # unlinks the file the waiter has just opened
        return real_flock(handle, flags)

    monkeypatch.setattr(fcntl, "flock", flock_after_owner_finishes)
    waiter = tar_target(out, tmp_path / "scratch")
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with pytest.raises(errors.FatalRunError, match="being written by"):
        tar_target(out, tmp_path / "scratch")
    waiter.close()


# -- committed streams are checked --------------------------------------------------------------

def flip(path: Path, offset: int, count: int = 16) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(count))
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def test_a_flipped_byte_in_a_committed_stream_is_fetched_again_not_archived(tmp_path):
    out = tmp_path / "out"
    target = tar_target(out, tmp_path / "scratch")
    first = commit_series(target, tmp_path, "1.2.3.40", "P/d-S-1/1-CT-40")
    first_end = (out / "COLL.tar.xz.part").stat().st_size
    commit_series(target, tmp_path, "1.2.3.41", "P/d-S-1/2-CT-41")
    commit_series(target, tmp_path, "1.2.3.42", "P/d-S-1/3-CT-42")
    abandon(target)
    flip(out / "COLL.tar.xz.part", first_end + 200)        # inside the second stream

    resumed = tar_target(out, tmp_path / "scratch")
    # the damaged series and the one behind it are forgotten; the first is kept
    assert set(resumed.committed()) == {"1.2.3.40"}
    assert (out / "COLL.tar.xz.part").stat().st_size == first_end
    again = commit_series(resumed, tmp_path, "1.2.3.41", "P/d-S-1/2-CT-41")
    again |= commit_series(resumed, tmp_path, "1.2.3.42", "P/d-S-1/3-CT-42")
    resumed.finalize()
    resumed.close()
    subprocess.run(["xz", "-t", str(out / "COLL.tar.xz")], check=True)
    assert {k: v for k, v in member_md5s(out / "COLL.tar.xz").items() if k in first | again} \
        == {k: hashlib.md5(v).hexdigest() for k, v in (first | again).items()}


def test_every_committed_stream_keeps_its_checksum_and_a_clean_resume_keeps_all(tmp_path):
    out = tmp_path / "out"
    target = tar_target(out, tmp_path / "scratch")
    for n in range(3):
        commit_series(target, tmp_path, f"1.2.3.5{n}", f"P/d-S-1/{n}-CT")
    streams = target.journal.streams()
    assert [s[4] is not None for s in streams] == [True, True, True]
    assert [s[2] for s in streams[1:]] == [s[3] for s in streams[:-1]]     # contiguous
    abandon(target)
    resumed = tar_target(out, tmp_path / "scratch")
    assert len(resumed.committed()) == 3
    resumed.close()


def test_an_append_that_does_not_read_back_as_written_is_undone(tmp_path, monkeypatch):
    """A torn or foreign write to the .part is caught before a journal row describes it."""
    out = tmp_path / "out"
    target = tar_target(out, tmp_path / "scratch")
    commit_series(target, tmp_path, "1.2.3.60", "P/d-S-1/1-CT")
    end = (out / "COLL.tar.xz.part").stat().st_size
    monkeypatch.setattr(tarstreams, "stream_sha256", lambda *args: "0" * 64)
    with pytest.raises(errors.TransientError, match="not the one compressed"):
        commit_series(target, tmp_path, "1.2.3.61", "P/d-S-1/2-CT")
    assert (out / "COLL.tar.xz.part").stat().st_size == end
    assert set(target.committed()) == {"1.2.3.60"}
    target.close()


def test_a_journal_of_version_0_3_without_checksums_is_checked_by_xz_itself(tmp_path):
    out = tmp_path / "out"
    target = tar_target(out, tmp_path / "scratch")
    commit_series(target, tmp_path, "1.2.3.70", "P/d-S-1/1-CT")
    first_end = (out / "COLL.tar.xz.part").stat().st_size
    commit_series(target, tmp_path, "1.2.3.71", "P/d-S-1/2-CT")
    target.journal._db.execute("UPDATE series SET stream_sha256 = NULL")
    abandon(target)
    flip(out / "COLL.tar.xz.part", first_end + 100)
    resumed = tar_target(out, tmp_path / "scratch")
    assert set(resumed.committed()) == {"1.2.3.70"}
    resumed.close()


# -- folder trees -------------------------------------------------------------------------------

def folder_target(out: Path, scratch: Path, name: str = "COLL", suffix: str = "") -> formats_base.Target:
    out.mkdir(parents=True, exist_ok=True)
    return tree.DirectoryTarget(name, out, scratch, suffix)


def test_a_shard_starting_leaves_another_shards_incoming_folder_alone(tmp_path):
    out = tmp_path / "out"
    incoming = out / "COLL" / "P" / "d-S-1" / ".2-CT-7.incoming"
    incoming.mkdir(parents=True)
    (incoming / "1-1.dcm").write_bytes(b"being copied in by shard 1")
    shard = folder_target(out, tmp_path / "scratch", "COLL.shard-0-of-2", ".shard-0-of-2")
    assert (incoming / "1-1.dcm").exists()
    shard.close()


def test_a_deleted_series_folder_is_forgotten_and_the_tree_is_not_finished(tmp_path):
    out = tmp_path / "out"
    target = folder_target(out, tmp_path / "scratch")
    commit_series(target, tmp_path, "1.2.3.80", "P/d-S-1/1-CT")
    commit_series(target, tmp_path, "1.2.3.81", "P/d-S-1/2-CT")
    target.finalize()
    target.close()
    shutil.rmtree(out / "COLL" / "P" / "d-S-1" / "2-CT")
    again = folder_target(out, tmp_path / "scratch")
    assert set(again.committed()) == {"1.2.3.80"}
    assert not again.complete
    again.close()


# -- journals and disks that fail ---------------------------------------------------------------

def test_a_zero_byte_journal_is_an_empty_journal(tmp_path):
    journal = tmp_path / "COLL.tar.xz.journal"
    journal.touch()                    # a kill between connect and the schema
    assert journal_module.read_journal(journal) == ({}, False)


def test_a_full_disk_inside_a_journal_transaction_is_named_not_masked(tmp_path):
    """sqlite rolls back by itself when the disk is full: 0.3's ROLLBACK then failed with
    'cannot rollback - no transaction is active', hiding why."""
    journal = journal_module.Journal(tmp_path / "j")
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    with pytest.raises(errors.FatalRunError, match="no space") as caught:
        with journal._transaction() as db:
            db.execute("ROLLBACK")         # what sqlite does on SQLITE_FULL
            raise full
    assert caught.value.exit_code == errors.EXIT_INCOMPLETE
    journal.close()


def test_discarding_a_packer_on_a_full_disk_does_not_hide_the_first_error(tmp_path):
    zip_path, _ = two_file_series(tmp_path, "1.2.3.90")
    packer = tarstreams.UnitPacker(zip_path, tarxz.XZ.compressor(0), "COLL/P/", tmp_path)

    class FullDisk:
        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    packer._writer._file.close()
    packer._writer._file = FullDisk()
    packer.discard()                    # 0.3: raised ENOSPC again from inside `finally`
    assert not zip_path.exists()


# -- zips a hostile server can send -------------------------------------------------------------

def test_an_absurd_license_or_md5_table_is_a_bad_series_not_a_crash(tmp_path):
    uid = "1.2.3.100"
    files = {"1-1.dcm": dicom_bytes(uid, 1)}
    big_license = write_series_zip(tmp_path / "a.zip", files, license_text="x" * (2 << 20))
    with pytest.raises(errors.TransientError, match="LICENSE in the zip is larger"):
        nbia.verify_zip(big_license, planned(uid, "P/S/1", count=1))
    rows = {"1-1.dcm": hashlib.md5(files["1-1.dcm"]).hexdigest(),
            **{f"x{n}.dcm": "0" * 32 for n in range(40_000)}}
    big_table = write_series_zip(tmp_path / "b.zip", files, listed=rows)
    with pytest.raises(errors.TransientError, match="md5hashes.csv in the zip is larger"):
        nbia.verify_zip(big_table, planned(uid, "P/S/1", count=1))


def test_a_zip_inflating_far_beyond_the_series_filesize_is_refused(tmp_path):
    uid = "1.2.3.110"
    data = dicom_bytes(uid, 1)
    bomb = data + b"\0" * (64 << 20)          # deflates to little, inflates to 64 MB
    path = write_series_zip(tmp_path / "bomb.zip", {"1-1.dcm": bomb})
    series = plan.PlannedSeries(uid=uid, collection="C", path="P/S/1", record={},
                              image_count=1, file_size=len(data))
    with pytest.raises(errors.TransientError, match="would inflate to"):
        nbia.verify_zip(path, series)


def test_encrypted_and_unsupported_entries_are_a_bad_zip_retried(tmp_path):
    uid = "1.2.3.120"
    path = write_series_zip(tmp_path / "s.zip", {"1-1.dcm": dicom_bytes(uid, 1)})
    raw = bytearray(path.read_bytes())
    name = b"1-1.dcm"
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo("1-1.dcm").header_offset
    raw[local + 6] |= 0x01                                  # local header: "encrypted"
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(name)] != name:
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 8] |= 0x01                                # central directory: the same
    encrypted = tmp_path / "encrypted.zip"
    encrypted.write_bytes(bytes(raw))
    with pytest.raises(errors.TransientError, match="unreadable zip entry"):
        nbia.verify_zip(encrypted, planned(uid, "P/S/1", count=1))


# -- small parsers ------------------------------------------------------------------------------

def test_retry_after_is_understood_in_its_http_date_form():
    assert 25 <= net.parse_retry_after(formatdate(time.time() + 30, usegmt=True)) <= 31
    assert net.parse_retry_after("7") == 7.0
    assert net.parse_retry_after("soon") is None


def test_a_huge_retry_count_cannot_overflow_the_backoff():
    assert net.RetryPolicy(attempts=5000, base_delay=1.0).delay(4999) <= 300


def test_server_uids_are_checked_before_they_name_anything():
    rows = [{"SeriesInstanceUID": "/home/user/important"}, {"SeriesInstanceUID": "../../x"},
            {"SeriesInstanceUID": "1" * 70 + ".1"}, {"SeriesInstanceUID": 12},
            {"PatientID": "no uid"}, {"SeriesInstanceUID": "1.2.840.5", "FileSize": "12.5MB",
                                       "StudyInstanceUID": {"a": 1}}]
    usable = plan.usable_records(rows, "getSeries")
    assert [r["SeriesInstanceUID"] for r in usable] == ["1.2.840.5"]
    assert "FileSize" not in usable[0] and isinstance(usable[0]["StudyInstanceUID"], str)
    assert plan.plan_records(usable)[0].file_size == 0


def test_a_patient_named_like_a_collection_file_gets_its_own_folder_name():
    records = [{"SeriesInstanceUID": f"1.2.{n}", "StudyInstanceUID": "1.3", "PatientID": pid,
                "Collection": "C"} for n, pid in enumerate(["MD5SUMS", "LICENSE", "metadata.csv",
                                                            "license.shard-0-of-2", "P1"])]
    patients = {s.path.split("/")[0] for s in plan.plan_records(records)}
    assert patients == {"MD5SUMS-patient", "LICENSE-patient", "metadata.csv-patient",
                        "license.shard-0-of-2-patient", "P1"}


def test_duplicate_rows_plan_one_series():
    record = {"SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.3", "PatientID": "P",
              "Collection": "C"}
    assert len(plan.plan_records([record, dict(record), dict(record)])) == 1


def test_a_garbage_manifest_is_refused_early(tmp_path):
    garbage = tmp_path / "garbage.tcia"
    garbage.write_bytes(bytes(range(256)) * 4000 + b"\n1.2.3.4\n")
    with pytest.raises(errors.FatalRunError, match="mostly not SeriesInstanceUIDs"):
        plan.read_manifest(garbage)


# -- log lines ----------------------------------------------------------------------------------

def sanitised(message: str, *secrets: str) -> str:
    vault = logs.Secrets()
    vault.add(lambda: list(secrets))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
    logs.LogSanitiser(vault).filter(record)
    return record.getMessage()


def test_a_short_password_is_masked_where_it_stands_not_inside_other_text():
    assert sanitised("writing /scratch/ab/x", "ab") == "writing /scratch/ab/x"
    assert sanitised("form password=ab&user=u", "ab") == "form password=***&user=u"
    assert sanitised("proxy http://alice:ab@proxy:3128/", "ab") == \
        "proxy http://alice:***@proxy:3128/"
    token = "eyJhbGciOiJSUzI1NiJ9.payload.signature"
    assert token not in sanitised(f"got {token} back", token)
    assert sanitised("Authorization: Bearer abc.def") == "Authorization: Bearer ***"


def test_escape_sequences_from_a_server_never_reach_the_log_raw():
    line = sanitised("dropped \x1b[31mred\x1b[0m\x07.dcm")
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[31mred" in line


def test_a_stop_cuts_a_transfer_blocked_in_a_read_at_once():
    """The watchdog, not the read timeout, ends a transfer when the run must stop."""
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()
    watchdog = net.TransferWatchdog(window=3600, stop=stop)
    client = watchdog.watch(socket.create_connection(server.getsockname()))
    peer, _ = server.accept()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.makefile("rb").read(10)))
    reader.start()
    stop.set()
    reader.join(timeout=5)
    assert not reader.is_alive() and got == [b""]
    watchdog.close()
    for s in (client, peer, server):
        s.close()


# -- what a kill leaves behind (found by the kill -9 campaign) ----------------------------------

HOT_JOURNAL = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tcia_dl.journal import Journal
journal = Journal(Path(sys.argv[2]))
journal._db.execute("PRAGMA cache_size=1")      # spill pages into the file before COMMIT
journal._db.execute("BEGIN IMMEDIATE")
for n in range(2000):
    journal._db.execute("INSERT INTO requested VALUES (?)", (f"1.2.{n}" * 8,))
os._exit(9)                                      # as kill -9 between the writes and COMMIT
"""


def test_a_journal_killed_mid_commit_is_read_not_refused(tmp_path):
    """0.3 opened it read-only, which cannot roll back the hot journal: every rerun
    exited 2 ('attempt to write a readonly database') and the run could not resume."""
    path = tmp_path / "COLL.tar.xz.journal"
    journal = journal_module.Journal(path)
    journal.put("finished", "no")
    journal.close()
    subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(Path(tcia_dl.__file__).parent.parent),
                    str(path)], check=False)
    assert Path(f"{path}-journal").exists()          # the kill left a hot journal
    assert journal_module.read_journal(path) == ({}, False)


def test_a_stale_series_folder_is_hidden_before_it_is_deleted(tmp_path, monkeypatch):
    """A kill while a stale folder (moved in by a run killed before its journal row) is
    deleted must not leave half a series visible."""
    destination = tmp_path / "COLL" / "P" / "S"
    destination.mkdir(parents=True)
    for n in range(3):
        (destination / f"{n}.dcm").write_bytes(b"old")
    new = tmp_path / "scratch" / "series-1.d"
    new.mkdir(parents=True)
    (new / "1.dcm").write_bytes(b"new")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith(".stale") and path.exists():
            next(path.iterdir()).unlink()             # deleted one file, then the kill
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        tree.move_folder(new, destination)
    assert not destination.exists()                   # never a half-deleted series in view
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    tree.move_folder(new, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["1.dcm"]
    assert [p.name for p in destination.parent.iterdir()] == ["S"]


def test_a_run_finding_its_output_finished_removes_what_a_late_kill_left(tmp_path,
                                                                         fake_nbia_factory):
    """A kill after the journal said finished, before the run cleaned up, left its lock
    file and scratch for ever: the rerun stopped at 'nothing to do' before tidying."""
    fake = fake_nbia_factory(demo_series=2)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    out = tmp_path / "out"
    (out / "DEMO.tar.xz.lock").write_text("pid 1 on a node that died\n")
    scratch, owner = storage.claim_scratch(out, "DEMO")
    (scratch / "series-1.zip").write_bytes(b"left by the killed run")
    owner.close()                                     # its run is gone
    rerun = Run(tmp_path, fake)
    assert rerun.code == errors.EXIT_OK and "nothing to do" in rerun.log
    assert sorted(p.name for p in out.iterdir()) == ["DEMO.tar.xz", "DEMO.tar.xz.journal"]


def test_metadata_with_control_characters_still_makes_a_metadata_csv(tmp_path):
    """Python 3.10's csv writer refuses NUL ('need to escape'): hostile metadata stopped
    every run at its last step, for ever. Control characters are removed on every Python."""
    journal = journal_module.Journal(tmp_path / "j")
    series = plan.PlannedSeries(uid="1.2.3", collection="C", path="P/S/1",
                              record={"SeriesInstanceUID": "1.2.3",
                                      "SeriesDescription": "nul\x00 bell\x07 tab\tok"},
                              image_count=1, file_size=1)
    journal.record(series, sources_base.VerifiedSeries(tmp_path, [], None, []), 0, 0)
    text = collection_files.metadata_csv(journal, "C").decode()
    assert "nul bell tab\tok" in text and "\x00" not in text
    journal.close()
