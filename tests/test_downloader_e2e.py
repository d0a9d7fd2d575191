"""The downloader end to end against tests/fakes/fake_nbia.py: clean runs, every fault kind,
contamination, hostile names, both MD5 endpoints, tokens, exit codes, and kill -9 / SIGTERM
at several points followed by a resume that matches an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tcia_dl import cli, errors as errors_module
from tcia_dl.settings import usable_cores
from tcia_dl.sources import nbia, nbia_api
from fakes.fake_nbia import Faults
from helpers import (SCRIPT, Run, archive_members, expected_folders, journal_uids, old_pythons,
                     series_folders, start_subprocess, terminal_screen, tree_members,
                     verify_with_standard_tools, wait_until)

# -- helpers --------------------------------------------------------------------------------

# -- clean runs -----------------------------------------------------------------------------

def test_a_clean_collection_becomes_one_verified_archive(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    run = Run(tmp_path, fake)
    done_lines = [line for line in capsys.readouterr().err.splitlines() if " done " in line]
    assert done_lines and max(map(len, done_lines)) <= 100     # a 100-column terminal
    assert run.code == errors_module.EXIT_OK, run.log
    archive = run.output / "DEMO.tar.xz"
    assert archive.exists() and not (run.output / "DEMO.tar.xz.part").exists()
    members = archive_members(archive)
    assert series_folders(members) == expected_folders(fake)
    assert {"DEMO/LICENSE", "DEMO/metadata.csv", "DEMO/MD5SUMS"} <= set(members)
    verify_with_standard_tools(archive, tmp_path)
    # one line per finished series, and a final report
    n = len(fake.series("DEMO"))
    assert run.log.count(" done DEMO/") == n
    assert f"downloaded and verified now: {n}" in run.log
    # nothing is left in scratch or beside the archive but the journal
    assert sorted(p.name for p in run.output.iterdir()) == ["DEMO.tar.xz", "DEMO.tar.xz.journal"]


def test_packing_takes_one_core_per_series_while_other_workers_download(tmp_path,
                                                                         fake_nbia_factory,
                                                                         monkeypatch):
    """With one usable core and three workers, a second series never packs beside the
    first (it would only share the core), yet the other workers' downloads go on."""
    fake = fake_nbia_factory()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    state = threading.Condition()
    seen = {"downloaded": 0, "packing": 0, "peak": 0, "downloaded_while_packing": 0}
    packed_uids: list[str] = []
    real_download, real_verify = nbia_api.TciaApi.download_zip, nbia.verify_zip

    def download_zip(self, *args, **kwargs):
        result = real_download(self, *args, **kwargs)
        with state:
            seen["downloaded"] += 1
            seen["downloaded_while_packing"] += seen["packing"] > 0
            state.notify_all()
        return result

    def verify_zip(path, series, sink=None, stop=None, series_hash=None):
        with state:
            seen["packing"] += 1
            seen["peak"] = max(seen["peak"], seen["packing"])
            state.notify_all()
            if series.uid not in packed_uids:
                packed_uids.append(series.uid)
                if len(packed_uids) == 2:      # while the workers' downloads overlap
                    # Hold the core until another worker has its zip: without the limit it
                    # would start packing now. This wait can only time out when it works.
                    downloads = seen["downloaded"]
                    assert state.wait_for(lambda: seen["downloaded"] > downloads, timeout=30)
                    state.wait_for(lambda: seen["packing"] >= 2, timeout=0.5)
        try:
            return real_verify(path, series, sink, stop, series_hash=series_hash)
        finally:
            with state:
                seen["packing"] -= 1

    monkeypatch.setattr(nbia_api.TciaApi, "download_zip", download_zip)
    monkeypatch.setattr(nbia, "verify_zip", verify_zip)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    assert seen["peak"] == 1
    assert seen["downloaded_while_packing"] >= 1


