"""What a repair may trust (issues #18 and #23): a repair or failure list names its output
and the source that made it, so that it works under another name and as printed; --verify,
--extract and --retry-failed believe a journal only when it describes the file beside it
(not a repair's new .part, not an earlier run's, not what was appended after the streams
were found), and a journal that is not one of ours is one line, never a traceback."""
from __future__ import annotations

import csv
import io
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest

from tcia_dl import cli, errors, journal as journal_module, plan, run as run_module, trust
from tcia_dl.formats import xz as xzread
from tcia_dl.sources.nbia import NbiaSettings
from helpers import Run, archive_members, flip, verify


def header(manifest: Path) -> dict[str, str]:
    """The key=value lines of a manifest before its list."""
    lines = manifest.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines[:lines.index("ListOfSeriesToDownload=")])


def rows_by_end(journal: Path) -> list[tuple]:
    with sqlite3.connect(journal) as db:
        return db.execute("SELECT uid, archive_end FROM series ORDER BY archive_end").fetchall()


def patients_folders(archive: Path) -> dict[str, set[str]]:
    """PatientID -> its series folders, from the archive's metadata.csv."""
    found: dict[str, set[str]] = {}
    with tarfile.open(archive, "r:xz") as tar:
        text = tar.extractfile("DEMO/metadata.csv").read().decode()
    for row in csv.DictReader(io.StringIO(text)):
        found.setdefault(row["PatientID"], set()).add(f"DEMO/{row['Path']}")
    return found


def extract(archive: Path, into: Path, capsys, *selection: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["--extract", str(archive), "--output", str(into), *selection,
                    "--cache_dir", str(into.parent / "xcache")])
    captured = capsys.readouterr()
    return code, captured.out.splitlines() + captured.err.splitlines()


# -- 3a: a list saved under another name ------------------------------------------------------

