"""--mode idc and --mode auto against a real S3 implementation (moto's server, behind a fault
layer; tests/fakes/fake_s3.py) holding synthetic DICOM at the real keys of real series of the
installed idc-index-data: the same verified archive as from NBIA, every fault recovered, a
corrupt object never in it, analysis results only when asked for, kill-safe, and auto mode
taking from IDC what NBIA cannot serve."""
from __future__ import annotations

import contextlib
import csv
import http.client
import http.server
import io
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from helpers import skip_without_idc_test_packages

skip_without_idc_test_packages()

from tcia_dl import cli, errors as errors_module, logs, plan  # noqa: E402
from tcia_dl.sources import idc, nbia_api
from fakes.fake_s3 import MIB, index_rows, synthetic_dicom, write_snapshot_index
from fakes.fake_s3 import rows as series_rows
from helpers import (PATIENTS, ROOT, WITHOUT_THE_INDEX_PACKAGE, ForwardProxy, Run, _NoNbia,
                     pass_answer_on, wait_until)

# idc-index-data 25.0.5 installs on Python 3.10+ only. On 3.9 the tool reads the index the
# way a 3.9 user gives it, --idc-index (here $TCIA_IDC_INDEX), made of the snapshot of real
# rows in fake_s3; what needs rows beyond the snapshot is 3.10+ only.
needs_the_index_package = pytest.mark.skipif(
    WITHOUT_THE_INDEX_PACKAGE, reason="needs idc-index-data's rows beyond fake_s3's snapshot "
    "(Lung Phantom's analysis results): Python >= 3.10")


@pytest.fixture(scope="session")
def snapshot_index(tmp_path_factory) -> str:
    return write_snapshot_index(tmp_path_factory.mktemp("idc-index"))


@pytest.fixture(autouse=True)
def index_for_this_python(request, monkeypatch):
    if WITHOUT_THE_INDEX_PACKAGE:
        monkeypatch.setenv("TCIA_IDC_INDEX", request.getfixturevalue("snapshot_index"))


def idc_run(tmp_path: Path, s3, *extra: str, collection: str | None = "Prostate-3T",
            compression: bool = True, name: str = "out") -> Run:
    return Run(tmp_path, _NoNbia(), "--mode", "idc", "--idc-endpoint", s3.endpoint, *extra,
               collection=collection, compression=compression, output=tmp_path / name)


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:xz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def metadata_rows(files: dict[str, bytes]) -> list[dict]:
    name = next(n for n in files if n.split("/")[-1].startswith("metadata"))
    return list(csv.DictReader(io.StringIO(files[name].decode())))


def series_files(files: dict[str, bytes], row: dict) -> list[bytes]:
    """The DICOM files of one series, in file-name order (= InstanceNumber order)."""
    tail = row["SeriesInstanceUID"][-5:]
    names = sorted(n for n in files if n.count("/") == 4 and n.split("/")[3].endswith(tail))
    return [files[n] for n in names]


@pytest.fixture
def prostate(fake_s3):
    """Three real Prostate-3T series (15-24 instances each) in the fake bucket."""
    rows = series_rows("prostate_3t", patient_ids=PATIENTS)
    blobs = {row["SeriesInstanceUID"]: fake_s3.add_series(row) for row in rows}
    return fake_s3, rows, blobs


def test_idc_gives_the_same_kind_of_verified_archive(prostate, tmp_path, capsys):
    s3, rows, blobs = prostate
    run = idc_run(tmp_path, s3, "--patient", *PATIENTS)
    assert run.code == errors_module.EXIT_OK, run.log
    archive = next((tmp_path / "out").glob("*.tar.xz"))
    files = members(archive)
    for row in rows:
        assert series_files(files, row) == blobs[row["SeriesInstanceUID"]]
        count = row["instanceCount"]
        names = sorted(n.split("/")[-1] for n in files if n.count("/") == 4 and
                       n.split("/")[3].endswith(row["SeriesInstanceUID"][-5:]))
        assert names == [f"1-{k:0{len(str(count))}d}.dcm" for k in range(1, count + 1)]
    meta = metadata_rows(files)
    assert {r["Source"] for r in meta} == {"idc"}
    assert {r["crdc_series_uuid"] for r in meta} == {r["crdc_series_uuid"] for r in rows}
    assert all(r["Collection"] == "Prostate-3T" for r in meta)
    assert any(n.endswith("/LICENSE.PatientID-" + "+".join(PATIENTS)) or "/LICENSE" in n
               for n in files)
    capsys.readouterr()
    assert cli.main(["--verify", str(archive), "--cache_dir", str(tmp_path / "v")]) == 0


