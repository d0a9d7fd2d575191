"""Zip verification and the .tar.xz writer, without a server: the file format, standard
readers, MD5SUMS, and recovery from a run killed in the middle of an append."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import zipfile

import pytest

from tcia_dl import dicom, errors, journal as journal_module
from tcia_dl.formats import tree, xz as tarxz
from tcia_dl.sources import base as sources_base, nbia
from fakes.fake_nbia import dicom_file_bytes
from helpers import (STANDARD_TOOLS, commit_series, dicom_bytes, md5, member_md5s, planned,
                     two_file_series, write_series_zip)


# -- verification ---------------------------------------------------------------------------

def test_verify_keeps_exactly_the_listed_dicom_files_of_the_series(tmp_path):
    uid = "1.2.3.1"
    files = {"1-1.dcm": dicom_bytes(uid, 1), "1-2.dcm": dicom_bytes(uid, 2),
             "foreign.dcm": dicom_bytes("9.9.9", 1), "notes.txt": b"hello"}
    listed = {n: md5(d) for n, d in files.items() if n != "foreign.dcm"}
    listed["other.dcm"] = md5(dicom_bytes("9.9.8", 1))
    zip_path = write_series_zip(tmp_path / "s.zip", {**files}, listed=listed)
    # other.dcm is listed but absent: a broken transfer, not a clean zip
    with pytest.raises(errors.TransientError, match="missing"):
        nbia.verify_zip(zip_path, planned(uid, "P/S/1", count=2))

    del listed["other.dcm"]
    files["stranger.dcm"] = dicom_bytes("9.9.7", 1)
    listed["stranger.dcm"] = md5(files["stranger.dcm"])
    zip_path = write_series_zip(tmp_path / "s2.zip", files, listed=listed)
    verified = nbia.verify_zip(zip_path, planned(uid, "P/S/1", count=2))
    assert [m.entry for m in verified.members] == ["1-1.dcm", "1-2.dcm"]
    assert [m.md5 for m in verified.members] == [md5(files["1-1.dcm"]), md5(files["1-2.dcm"])]
    reasons = dict(verified.dropped)
    assert "not listed" in reasons["foreign.dcm"]
    assert "not a DICOM" in reasons["notes.txt"]
    assert "another series" in reasons["stranger.dcm"]
    assert verified.license_text.startswith("License Information")


def test_verify_rejects_a_wrong_md5_case_insensitively_correct_ones(tmp_path):
    uid = "1.2.3.2"
    files = {"a.dcm": dicom_bytes(uid, 1)}
    upper = write_series_zip(tmp_path / "u.zip", files, listed={"a.dcm": md5(files["a.dcm"]).upper()})
    assert len(nbia.verify_zip(upper, planned(uid, "P/S/1", count=1)).members) == 1
    wrong = write_series_zip(tmp_path / "w.zip", files, listed={"a.dcm": "0" * 32})
    with pytest.raises(errors.TransientError, match="MD5 mismatch"):
        nbia.verify_zip(wrong, planned(uid, "P/S/1", count=1))


def test_verify_refuses_unsafe_entry_names(tmp_path):
    uid = "1.2.3.3"
    data = dicom_bytes(uid, 1)
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("1-1.dcm", data)
        archive.writestr("../escape.dcm", data)
        archive.writestr("/abs.dcm", data)
        archive.writestr("md5hashes.csv", "Filename,MD5Hash\n1-1.dcm,%s\n../escape.dcm,%s\n/abs.dcm,%s\n"
                         % (md5(data), md5(data), md5(data)))
    verified = nbia.verify_zip(zip_path, planned(uid, "P/S/1", count=1))
    assert [m.entry for m in verified.members] == ["1-1.dcm"]
    assert {e for e, _ in verified.dropped} == {"../escape.dcm", "/abs.dcm"}


def test_verify_reports_count_mismatch_truncation_and_missing_table(tmp_path):
    zip_path, _ = two_file_series(tmp_path, "1.2.3.4")
    with pytest.raises(errors.TransientError, match="ImageCount"):
        nbia.verify_zip(zip_path, planned("1.2.3.4", "P/S/1", count=3))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(zip_path.read_bytes()[:-200])
    with pytest.raises(errors.TransientError, match="truncated"):
        nbia.verify_zip(cut, planned("1.2.3.4", "P/S/1"))
    bare = write_series_zip(tmp_path / "bare.zip", {"a.dcm": dicom_bytes("1.2.3.4", 1)},
                            with_md5_table=False)
    with pytest.raises(errors.Md5TableMissing):
        nbia.verify_zip(bare, planned("1.2.3.4", "P/S/1"))


# -- the archive ----------------------------------------------------------------------------

def open_archive(archive_format, out, scratch):
    """An output of the format at its fastest level."""
    return archive_format.open("COLL", out, scratch, archive_format.codec.levels[0], "")


def test_a_series_being_packed_is_one_file_in_scratch(tmp_path, archive_format):
    """Inode quotas: the series' compressed unit grows after its zip, in the zip's own
    file, and only that unit reaches the archive."""
    out = tmp_path / "out"
    out.mkdir()
    target = open_archive(archive_format, out, tmp_path / "scratch")
    series = planned("1.2.3.10", "P1/2020-01-01-S-00001/1-CT-3.10")
    source, files = two_file_series(tmp_path, series.uid)
    zip_path = target.scratch_path(".zip")
    shutil.move(source, zip_path)
    zip_size = zip_path.stat().st_size
    packer = target.packer(series, zip_path)
    scratch_seen: list[list[str]] = []
    add = packer.add

    def add_and_look(name, size, chunks):
        add(name, size, chunks)
        scratch_seen.append(sorted(p.name for p in target.scratch.iterdir()))

    packer.add = add_and_look
    verified = nbia.verify_zip(zip_path, series, packer)
    prepared = packer.finish()
    assert scratch_seen == [[zip_path.name]] * len(files)
    assert prepared.path == zip_path and prepared.offset == zip_size
    target.commit(series, verified, prepared)
    packer.discard()
    assert list(target.scratch.iterdir()) == []
    target.finalize()
    target.close()
    members = member_md5s(out / f"COLL{archive_format.suffix}")
    expected = {f"COLL/{series.path}/{name}": md5(data) for name, data in files.items()}
    assert {k: v for k, v in members.items() if k in expected} == expected
    assert set(members) - set(expected) == {"COLL/LICENSE", "COLL/CITATION.md", "COLL/metadata.csv",
                                            "COLL/MD5SUMS"}


def test_archive_is_standard_and_self_verifying(tmp_path, archive_format):
    out = tmp_path / "out"
    out.mkdir()
    target = open_archive(archive_format, out, tmp_path / "scratch")
    expected = commit_series(target, tmp_path, "1.2.3.10", "P1/2020-01-01-S-00001/1-CT-3.10")
    expected |= commit_series(target, tmp_path, "1.2.3.11", "P2/unknown_date-NA-00002/" + "x" * 150)
    ends = [end for _, _, _, end, _ in target.journal.streams()]
    target.finalize()
    target.close()
    archive = out / f"COLL{archive_format.suffix}"
    assert archive.exists() and not (out / f"COLL{archive_format.suffix}.part").exists()

    members = member_md5s(archive)
    assert {k: v for k, v in members.items() if k in expected} == {k: md5(v) for k, v in expected.items()}
    assert set(members) - set(expected) == {"COLL/LICENSE", "COLL/CITATION.md", "COLL/metadata.csv",
                                            "COLL/MD5SUMS"}
    # three units: two series and the closing one
    assert archive_format.codec.spans(archive) == [
        (0, ends[0]), (ends[0], ends[1]), (ends[1], archive.stat().st_size)]

    test, flag, _ = STANDARD_TOOLS[archive_format.codec.name]
    subprocess.run([*test, str(archive)], check=True)
    listing = subprocess.run(["tar", flag, "-tf", str(archive)], check=True, capture_output=True,
                             text=True).stdout.split()
    assert sorted(listing) == sorted(members)
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["tar", flag, "-xf", str(archive), "-C", str(extract)], check=True)
    check = subprocess.run(["md5sum", "-c", "MD5SUMS"], cwd=extract / "COLL", check=True,
                           capture_output=True, text=True).stdout
    assert check.count(": OK") == len(expected) + 3      # + LICENSE, CITATION.md, metadata.csv
    metadata = (extract / "COLL" / "metadata.csv").read_text().splitlines()
    assert len(metadata) == 3 and "Path" in metadata[0]
    assert (extract / "COLL" / "LICENSE").read_text() == "License Information. Test.\n"


def test_a_kill_during_an_append_loses_only_that_append(tmp_path, archive_format):
    out = tmp_path / "out"
    out.mkdir()
    part_path = out / f"COLL{archive_format.suffix}.part"
    target = open_archive(archive_format, out, tmp_path / "scratch")
    first = commit_series(target, tmp_path, "1.2.3.20", "P1/d-S-00020/1-CT-3.20")
    committed_size = part_path.stat().st_size
    # What a kill -9 mid-append leaves: half a unit after the committed end, the lock held
    # by a dead process (the lock file stays), stale scratch files.
    with open(part_path, "ab") as part:
        part.write(archive_format.codec.magic + b" half a unit")
    stale = target.scratch / "stale.zip"
    stale.write_bytes(b"junk")
    target.journal.close()
    target._lock_file.close()
    target._scratch_owner.close()       # the dead run's scratch is no longer owned

    resumed = open_archive(archive_format, out, tmp_path / "scratch")
    assert part_path.stat().st_size == committed_size
    assert set(resumed.committed()) == {"1.2.3.20"}
    assert not stale.exists() and not stale.parent.exists()
    second = commit_series(resumed, tmp_path, "1.2.3.21", "P1/d-S-00020/2-CT-3.21")
    resumed.finalize()
    resumed.close()
    members = member_md5s(out / f"COLL{archive_format.suffix}")
    assert {k: members[k] for k in first | second} == {k: md5(v) for k, v in (first | second).items()}


def test_a_kill_between_rename_and_journal_is_recognised_as_finished(tmp_path, archive_format):
    out = tmp_path / "out"
    out.mkdir()
    target = open_archive(archive_format, out, tmp_path / "scratch")
    commit_series(target, tmp_path, "1.2.3.30", "P/d-S-1/1-CT-1")
    target.finalize()
    target.journal.put("finished", "no")        # as if killed right after the rename
    target.close()
    again = open_archive(archive_format, out, tmp_path / "scratch")
    assert again.complete
    again.close()


def test_a_second_run_on_the_same_output_is_refused(tmp_path, archive_format):
    out = tmp_path / "out"
    out.mkdir()
    target = open_archive(archive_format, out, tmp_path / "scratch")
    with pytest.raises(errors.FatalRunError, match="being written by pid") as caught:
        open_archive(archive_format, out, tmp_path / "scratch")
    assert caught.value.exit_code == errors.EXIT_USAGE
    target.close()


def test_folder_target_moves_whole_series_and_writes_md5sums(tmp_path):
    out = tmp_path / "out"
    target = tree.DirectoryTarget("COLL", out, tmp_path / "scratch")
    expected = commit_series(target, tmp_path, "1.2.3.40", "P/d-S-1/1-CT-40")
    # a stale half-moved folder from a killed run is swept on the next start
    stale = out / "COLL" / "P" / "d-S-1" / ".9-MR-9.incoming"
    stale.mkdir(parents=True)
    target.finalize()
    target.close()
    for name, data in expected.items():
        assert (out / name).read_bytes() == data
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=out / "COLL", check=True)
    tree.DirectoryTarget("COLL", out, tmp_path / "scratch").close()
    assert stale.exists(), "a finished tree is left alone"


@pytest.mark.skipif(shutil.which("7z") is None and shutil.which("7zz") is None,
                    reason="7-Zip is not installed (apt-get install 7zip)")
def test_seven_zip_reads_the_concatenated_streams(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tarxz.TarXzTarget("COLL", out, tmp_path / "scratch", level=0)
    commit_series(target, tmp_path, "1.2.3.50", "P/d-S-1/1-CT-50")
    commit_series(target, tmp_path, "1.2.3.51", "P/d-S-1/2-CT-51")
    target.finalize()
    target.close()
    seven = shutil.which("7z") or shutil.which("7zz")
    subprocess.run([seven, "x", "-y", f"-o{tmp_path / 'tar'}", str(out / "COLL.tar.xz")],
                   check=True, capture_output=True)
    tar_path = next((tmp_path / "tar").iterdir())
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert sum(n.endswith(".dcm") for n in names) == 4


def test_folder_target_copies_across_filesystems_when_rename_cannot(tmp_path, monkeypatch):
    """Node-local scratch to a shared output: os.rename fails with EXDEV there."""
    import errno
    import os
    real_rename = os.rename
    scratch = tmp_path / "scratch"

    def rename_within_one_filesystem(src, dst):
        if str(src).startswith(str(scratch)) and not str(dst).startswith(str(scratch)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_within_one_filesystem)
    out = tmp_path / "out"
    target = tree.DirectoryTarget("COLL", out, scratch)
    expected = commit_series(target, tmp_path, "1.2.3.60", "P/d-S-1/1-CT-60")
    target.finalize()
    target.close()
    for name, data in expected.items():
        assert (out / name).read_bytes() == data
    assert not any(p.name.endswith(".incoming") for p in out.rglob("*"))
    assert not scratch.exists() or not any(scratch.rglob("*.dcm"))


def test_a_journal_record_is_all_or_nothing(tmp_path):
    """A kill between the statements of one record must not leave a series row with only
    some of its files (a real bug once: autocommit mode committed each statement)."""
    journal = journal_module.Journal(tmp_path / "j.sqlite")
    series = planned("1.2.3.70", "P/d-S-1/1-CT-70")
    members = [sources_base.Member("a.dcm", "a.dcm", 1, "0" * 32), sources_base.Member("b.dcm", "b.dcm", 1, None)]
    broken = sources_base.VerifiedSeries(tmp_path / "x.zip", members, None, [])   # md5 NULL: 2nd row fails
    with pytest.raises(Exception):
        journal.record(series, broken, 100, 1024)
    assert journal.committed() == {}
    assert list(journal.files("COLL")) == []
    journal.close()


def test_a_header_longer_than_the_first_read_is_still_recognised(tmp_path):
    """The series check reads a 64 KiB head; a bigger header (a long comment before the
    SeriesInstanceUID) must make it read on, not drop the file as unreadable."""
    import io as _io
    import pydicom
    uid = "1.2.3.80"
    dataset = pydicom.dcmread(_io.BytesIO(dicom_bytes(uid, 1)))
    dataset.PatientComments = "x" * 200_000            # (0010,4000) comes before (0020,000E)
    data = dicom_file_bytes(dataset)
    assert data.index(b"\x20\x00\x0e\x00") > dicom.HEAD_SIZE     # the SeriesInstanceUID tag
    zip_path = write_series_zip(tmp_path / "long.zip", {"1-1.dcm": data})
    collected = {}

    class Sink:
        def add(self, name, size, chunks):
            collected[name] = b"".join(chunks)

    verified = nbia.verify_zip(zip_path, planned(uid, "P/S/1", count=1), Sink())
    assert [m.entry for m in verified.members] == ["1-1.dcm"]
    assert collected == {"1-1.dcm": data}                 # streamed whole, exactly once