def test_a_repair_list_saved_under_another_name_repairs_the_archive_it_names(
        damaged, tmp_path, capsys):
    fake, archive, manifest, before, uid, _ = damaged
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    copy = downloads / "DEMO.damaged (1).tcia"           # as a browser saves a second copy
    shutil.copy(manifest, copy)
    run = Run(tmp_path, fake, "--retry-failed", str(copy), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert sorted(p.name for p in archive.parent.glob("DEMO.damaged (1)*")) == []
    assert archive_members(archive) == before             # the real archive is repaired
    assert set(fake.counters.snapshot()["complete_downloads"]) == {uid}
    assert verify(archive, capsys)[0] == errors.EXIT_OK


def test_a_failure_list_saved_under_another_name_goes_into_its_output(tmp_path,
                                                                       fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=4)
    victim = fake.series("DEMO")[1]["SeriesInstanceUID"]
    fake.script_faults(victim, ["500"] * 2)
    first = Run(tmp_path, fake, "--retries", "2")
    assert first.code == errors.EXIT_INCOMPLETE
    failed = first.output / "DEMO.failed.tcia"
    assert header(failed)["tcia_downloader.name"] == "DEMO"
    copy = tmp_path / "DEMO.failed(2).tcia"
    failed.rename(copy)
    retry = Run(tmp_path, fake, "--retry-failed", str(copy), collection=None)
    assert retry.code == errors.EXIT_OK, retry.log
    assert (first.output / "DEMO.tar.xz").exists()
    assert not list(first.output.glob("DEMO.failed(2)*"))


def test_an_old_repair_list_without_the_new_keys_still_works(damaged, tmp_path):
    fake, archive, manifest, before, uid, _ = damaged
    lines = [line for line in manifest.read_text().splitlines()
             if not line.startswith(("tcia_downloader.name", "tcia_downloader.api-url",
                                     "tcia_downloader.mode"))]
    manifest.write_text("\n".join(lines) + "\n")
    run = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert archive_members(archive) == before


# -- 3b: --verify while a repair is under way -------------------------------------------------

def test_verify_during_an_interrupted_repair_keeps_the_repair_list(damaged, tmp_path, capsys):
    fake, archive, manifest, before, uid, _ = damaged
    listed = manifest.read_text()
    fake.script_faults(uid, ["500"] * 3)
    cut = Run(tmp_path, fake, "--retry-failed", str(manifest), "--retries", "1",
              collection=None)
    assert cut.code == errors.EXIT_INCOMPLETE
    assert archive.with_name("DEMO.tar.xz.part").exists()   # the journal moved onto it
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE                       # the old archive is still damaged
    assert manifest.read_text() == listed                   # the right list stays
    assert not any("from the journal" in line for line in lines)      # nobody blamed wrongly
    assert any(line.startswith("DEMO.tar.xz.journal is ignored: it describes "
                               "DEMO.tar.xz.part, the repair in progress") for line in lines)
    assert any(line.startswith("no repair list is written") and "is left as it is" in line
               for line in lines)
    resumed = Run(tmp_path, fake)                           # the repair still finishes
    assert resumed.code == errors.EXIT_OK, resumed.log
    assert archive_members(archive) == before


# -- 3c: a stale journal -------------------------------------------------------------------------

def shuffle_rows(journal: Path) -> None:
    """The journal of another run whose streams happen to end where this archive's do:
    every row moved to the next row's place in the archive."""
    with sqlite3.connect(journal) as db:
        rows = db.execute("SELECT uid, archive_end, tar_end FROM series "
                          "ORDER BY archive_end").fetchall()
        places = [(end, tar) for _, end, tar in rows[1:] + rows[:1]]
        for (uid, _, _), (end, tar) in zip(rows, places):
            db.execute("UPDATE series SET archive_end=?, tar_end=? WHERE uid=?", (end, tar, uid))


def test_a_stale_journal_does_not_choose_what_extract_reads(tmp_path, fake_nbia_factory,
                                                            capsys):
    fake = fake_nbia_factory(demo_series=6)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    journal = archive.with_name("DEMO.tar.xz.journal")
    shuffle_rows(journal)
    patient, folders = sorted(patients_folders(archive).items())[0]
    code, lines = extract(archive, tmp_path / "x", capsys, "--patient", patient)
    written = {str(p.parent.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*")
               if p.is_file() and p.parent.name != "DEMO"}
    assert written == folders                    # that patient's series, no other
    assert code == errors.EXIT_OK, lines
    assert any(line.startswith("DEMO.tar.xz.journal is ignored") for line in lines)
    assert not trust.journal_describes(archive, journal)
    assert trust.journal_beside(archive) is None and trust.journal_series_ends(archive) == {}


def test_the_journal_of_a_part_cut_in_an_append_describes_its_whole_streams(tmp_path,
                                                                           fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=4)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    spans = xzread.xz_stream_spans(archive)
    cut = tmp_path / "cut"
    cut.mkdir()
    part = cut / "DEMO.tar.xz.part"
    part.write_bytes(archive.read_bytes()[:spans[2][1] + 100])    # 3 streams, a torn 4th
    journal = cut / "DEMO.tar.xz.journal"
    shutil.copy(archive.with_name("DEMO.tar.xz.journal"), journal)
    with sqlite3.connect(journal) as db:
        db.execute("DELETE FROM series WHERE archive_end > ?", (spans[2][1],))
        db.execute("DELETE FROM meta WHERE key='closing_end'")
    assert trust.journal_describes(part, journal)
    assert not trust.journal_describes(archive, journal)         # not the finished archive's
    flip(part, spans[2][1] - 200)                             # the last committed stream
    assert trust.journal_describes(part, journal)                # damaged, still described
    flip(part, 100)                                           # and the first: another file
    assert not trust.journal_describes(part, journal)


# -- a .part that grows while it is verified -----------------------------------------------------

def test_verify_of_a_growing_part_counts_only_the_streams_it_checked(tmp_path,
                                                                     fake_nbia_factory,
                                                                     monkeypatch, capsys):
    fake = fake_nbia_factory(demo_series=5)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    full = tmp_path / "out" / "DEMO.tar.xz.journal"
    spans = xzread.xz_stream_spans(archive)
    live = tmp_path / "live"
    live.mkdir()
    part, journal = live / "DEMO.tar.xz.part", live / "DEMO.tar.xz.journal"
    part.write_bytes(archive.read_bytes()[:spans[2][1]])          # 3 series committed
    shutil.copy(full, journal)
    with sqlite3.connect(journal) as db:
        db.execute("DELETE FROM files WHERE uid IN (SELECT uid FROM series WHERE "
                   "archive_end > ?)", (spans[2][1],))
        db.execute("DELETE FROM series WHERE archive_end > ?", (spans[2][1],))
        db.execute("DELETE FROM meta WHERE key='closing_end'")
    fourth = archive.read_bytes()[spans[3][0]:spans[3][1]]
    original = xzread.xz_stream_spans

    def spans_then_an_append(path):
        """The download appends its 4th series (stream, then journal row) just after
        --verify found the .part's streams."""
        found = original(path)
        if path == part and part.stat().st_size == spans[2][1]:
            with open(part, "ab") as handle:
                handle.write(fourth)
            with sqlite3.connect(journal) as db:
                db.execute("ATTACH ? AS full", (str(full),))
                db.execute("INSERT INTO series SELECT * FROM full.series WHERE archive_end=?",
                           (spans[3][1],))
                db.execute("INSERT INTO files SELECT f.* FROM full.files f JOIN full.series s "
                           "ON s.uid = f.uid WHERE s.archive_end=?", (spans[3][1],))
        return found
    monkeypatch.setattr(type(xzread.XZ), "spans", staticmethod(spans_then_an_append))
    code, lines = verify(part, capsys)
    assert code == errors.EXIT_OK, lines
    assert len(rows_by_end(journal)) == 4 and part.stat().st_size == spans[3][1]
    assert "3 series" in lines[-1]


# -- journals that are not ours ------------------------------------------------------------------

def garbage(journal: Path) -> None:
    journal.write_bytes(b"not a database at all\n" * 100)


def foreign_tables(journal: Path) -> None:
    journal.unlink()
    with sqlite3.connect(journal) as db:
        db.execute("CREATE TABLE notes (id INTEGER, text TEXT)")


def wrong_columns(journal: Path) -> None:
    journal.unlink()
    with sqlite3.connect(journal) as db:
        db.execute("CREATE TABLE series (uid TEXT, archive_end TEXT)")
        db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        db.execute("INSERT INTO series VALUES ('1.2.3', 'x')")


def record_not_json(journal: Path) -> None:
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE series SET record='{not json' WHERE rowid = "
                   "(SELECT min(rowid) FROM series)")


SPOILERS = [garbage, foreign_tables, wrong_columns, record_not_json]


def repair_list(output: Path, uid: str, name: str = "DEMO", compression: bool = True) -> Path:
    path = output / f"{name}.damaged.tcia"
    path.write_text(f"tcia_downloader.output={output}\ntcia_downloader.name={name}\n"
                    f"tcia_downloader.compression={'yes' if compression else 'no'}\n"
                    f"tcia_downloader.repair=yes\nListOfSeriesToDownload=\n{uid}\n")
    return path


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__)
def test_a_journal_not_ours_beside_an_archive_is_ignored_in_one_line(
        spoil, tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=4)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    journal = archive.with_name("DEMO.tar.xz.journal")
    spoil(journal)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines
    assert [line for line in lines if "is ignored" in line] == \
        [line for line in lines if line.startswith("DEMO.tar.xz.journal is ignored: ")]
    assert len([line for line in lines if "is ignored" in line]) == 1
    patient = sorted(patients_folders(archive))[0]
    code, lines = extract(archive, tmp_path / "x", capsys, "--patient", patient)
    assert code == errors.EXIT_OK, lines
    assert len([line for line in lines if line.startswith("DEMO.tar.xz.journal is ignored: ")]) == 1
    uid = fake.series("DEMO")[0]["SeriesInstanceUID"]
    retry = Run(tmp_path, fake, "--retry-failed", str(repair_list(archive.parent, uid)),
                collection=None)
    assert retry.code == errors.EXIT_USAGE
    assert "DEMO.tar.xz.journal is unusable" in retry.log and "Traceback" not in retry.log


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__)
def test_a_journal_not_ours_beside_a_tree_is_ignored_in_one_line(
        spoil, tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=3)
    assert Run(tmp_path, fake, compression=False).code == errors.EXIT_OK
    tree = tmp_path / "out"
    spoil(tree / "DEMO.journal")
    code, lines = verify(tree, capsys)
    assert code == errors.EXIT_OK, lines
    assert len([line for line in lines if line.startswith("DEMO.journal is ignored: ")]) == 1
    uid = fake.series("DEMO")[0]["SeriesInstanceUID"]
    retry = Run(tmp_path, fake, "--retry-failed",
                str(repair_list(tree, uid, compression=False)), collection=None,
                compression=False)
    assert retry.code == errors.EXIT_USAGE
    assert "DEMO.journal is unusable" in retry.log and "Traceback" not in retry.log


