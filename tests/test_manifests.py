"""What TCIA hands out, as --manifest: IDC's s5cmd manifests (their real variants: gs://,
quotes, old bucket names, comments, CRLF, duplicates, uuids the index lacks) in --mode idc,
auto and nbia, spreadsheets with a SeriesInstanceUID column, the kind told by the content;
and NLST's own host, and what IDC's default of original series leaves out."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tcia_dl import cli, errors, manifests
from tcia_dl.sources import nbia as nbia_source
from fakes.fake_s3 import rows as series_rows
from fakes.fake_s3 import write_snapshot_index
from helpers import PATIENTS, WITHOUT_THE_INDEX_PACKAGE, Run, _NoNbia, skip_unless_ci

PANCREAS_PATIENTS = ("PANCREAS_0001", "PANCREAS_0002")
UUID_A = "685be04a-ca32-4ec4-b2ca-45cb8252c817"
UUID_B = "98b8ff07-c5f9-406e-83fe-16bf083c717d"


@pytest.fixture(scope="session")
def snapshot_index(tmp_path_factory) -> str:
    return write_snapshot_index(tmp_path_factory.mktemp("idc-index"))


@pytest.fixture(autouse=True)
def index_for_this_python(request, monkeypatch):
    """Python 3.9 has no idc-index-data: the index is fake_s3's snapshot, as a 3.9 user
    would give it (--idc-index, here $TCIA_IDC_INDEX)."""
    if WITHOUT_THE_INDEX_PACKAGE:
        monkeypatch.setenv("TCIA_IDC_INDEX", request.getfixturevalue("snapshot_index"))


def s5cmd_line(row: dict, dest: str = ".") -> str:
    """A line as idc-index writes it: cp <series_aws_url> <dest>."""
    return f"cp s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/* {dest}"


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def metadata_rows(output: Path) -> list[dict]:
    """The rows of every collection's metadata.csv in the output's archive."""
    archive = next(output.glob("*.tar.xz"))
    with tarfile.open(archive, "r:xz") as tar:
        texts = [tar.extractfile(name).read().decode() for name in tar.getnames()
                 if name.split("/")[-1].startswith("metadata")]
    return [row for text in texts for row in csv.DictReader(io.StringIO(text))]


def metadata_uids(output: Path) -> list[str]:
    return sorted(row["SeriesInstanceUID"] for row in metadata_rows(output))


def main_error(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# -- reading the files ------------------------------------------------------------------------

def test_an_s5cmd_manifest_in_its_real_variants(tmp_path, caplog):
    path = write(tmp_path / "cart.s5cmd", "\n".join([
        "# made by IDC's portal",
        "",
        f"cp s3://idc-open-data/{UUID_A}/* .",
        f'cp "s3://idc-open-data-two/{UUID_B.upper()}/*" "my folder"',      # quoted, upper
        f"cp gs://public-datasets-idc/{UUID_A}/* ./x    # again, from the old GCS bucket",
        f"sync s3://idc-open-idc1/{UUID_B}/ .",
        "ls s3://idc-open-data/",                                         # not a copy
    ]) + "\n", newline="\r\n")
    manifest = manifests.read_manifest(path)
    assert manifest.kind == "s5cmd" and manifest.uids == []
    assert manifest.uuids == [UUID_A, UUID_B]                 # lower case, once each
    assert manifest.stray_count == 1 and manifest.stray[0][0] == 7
    assert manifest.stem == "cart"


def test_the_kind_is_told_by_the_content_not_the_name(tmp_path):
    uid = "1.2.3.4.5"
    cases = {
        "a.csv": (f"downloadServerUrl=x\nListOfSeriesToDownload=\n{uid}\n", "tcia"),
        "b.txt": (f"cp s3://idc-open-data/{UUID_A}/* .\n", "s5cmd"),
        "c.tcia": (f"Subject ID,Series Instance UID\nP1,{uid}\n", "spreadsheet"),
        "d": (f"{uid}\n", "tcia"),                                     # a bare list of UIDs
        "e.dat": (f"series_instance_uid\t Modality\n{uid}\tCT\n", "spreadsheet"),
    }
    for name, (text, kind) in cases.items():
        assert manifests.manifest_kind(write(tmp_path / name, text)) == kind, name


def test_a_file_of_no_kind_gets_one_line_listing_the_kinds(tmp_path, capsys):
    other = write(tmp_path / "notes.txt", "Dear colleague,\nhere are the scans.\n")
    code, err = main_error(["--manifest", str(other), "--output", str(tmp_path / "o"),
                            "--cache_dir", str(tmp_path / "c"), "--api-url", _NoNbia.url],
                           capsys)
    assert code == errors.EXIT_USAGE and "Traceback" not in err
    assert f"{other} is none of the files --manifest reads: a .tcia manifest" in err
    assert "s5cmd" in err and "SeriesInstanceUID column" in err
    workbook = tmp_path / "cart.xlsx"
    workbook.write_bytes(b"PK\x03\x04" + bytes(100))
    code, err = main_error(["--manifest", str(workbook), "--output", str(tmp_path / "o"),
                            "--cache_dir", str(tmp_path / "c"), "--api-url", _NoNbia.url],
                           capsys)
    assert code == errors.EXIT_USAGE and "save it as CSV" in err and "Traceback" not in err
    old_excel = tmp_path / "cart.xls"
    old_excel.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100))
    code, err = main_error(["--manifest", str(old_excel), "--output", str(tmp_path / "o"),
                            "--cache_dir", str(tmp_path / "c"), "--api-url", _NoNbia.url],
                           capsys)
    assert code == errors.EXIT_USAGE and "save it as .xlsx or CSV" in err


def test_an_xlsx_workbook_gives_the_series_of_its_uid_column(tmp_path):
    if importlib.util.find_spec("openpyxl") is None:
        skip_unless_ci("openpyxl is not installed: pip install -r requirements-xlsx.txt")
    import openpyxl
    uids = ["1.3.6.1.4.1.9328.50.4.1", "1.3.6.1.4.1.9328.50.4.2"]
    book = openpyxl.Workbook()
    book.active.title = "notes"
    book.active.append(["nothing here"])
    sheet = book.create_sheet("cart")
    sheet.append([None])
    sheet.append(["Collection", "Series Instance UID", "Modality"])
    sheet.append(["LIDC-IDRI", uids[0], "CT"])
    sheet.append(["LIDC-IDRI", "not a uid", "CT"])
    sheet.append(["LIDC-IDRI", uids[1], "CT"])
    sheet.append(["LIDC-IDRI", uids[0], "CT"])                 # listed twice: once
    path = tmp_path / "cart.dat"                                 # told by its content
    book.save(path)
    manifest = manifests.read_manifest(path)
    assert manifest.uids == uids
    assert manifest.stray_count == 1 and "not a uid" in manifest.stray[0][1]


def test_a_spreadsheet_with_extra_columns_gives_its_uid_column(tmp_path):
    uids = ["1.3.6.1.4.1.9328.50.4.1", "1.3.6.1.4.1.9328.50.4.2"]
    path = write(tmp_path / "cart.csv", "\n".join([
        'Collection,Subject ID,"Series Instance UID",Modality',
        f"LIDC-IDRI,P1,{uids[0]},CT",
        "",
        f'LIDC-IDRI,"P, 2",{uids[1]},CT',                    # a quoted comma in another cell
        f"LIDC-IDRI,P1,{uids[0]},CT",                         # twice: once
    ]) + "\n", newline="\r\n")
    manifest = manifests.read_manifest(path)
    assert (manifest.kind, manifest.uids, manifest.stray_count) == ("spreadsheet", uids, 0)
    assert manifest.stem == "cart"
    tsv = write(tmp_path / "cart.tsv", f"seriesinstanceuid\tnote\n{uids[1]}\tx\nnot a uid\ty\n")
    manifest = manifests.read_manifest(tsv)
    assert manifest.uids == [uids[1]] and manifest.stray_count == 1


@pytest.mark.parametrize("text, says", [
    ("Subject ID,Modality\nP1,CT\n", "a spreadsheet needs a header row naming a "
                                     "SeriesInstanceUID column; its first row is 'Subject ID,"),
    ("1.2.3.4,CT\n1.2.3.5,CT\n", "its first row is '1.2.3.4,CT'"),          # no header
    ("", "it is empty"),
    ("SeriesInstanceUID,Modality\n,CT\n", "its SeriesInstanceUID column (row 1) holds no "
                                          "SeriesInstanceUID"),
])
def test_a_spreadsheet_without_the_column_is_one_line_naming_the_file(tmp_path, capsys, text,
                                                                      says):
    path = write(tmp_path / "cart.csv", text)
    code, err = main_error(["--manifest", str(path), "--output", str(tmp_path / "o"),
                            "--cache_dir", str(tmp_path / "c"), "--api-url", _NoNbia.url],
                           capsys)
    assert code == errors.EXIT_USAGE and "Traceback" not in err
    assert f"{path}: " in err and says in err and len(err.strip().splitlines()) == 2


def test_an_s5cmd_manifest_without_index_support_says_how(tmp_path):
    """--mode aspera (or any source that cannot map uuids) refuses in one line."""
    path = write(tmp_path / "cart.s5cmd", f"cp s3://idc-open-data/{UUID_A}/* .\n")
    with pytest.raises(errors.FatalRunError, match="is an IDC s5cmd manifest: use --mode idc"):
        manifests.wanted_series((path,), None)


def test_nbia_mode_without_duckdb_says_what_an_s5cmd_manifest_needs(tmp_path, fake_nbia,
                                                                      monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "duckdb", None)               # as if not installed
    path = write(tmp_path / "cart.s5cmd", f"cp s3://idc-open-data/{UUID_A}/* .\n")
    code, err = main_error(["--manifest", str(path), "--mode", "nbia", "--api-url",
                            fake_nbia.url, "--output", str(tmp_path / "o"), "--cache_dir",
                            str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == errors.EXIT_USAGE and "Traceback" not in err
    assert "an IDC s5cmd manifest names series by IDC's uuids, which IDC's index maps to " \
        "SeriesInstanceUIDs: IDC (--mode idc or auto) needs duckdb: " in err
    assert fake_nbia.counters.snapshot()["requests"] == {}


# -- runs ---------------------------------------------------------------------------------------

def idc_manifest_run(tmp_path: Path, s3, *paths: Path, name: str = "out",
                     mode: str = "idc", nbia=None) -> Run:
    args = [arg for path in paths for arg in ("--manifest", str(path))]
    return Run(tmp_path, nbia or _NoNbia(), "--mode", mode, "--idc-endpoint", s3.endpoint,
               *args, collection=None, output=tmp_path / name)


def test_s5cmd_manifests_fetch_each_series_once_named_after_the_manifest(fake_s3, tmp_path):
    rows = series_rows("prostate_3t", patient_ids=PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    first = write(tmp_path / "cart.s5cmd", "\n".join(
        [s5cmd_line(rows[0]), s5cmd_line(rows[1]), s5cmd_line(rows[0], "elsewhere")]) + "\n")
    gcs = f"cp gs://public-datasets-idc/{rows[2]['crdc_series_uuid']}/* ."  # the old mirror
    second = write(tmp_path / "more.s5cmd", f"# two more\n{s5cmd_line(rows[1])}\n{gcs}\n",
                   newline="\r\n")
    run = idc_manifest_run(tmp_path, fake_s3, first, second)
    assert run.code == errors.EXIT_OK, run.log
    assert (tmp_path / "out" / "cart-and-1-more.tar.xz").is_file()
    assert metadata_uids(tmp_path / "out") == sorted(r["SeriesInstanceUID"] for r in rows)
    for row in rows:                                   # listed up to three times: once
        assert fake_s3.gets_under(f"{row['crdc_series_uuid']}/") == row["instanceCount"]


# idc-index's own manifest code (IDCClient.download_from_selection), with s5cmd replaced by
# a function that keeps the manifest it was handed: run in a child process (pandas, ~0.5 GB),
# any request it might make sent to a port nothing listens on.
IDC_INDEX_MANIFESTS = """
import json, sys
from idc_index import index
written = []
index.IDCClient._s5cmd_run = lambda self, *a, **k: written.append(open(k["manifest_file"]).read())
client = index.IDCClient()
uids, folder = json.loads(sys.argv[1]), sys.argv[2]
client.download_from_selection(seriesInstanceUID=uids, downloadDir=folder, quiet=True)
json.dump(written, sys.stdout)
"""


def test_manifests_that_idc_index_writes_are_read(fake_s3, tmp_path):
    pytest.importorskip("idc_index", reason="idc-index (requirements-dev.txt, via tcia_utils) "
                                            "writes the manifests of this test")
    rows = series_rows("prostate_3t", patient_ids=PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    uids = sorted(r["SeriesInstanceUID"] for r in rows)
    dead = "http://127.0.0.1:9"
    done = subprocess.run([sys.executable, "-c", IDC_INDEX_MANIFESTS, json.dumps(uids),
                           str(tmp_path / "idc-index-download")], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "HTTPS_PROXY": dead, "HTTP_PROXY": dead,
                               # idc-index leaves its manifest file in the temp folder
                               "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(done.stdout)
    assert len(written) == 1 and written[0].count("cp s3://") == len(uids)
    manifest = write(tmp_path / "idc-index.s5cmd", written[0])
    run = idc_manifest_run(tmp_path, fake_s3, manifest)
    assert run.code == errors.EXIT_OK, run.log
    assert metadata_uids(tmp_path / "out") == uids


def test_a_uuid_the_index_lacks_is_reported_like_an_unknown_uid(fake_s3, tmp_path):
    row = series_rows("prostate_3t", patient_ids=PATIENTS[:1])[0]
    fake_s3.add_series(row)
    ghost, ghost_uid = "00000000-1111-4222-8333-444444444444", "1.2.840.99999.1"
    manifest = write(tmp_path / "cart.s5cmd",
                     f"{s5cmd_line(row)}\ncp s3://idc-open-data/{ghost}/* .\n")
    legacy = write(tmp_path / "old.tcia", f"ListOfSeriesToDownload=\n{ghost_uid}\n")
    run = idc_manifest_run(tmp_path, fake_s3, manifest, legacy)
    assert run.code == errors.EXIT_INCOMPLETE, run.log
    assert metadata_uids(tmp_path / "out") == [row["SeriesInstanceUID"]]
    upgrade = "series newer than the index? pip install --upgrade idc-index-data"
    assert "1 crdc_series_uuid(s) of the manifest are not in IDC's index" in run.log
    assert "1 SeriesInstanceUID(s) of the manifest are not in IDC's index" in run.log
    assert run.log.count(upgrade) == 2
    assert f"2 series UIDs are unknown to the server (withdrawn, or a typo): {ghost_uid}, " \
        f"{ghost}" in run.log
    # which index: in the report and in CITATION.md
    index = "idc-index-data 25.0.5" if not WITHOUT_THE_INDEX_PACKAGE else "idc_index.parquet"
    assert "  IDC's index:                 " in run.log and index in run.log
    with tarfile.open(next((tmp_path / "out").glob("*.tar.xz")), "r:xz") as tar:
        citation = next(n for n in tar.getnames() if "/CITATION" in n)
        assert index in tar.extractfile(citation).read().decode()


@pytest.fixture
def pancreas_ct(fake_s3, fake_nbia_factory):
    """Two Pancreas-CT CT series (real UIDs) in the fake bucket and on the fake NBIA."""
    rows = series_rows("pancreas_ct", patient_ids=PANCREAS_PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    return fake_s3, fake_nbia_factory(instances=2, demo_series=0), rows


def test_the_same_s5cmd_manifest_gives_the_same_series_in_every_mode(pancreas_ct, tmp_path):
    s3, nbia, rows = pancreas_ct
    manifest = write(tmp_path / "pancreas.s5cmd", "".join(s5cmd_line(r) + "\n" for r in rows))
    wanted = sorted(r["SeriesInstanceUID"] for r in rows)
    for mode in ("idc", "auto", "nbia"):
        run = idc_manifest_run(tmp_path, s3, manifest, name=mode, mode=mode, nbia=nbia)
        assert run.code == errors.EXIT_OK, (mode, run.log)
        assert (tmp_path / mode / "pancreas.tar.xz").is_file(), mode
        assert metadata_uids(tmp_path / mode) == wanted, mode
    # NBIA's run (and auto's, NBIA first) asked NBIA, the IDC run the bucket
    served = nbia.counters.snapshot()["complete_downloads"]
    assert all(served.get(r["SeriesInstanceUID"]) == 2 for r in rows), served
    assert s3.gets_under(f"{rows[0]['crdc_series_uuid']}/") == rows[0]["instanceCount"]


def test_idc_says_what_its_default_of_original_series_left_out(pancreas_ct, tmp_path):
    s3, nbia, rows = pancreas_ct
    argv = ("--mode", "idc", "--idc-endpoint", s3.endpoint, "--patient", *PANCREAS_PATIENTS)
    note = ("left out: 2 analysis-result series that IDC files under this selection "
            "(pancreas_ct_seg 2); --include-analysis-results adds them")
    (tmp_path / "dry").mkdir()                # a log of its own (their names have seconds)
    dry = Run(tmp_path / "dry", _NoNbia(), *argv, "--dry-run", collection="Pancreas-CT")
    assert dry.code == errors.EXIT_OK, dry.log
    assert note in dry.log
    run = Run(tmp_path, _NoNbia(), *argv, collection="Pancreas-CT")
    assert run.code == errors.EXIT_OK, run.log
    report = run.log[run.log.index("report for"):]
    assert note in run.log[:run.log.index("report for")] and note in report
    assert metadata_uids(tmp_path / "out") == sorted(r["SeriesInstanceUID"] for r in rows)
    (tmp_path / "auto").mkdir()               # auto, NBIA planning: IDC's index says it too
    auto = Run(tmp_path / "auto", nbia, "--mode", "auto", *argv[2:], "--dry-run",
               collection="Pancreas-CT")
    assert auto.code == errors.EXIT_OK and note in auto.log, auto.log


# -- NLST's own host ------------------------------------------------------------------------------

def nlst_data(folder: Path) -> Path:
    """Two series of our test data, served as NLST's."""
    source = Path(__file__).resolve().parent / "data" / "Pancreas-CT.series.json"
    records = [r for r in json.loads(source.read_text()) if r["Modality"] == "CT"][:2]
    folder.mkdir()
    (folder / "NLST.series.json").write_text(json.dumps(
        [{**r, "Collection": "NLST"} for r in records]))
    return folder


