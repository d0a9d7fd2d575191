"""Choosing what to download and knowing before you start: manifests, getSeries filters,
--dry-run and the space check, --list-collections, --update, --retry-failed, proxies and
CA bundles, and --help."""

from __future__ import annotations

import csv
import http.client
import io
import http.server
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tcia_dl import cli, errors, journal as journal_module, logs as logs_module, settings
from tcia_dl.formats.xz import TarXzTarget
from helpers import (SCRIPT, ForwardProxy, Run, archive_members, expected_folders, journal_uids,
                     series_folders, verify_with_standard_tools)


def uids_of(fake, collection: str) -> list[str]:
    return [s["SeriesInstanceUID"] for s in fake.series(collection)]


def write_manifest(path: Path, uids: list[str], basket: str = "manifest-1746549740123.tcia",
                   newline: str = "\r\n", extra: tuple[str, ...] = (), final_newline=False) -> Path:
    head = ["downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/"
            "DownloadServlet", "includeAnnotation=true", "noOfrRetry=4",
            f"databasketId={basket}", "manifestVersion=3.0", "ListOfSeriesToDownload="]
    body = newline.join(head + list(extra) + uids)
    path.write_bytes((body + (newline if final_newline else "")).encode())
    return path


def dicom_folders(members: dict[str, str]) -> dict[str, list[str]]:
    return series_folders(members)


# -- manifests -------------------------------------------------------------------------------

def test_a_manifest_spanning_collections_gets_exactly_its_series(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=2)
    wanted = uids_of(fake, "DEMO")[:3] + uids_of(fake, "CPTAC-GBM")[:2]
    manifest = write_manifest(tmp_path / "cart.tcia", wanted,
                              extra=("", "this line is junk"), final_newline=False)
    run = Run(tmp_path, fake, "--manifest", str(manifest), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    archive = run.output / "manifest-1746549740123.tar.xz"        # named after databasketId
    members = archive_members(archive)
    folders = dicom_folders(members)
    assert len(folders) == 5
    assert Counter(f.split("/")[0] for f in folders) == {"DEMO": 3, "CPTAC-GBM": 2}
    expected = {**expected_folders(fake, "DEMO"), **expected_folders(fake, "CPTAC-GBM")}
    assert folders == {f: expected[f] for f in folders}
    assert "line 8 is not a SeriesInstanceUID; skipped: 'this line is junk'" in run.log
    subprocess.run(["xz", "-t", str(archive)], check=True)
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(extract)], check=True)
    for collection in ("DEMO", "CPTAC-GBM"):       # each collection keeps its own files
        subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS.manifest-1746549740123"],
                       cwd=extract / collection, check=True)