# -- #23 item 5: the printed command runs as printed --------------------------------------------

def test_the_repair_list_names_the_source_and_runs_as_printed(damaged, tmp_path, capsys):
    fake, archive, manifest, before, uid, _ = damaged
    keys = header(manifest)
    assert keys["tcia_downloader.api-url"] == fake.url.rstrip("/") + "/"
    assert keys["tcia_downloader.mode"] == "nbia"
    assert "cancerimagingarchive" not in manifest.read_text()   # not TCIA's: the fake's
    assert keys["downloadServerUrl"] == \
        fake.url.split("/nbia-api/")[0] + "/nbia-download/servlet/DownloadServlet"
    code = cli.main(["--retry-failed", str(manifest.resolve()),      # no --api-url, no --mode
                    "--cache_dir", str(tmp_path / "cache"), "--no-progress",
                    "--retry-wait", "0.05", "--connect-timeout", "2"])
    assert code == errors.EXIT_OK
    assert archive_members(archive) == before
    assert not manifest.exists()                   # repaired: the list of damage is gone


class Described:
    def describe(self) -> str:
        return "a source"


def test_source_flags_come_from_the_list_unless_given_and_no_secret_is_written(tmp_path):
    index = tmp_path / "index.parquet"
    index.write_bytes(b"PAR1")
    out = tmp_path / "out"
    made = cli.parse_options([
        "--collection", "X", "--output", str(out), "--mode", "auto", "--idc-index", str(index),
        "--idc-endpoint", "http://key:secret-key@127.0.0.1:9/s3?X-Amz-Security-Token=tok",
        "--api-url", "https://me:hunter2@nbia.example.org/nbia-api/services/v4/",
        "--user", "me", "--password", "hunter2"])
    out.mkdir()
    journal = journal_module.Journal(out / "X.tar.xz.journal")
    run_module.record_provenance(journal, made, Described())
    manifest = out / "X.failed.tcia"
    plan.write_failed_manifest(manifest, ["1.2.3"], "tar.xz", "X", plan.recorded_source(journal.get))
    journal.close()
    text = manifest.read_text()
    assert not any(secret in text for secret in ("hunter2", "secret-key", "tok", "me@"))
    assert header(manifest)["downloadServerUrl"] == \
        "https://nbia.example.org/nbia-download/servlet/DownloadServlet"
    again = cli.parse_options(["--retry-failed", str(manifest)])
    assert (again.mode, again.source.nbia.api_url, again.source.idc.endpoint,
            again.source.idc.index) == \
        ("auto", "https://nbia.example.org/nbia-api/services/v4/", "http://127.0.0.1:9/s3",
         index.resolve())
    assert again.selection.retry_name == "X" and again.output == out.resolve()
    told = cli.parse_options(["--retry-failed", str(manifest), "--mode", "nbia",
                             "--api-url", "https://other.example.org/v4/"])
    assert (told.mode, told.source) == ("nbia", NbiaSettings("https://other.example.org/v4/"))