def test_nlst_goes_to_its_own_host_and_api_url_still_overrides(tmp_path, fake_nbia_factory,
                                                               monkeypatch, capsys):
    main = fake_nbia_factory(instances=1)                      # no NLST here, as on TCIA
    nlst = fake_nbia_factory(instances=1, demo_series=0, data_dir=nlst_data(tmp_path / "d"))
    monkeypatch.setattr(nbia_source, "NLST_API_URL", nlst.url)
    monkeypatch.setattr(nbia_source, "DEFAULT_API_URL", _NoNbia.url)     # never TCIA's own
    code = cli.main(["--collection", "NLST", "--output", str(tmp_path / "out"), "--cache_dir",
                     str(tmp_path / "c"), "--no-progress", "--mode", "nbia", "--compression"])
    capsys.readouterr()
    assert code == errors.EXIT_OK
    assert (tmp_path / "out" / "NLST.tar.xz").is_file()
    assert len(metadata_uids(tmp_path / "out")) == 2
    assert main.counters.snapshot()["requests"] == {}

    code, err = main_error(["--collection", "NLST", "--api-url", main.url, "--mode", "nbia",
                            "--output", str(tmp_path / "o2"), "--cache_dir",
                            str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == errors.EXIT_USAGE
    assert "unknown collection 'NLST'" in err and "NLST is on its own server" in err


# -- auto: IDC first, NBIA the fallback; the default mode ---------------------------------------

def metadata_sources(output: Path) -> dict[str, str]:
    return {row["SeriesInstanceUID"]: row["Source"] for row in metadata_rows(output)}


def test_auto_takes_each_series_from_idc_first_and_from_nbia_what_idc_lacks_or_fails(
        fake_s3, fake_nbia_factory, tmp_path, capsys):
    """Two Pancreas-CT series that NBIA and IDC both have, as many instances in each (the
    fake NBIA serves them whole here), and one DEMO series IDC's index lacks. IDC serves the
    first CT; an object of the second fails all its tries in the bucket, so NBIA serves that
    one; NBIA serves the DEMO series."""
    rows = series_rows("pancreas_ct", patient_ids=PANCREAS_PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    nbia = fake_nbia_factory(instances=500, demo_series=1)
    demo = nbia.series("DEMO")[0]["SeriesInstanceUID"]
    failing = rows[1]
    fake_s3.script_faults(fake_s3.keys(failing["crdc_series_uuid"])[0], ["500"] * 10)
    manifest = write(tmp_path / "mixed.tcia", "ListOfSeriesToDownload=\n" + "".join(
        uid + "\n" for uid in [rows[0]["SeriesInstanceUID"], failing["SeriesInstanceUID"], demo]))
    argv = ("--mode", "auto", "--idc-endpoint", fake_s3.endpoint, "--manifest", str(manifest),
            "--retries", "1")
    capsys.readouterr()
    dry = Run(tmp_path, nbia, *argv, "--dry-run", collection=None, output=tmp_path / "dry")
    assert dry.code == errors.EXIT_OK, dry.log
    planned = {row["SeriesInstanceUID"]: row["Source"] for row in
               csv.DictReader(io.StringIO(capsys.readouterr().out), delimiter="\t")}
    assert planned == {rows[0]["SeriesInstanceUID"]: "idc", failing["SeriesInstanceUID"]: "idc",
                       demo: "nbia"}                            # where each is tried first
    run = Run(tmp_path, nbia, *argv, collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert metadata_sources(tmp_path / "out") == {
        rows[0]["SeriesInstanceUID"]: "idc", failing["SeriesInstanceUID"]: "nbia", demo: "nbia"}
    served = nbia.counters.snapshot()["complete_downloads"]
    assert rows[0]["SeriesInstanceUID"] not in served                  # IDC's, not NBIA's
    assert fake_s3.gets_under(f"{rows[0]['crdc_series_uuid']}/") == rows[0]["instanceCount"]
    assert "IDC fails it" in run.log and "fetching it from NBIA" in run.log
    assert "plan:                        NBIA's list; 2 of its 3 series as IDC's index has " \
        "them" in run.log
    assert "from each source:            idc 1, nbia 2" in run.log


def test_the_default_mode_is_auto_with_the_idc_requirements_and_nbia_without(
        fake_nbia_factory, tmp_path, monkeypatch):
    from tcia_dl.sources import idc_index, registry
    monkeypatch.delenv("TCIA_MODE")
    argv = ["--collection", "DEMO", "--output", str(tmp_path / "o"), "--cache_dir",
            str(tmp_path / "c")]
    # duckdb and an index (the package's, or a file that $TCIA_IDC_INDEX names): installed
    (tmp_path / "any.parquet").touch()
    monkeypatch.setenv("TCIA_IDC_INDEX", str(tmp_path / "any.parquet"))
    assert idc_index.idc_installed() == (importlib.util.find_spec("duckdb") is not None)
    monkeypatch.setattr(registry, "idc_installed", lambda: True)
    assert cli.parse_options(argv).mode == "auto"
    monkeypatch.setattr(registry, "idc_installed", lambda: False)
    monkeypatch.setattr(nbia_source, "idc_installed", lambda: False)
    assert cli.parse_options(argv).mode == "nbia"
    fake = fake_nbia_factory(demo_series=2, instances=1)
    run = Run(tmp_path, fake, collection="DEMO")
    assert run.code == errors.EXIT_OK, run.log
    hint = [line for line in run.log.splitlines() if "IDC (NCI's Imaging Data Commons)" in line]
    assert len(hint) == 1 and idc_index.idc_install_hint() in hint[0]
    (tmp_path / "two").mkdir()                # a log of its own (their names have seconds)
    again = Run(tmp_path / "two", fake, "--mode", "nbia", collection="DEMO")
    assert again.code == errors.EXIT_OK and "Imaging Data Commons" not in again.log
