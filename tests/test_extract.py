"""--extract: series out of an archive by seeking to their xz streams, verified against the
archive's MD5SUMS as they are written, byte-identical to what `tar -xJf` writes, and never
anything outside the folder asked for."""
from __future__ import annotations

import csv
import filecmp
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tcia_dl import cli, errors, extract as extract_module, tarread, verify
from tcia_dl.formats import xz as xzread
from helpers import Run


@pytest.fixture
def archive(tmp_path, fake_nbia_factory) -> Path:
    """A finished archive of 6 series (4 patients), with its journal beside it."""
    fake = fake_nbia_factory(demo_series=6)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    return tmp_path / "out" / "DEMO.tar.xz"


def extract(archive: Path, into: Path, capsys, *selection: str) -> tuple[int, list[str]]:
    capsys.readouterr()                       # what the runs before it printed
    code = cli.main(["--extract", str(archive), "--output", str(into), *selection,
                    "--cache_dir", str(into.parent / "xcache")])
    captured = capsys.readouterr()
    return code, captured.out.splitlines() + captured.err.splitlines()


def metadata(archive: Path) -> list[dict]:
    with tarfile.open(archive, "r:xz") as tar:
        text = tar.extractfile("DEMO/metadata.csv").read().decode()
    return list(csv.DictReader(io.StringIO(text)))


def tar_copy(archive: Path, into: Path, *members: str) -> Path:
    into.mkdir()
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(into), *members], check=True)
    return into


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def same_trees(ours: Path, theirs: Path) -> None:
    mine, tars = files_under(ours), files_under(theirs)
    assert sorted(mine) == sorted(tars)
    for name, path in mine.items():
        assert filecmp.cmp(path, tars[name], shallow=False), name
        assert path.stat().st_mtime == tars[name].stat().st_mtime, name


def decompressed_streams(monkeypatch) -> list[int]:
    """Records the index of every stream --extract decompresses whole."""
    seen: list[int] = []
    real = tarread.check_stream

    def counting(path, index, *args, **kwargs):
        seen.append(index)
        return real(path, index, *args, **kwargs)
    for patched_module in (extract_module, verify):
        monkeypatch.setattr(patched_module, "check_stream", counting)
    return seen


def test_one_series_decompresses_only_its_stream_and_matches_tar(archive, tmp_path, capsys,
                                                                  monkeypatch):
    rows = metadata(archive)
    wanted = rows[3]
    spans = xzread.xz_stream_spans(archive)
    seen = decompressed_streams(monkeypatch)
    code, lines = extract(archive, tmp_path / "one", capsys, "--series-uid",
                          wanted["SeriesInstanceUID"])
    assert code == errors.EXIT_OK, lines
    assert "1 series" in lines[-1] and f"from 2 of {len(spans)} xz streams" in lines[-1]
    # the series' own stream and the small closing one (LICENSE, metadata, MD5SUMS): the
    # closing one twice (read for MD5SUMS first, then written), no other stream
    folder = f"DEMO/{wanted['Path']}"
    holder = next(i for i, (start, end) in enumerate(spans[:-1])
                  if folder in extract_module.first_member_name(archive, start, end)[0])
    assert sorted(set(seen)) == sorted({holder, len(spans) - 1})

    with tarfile.open(archive, "r:xz") as tar:
        names = [m.name for m in tar.getmembers()
                 if m.name.startswith(folder + "/") or m.name.count("/") == 1]
    same_trees(tmp_path / "one", tar_copy(archive, tmp_path / "tar", *names))
    assert not [p for p in (tmp_path / "one").rglob(".*")]          # no scratch left


def test_without_a_selection_it_is_a_verifying_tar_x(archive, tmp_path, capsys):
    code, lines = extract(archive, tmp_path / "all", capsys)
    assert code == errors.EXIT_OK and "6 series, 26 files" in lines[-1], lines
    same_trees(tmp_path / "all", tar_copy(archive, tmp_path / "tar"))
    check = subprocess.run(["md5sum", "--quiet", "-c", "MD5SUMS"], cwd=tmp_path / "all" / "DEMO")
    assert check.returncode == 0


def test_a_copy_without_its_journal_finds_the_series_from_its_headers(archive, tmp_path,
                                                                       capsys, monkeypatch):
    elsewhere = tmp_path / "site-b"
    elsewhere.mkdir()
    copy = Path(shutil.copy(archive, elsewhere))
    rows = metadata(copy)
    patient = rows[0]["PatientID"]
    theirs = {r["Path"] for r in rows if r["PatientID"] == patient}
    seen = decompressed_streams(monkeypatch)
    code, lines = extract(copy, tmp_path / "p", capsys, "--patient", patient)
    assert code == errors.EXIT_OK, lines
    assert len(set(seen)) == len(theirs) + 1
    got = {str(p.parent.relative_to(tmp_path / "p" / "DEMO"))
           for p in (tmp_path / "p" / "DEMO").rglob("*.dcm")}
    assert got == theirs
    # all of it: the streams peeked at for their names are read once more, but counted once
    code, lines = extract(copy, tmp_path / "all", capsys)
    read, total = re.search(r"\(read (.+) of (.+)\)", lines[-1]).groups()
    assert code == errors.EXIT_OK and read == total, lines