def test_a_finished_archive_is_not_downloaded_again(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    assert Run(tmp_path, fake).code == errors_module.EXIT_OK
    images = fake.counters.requests("getImage") + fake.counters.requests("getImageWithMD5Hash")
    again = Run(tmp_path, fake)
    assert again.code == errors_module.EXIT_OK
    assert "nothing to do" in again.log
    assert fake.counters.requests("getImage") + fake.counters.requests("getImageWithMD5Hash") == images


@pytest.mark.parametrize("mode", ["honour", "ignore", "refuse"])
def test_each_include_md5_behaviour_of_the_server_ends_verified(tmp_path, fake_nbia_factory, mode):
    fake = fake_nbia_factory(include_md5=mode)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    members = archive_members(run.output / "DEMO.tar.xz")
    assert series_folders(members) == expected_folders(fake)
    with_hash = fake.counters.requests("getImageWithMD5Hash", 200)
    if mode == "honour":
        assert with_hash == 0
        assert any(name.endswith("/1-1.dcm") or name.endswith("/1-01.dcm") or name.endswith("/1-001.dcm")
                   for name in members)
    elif mode == "ignore":
        # No series is downloaded twice, and nobody waits: each zip, without its
        # md5hashes.csv, is verified by its series hash.
        assert with_hash == 0
        assert fake.counters.requests("getImage", 200) == len(fake.series("DEMO"))
        assert fake.counters.requests("getMD5Hierarchy", 200) == len(fake.series("DEMO"))
        assert "verified as a whole against its series' getMD5Hierarchy hash" in run.log
    else:
        assert with_hash == len(fake.series("DEMO"))
        assert fake.counters.requests("getImage", 200) == 0
        assert "using getImageWithMD5Hash for the rest of the run" in run.log


def test_a_corrupt_zip_without_md5hashes_is_caught_by_its_series_hash(tmp_path,
                                                                     fake_nbia_factory):
    """On a server that ignores IncludeMD5, a corrupted file fails its series' hash; the
    zip fetched again with md5hashes.csv shows the hash was right, so it stays trusted."""
    fake = fake_nbia_factory(include_md5="ignore")
    victim = fake.series("DEMO")[4]["SeriesInstanceUID"]
    fake.script_faults(victim, ["corrupt"])
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    assert fake.counters.requests("getImageWithMD5Hash", 200) == 1      # the victim only
    assert fake.counters.requests("getImage", 200) == len(fake.series("DEMO"))
    assert "downloaded again from getImageWithMD5Hash" not in run.log


@pytest.mark.parametrize("answer", ["other", "empty"])
def test_series_hashes_that_do_not_verify_are_distrusted_and_the_zip_fetched_again(
        tmp_path, fake_nbia_factory, answer):
    """getMD5Hierarchy's formula is unconfirmed on live data: a server whose series hash
    is not the documented one (or missing) costs a second download of the zips already
    fetched without md5hashes.csv, never a wrong archive."""
    fake = fake_nbia_factory(include_md5="ignore", md5_hierarchy=answer)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    assert "getMD5Hierarchy" in run.log and "downloaded again from getImageWithMD5Hash" in run.log
    zips = fake.counters.requests("getImage", 200)
    assert fake.counters.requests("getImageWithMD5Hash", 200) == len(fake.series("DEMO"))
    # The zips in flight at the switch: 3 downloading, and as many again waiting for a core
    # beside one packing on each core (run.WorkerPool).
    assert 1 <= zips <= 2 * 3 + usable_cores() < len(fake.series("DEMO"))


def test_folder_tree_mode_moves_verified_series_and_leaves_no_scratch(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    scratch = tmp_path / "scratch"
    run = Run(tmp_path, fake, "--temp_dir", str(scratch), compression=False)
    assert run.code == errors_module.EXIT_OK, run.log
    root = run.output / "DEMO"
    members = {f"DEMO/{k}": v for k, v in tree_members(root).items()}
    assert series_folders(members) == expected_folders(fake)
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=root, check=True)
    assert not any(p.name.startswith(".") for p in root.rglob("*"))
    assert list(scratch.iterdir()) == []


def test_real_metadata_collection_with_missing_series_dates(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=2)
    run = Run(tmp_path, fake, "--workers", "4", collection="Pancreas-CT")
    assert run.code == errors_module.EXIT_OK, run.log
    members = archive_members(run.output / "Pancreas-CT.tar.xz")
    assert series_folders(members) == expected_folders(fake, "Pancreas-CT")
    assert not any("unknown_date" in name for name in members)


# -- faults ---------------------------------------------------------------------------------

FAULT_KINDS = {
    "500": "HTTP 500", "429": "HTTP 429", "reset": "connection", "stall": "stalled",
    "corrupt": "MD5 mismatch", "truncate": "truncated", "bad_md5_row": "MD5 mismatch",
}


def test_every_fault_kind_is_retried_to_a_complete_archive(tmp_path, fake_nbia_factory):
    # (a server that honours IncludeMD5: a corrupt file is named by its MD5; on one that
    # ignores it, by the series hash: see the test after the next)
    fake = fake_nbia_factory(include_md5="honour", faults=Faults(retry_after=0.1,
                                                                 stall_seconds=30))
    uids = [s["SeriesInstanceUID"] for s in fake.series("DEMO")]
    kinds = list(FAULT_KINDS)
    for uid, kind in zip(uids[1:], kinds):    # the first series goes alone: keep it clean
        fake.script_faults(uid, [kind, kind])  # twice in a row: the backoff must go on
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    for kind, symptom in FAULT_KINDS.items():
        assert f"attempt 2/6 failed: {symptom}" in run.log or \
            any(symptom in line and "attempt 2/6" in line for line in run.log.splitlines()), kind


def test_a_series_that_keeps_failing_is_reported_and_the_rest_resumes_later(tmp_path,
                                                                           fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour")   # no probe download: counts are exact
    uids = [s["SeriesInstanceUID"] for s in fake.series("DEMO")]
    victim = uids[3]
    fake.script_faults(victim, ["500"] * 3)
    run = Run(tmp_path, fake, "--retries", "3")
    assert run.code == errors_module.EXIT_INCOMPLETE
    assert (run.output / "DEMO.tar.xz.part").exists()
    assert not (run.output / "DEMO.tar.xz").exists()
    manifest = (run.output / "DEMO.failed.tcia").read_text().splitlines()
    assert manifest[manifest.index("ListOfSeriesToDownload=") + 1:] == [victim]
    assert "failed:                      1" in run.log
    downloads = {uid: fake.counters.complete_downloads(uid) for uid in uids}

    again = Run(tmp_path, fake)
    assert again.code == errors_module.EXIT_OK, again.log
    assert {uid: fake.counters.complete_downloads(uid) for uid in uids} == \
        {**downloads, victim: downloads[victim] + 1}
    assert series_folders(archive_members(run.output / "DEMO.tar.xz")) == expected_folders(fake)
    assert not (run.output / "DEMO.failed.tcia").exists()     # no stale list of failures


def test_a_refused_series_fails_at_once_and_the_rest_completes(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour")
    uids = [s["SeriesInstanceUID"] for s in fake.series("DEMO")]
    refused = uids[5]
    fake.script_faults(refused, ["not_granted"] * 6)
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_INCOMPLETE
    assert fake.counters.requests("getImage", 400) == 1          # no retry: it would not help
    assert "not granted" in run.log and "failed: the server refuses" not in run.log
    assert "attempt 1/" not in run.log
    assert journal_uids(run.output) == set(uids) - {refused}
    manifest = (run.output / "DEMO.failed.tcia").read_text().splitlines()
    assert manifest[-1] == refused


def test_a_service_outage_stops_the_run_instead_of_spending_the_job(tmp_path,
                                                                    fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=30, faults=Faults(p500=1.0))
    run = Run(tmp_path, fake, "--retries", "2", "--workers", "2")
    assert run.code == errors_module.EXIT_INCOMPLETE
    assert "the service looks down: 5 series in a row failed" in run.log
    attempted = len({line.split("(")[-1].split(")")[0] for line in run.log.splitlines()
                     if "FAILED" in line})
    assert attempted < 30                          # it stopped early
    assert "Rerun later: it resumes" in run.log
    fake.config.faults = Faults()                  # the service is back
    again = Run(tmp_path, fake)
    assert again.code == errors_module.EXIT_OK, again.log


def test_refused_series_do_not_look_like_an_outage(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=12)
    uids = [s["SeriesInstanceUID"] for s in fake.series("DEMO")]
    for uid in uids[1:9]:                          # 8 refusals, more than the breaker's 5
        fake.script_faults(uid, ["not_granted"])
    run = Run(tmp_path, fake, "--workers", "2")
    assert run.code == errors_module.EXIT_INCOMPLETE
    assert "looks down" not in run.log
    assert len(journal_uids(run.output)) == 12 - 8


# -- nastiness ------------------------------------------------------------------------------

def test_contamination_and_junk_are_dropped_and_hostile_names_made_safe(tmp_path,
                                                                       fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour",      # "not listed" needs the table
                             nasty=frozenset({"contaminate", "junk", "hostile_names",
                                              "duplicate_series_numbers", "missing_dates"}))
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_OK, run.log
    archive = run.output / "DEMO.tar.xz"
    members = archive_members(archive)
    assert series_folders(members) == expected_folders(fake)
    dropped = [line for line in run.log.splitlines() if "WARNING" in line and "dropped" in line]
    assert any("not listed in md5hashes.csv" in line for line in dropped)
    assert any("not a DICOM file" in line for line in dropped)
    # one warning per series that had drops, with the count; the names go to the debug log
    labels = [line.split(" WARNING ")[1].split(": dropped ")[0] for line in dropped]
    assert len(labels) == len(set(labels))
    dropped_files = sum(int(line.split(": dropped ")[1].split(" ")[0]) for line in dropped)
    assert f"files dropped (not the series'): {dropped_files}" in run.log
    for name in members:
        for part in name.split("/"):
            assert part and not part.startswith(".") and part.isascii() and part.isprintable()
            assert len(part) <= 160
    verify_with_standard_tools(archive, tmp_path)
    assert any("unknown_date" in name for name in members)


# -- kills and signals ----------------------------------------------------------------------

def test_kill_9_at_several_points_then_resume_gives_the_uninterrupted_archive(tmp_path,
                                                                             fake_nbia_factory):
    # Slow enough that each kill point is reachable, fast enough for CI.
    fake = fake_nbia_factory(demo_series=10, conn_bandwidth=100_000)
    reference = Run(tmp_path / "ref", fake, output=tmp_path / "ref" / "out")
    assert reference.code == errors_module.EXIT_OK
    expected = archive_members(reference.output / "DEMO.tar.xz")
    fake.counters.reset()

    output, cache, scratch = tmp_path / "out", tmp_path / "cache", tmp_path / "scratch"
    committed_before: set[str] = set()
    downloads_at_kill: dict[str, int] = {}
    kill_points = [
        ("during the first download", lambda: fake.counters.requests("getImage") >= 1),
        ("after 2 more commits", lambda: len(journal_uids(output) - committed_before) >= 2),
        ("after 3 more commits", lambda: len(journal_uids(output) - committed_before) >= 3),
    ]
    for what, condition in kill_points:
        process = start_subprocess(fake, output, cache, "--temp_dir", str(scratch))
        try:
            wait_until(condition, 60, what)
        finally:
            process.kill()
            process.wait()
        # nothing per-series or per-image was ever written under --output
        assert set(os.listdir(output)) <= {"DEMO.tar.xz.part", "DEMO.tar.xz.journal",
                                           "DEMO.tar.xz.journal-journal", "DEMO.tar.xz.lock"}
        committed_before = journal_uids(output)
        downloads_at_kill.update({uid: fake.counters.complete_downloads(uid)
                                  for uid in committed_before})
        assert not (output / "DEMO.tar.xz").exists()

    assert len(committed_before) >= 5
    final = start_subprocess(fake, output, cache, "--temp_dir", str(scratch))
    _, errors = final.communicate(timeout=120)
    assert final.returncode == errors_module.EXIT_OK, errors
    # the same members with the same content, LICENSE, metadata.csv and MD5SUMS included
    assert archive_members(output / "DEMO.tar.xz") == expected
    # no committed series was downloaded again
    assert {uid: fake.counters.complete_downloads(uid) for uid in downloads_at_kill} == downloads_at_kill
    verify_with_standard_tools(output / "DEMO.tar.xz", tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, errors_module.EXIT_SIGTERM),
                                       (signal.SIGINT, errors_module.EXIT_SIGINT)])
def test_a_signal_stops_promptly_with_its_exit_code_and_the_rerun_completes(
        tmp_path, fake_nbia_factory, sig, code):
    fake = fake_nbia_factory(demo_series=8, conn_bandwidth=150_000)
    output, cache = tmp_path / "out", tmp_path / "cache"
    process = start_subprocess(fake, output, cache)
    wait_until(lambda: len(journal_uids(output)) >= 1, 60, "a first commit")
    sent = time.monotonic()
    process.send_signal(sig)
    _, errors = process.communicate(timeout=30)
    assert process.returncode == code, errors
    assert time.monotonic() - sent < 10
    assert "Traceback" not in errors
    assert "rerun" in errors
    committed = journal_uids(output)
    downloads = {uid: fake.counters.complete_downloads(uid) for uid in committed}
    rerun = start_subprocess(fake, output, cache)
    _, errors = rerun.communicate(timeout=120)
    assert rerun.returncode == errors_module.EXIT_OK, errors
    assert {uid: fake.counters.complete_downloads(uid) for uid in committed} == downloads
    assert series_folders(archive_members(output / "DEMO.tar.xz")) == expected_folders(fake)


# -- tokens ---------------------------------------------------------------------------------

def run_with_login(fake, tmp_path: Path, password: str, during=None) -> tuple[subprocess.Popen, str]:
    output, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "TCIA_PASSWORD": password}
    argv = [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(output),
            "--cache_dir", str(cache), "--api-url", fake.url, "--no-progress", "--compression",
            "--workers", "2", "--retry-wait", "0.05", "--user", "alice"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    if during is not None:
        during(output)
    _, errors = process.communicate(timeout=120)
    return process, errors


def assert_no_secret_written(tmp_path: Path, password: str, errors: str) -> None:
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert password.encode() not in content, path
            assert b"Bearer " not in content, path
    assert password not in errors


def image_requests(fake, status: int) -> int:
    return sum(fake.counters.requests(e, status) for e in ("getImage", "getImageWithMD5Hash"))


def test_short_lived_tokens_are_renewed_before_they_expire(tmp_path, fake_nbia_factory):
    password = "pw-Very-Secret-42"
    # Tokens live 1 s and the run takes several: a client that did not renew in time
    # would send an expired token and get 401.
    fake = fake_nbia_factory(require_token=True, users={"alice": password}, token_lifetime=1.0,
                             demo_series=8, conn_bandwidth=40_000)
    process, errors = run_with_login(fake, tmp_path, password)
    assert process.returncode == errors_module.EXIT_OK, errors
    assert image_requests(fake, 401) == 0
    assert fake.counters.requests("token", 200) >= 2
    assert series_folders(archive_members(tmp_path / "out" / "DEMO.tar.xz")) == \
        expected_folders(fake)
    assert_no_secret_written(tmp_path, password, errors)


def test_tokens_revoked_mid_run_are_renewed_after_the_401(tmp_path, fake_nbia_factory):
    password = "pw-Very-Secret-43"
    # (honoured IncludeMD5: the first request after the revocation is an image request,
    # not a getMD5Hierarchy, so the image path's renewal is what is tested)
    fake = fake_nbia_factory(require_token=True, users={"alice": password}, demo_series=8,
                             conn_bandwidth=100_000, include_md5="honour")

    def revoke_after_two_image_requests(output: Path) -> None:
        # As soon as the second image request is in (its zip takes 0.4 s to send at this
        # bandwidth): six of the eight series are still to be asked for, whatever the
        # pipeline has downloaded meanwhile. (After two commits, a loaded machine could see
        # every download done before the revocation.)
        wait_until(lambda: image_requests(fake, 200) >= 2, 60, "two image requests")
        fake.expire_tokens()

    process, errors = run_with_login(fake, tmp_path, password, revoke_after_two_image_requests)
    assert process.returncode == errors_module.EXIT_OK, errors
    assert image_requests(fake, 401) >= 1          # the revoked token was really refused
    assert fake.counters.requests("token", 200) >= 2
    assert series_folders(archive_members(tmp_path / "out" / "DEMO.tar.xz")) == \
        expected_folders(fake)
    assert_no_secret_written(tmp_path, password, errors)


def test_a_wrong_password_is_one_clear_line_and_exit_2(tmp_path, fake_nbia_factory, monkeypatch,
                                                       capsys):
    fake = fake_nbia_factory(require_token=True, users={"alice": "right"})
    monkeypatch.setenv("TCIA_PASSWORD", "pw-Wrong-77")
    run = Run(tmp_path, fake, "--user", "alice")
    assert run.code == errors_module.EXIT_USAGE
    err = capsys.readouterr().err
    assert "rejected the login of user 'alice'" in err
    assert "pw-Wrong-77" not in err
    assert "Traceback" not in err


def test_a_private_server_without_user_asks_for_one(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(require_token=True, users={"alice": "right"})
    run = Run(tmp_path, fake)
    assert run.code == errors_module.EXIT_USAGE
    assert "pass --user" in capsys.readouterr().err


# -- bad input ------------------------------------------------------------------------------

def test_an_unknown_collection_exits_2_and_suggests_close_names(tmp_path, fake_nbia_factory,
                                                                capsys):
    fake = fake_nbia_factory()
    run = Run(tmp_path, fake, collection="pancreas_ct")
    assert run.code == errors_module.EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown collection 'pancreas_ct'" in err and "Pancreas-CT" in err
    assert not (run.output / "pancreas_ct.tar.xz.part").exists()


def test_an_nlst_name_points_to_the_nlst_server(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    assert Run(tmp_path, fake, collection="NLST").code == errors_module.EXIT_USAGE
    assert "nlst.cancerimagingarchive.net" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--patient", "X", "--mode", "aspera"], "--mode aspera needs --aspera-url LINK"),
    (["--collection", "X", "--mode", "s3"], "--mode s3: choose nbia, idc, auto or aspera"),
    (["--collection", "X", "--workers", "0"], "--workers must be a number from 1 to 64"),
    (["--collection", "X", "--workers", "10000"], "--workers must be a number from 1 to 64"),
    (["--collection", "X", "--compression", "--compression-level", "12"],
     "--compression-level must be from 0 to 9 for --format tar.xz"),
    (["--collection", "X", "--compression-level", "99"], "--compression-level must be from 0 to"),
    # numbers that would overflow the backoff or switch a timer off
    (["--collection", "X", "--stall-timeout", "nan"], "--stall-timeout must be a number"),
    (["--collection", "X", "--stall-timeout", "inf"], "--stall-timeout must be a number"),
    (["--collection", "X", "--connect-timeout", "nan"], "--connect-timeout must be a number"),
    (["--collection", "X", "--cache-expiry", "1e12"], "--cache-expiry must be a number"),
    (["--collection", "X", "--cache-expiry", "nan"], "--cache-expiry must be a number"),
    (["--collection", "X", "--summary-interval", "inf"], "--summary-interval must be a"),
    (["--collection", "X", "--retry-wait", "nan"], "--retry-wait must be a number"),
    (["--collection", "X", "--retries", "2000"], "--retries must be a number from 1 to 100"),
    (["--collection", "X", "--api-url", "ftp://x"], "is not an http(s) URL"),
    (["--collection", "X", "--password", "p"], "--password was given without --user"),
    ([], "say what to download"),
    (["--collection", "X", "--manifest", "m.tcia"], "choose one of"),
    (["--manifest", "/nonexistent.tcia"], "no such manifest file"),
    (["--retry-failed", "x.tcia", "--update"], "--update goes with"),
    (["--collection", "X", "--proxy", "socks5://h:1"], "http:// or https:// proxy"),
    (["--collection", "X", "--ca-bundle", "/nonexistent.pem"], "no such file"),
    (["--collection", "X", "--shard", "3/3"], "give I/N with 0 <= I < N"),
    (["--colection", "X"], "unknown flag --colection; did you mean --collection?"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == errors_module.EXIT_USAGE
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_user_without_password_and_no_terminal_says_how(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TCIA_PASSWORD"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--collection", "X", "--user", "u"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    assert result.returncode == errors_module.EXIT_USAGE
    assert "set TCIA_PASSWORD" in result.stderr


def test_password_on_the_command_line_warns_about_ps(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(require_token=True, users={"alice": "pw-cmdline"})
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(tmp_path / "o"),
         "--cache_dir", str(tmp_path / "c"), "--api-url", fake.url, "--no-progress",
         "--user", "alice", "--password", "pw-cmdline", "--compression", "--retry-wait", "0"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == errors_module.EXIT_OK, result.stderr
    assert "visible to other users in `ps`" in result.stderr
    assert "pw-cmdline" not in result.stderr
    for path in (tmp_path / "c").rglob("*"):
        if path.is_file():
            assert b"pw-cmdline" not in path.read_bytes()


# -- what the user sees, and what stays on disk ---------------------------------------------

def test_metadata_is_cached_but_images_and_tokens_never(tmp_path, fake_nbia_factory, monkeypatch):
    fake = fake_nbia_factory(require_token=True, users={"alice": "pw-cache-1"})
    monkeypatch.setenv("TCIA_PASSWORD", "pw-cache-1")
    assert Run(tmp_path, fake, "--user", "alice").code == errors_module.EXIT_OK
    assert Run(tmp_path, fake, "--user", "alice").code == errors_module.EXIT_OK
    assert fake.counters.requests("getSeries") == 1          # the second run read the cache
    cache_files = [p for p in (tmp_path / "cache").glob("http_cache*") if p.is_file()]
    assert cache_files
    stored = b"".join(p.read_bytes() for p in cache_files)
    assert b"getSeries" in stored
    for never in (b"getImage", b"oauth/token", b"pw-cache-1", b"Bearer", b"access_token"):
        assert never not in stored, never


def test_cache_and_log_folders_are_private(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=2)
    assert Run(tmp_path, fake).code == errors_module.EXIT_OK
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "cache" / "logs").stat().st_mode & 0o777 == 0o700
    logs = sorted(p.name for p in (tmp_path / "cache" / "logs").iterdir())
    assert any(n.endswith("-info.log") for n in logs) and any(n.endswith("-debug.log") for n in logs)


def run_into_slurm_out(tmp_path: Path, fake, *extra: str) -> tuple[int, str]:
    """A run whose stderr is a file, as in a slurm job: (exit code, what the file holds)."""
    slurm_out = tmp_path / "slurm-1.out"
    with open(slurm_out, "w") as stderr:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(tmp_path / "o"),
             "--cache_dir", str(tmp_path / "c"), "--api-url", fake.url, "--compression",
             "--workers", "2", "--summary-interval", "0.3", *extra],
            stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    return result.returncode, slurm_out.read_text()


def test_a_slurm_out_file_gets_summary_lines_not_bars(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=6, conn_bandwidth=40_000)
    code, text = run_into_slurm_out(tmp_path, fake)
    assert code == errors_module.EXIT_OK
    assert "\r" not in text                                   # no bars in a file
    summaries = [line for line in text.splitlines() if " progress: " in line]
    assert len(summaries) >= 2
    assert "series" in summaries[-1] and "ETA" in summaries[-1]
    assert text.count(" done DEMO/") == 6


def test_log_level_warning_quietens_the_out_file_but_keeps_summaries_and_the_report(
        tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=6, conn_bandwidth=40_000)
    code, text = run_into_slurm_out(tmp_path, fake, "--log-level", "warning")
    assert code == errors_module.EXIT_OK
    assert " done DEMO/" not in text                          # the INFO lines are gone
    assert " progress: " in text and "report for DEMO: 6 series requested" in text
    archive = (tmp_path / "o" / "DEMO.tar.xz").resolve()
    assert re.search(rf"output: {re.escape(str(archive))} \(\S+ \S+, [0-9.]+x smaller", text)
    assert re.search(r"logs: \S+-info\.log, \S+-debug\.log", text)


def test_a_terminal_gets_progress_bars(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(demo_series=4)
    code, text = terminal_screen(
        [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(tmp_path / "o"),
         "--cache_dir", str(tmp_path / "c"), "--api-url", fake.url, "--compression"])
    assert code == errors_module.EXIT_OK
    assert "series: 100%" in text and "4/4" in text
    assert "data: 100%" in text
    assert " done DEMO/" in text                                # log lines still shown


def test_an_unusable_output_is_refused_before_any_request(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory()
    (tmp_path / "a-file").write_text("")
    run = Run(tmp_path, fake, output=tmp_path / "a-file" / "out")
    assert run.code == errors_module.EXIT_USAGE
    assert "--output" in capsys.readouterr().err
    assert fake.counters.snapshot()["requests"] == {}


def test_an_unreachable_server_names_the_host(tmp_path, capsys):
    import socket
    with socket.socket() as probe:          # a port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = cli.main(["--collection", "DEMO", "--output", str(tmp_path / "o"), "--cache_dir",
                    str(tmp_path / "c"), "--api-url", f"http://127.0.0.1:{port}/nbia-api/services/v4/",
                    "--retries", "2", "--retry-wait", "0", "--no-progress"])
    assert code == errors_module.EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert f"cannot connect to 127.0.0.1:{port}" in err and "Traceback" not in err


def run_against(tmp_path, api_url: str) -> int:
    return cli.main(["--collection", "DEMO", "--output", str(tmp_path / "o"), "--cache_dir",
                    str(tmp_path / "c"), "--api-url", api_url, "--retries", "3",
                    "--retry-wait", "5", "--no-progress"])


def test_a_host_that_does_not_exist_is_a_mistake_to_fix_not_an_outage(tmp_path, capsys,
                                                                      monkeypatch):
    """No 40 s of retries ending in 'the service may be down', exit 1: one line, exit 2."""
    import socket
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "nbia.example.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    started = time.monotonic()
    code = run_against(tmp_path, "https://nbia.example.invalid/nbia-api/services/v4/")
    assert code == errors_module.EXIT_USAGE and time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "nbia.example.invalid does not exist" in err and "--proxy" in err
    assert "Traceback" not in err


def test_a_wrong_api_path_and_a_tls_failure_are_mistakes_to_fix(tmp_path, fake_nbia_factory,
                                                                 capsys):
    fake = fake_nbia_factory()
    assert run_against(tmp_path, fake.url.replace("/services/v4/", "/v4/")) == errors_module.EXIT_USAGE
    assert "HTTP 404 (not found): check --api-url" in capsys.readouterr().err
    started = time.monotonic()       # TLS spoken to a plain-HTTP server fails the handshake
    assert run_against(tmp_path, fake.url.replace("http://", "https://")) == errors_module.EXIT_USAGE
    assert time.monotonic() - started < 5
    assert "TLS with 127.0.0.1 failed" in capsys.readouterr().err


def test_an_old_python_gets_one_line_saying_what_to_load(tmp_path):
    for python in old_pythons():
        result = subprocess.run([str(python), str(SCRIPT), "--collection", "X"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert result.returncode == errors_module.EXIT_USAGE, (python, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs Python 3.9 or newer" in lines[0], (python, lines)
        assert "module load" in lines[0]


def test_a_missing_package_gets_one_line_saying_how_to_install(tmp_path):
    # -S: no site-packages, so requests cannot be imported
    result = subprocess.run([sys.executable, "-S", str(SCRIPT), "--collection", "X"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == errors_module.EXIT_USAGE
    assert result.stderr.strip().splitlines() == [
        "tcia_downloader: error: the Python package 'requests' is missing: install "
        "requirements.txt (python3 -m pip install -r requirements.txt, in a venv: see the "
        "README)"]