def test_unknown_manifest_uids_fail_the_run_after_the_rest_is_done(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    known = uids_of(fake, "DEMO")[:2]
    ghost = "1.2.3.4.5.6.7.8.9"
    manifest = write_manifest(tmp_path / "m.tcia", [known[0], ghost, known[1]], newline="\n",
                              final_newline=True)
    run = Run(tmp_path, fake, "--manifest", str(manifest), collection=None)
    assert run.code == errors.EXIT_INCOMPLETE
    assert f"unknown to the server (withdrawn, or a typo): {ghost}" in run.log
    archive = run.output / "manifest-1746549740123.tar.xz"
    assert archive.exists()                       # everything that exists is in, verified
    assert len(dicom_folders(archive_members(archive))) == 2


def test_two_manifests_are_united_without_duplicates(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    uids = uids_of(fake, "DEMO")
    first = write_manifest(tmp_path / "a.tcia", uids[:3], basket="a.tcia")
    second = write_manifest(tmp_path / "b.tcia", uids[2:5], basket="b.tcia")
    run = Run(tmp_path, fake, "--manifest", str(first), "--manifest", str(second),
              collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert journal_uids(run.output, "a-and-1-more.tar.xz.journal") == set(uids[:5])


# -- filters ---------------------------------------------------------------------------------

def test_filters_map_onto_getseries_and_combine(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    records = fake.series("DEMO")
    modalities = sorted({r["Modality"] for r in records})[:2]
    patient = records[0]["PatientID"]
    run = Run(tmp_path, fake, "--modality", *modalities, "--patient", patient)
    assert run.code == errors.EXIT_OK, run.log
    expected = {r["SeriesInstanceUID"] for r in records
                if r["Modality"] in modalities and r["PatientID"] == patient}
    assert expected
    journals = list(run.output.glob("*.tar.xz.journal"))
    assert len(journals) == 1 and journals[0].name != "DEMO.tar.xz.journal"
    assert journal_uids(run.output, journals[0].name) == expected
    # one getSeries per combination, with the exact NBIA parameter names
    assert fake.counters.requests("getSeries", 200) == len(modalities)
    assert fake.counters.requests("getSeries", 400) == 0


def test_filters_without_a_collection_search_every_collection(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=2)
    patient = fake.series("CPTAC-GBM")[0]["PatientID"]
    run = Run(tmp_path, fake, "--patient", patient, collection=None)
    assert run.code == errors.EXIT_OK, run.log
    wanted = {s["SeriesInstanceUID"] for s in fake.series("CPTAC-GBM") if s["PatientID"] == patient}
    journal = next(run.output.glob("*.tar.xz.journal"))
    assert journal.name.startswith("TCIA.PatientID-")
    assert journal_uids(run.output, journal.name) == wanted


def test_a_filter_that_matches_nothing_is_bad_input(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    run = Run(tmp_path, fake, "--modality", "NOPE")
    assert run.code == errors.EXIT_USAGE
    assert "no series matches these filters" in capsys.readouterr().err


# -- knowing before you start ----------------------------------------------------------------

def test_dry_run_tells_what_and_how_much_and_writes_nothing(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    run = Run(tmp_path, fake, "--dry-run", output=tmp_path / "not-yet")
    assert run.code == errors.EXIT_OK, run.log
    records = fake.series("DEMO")
    total = sum(r["FileSize"] for r in records)
    patients = len({r["PatientID"] for r in records})
    studies = len({r["StudyInstanceUID"] for r in records})
    assert (f"DEMO: {len(records)} series of 1 collection(s), {patients} patients, "
            f"{studies} studies, {logs_module.human_bytes(total)} of DICOM") in run.log
    assert "estimated archive: about" in run.log
    assert "--output and --temp_dir" in run.log and ": enough" in run.log
    assert "dry run: nothing was written" in run.log
    assert not (tmp_path / "not-yet").exists()
    assert fake.counters.requests("getImage") == fake.counters.requests("getImageWithMD5Hash") == 0


def test_dry_run_lists_every_series_on_stdout_as_tsv(tmp_path, fake_nbia_factory, capsys):
    """`--dry-run > plan.tsv`: a header and one row per series (what it is, where it would
    go, whether it is still to come), the summary staying on stderr; a series already in
    the output says so."""
    fake = fake_nbia_factory(demo_series=4)
    records = fake.series("DEMO")
    missing = records[1]["SeriesInstanceUID"]
    fake.script_faults(missing, ["500"] * 3)
    assert Run(tmp_path, fake, "--retries", "1").code == errors.EXIT_INCOMPLETE
    capsys.readouterr()
    run = Run(tmp_path, fake, "--dry-run")
    assert run.code == errors.EXIT_OK, run.log
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out), delimiter="\t"))
    assert sorted(r["SeriesInstanceUID"] for r in rows) == \
        sorted(r["SeriesInstanceUID"] for r in records)
    assert len(rows) == len(records) and "dry run" not in out and "dry run" in err
    by_uid = {r["SeriesInstanceUID"]: r for r in records}
    for row in rows:
        record = by_uid[row["SeriesInstanceUID"]]
        assert (row["PatientID"], row["Modality"], row["Files"], row["Bytes"]) == (
            record["PatientID"], record["Modality"], str(record["ImageCount"]),
            str(record["FileSize"]))
        assert row["Folder"].startswith(f"DEMO/{record['PatientID']}/") and row["Source"] == "nbia"
        assert len(row["StudyDate"]) == 10 and row["StudyDate"][4] == "-"
    status = {r["SeriesInstanceUID"]: r["Status"] for r in rows}
    assert status.pop(missing) == "to download"
    assert set(status.values()) == {"present"}


def tiny_filesystem(real_statvfs):
    def statvfs(path):
        real = real_statvfs(path)
        return os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 10, 10, real.f_files,
                                  real.f_ffree, real.f_favail, real.f_flag, real.f_namemax))
    return statvfs


def test_a_run_that_will_not_fit_is_refused_unless_forced(tmp_path, fake_nbia_factory,
                                                          monkeypatch):
    fake = fake_nbia_factory()
    monkeypatch.setattr(os, "statvfs", tiny_filesystem(os.statvfs))   # 40 kB free
    refused = Run(tmp_path, fake)
    assert refused.code == errors.EXIT_USAGE
    assert "missing" in refused.log and "not enough space" in refused.log
    assert not list((tmp_path / "out").glob("DEMO.tar.xz*"))
    assert fake.counters.requests("getImageWithMD5Hash") == 0
    forced = Run(tmp_path, fake, "--force")
    assert forced.code == errors.EXIT_OK, forced.log


def test_list_collections_prints_one_name_per_line(fake_nbia_factory, tmp_path, capsys):
    fake = fake_nbia_factory()
    code = cli.main(["--list-collections", "--api-url", fake.url, "--cache_dir",
                    str(tmp_path / "c"), "--no-progress"])
    assert code == errors.EXIT_OK
    assert capsys.readouterr().out.splitlines() == sorted(fake.collections())


# -- later runs ------------------------------------------------------------------------------

def archive_then_update(tmp_path: Path, fake_nbia_factory, series_before: int,
                        series_after: int) -> tuple[Run, object, object]:
    """A finished archive of one server's DEMO, then --update against another's."""
    before = fake_nbia_factory(demo_series=series_before)
    assert Run(tmp_path, before).code == errors.EXIT_OK
    after = fake_nbia_factory(demo_series=series_after)
    run = Run(tmp_path, after, "--update")
    assert run.code == errors.EXIT_OK, run.log
    return run, before, after


def test_update_fetches_only_new_series_into_a_dated_archive(tmp_path, fake_nbia_factory):
    # two series published since
    run, old, new = archive_then_update(tmp_path, fake_nbia_factory, 12, 14)
    updates = list(run.output.glob("DEMO.update-*.tar.xz"))
    assert len(updates) == 1
    fresh = set(uids_of(new, "DEMO")) - set(uids_of(old, "DEMO"))
    journal = updates[0].name + ".journal"
    assert journal_uids(run.output, journal) == fresh
    assert new.counters.requests("getImageWithMD5Hash", 200) + \
        new.counters.requests("getImage", 200) == len(fresh)      # each once
    assert "12 series already archived, 2 new" in run.log
    # whole + update extract side by side into the full collection
    whole = archive_members(run.output / "DEMO.tar.xz")
    added = archive_members(updates[0])
    assert not {k for k in whole if k.endswith(".dcm")} & {k for k in added if k.endswith(".dcm")}
    assert series_folders({**whole, **added}).keys() == expected_folders(new).keys()

    again = Run(tmp_path, new, "--update")
    assert again.code == errors.EXIT_OK
    assert "nothing new since the last archive" in again.log


def test_update_needs_a_finished_archive(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    assert Run(tmp_path, fake, "--update").code == errors.EXIT_USAGE
    assert "run without --update first" in capsys.readouterr().err


def test_retry_failed_fetches_exactly_the_failed_series_into_the_same_archive(
        tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour")
    uids = uids_of(fake, "DEMO")
    victims = uids[2:4]
    for uid in victims:
        fake.script_faults(uid, ["500"] * 2)
    first = Run(tmp_path, fake, "--retries", "2")
    assert first.code == errors.EXIT_INCOMPLETE
    failed = first.output / "DEMO.failed.tcia"
    before = {uid: fake.counters.complete_downloads(uid) for uid in uids}
    retry = Run(tmp_path, fake, "--retry-failed", str(failed), collection=None)
    assert retry.code == errors.EXIT_OK, retry.log
    after = {uid: fake.counters.complete_downloads(uid) for uid in uids}
    assert {u for u in uids if after[u] != before[u]} == set(victims)
    archive = first.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    verify_with_standard_tools(archive, tmp_path)


def test_retry_failed_goes_into_the_failed_runs_output_whatever_the_flags_say(
        tmp_path, fake_nbia_factory, monkeypatch):
    """0.3 fetched the failed series of a .tar.xz run into a new folder tree when
    --compression was left out, reported 'failed: 0' and left the .part unfinished."""
    fake = fake_nbia_factory(include_md5="honour")
    uids = uids_of(fake, "DEMO")
    fake.script_faults(uids[1], ["500"] * 2)
    first = Run(tmp_path, fake, "--retries", "2")
    assert first.code == errors.EXIT_INCOMPLETE
    failed = first.output / "DEMO.failed.tcia"
    assert f"--retry-failed {failed.resolve()}" in first.log     # a path that works pasted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    retry = Run(tmp_path, fake, "--retry-failed", str(failed), collection=None,
                compression=False, output=elsewhere / "out")
    assert retry.code == errors.EXIT_OK, retry.log
    assert not (elsewhere / "out").exists() and not (first.output / "DEMO").exists()
    archive = first.output / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)


def test_retry_failed_does_not_finish_an_archive_with_other_series_missing(tmp_path,
                                                                           fake_nbia_factory):
    """An interrupted first run left series unattempted: fetching its failures alone must
    not close the archive as if it were whole."""
    fake = fake_nbia_factory(include_md5="honour")
    uids = uids_of(fake, "DEMO")
    manifest = write_manifest(tmp_path / "DEMO.failed.tcia", uids[:1], basket="DEMO.failed.tcia")
    out = tmp_path / "out"
    out.mkdir()
    journal = journal_module.Journal(TarXzTarget.journal_path(out, "DEMO"))
    journal.request(uids, replace=True)                  # what the interrupted run asked for
    journal.close()
    run = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert run.code == errors.EXIT_INCOMPLETE
    assert "that an earlier run asked for are not in" in run.log
    assert not (out / "DEMO.tar.xz").exists() and (out / "DEMO.tar.xz.part").exists()


# -- network ---------------------------------------------------------------------------------

@pytest.fixture
def proxy():
    server = ForwardProxy()
    yield server
    server.shutdown()
    server.server_close()


def test_https_proxy_from_the_environment_is_honoured(tmp_path, fake_nbia_factory, proxy,
                                                      monkeypatch):
    fake = fake_nbia_factory(demo_series=3)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    run = Run(tmp_path, fake)
    assert run.code == errors.EXIT_OK, run.log
    assert any(s.endswith("/getSeries") for s in proxy.seen)
    assert sum(s.endswith(("/getImage", "/getImageWithMD5Hash")) for s in proxy.seen) == 3
    assert sum(s.endswith("/getMD5Hierarchy") for s in proxy.seen) == 3   # their series hashes


def test_the_proxy_flag_wins_over_the_environment(tmp_path, fake_nbia_factory, proxy,
                                                  monkeypatch):
    fake = fake_nbia_factory(demo_series=2)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")          # nobody there
    run = Run(tmp_path, fake, "--proxy", proxy.url)
    assert run.code == errors.EXIT_OK, run.log
    assert proxy.seen


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server with a self-signed certificate that answers getCollectionValues."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = b'[{"Collection":"Secure-Collection"}]'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/nbia-api/services/v4/", cert
    server.shutdown()
    server.server_close()


def test_a_ca_bundle_lets_a_private_certificate_through(tmp_path, tls_server, capsys):
    url, cert = tls_server
    argv = ["--list-collections", "--api-url", url, "--cache_dir", str(tmp_path / "c"),
            "--retries", "1"]
    assert cli.main(argv) == errors.EXIT_USAGE             # a misconfiguration, not an outage
    assert "TLS with 127.0.0.1 failed (CERTIFICATE_VERIFY_FAILED): a site proxy that " \
        "inspects TLS needs --ca-bundle" in capsys.readouterr().err
    assert cli.main([*argv, "--ca-bundle", str(cert)]) == errors.EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["Secure-Collection"]


# -- the command line ------------------------------------------------------------------------

def test_help_groups_the_flags_and_shows_three_examples():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                            text=True, check=True)
    text = result.stdout
    for group in ("what to download:", "where:", "how:", "network:", "NBIA:", "IDC:",
                  "logging:"):
        assert group in text
    examples = text.split("examples:")[1].split("exit codes:")[0]
    assert sum(line.strip().startswith("tcia_downloader.py ") for line in examples.splitlines()) == 3