def test_by_study_and_a_selection_the_archive_lacks(archive, tmp_path, capsys):
    rows = metadata(archive)
    study = rows[0]["StudyInstanceUID"]
    code, lines = extract(archive, tmp_path / "s", capsys, "--study-uid", study)
    assert code == errors.EXIT_OK
    assert f"{sum(r['StudyInstanceUID'] == study for r in rows)} series" in lines[-1]

    code, lines = extract(archive, tmp_path / "none", capsys, "--series-uid", "1.2.3.4")
    assert code == errors.EXIT_USAGE and len(lines) == 1
    assert "--series-uid 1.2.3.4: no series of DEMO.tar.xz matches" in lines[0]
    assert not (tmp_path / "none").exists()


def test_a_damaged_stream_leaves_no_file_of_it(archive, tmp_path, capsys):
    spans = xzread.xz_stream_spans(archive)
    start, end = spans[1]
    folder = extract_module.first_member_name(archive, start, end)[0].rsplit("/", 1)[0]
    data = bytearray(archive.read_bytes())
    data[(start + end) // 2] ^= 0x55
    archive.write_bytes(bytes(data))
    code, lines = extract(archive, tmp_path / "x", capsys)
    assert code == errors.EXIT_INCOMPLETE
    assert any(line.startswith("stream 2 ") and "damaged" in line for line in lines)
    missing = [line for line in lines if line.endswith("listed in MD5SUMS, missing from the "
                                                       "archive")]
    assert missing and all(line.startswith(folder + "/") for line in missing)
    assert not [p for p in (tmp_path / "x").rglob(".*")]            # no half file hidden
    # every file that is there is whole, and the other series are all there
    check = subprocess.run(["md5sum", "-c", "--ignore-missing", "--quiet", "MD5SUMS"],
                           cwd=tmp_path / "x" / "DEMO")
    assert check.returncode == 0
    present = {str(p.parent.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*.dcm")}
    assert len(present - {folder}) == 5


def test_a_file_whose_md5_is_not_the_listed_one_is_not_written(archive, tmp_path, capsys):
    with tarfile.open(archive, "r:xz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".dcm"))
    info, data = members[victim]
    name = info.name
    members[victim] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    changed = tmp_path / "changed.tar.xz"
    with tarfile.open(changed, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    code, lines = extract(changed, tmp_path / "c", capsys)
    assert code == errors.EXIT_INCOMPLETE
    assert lines[0].startswith(f"{name}: MD5 ") and lines[0].endswith("not extracted")
    assert not (tmp_path / "c" / name).exists() and len(lines) == 2


def hostile(path: Path, target_outside: Path) -> Path:
    """An archive with what tarfile's data filter refuses, and one honest file."""
    def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
              link: str = "") -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname = kind, len(data), link
        return info, data
    members = [
        entry("../escaped.txt", data=b"out"),
        entry(str(target_outside / "absolute.txt"), data=b"abs"),
        entry("DEMO/a/../../../up.txt", data=b"up"),
        entry("DEMO/link", tarfile.SYMTYPE, link=str(target_outside)),
        entry("DEMO/hard", tarfile.LNKTYPE, link="/etc/passwd"),
        entry("DEMO/dev", tarfile.CHRTYPE),
        entry("DEMO/linked/through.txt", data=b"via a link in the folder"),
        entry("DEMO/fine.txt", data=b"fine"),
    ]
    with tarfile.open(path, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return path


def test_hostile_names_are_refused_and_nothing_lands_outside(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "dir" / "into"
    (into / "DEMO").mkdir(parents=True)
    os.symlink(outside, into / "DEMO" / "linked")     # a folder link already in DIR
    archive = hostile(tmp_path / "hostile.tar.xz", outside)
    code, lines = extract(archive, into, capsys)
    assert code == errors.EXIT_INCOMPLETE
    refused = [line for line in lines if line.endswith("; refused")]
    assert len(refused) == 7, lines
    for why in ("(..)", "absolute", "symbolic link, not a regular file",
                "hard link, not a regular file", "character device",
                "through a symbolic link that leaves the folder"):
        assert any(why in line for line in refused), why
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dir" / "up.txt").exists()
    assert (into / "DEMO" / "fine.txt").read_bytes() == b"fine"
    assert "no MD5SUMS" in "\n".join(lines)


def test_a_part_with_its_journal_extracts_a_series(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=5)
    fake.script_faults(fake.series("DEMO")[1]["SeriesInstanceUID"], ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1").code == errors.EXIT_INCOMPLETE
    part = tmp_path / "out" / "DEMO.tar.xz.part"
    uid = fake.series("DEMO")[3]["SeriesInstanceUID"]
    code, lines = extract(part, tmp_path / "p", capsys, "--series", uid)
    assert code == errors.EXIT_OK and "1 series" in lines[-1], lines
    assert len(list((tmp_path / "p").rglob("*.dcm"))) == fake.series("DEMO")[3]["ImageCount"]


def test_extract_of_nothing_and_with_download_flags_is_bad_usage(tmp_path, capsys):
    code, lines = extract(tmp_path / "nope.tar.xz", tmp_path / "o", capsys)
    assert code == errors.EXIT_USAGE and "no such archive" in lines[0]
    code, lines = extract(tmp_path / "nope.tar.xz", tmp_path / "o", capsys, "--dry-run")
    assert code == errors.EXIT_USAGE and "--extract takes filters" in lines[0]