# -- the .incoming name --------------------------------------------------------------------------

def test_a_link_planted_at_the_incoming_name_is_not_followed(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=3)
    fake.script_faults(fake.series("DEMO")[0]["SeriesInstanceUID"], ["500"] * 2)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("DEMO.failed.tcia.incoming", ".DEMO.failed.tcia.incoming"):
        (out / name).symlink_to(victim)                  # 0.4.0's temporary name, and ours
    run = Run(tmp_path, fake, "--retries", "2")
    assert run.code == errors.EXIT_INCOMPLETE
    assert victim.read_text() == "precious\n"
    failed = out / "DEMO.failed.tcia"
    assert failed.is_file() and not failed.is_symlink()
    assert "ListOfSeriesToDownload=" in failed.read_text()
    assert not (out / ".DEMO.failed.tcia.incoming").is_symlink()


@pytest.mark.parametrize("where", ["inside a series", "inside the closing stream"])
def test_a_finished_archive_cut_short_is_repaired_by_the_printed_command(
        where, tmp_path, fake_nbia_factory, capsys):
    """A copy cut short is ordinary damage: the journal still names its series (what is
    left is what it recorded), --verify writes the repair list, and the command it prints
    restores the whole archive."""
    fake = fake_nbia_factory(demo_series=5)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    before = archive_members(archive)
    spans = xzread.xz_stream_spans(archive)
    start, end = spans[3] if where == "inside a series" else spans[-1]
    with open(archive, "r+b") as handle:
        handle.truncate((start + end) // 2)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE, lines
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    assert manifest.exists(), lines
    # the series from the cut on (none when only the collection files are lost)
    expected = len(spans) - 1 - 3 if where == "inside a series" else 0
    assert len(plan.read_manifest(manifest).uids) == expected, lines
    run = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert archive_members(archive) == before
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK, lines


class WithoutJsonFunctions:
    """An sqlite connection as one built without JSON1 answers: no json_valid."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, *args):
        if "json_valid" in sql:
            raise sqlite3.OperationalError("no such function: json_valid")
        return self._db.execute(sql, *args)


@pytest.mark.parametrize("record, bad", [('{"a": 1}', False), ("{not json", True),
                                         ("[1, 2]", True), (None, True)])
def test_a_record_that_is_no_json_object_is_found_with_or_without_sqlites_json(record, bad):
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE series (uid TEXT, record TEXT)")
    db.execute("INSERT INTO series VALUES ('1.2.3', '{\"b\": 2}'), ('1.2.4', ?)", (record,))
    expected = "1.2.4" if bad else None
    assert journal_module.first_record_not_json(db) == expected
    assert journal_module.first_record_not_json(WithoutJsonFunctions(db)) == expected