def test_the_debug_log_names_failed_requests_not_each_object_answered(prostate, tmp_path):
    """One line per object answered 200 would be 2 GB of log per 10 million objects in
    --cache-dir; a request that failed is still named, with its status."""
    s3, rows, _ = prostate
    keys = [key for row in rows for key in s3.keys(row["crdc_series_uuid"])]
    s3.script_faults(keys[0], ["500"])
    run = idc_run(tmp_path, s3, "--patient", *PATIENTS)
    assert run.code == errors_module.EXIT_OK, run.log
    debug = "".join(p.read_text() for p in run.cache.glob("logs/*-debug.log"))
    responses = [line for line in debug.splitlines() if '" 500 ' in line or '" 200 ' in line]
    assert [line for line in responses if keys[0] in line and '" 500 ' in line], debug[-3000:]
    answered = [line for line in responses if '" 200 ' in line and
                any(key in line for key in keys)]
    assert not answered, answered[:3]
    assert "Starting new HTTP connection" in debug      # urllib3's other lines stay


def test_objects_share_kept_connections(prostate, tmp_path):
    """Each GET on a connection an earlier one left open: a new one per object (a TLS
    handshake each against AWS) would cost more CPU than the object."""
    s3, rows, _ = prostate
    run = idc_run(tmp_path, s3, "--patient", *PATIENTS, "--workers", "1")
    assert run.code == errors_module.EXIT_OK, run.log
    assert sum(s3.gets.values()) == sum(r["instanceCount"] for r in rows) >= 45
    # one series at a time: its objects in flight, and the listing before them
    assert s3.connections_opened <= idc.OBJECTS_IN_FLIGHT + 1


def test_every_fault_is_recovered_and_a_corrupt_object_never_gets_in(prostate, tmp_path):
    s3, rows, blobs = prostate
    first, second, third = (s3.keys(r["crdc_series_uuid"]) for r in rows)
    s3.script_faults(first[0], ["500", "503"])
    s3.script_faults(first[1], ["reset"])
    s3.script_faults(second[2], ["short", "corrupt"])
    s3.script_faults(third[3], ["corrupt", "corrupt"])
    s3.script_faults(third[4], ["stall"])
    s3.script_list_faults(f"{rows[1]['crdc_series_uuid']}/", ["503", "500"])
    run = idc_run(tmp_path, s3, "--patient", *PATIENTS, "--stall-timeout", "1")
    assert run.code == errors_module.EXIT_OK, run.log
    assert s3.pending_faults() == {} and s3.pending_list_faults() == {}   # every fault served
    files = members(next((tmp_path / "out").glob("*.tar.xz")))
    for row in rows:                    # byte for byte what was uploaded: no corrupt copy
        assert series_files(files, row) == blobs[row["SeriesInstanceUID"]]
    debug = "".join(p.read_text() for p in run.cache.glob("logs/*-debug.log"))
    assert "but its ETag says" in debug                                     # corrupt: caught
    assert "object downloads retried:     8" in run.log       # each object fault, once


def test_a_multipart_object_is_checked_by_its_etag_and_an_odd_one_by_size(fake_s3, tmp_path):
    row = series_rows("prostate_3t", patient_ids=PATIENTS[:1])[0]
    blobs = fake_s3.add_series(row, multipart_index=0)
    run = idc_run(tmp_path, fake_s3, "--patient", PATIENTS[0])
    assert run.code == errors_module.EXIT_OK, run.log
    assert len(blobs[0]) > 8 * MIB and "size only:  0" in run.log
    assert series_files(members(next((tmp_path / "out").glob("*.tar.xz"))), row) == blobs

    # the same object uploaded in 7 MiB parts, a size nobody uses: trusted by its size, said
    key = fake_s3.keys(row["crdc_series_uuid"])[0]
    fake_s3.put_object(row["aws_bucket"], key, blobs[0], multipart=True, part_size=7 * MIB)
    again = idc_run(tmp_path, fake_s3, "--patient", PATIENTS[0], name="again")
    assert again.code == errors_module.EXIT_OK
    assert "1 file(s) verified by their size only" in again.log       # the series' warning
    assert "files verified by size only:  1" in again.log              # and the report


