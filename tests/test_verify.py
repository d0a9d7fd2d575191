"""--verify: an archive (or a .part, or a folder tree) this tool wrote, checked against its own
MD5SUMS without a journal or a network, one line per problem and an exit code."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tcia_dl import cli, errors
from tcia_dl.formats import xz as xzread
from helpers import Run


@pytest.fixture
def made(tmp_path, fake_nbia_factory):
    """A finished archive and a finished folder tree of the same 6 series."""
    fake = fake_nbia_factory(demo_series=6)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    assert Run(tmp_path, fake, compression=False).code == errors.EXIT_OK
    return tmp_path / "out"


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    code = cli.main(["--verify", str(path), "--cache_dir", str(path.parent / "vcache")])
    return code, capsys.readouterr().out.splitlines()


def members_of(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive, "r:xz") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def repack(members: list[tuple[tarfile.TarInfo, bytes]], path: Path) -> Path:
    """The same members in one xz stream, as another tool would write them."""
    with tarfile.open(path, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_clean_archive_and_tree_verify(made, capsys):
    code, lines = verify(made / "DEMO.tar.xz", capsys)
    assert code == errors.EXIT_OK and lines[-1].endswith(": OK") and len(lines) == 1
    assert "6 series, 26 files" in lines[-1] and "7 xz streams" in lines[-1]
    code, lines = verify(made / "DEMO", capsys)
    assert code == errors.EXIT_OK and lines == [lines[-1]] and "folder tree, 6 series" in lines[-1]


def test_a_flipped_byte_names_its_stream_and_the_series_it_holds(made, capsys):
    archive = made / "DEMO.tar.xz"
    spans = xzread.xz_stream_spans(archive)
    start, end = spans[2]
    with open(archive, "r+b") as handle:
        handle.seek((start + end) // 2)
        byte = handle.read(1)
        handle.seek((start + end) // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE
    damaged = [line for line in lines if line.startswith(f"stream 3 (bytes {start}-{end}) is "
                                                         "damaged")]
    assert len(damaged) == 1 and damaged[0].endswith(", from the journal)")   # names the series
    assert any("listed in DEMO/MD5SUMS, missing" in line for line in lines)
    assert lines[-1].endswith("problem(s)")


def test_a_truncated_archive_fails(made, capsys):
    archive = made / "DEMO.tar.xz"
    data = archive.read_bytes()
    cut = made / "cut.tar.xz"
    cut.write_bytes(data[:len(data) * 2 // 3])
    code, lines = verify(cut, capsys)
    assert code == errors.EXIT_INCOMPLETE and "no xz stream ends at byte" in lines[0]


def test_missing_extra_and_twice_archived_members_and_a_swapped_md5sums_line(made, capsys):
    members = members_of(made / "DEMO.tar.xz")
    dicoms = [i for i, (info, _) in enumerate(members) if info.name.endswith(".dcm")]
    missing = [m for i, m in enumerate(members) if i != dicoms[0]]
    code, lines = verify(repack(missing, made / "missing.tar.xz"), capsys)
    assert code == errors.EXIT_INCOMPLETE
    assert lines[0] == f"{members[dicoms[0]][0].name}: listed in DEMO/MD5SUMS, missing"

    extra_info = tarfile.TarInfo("DEMO/stowaway.txt")
    extra_info.size = 5
    code, lines = verify(repack([*members, (extra_info, b"hello")], made / "extra.tar.xz"),
                         capsys)
    assert code == errors.EXIT_INCOMPLETE and "DEMO/stowaway.txt: in the output but in no MD5SUMS" \
        in lines

    twice = [*members, members[dicoms[1]]]
    code, lines = verify(repack(twice, made / "twice.tar.xz"), capsys)
    assert f"{members[dicoms[1]][0].name} is in the archive 2 times" in lines

    sums_at = next(i for i, (info, _) in enumerate(members) if info.name == "DEMO/MD5SUMS")
    rows = members[sums_at][1].decode().splitlines()
    a, b = [i for i, row in enumerate(rows) if row.endswith(".dcm")][:2]
    rows[a], rows[b] = rows[a][:34] + rows[b][34:], rows[b][:34] + rows[a][34:]
    swapped = bytes("\n".join(rows) + "\n", "utf-8")
    info = members[sums_at][0]
    info.size = len(swapped)
    code, lines = verify(repack([*members[:sums_at], (info, swapped)], made / "swap.tar.xz"),
                         capsys)
    assert code == errors.EXIT_INCOMPLETE
    assert sum("but DEMO/MD5SUMS says" in line for line in lines) == 2


def test_a_part_verifies_with_and_without_its_journal(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=6)
    fake.script_faults(fake.series("DEMO")[2]["SeriesInstanceUID"], ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1").code == errors.EXIT_INCOMPLETE
    part = tmp_path / "out" / "DEMO.tar.xz.part"
    code, lines = verify(part, capsys)
    assert code == errors.EXIT_OK and "unfinished archive, 5 series" in lines[-1], lines
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(part, elsewhere)                     # a copy at another site: no journal
    code, lines = verify(elsewhere / part.name, capsys)
    assert code == errors.EXIT_OK and lines[-1].endswith(": OK"), lines


def test_a_changed_file_in_a_tree_is_named(made, capsys):
    victim = sorted((made / "DEMO").rglob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    code, lines = verify(made / "DEMO", capsys)
    assert code == errors.EXIT_INCOMPLETE
    name = str(victim.relative_to(made))
    assert lines[0].startswith(f"{name}: MD5 ") and "but DEMO/MD5SUMS says" in lines[0]


def test_verify_of_nothing_is_bad_usage(tmp_path, capsys):
    assert cli.main(["--verify", str(tmp_path / "nope.tar.xz"), "--cache_dir",
                    str(tmp_path / "c")]) == errors.EXIT_USAGE
    assert "no such file or folder" in capsys.readouterr().err


def test_a_rerun_of_a_finished_archive_checks_what_is_cheap(tmp_path, fake_nbia_factory):
    """'Nothing to do' without reading the archive, but its size and last series' stream
    are checked against the journal: 0.3 said 'finished' of an archive cut short."""
    fake = fake_nbia_factory(demo_series=4)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    again = Run(tmp_path, fake)
    assert again.code == errors.EXIT_OK and f"--verify {archive.resolve()} reads all of it" in again.log

    spans = xzread.xz_stream_spans(archive)
    start, end = spans[-2]                             # the last series' stream
    original = archive.read_bytes()
    damaged = bytearray(original)
    damaged[(start + end) // 2] ^= 0xFF
    archive.write_bytes(bytes(damaged))
    rerun = Run(tmp_path, fake)
    assert rerun.code == errors.EXIT_INCOMPLETE
    assert "the last series' stream" in rerun.log and "--verify" in rerun.log

    archive.write_bytes(original[:-512])
    rerun = Run(tmp_path, fake)
    assert rerun.code == errors.EXIT_INCOMPLETE and "but its journal says" in rerun.log


def test_a_part_cut_in_an_append_verifies_without_its_journal(tmp_path, fake_nbia_factory,
                                                              capsys):
    """A kill inside an append leaves half a stream at the end of the .part; at another
    site, without the journal, the whole streams before it are found from their headers."""
    fake = fake_nbia_factory(demo_series=6)
    fake.script_faults(fake.series("DEMO")[2]["SeriesInstanceUID"], ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1").code == errors.EXIT_INCOMPLETE
    part = tmp_path / "out" / "DEMO.tar.xz.part"
    spans = xzread.xz_stream_spans(part)
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    torn = elsewhere / part.name
    data = part.read_bytes()
    start, end = spans[1]
    torn.write_bytes(data + data[start:(start + end) // 2])        # half a stream behind
    code, lines = verify(torn, capsys)
    assert code == errors.EXIT_OK, lines
    assert f"after byte {len(data)} are an append cut short" in lines[0]
    assert f"the {len(spans)} whole streams before are checked" in lines[0]
    assert "unfinished archive, 5 series" in lines[-1]

    flipped = bytearray(torn.read_bytes())
    flipped[(spans[0][0] + spans[0][1]) // 2] ^= 1                # and a damaged stream
    torn.write_bytes(bytes(flipped))
    code, lines = verify(torn, capsys)
    assert code == errors.EXIT_INCOMPLETE and any(l.startswith("stream 1 ") for l in lines)