def test_update_reports_series_that_vanished_from_the_server(tmp_path, fake_nbia_factory):
    # two series withdrawn since
    run, before, after = archive_then_update(tmp_path, fake_nbia_factory, 14, 12)
    gone = sorted(set(uids_of(before, "DEMO")) - set(uids_of(after, "DEMO")))
    assert f"2 series in the archives are no longer listed by the server (kept): {', '.join(gone)}" \
        in run.log
    assert "nothing new since the last archive" in run.log
    assert archive_members(run.output / "DEMO.tar.xz")          # the archive is untouched


@pytest.mark.parametrize("cpus, workers", [("1", 4), ("2", 8), ("3", 12), ("8", 16)])
def test_workers_default_to_four_per_granted_cpu_and_at_most_16(monkeypatch, tmp_path, cpus,
                                                                 workers):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", cpus)
    options = cli.parse_options(["--collection", "X", "--output", str(tmp_path)])
    assert options.workers == workers
    assert settings.usable_cores() == int(cpus)
    assert cli.parse_options(["--collection", "X", "--output", str(tmp_path),
                             "--workers", "3"]).workers == 3


def test_logs_of_old_runs_are_pruned_and_only_ours(tmp_path, capsys):
    """Every invocation writes two logs; the newest 50 runs' stay, none older than 30 days,
    and files that are not our logs are never touched."""
    logs = tmp_path / "cache" / "logs"
    logs.mkdir(parents=True, mode=0o700)
    tmp_path.joinpath("cache").chmod(0o700)
    old = time.time() - 40 * 86400
    for day in range(1, 61):                            # 60 earlier runs, 2026-01-01 on
        for kind in ("info", "debug"):
            path = logs / f"2026-01-01_00-00-{day:02d}-{kind}.log" if day < 60 else \
                logs / f"2026-03-01_00-00-00-{kind}.log"
            path.write_text("x")
    ancient = logs / "2026-03-01_00-00-00-info.log"      # among the newest, but 40 days old
    os.utime(ancient, (old, old))
    mine = logs / "notes.txt"
    mine.write_text("the user's")
    code = cli.main(["--verify", str(tmp_path / "nothing"), "--cache_dir", str(tmp_path / "cache")])
    assert code == errors.EXIT_USAGE
    names = sorted(p.name for p in logs.iterdir())
    runs = {name.rsplit("-", 1)[0] for name in names if name.endswith(".log")}
    assert len(runs) == 50 and mine.exists()
    assert not ancient.exists() and (logs / "2026-03-01_00-00-00-debug.log").exists()
    assert "2026-01-01_00-00-01-info.log" not in names          # the oldest went first
    assert "2026-01-01_00-00-59-info.log" in names


def test_the_cache_follows_xdg_cache_home(tmp_path):
    """Without --cache_dir, the logs go to $XDG_CACHE_HOME/tcia_downloader/logs."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--verify", str(tmp_path / "nothing")],
                          capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert done.returncode == errors.EXIT_USAGE, done.stderr
    assert len(list((tmp_path / "xdg" / "tcia_downloader" / "logs").glob("*-info.log"))) == 1