def test_an_object_of_another_series_fails_the_series(prostate, tmp_path):
    s3, rows, blobs = prostate
    stranger = synthetic_dicom(rows[1], 1, "1.2.3.4.5")        # DICOM, but of another series
    key = s3.keys(rows[0]["crdc_series_uuid"])[0]
    s3.put_object(rows[0]["aws_bucket"], key, stranger)
    run = idc_run(tmp_path, s3, "--patient", *PATIENTS, "--retries", "2")
    assert run.code == errors_module.EXIT_INCOMPLETE
    assert "is not DICOM of this series" in run.log or "ETag" in run.log
    failed = (tmp_path / "out").glob("*.failed.tcia")
    assert plan.read_manifest(next(failed)).uids == [rows[0]["SeriesInstanceUID"]]


@needs_the_index_package
def test_analysis_results_only_when_asked(fake_s3, tmp_path):
    rows = index_rows("lung_phantom", include_analysis_results=True)
    original = [r for r in rows if r["analysis_result_id"] is None]
    analysis = [r for r in rows if r["analysis_result_id"] is not None][:5]
    for row in original + analysis:
        fake_s3.add_series(row)
    assert len(original) == 1 and len(analysis) == 5
    run = idc_run(tmp_path, fake_s3, collection="Lung Phantom")
    assert run.code == errors_module.EXIT_OK, run.log
    meta = metadata_rows(members(next((tmp_path / "out").glob("*.tar.xz"))))
    assert [r["SeriesInstanceUID"] for r in meta] == [original[0]["SeriesInstanceUID"]]
    assert fake_s3.gets_under(f"{analysis[0]['crdc_series_uuid']}/") == 0

    wanted = [r["SeriesInstanceUID"] for r in original + analysis]
    run = idc_run(tmp_path, fake_s3, "--series-uid", *wanted, "--include-analysis-results",
                  collection="lung_phantom", name="with")
    assert run.code == errors_module.EXIT_OK, run.log
    meta = metadata_rows(members(next((tmp_path / "with").glob("*.tar.xz"))))
    assert sorted(r["SeriesInstanceUID"] for r in meta) == sorted(wanted)
    assert {r["analysis_result_id"] for r in meta} == {"", "qin_lungct_seg"}


