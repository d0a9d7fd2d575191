"""tcia_downloader_hpc.sh under a real slurm: a plain job, a job array of shards, and a job
whose time limit falls in the middle of the download."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import (ROOT, archive_members, expected_folders, series_folders,
                     verify_with_standard_tools)

TEMPLATE = ROOT / "tcia_downloader_hpc.sh"


def submit_template(cluster, tmp_path: Path, fake, *sbatch_args: str, **variables: str) -> str:
    """sbatch the unmodified template from the project folder (as users do); its variables
    come from the environment that sbatch exports, and --api-url passes through. PYTHON is
    the interpreter running the tests (its venv's bin need not be on PATH)."""
    settings = {"COLLECTION": "DEMO", "OUTPUT_DIR": str(tmp_path / "out"),
                "CACHE_DIR": str(tmp_path / "cache"), "TEMP_DIR": str(tmp_path / "scratch"),
                "PYTHON": sys.executable, **variables}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in settings.items())
    return cluster.submit(TEMPLATE, "--api-url", fake.url, cwd=ROOT,
                          sbatch_args=["--cpus-per-task=2", f"--export={export}",
                                       f"--output={tmp_path}/%x-%A_%a.out", *sbatch_args])


def job_output(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("tcia-download-*.out")))


def test_sbatch_of_the_template_downloads_a_verified_collection(slurm_cluster, tmp_path,
                                                               fake_nbia_factory):
    fake = fake_nbia_factory()
    job = submit_template(slurm_cluster, tmp_path, fake)
    state = slurm_cluster.wait(job, timeout=120)
    assert state == "COMPLETED", job_output(tmp_path)
    archive = tmp_path / "out" / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    verify_with_standard_tools(archive, tmp_path)
    log = job_output(tmp_path)
    assert f"job {job}" in log and "exited with 0" in log
    assert "with 8 workers, packing on 2 cores" in log   # SLURM_CPUS_PER_TASK reached it


def test_an_array_of_three_yields_shards_whose_union_is_the_collection(slurm_cluster, tmp_path,
                                                                      fake_nbia_factory):
    fake = fake_nbia_factory()
    job = submit_template(slurm_cluster, tmp_path, fake, "--array=0-2")
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", job_output(tmp_path)
    union: dict[str, str] = {}
    for index in range(3):
        part = archive_members(tmp_path / "out" / f"DEMO.shard-{index}-of-3.tar.xz")
        dicoms = {k: v for k, v in part.items() if k.endswith(".dcm")}
        assert dicoms, f"shard {index} is empty"
        assert not set(dicoms) & set(union), "a file is in two shards"
        union |= dicoms
    assert series_folders(union) == expected_folders(fake)


def test_a_time_limit_mid_download_checkpoints_requeues_and_completes(slurm_cluster, tmp_path,
                                                                     fake_nbia_factory):
    """slurm warns (USR1) 2..32 s into a 1-minute job (its timer ticks every 30 s). 16
    series of ~6 s (zips of ~17.6 kB at 3 kB/s) on 2 workers need ~48 s, so the warning
    always comes mid-download (at 6.5 kB/s they needed 26 s: one run in five finished
    before the warning); the grace (20 s) is far longer than a series, so nothing in flight
    is ever abandoned and every series must have been downloaded exactly once, across all
    the job's runs."""
    fake = fake_nbia_factory(include_md5="honour", demo_series=16, conn_bandwidth=3_000)
    job = submit_template(slurm_cluster, tmp_path, fake, "--time=1", "--signal=B:USR1@28",
                          STOP_GRACE="20", WORKERS="2")
    state = slurm_cluster.wait(job, timeout=420)
    log = job_output(tmp_path)
    assert state == "COMPLETED", log
    info = slurm_cluster.job_info(job)
    assert int(info["Restarts"]) >= 1, log
    assert "received SIGUSR1: starting no new series" in log
    assert "checkpointed before the time limit: requeueing" in log
    archive = tmp_path / "out" / "DEMO.tar.xz"
    assert series_folders(archive_members(archive)) == expected_folders(fake)
    verify_with_standard_tools(archive, tmp_path)
    downloads = [fake.counters.complete_downloads(s["SeriesInstanceUID"])
                 for s in fake.series("DEMO")]
    assert downloads == [1] * 16, "a committed series was downloaded again"