def test_kill_9_then_rerun_gives_the_same_archive_without_fetching_again(prostate, tmp_path):
    s3, rows, blobs = prostate
    whole = idc_run(tmp_path, s3, "--patient", *PATIENTS, name="whole")
    assert whole.code == errors_module.EXIT_OK
    expected = members(next((tmp_path / "whole").glob("*.tar.xz")))

    s3.stall_seconds = 120
    last = s3.keys(rows[-1]["crdc_series_uuid"])
    s3.script_faults(last[0], ["stall"])            # holds the run after some commits
    out = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "tcia_downloader.py"), "--mode", "idc", "--collection",
            "Prostate-3T", "--patient", *PATIENTS, "--idc-endpoint", s3.endpoint,
            "--output", str(out), "--cache_dir", str(tmp_path / "kc"), "--compression",
            "--workers", "1", "--no-progress", "--stall-timeout", "60"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ})
    # kill once a series is committed and the run sits in the stalled object
    wait_until(lambda: committed_uids(out) and s3.gets[last[0]], 60,
               "a commit, then the stalled object")
    committed = committed_uids(out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    s3.release_stalls()
    s3.clear_faults()
    s3.reset_counters()
    rerun = Run(tmp_path, _NoNbia(), "--mode", "idc", "--idc-endpoint", s3.endpoint,
                "--patient", *PATIENTS, collection="Prostate-3T", output=out)
    assert rerun.code == errors_module.EXIT_OK, rerun.log
    got = members(next(out.glob("*.tar.xz")))
    assert {n: d for n, d in got.items() if "/MD5SUMS" not in n and "/CITATION" not in n
            and "/metadata" not in n} == \
        {n: d for n, d in expected.items() if "/MD5SUMS" not in n and "/CITATION" not in n
         and "/metadata" not in n}
    for row in rows:
        if row["SeriesInstanceUID"] in committed:
            assert s3.gets_under(f"{row['crdc_series_uuid']}/") == 0


def committed_uids(out: Path) -> list[str]:
    """The series a run in progress has committed to out's journal, read-only."""
    journal = next(out.glob("*.journal"), None) if out.is_dir() else None
    if journal is None:
        return []
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        try:
            return [uid for (uid,) in db.execute("SELECT uid FROM series")]
        except sqlite3.OperationalError:           # created, but the schema is not there yet
            return []


def idc_process(s3, tmp_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "tcia_downloader.py"), "--mode", "idc", "--collection",
            "Prostate-3T", "--patient", *PATIENTS, "--idc-endpoint", s3.endpoint,
            "--output", str(out), "--cache_dir", str(tmp_path / "pc"), "--compression",
            "--no-progress", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stalled_gets(s3) -> int:
    with s3._lock:
        return sum(1 for r in s3.log if r.fault == "stall" and r.status is not None)


@pytest.mark.parametrize("sig, code, extra", [
    (signal.SIGTERM, errors_module.EXIT_SIGTERM, ()),
    (signal.SIGUSR1, errors_module.EXIT_CHECKPOINT, ("--stop-grace", "1")),
])
def test_a_signal_during_stalled_objects_stops_promptly_and_the_rerun_completes(
        prostate, tmp_path, sig, code, extra):
    s3, rows, blobs = prostate
    s3.stall_seconds = 600                 # only the signal can end these in time
    for row in rows:
        s3.script_faults(s3.keys(row["crdc_series_uuid"])[2], ["stall"])
    out = tmp_path / "out"
    process = idc_process(s3, tmp_path, out, "--stall-timeout", "300", "--workers", "3", *extra)
    try:
        wait_until(lambda: stalled_gets(s3) == len(rows), 60, "every series in a stall")
        sent = time.monotonic()
        process.send_signal(sig)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, errors
    assert time.monotonic() - sent < 10
    assert "Traceback" not in errors and "report for Prostate-3T" in errors
    assert not list(out.glob("*.tar.xz")) and list(out.glob("*.part"))    # resumable, not done

    s3.release_stalls()
    s3.clear_faults()
    rerun = idc_run(tmp_path, s3, "--patient", *PATIENTS)
    assert rerun.code == errors_module.EXIT_OK, rerun.log
    files = members(next(out.glob("*.tar.xz")))
    for row in rows:
        assert series_files(files, row) == blobs[row["SeriesInstanceUID"]]


def test_an_object_failing_for_good_ends_the_attempt_without_waiting_for_the_others(
        prostate, tmp_path):
    s3, rows, _ = prostate
    s3.stall_seconds = 600
    keys = s3.keys(rows[0]["crdc_series_uuid"])
    s3.script_faults(keys[1], ["stall"])                 # a sibling that would hold it
    s3.script_faults(keys[0], ["500"] * idc.OBJECT_ATTEMPTS)
    out = tmp_path / "out"
    # One attempt per series and a stall timeout far beyond the test's patience: the
    # attempt ends only if the failure cuts the stalled sibling.
    process = idc_process(s3, tmp_path, out, "--stall-timeout", "300", "--retries", "1")
    try:
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == errors_module.EXIT_INCOMPLETE, errors
    assert s3.gets[keys[0]] == idc.OBJECT_ATTEMPTS and stalled_gets(s3) == 1
    assert f"{keys[0]}: HTTP 500" in errors                   # the reason, not the cut
    assert "Traceback" not in errors


def test_index_lookups_match_each_value_whole_whatever_it_holds(snapshot_index):
    """The values of a lookup reach duckdb as one string it splits (fast for 200,000 UIDs):
    a quote, an empty value or one holding the separator must match only itself."""
    from tcia_dl.sources.idc_index import VALUE_SEPARATOR, IdcIndex
    index = IdcIndex(Path(snapshot_index))
    try:
        def found(values: list[str]) -> set[str]:
            return {row["SeriesInstanceUID"] for row in
                    index.rows([("SeriesInstanceUID", values)], original_only=False)}
        uids = sorted(row["SeriesInstanceUID"] for row in index.rows([], original_only=False))
        wanted = uids[:2]
        joined = VALUE_SEPARATOR.join(wanted)
        assert found(wanted) == set(wanted)
        assert found(wanted + ["no.such.uid", "it's", "", f"a{VALUE_SEPARATOR}b"]) == set(wanted)
        assert found([joined]) == set() and found([joined, wanted[0]]) == {wanted[0]}
        assert found([]) == set() and len(uids) > 2
    finally:
        index.close()


def test_bad_idc_input_is_one_line(fake_s3, tmp_path, capsys, monkeypatch):
    code = cli.main(["--mode", "idc", "--collection", "Prostate3T", "--output", str(tmp_path),
                    "--cache_dir", str(tmp_path / "c"), "--idc-endpoint", fake_s3.endpoint])
    assert code == errors_module.EXIT_USAGE
    assert "IDC's index has no collection 'Prostate3T'; did you mean: Prostate-3T" in \
        capsys.readouterr().err
    bogus = tmp_path / "not.parquet"
    bogus.write_bytes(b"PAR1 nothing")
    code = cli.main(["--mode", "idc", "--collection", "X", "--idc-index", str(bogus),
                    "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == errors_module.EXIT_USAGE and "not a parquet file" in err and "Traceback" not in err
    # $TCIA_IDC_INDEX stands for --idc-index, and says so when it names nothing
    monkeypatch.setenv("TCIA_IDC_INDEX", str(tmp_path / "gone.parquet"))
    code = cli.main(["--mode", "idc", "--collection", "X", "--cache_dir", str(tmp_path / "c")])
    assert code == errors_module.EXIT_USAGE
    assert "gone.parquet (or $TCIA_IDC_INDEX): no such file" in capsys.readouterr().err


# -- listings no S3 sends ----------------------------------------------------------------------

class _HostileListing(http.server.BaseHTTPRequestHandler):
    """ListObjectsV2 answers of server.kind: "twice" (one key listed instanceCount times),
    "endless" (a new key per page, "more" for ever), "empty_more" (nothing, but "more")."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.lists += 1
        query = parse_qs(urlsplit(self.path).query)
        prefix, page = query["prefix"][0], int(query.get("continuation-token", ["0"])[0])
        kind, count = self.server.kind, self.server.count
        keys = {"twice": [f"{prefix}a.dcm"] * count, "endless": [f"{prefix}{page}.dcm"],
                "empty_more": []}[kind]
        more = kind != "twice"
        body = ("<ListBucketResult>" + "".join(
            f"<Contents><Key>{k}</Key><Size>10</Size><ETag>\"{'0' * 32}\"</ETag></Contents>"
            for k in keys) + f"<IsTruncated>{str(more).lower()}</IsTruncated>" +
            (f"<NextContinuationToken>{page + 1}</NextContinuationToken>" if more else "") +
            "</ListBucketResult>").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("kind, says", [
    ("twice", "names an object twice"),
    ("endless", "goes on beyond 15 objects"),
    ("empty_more", "lists nothing but says there is more"),
])
def test_a_listing_no_s3_sends_fails_the_series_and_ends(tmp_path, kind, says):
    row = series_rows("prostate_3t", patient_ids=PATIENTS[:1])[0]
    assert row["instanceCount"] == 15
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileListing)
    server.kind, server.count, server.lists = kind, row["instanceCount"], 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = Run(tmp_path, _NoNbia(), "--mode", "idc", "--patient", PATIENTS[0], "--idc-endpoint",
                  f"http://127.0.0.1:{server.server_address[1]}", "--retries", "2",
                  collection="Prostate-3T")
    finally:
        server.shutdown()
        server.server_close()
    assert run.code == errors_module.EXIT_INCOMPLETE, run.log
    assert says in run.log
    assert server.lists <= 2 * (row["instanceCount"] + 1)        # two attempts, each bounded


def test_one_instance_under_two_keys_fails_the_series(prostate, tmp_path):
    s3, rows, blobs = prostate
    keys = s3.keys(rows[0]["crdc_series_uuid"])
    s3.put_object(rows[0]["aws_bucket"], keys[1], blobs[rows[0]["SeriesInstanceUID"]][0])
    run = idc_run(tmp_path, s3, "--patient", PATIENTS[0], "--retries", "2")
    assert run.code == errors_module.EXIT_INCOMPLETE, run.log
    assert "repeats the instance" in run.log
    assert not list((tmp_path / "out").glob("*.tar.xz"))


# -- the network settings NBIA mode has: proxy, CA bundle ---------------------------------------

class _TlsRelay(http.server.BaseHTTPRequestHandler):
    """HTTPS in front of the fake S3, with a certificate of its own (a site's TLS proxy)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        upstream.request("GET", self.path)
        pass_answer_on(self, upstream)


@pytest.fixture
def tls_endpoint(fake_s3, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TlsRelay)
    server.upstream_port = urlsplit(fake_s3.endpoint).port
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_a_tls_endpoint_needs_its_ca_bundle_and_says_so_in_one_line(prostate, tls_endpoint,
                                                                    tmp_path):
    s3, rows, blobs = prostate
    url, cert = tls_endpoint
    argv = ["--mode", "idc", "--collection", "Prostate-3T", "--patient", PATIENTS[0],
            "--idc-endpoint", url, "--api-url", _NoNbia.url, "--no-progress",
            "--cache_dir", str(tmp_path / "c")]
    dry = subprocess.run([sys.executable, str(ROOT / "tcia_downloader.py"), *argv, "--dry-run",
                          "--output", str(tmp_path / "no")], capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == errors_module.EXIT_USAGE, dry.stderr      # as the run says it
    assert "TLS with 127.0.0.1 failed (CERTIFICATE_VERIFY_FAILED)" in dry.stderr
    assert "enough" not in dry.stderr.splitlines()[-1]
    refused = subprocess.run([sys.executable, str(ROOT / "tcia_downloader.py"), *argv,
                              "--output", str(tmp_path / "no")], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == errors_module.EXIT_USAGE, refused.stderr
    assert "TLS with 127.0.0.1 failed (CERTIFICATE_VERIFY_FAILED): a site proxy that " \
        "inspects TLS needs --ca-bundle; check --idc-endpoint and --proxy" in refused.stderr
    assert "retrying" not in refused.stderr and "Traceback" not in refused.stderr
    assert s3.gets_under("") == 0
    # nothing that looks resumable: no empty .part, no journal, no failure list
    assert "resumable" not in refused.stderr and "nothing was written" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "no").iterdir()
                  if not p.name.endswith(".lock")) == []

    run = Run(tmp_path, _NoNbia(), "--mode", "idc", "--idc-endpoint", url, "--ca-bundle",
              str(cert), "--patient", PATIENTS[0], collection="Prostate-3T")
    assert run.code == errors_module.EXIT_OK, run.log
    files = members(next(run.output.glob("*.tar.xz")))
    assert series_files(files, rows[0]) == blobs[rows[0]["SeriesInstanceUID"]]


def test_objects_go_through_the_proxy(prostate, tmp_path, monkeypatch):
    s3, rows, _ = prostate
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = ForwardProxy()
    try:
        run = idc_run(tmp_path, s3, "--patient", PATIENTS[0], "--proxy", proxy.url)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert run.code == errors_module.EXIT_OK, run.log
    prefix = f"GET /{rows[0]['aws_bucket']}/{rows[0]['crdc_series_uuid']}/"
    assert sum(s.startswith(prefix) for s in proxy.seen) == rows[0]["instanceCount"]
    assert f"GET /{rows[0]['aws_bucket']}/" in proxy.seen                   # the listing


# -- --mode auto ------------------------------------------------------------------------------

AUTO_PATIENTS = ("PANCREAS_0001", "PANCREAS_0002")


@pytest.fixture
def pancreas(fake_s3, fake_nbia_factory):
    """Pancreas-CT on the fake NBIA, and the same series (real UIDs) in the fake bucket; the
    fake NBIA serves the SEG analysis results too, for four series of two sources."""
    rows = series_rows("pancreas_ct", include_analysis_results=True, patient_ids=AUTO_PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    return fake_nbia_factory(instances=2, analysis_results=True), fake_s3, rows


def auto_run(tmp_path: Path, nbia, s3, *extra: str) -> Run:
    return Run(tmp_path, nbia, "--mode", "auto", "--idc-endpoint", s3.endpoint, "--patient",
               *AUTO_PATIENTS, "--include-analysis-results", *extra, collection="Pancreas-CT")


def test_auto_takes_from_idc_what_nbia_refuses(pancreas, tmp_path):
    """The fake NBIA serves 2 instances a series: its CT series are not IDC's (240 and 195),
    its one-instance SEGs are. The SEGs come from IDC, the CTs from NBIA; the CT NBIA
    refuses comes from IDC all the same."""
    nbia, s3, rows = pancreas
    refused = rows[1]["SeriesInstanceUID"]
    assert [r["Modality"] for r in rows] == ["SEG", "CT", "SEG", "CT"]
    nbia.script_faults(refused, ["not_granted"] * 10)
    run = auto_run(tmp_path, nbia, s3)
    assert run.code == errors_module.EXIT_OK, run.log
    meta = metadata_rows(members(next((tmp_path / "out").glob("*.tar.xz"))))
    sources = {r["SeriesInstanceUID"]: r["Source"] for r in meta}
    assert sources == {r["SeriesInstanceUID"]: "nbia" if r is rows[3] else "idc" for r in rows}
    assert "from each source:            idc 3, nbia 1" in run.log
    assert "plan:                        NBIA's list; 2 of its 4 series as IDC's index has " \
        "them" in run.log
    assert s3.gets_under(f"{rows[3]['crdc_series_uuid']}/") == 0     # NBIA served it


def test_auto_with_nbia_down_from_the_start_takes_everything_from_idc(pancreas, tmp_path):
    _, s3, rows = pancreas
    run = auto_run(tmp_path, _NoNbia(), s3, "--retries", "1", "--retry-wait", "0")
    assert run.code == errors_module.EXIT_OK, run.log
    assert "planning from IDC's index" in run.log
    meta = metadata_rows(members(next((tmp_path / "out").glob("*.tar.xz"))))
    assert sorted(r["SeriesInstanceUID"] for r in meta) == \
        sorted(r["SeriesInstanceUID"] for r in rows)
    assert {r["Source"] for r in meta} == {"idc"}


def test_auto_with_nbia_gone_in_the_middle_takes_the_rest_from_idc(fake_s3, fake_nbia_factory,
                                                                    tmp_path):
    rows = series_rows("pancreas_ct", include_analysis_results=True, patient_ids=AUTO_PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    nbia = fake_nbia_factory(instances=2, conn_bandwidth=20_000,     # a zip takes ~1 s
                             analysis_results=True)

    from_nbia = {r["SeriesInstanceUID"] for r in rows if r["Modality"] == "CT"}  # IDC: the SEGs

    def stop_nbia_after_its_first_series() -> None:
        wait_until(lambda: from_nbia & set(committed_uids(tmp_path / "out")), 60,
                   "NBIA's first series committed")
        nbia.stop()                    # mid-way through the next zip: reset, then refused
    stopper = threading.Thread(target=stop_nbia_after_its_first_series)
    stopper.start()
    try:
        run = auto_run(tmp_path, nbia, fake_s3, "--workers", "1")
    finally:
        stopper.join()
    assert run.code == errors_module.EXIT_OK, run.log
    assert "NBIA failed 3 times in a row: the rest of the run comes from IDC" in run.log
    meta = metadata_rows(members(next((tmp_path / "out").glob("*.tar.xz"))))
    assert sorted(r["SeriesInstanceUID"] for r in meta) == \
        sorted(r["SeriesInstanceUID"] for r in rows)
    assert sorted(r["Source"] for r in meta) == ["idc"] * (len(rows) - 1) + ["nbia"]
    assert f"from each source:            idc {len(rows) - 1}, nbia 1" in run.log


def test_auto_keeps_the_tokens_of_its_nbia_out_of_the_logs(fake_s3, fake_nbia_factory,
                                                           tmp_path, monkeypatch):
    """A run collects the secrets of the source --mode opened, here NBIA's inside auto: a
    token that some line of code writes down is masked in both logs."""
    rows = series_rows("pancreas_ct", include_analysis_results=True, patient_ids=AUTO_PATIENTS)
    for row in rows:
        fake_s3.add_series(row)
    nbia = fake_nbia_factory(instances=2, require_token=True,
                             users={"alice": "pw-Auto-Secret-7"})
    monkeypatch.setenv("TCIA_PASSWORD", "pw-Auto-Secret-7")
    sent: set[str] = set()
    headers = nbia_api.TokenManager.headers

    def headers_written_down(self) -> dict[str, str]:
        given = headers(self)
        token = given["Authorization"].split()[-1]          # bare: no "Bearer" to mask it by
        sent.add(token)
        logs.log.debug("using the token %s", token)
        return given
    monkeypatch.setattr(nbia_api.TokenManager, "headers", headers_written_down)
    run = auto_run(tmp_path, nbia, fake_s3, "--user", "alice")
    assert run.code == errors_module.EXIT_OK, run.log
    written = b"".join(path.read_bytes() for path in (tmp_path / "cache").glob("logs/*.log"))
    assert sent and b"using the token ***" in written
    assert not any(token.encode() in written for token in sent)
    assert b"pw-Auto-Secret-7" not in written


def test_an_archive_begun_from_nbia_is_finished_from_idc(pancreas, tmp_path):
    """NBIA retired between two runs: the same command with --mode idc resumes the .part."""
    nbia, s3, rows = pancreas
    refused = rows[1]["SeriesInstanceUID"]
    nbia.script_faults(refused, ["not_granted"] * 10)
    argv = ("--patient", *AUTO_PATIENTS, "--include-analysis-results")
    first = Run(tmp_path, nbia, *argv, collection="Pancreas-CT")
    assert first.code == errors_module.EXIT_INCOMPLETE, first.log
    assert list((tmp_path / "out").glob("*.tar.xz.part"))
    second = Run(tmp_path, _NoNbia(), "--mode", "idc", "--idc-endpoint", s3.endpoint, *argv,
                 collection="Pancreas-CT")
    assert second.code == errors_module.EXIT_OK, second.log
    assert "already present:             3" in second.log
    meta = metadata_rows(members(next((tmp_path / "out").glob("*.tar.xz"))))
    sources = {r["SeriesInstanceUID"]: r["Source"] for r in meta}
    assert sources == {r["SeriesInstanceUID"]: "idc" if r["SeriesInstanceUID"] == refused
                       else "nbia" for r in rows}
    for row in rows:                            # IDC served only what NBIA had not
        expected = row["instanceCount"] if row["SeriesInstanceUID"] == refused else 0
        assert s3.gets_under(f"{row['crdc_series_uuid']}/") == expected


def test_dry_run_and_shards_plan_from_the_index(prostate, tmp_path):
    s3, rows, _ = prostate
    dry = idc_run(tmp_path, s3, "--patient", *PATIENTS, "--dry-run", name="dry")
    assert dry.code == errors_module.EXIT_OK and "dry run: nothing was written" in dry.log
    assert "dry run: IDC" in dry.log and "answers" in dry.log     # the bucket was asked once
    megabytes = sum(r["series_size_MB"] for r in rows)
    assert "3 series of 1 collection(s)" in dry.log and f"{megabytes:.1f} MB" in dry.log
    assert s3.gets_under("") == 0 and not (tmp_path / "dry").exists()
    parts = []
    for index in (0, 1):
        run = idc_run(tmp_path, s3, "--patient", *PATIENTS, "--shard", f"{index}/2",
                      name="shards")
        assert run.code == errors_module.EXIT_OK, run.log
    for archive in sorted((tmp_path / "shards").glob("*.tar.xz")):
        parts += [r["SeriesInstanceUID"] for r in metadata_rows(members(archive))]
    assert sorted(parts) == sorted(r["SeriesInstanceUID"] for r in rows)


def test_objects_are_read_back_from_the_series_file_by_offset(tmp_path):
    """pread_range: each object's bytes from one open file, across the 4 MiB read chunk, and
    no more than the file holds."""
    from tcia_dl.storage import pread_range
    regions = [os.urandom(130_000), os.urandom(9 * MIB + 17), b"", os.urandom(5)]
    path = tmp_path / "series"
    path.write_bytes(b"".join(regions))
    start = 0
    with open(path, "rb") as handle:
        for region in regions:
            assert b"".join(pread_range(handle.fileno(), start, start + len(region))) == region
            start += len(region)
        assert b"".join(pread_range(handle.fileno(), start - 5, start + 100)) == regions[-1]
