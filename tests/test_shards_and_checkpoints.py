"""Job arrays (--shard) and the SIGUSR1 checkpoint that slurm's time-limit warning triggers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tcia_dl import cli, errors as errors_module, plan, settings
from helpers import (SCRIPT, Run, archive_members, expected_folders, journal_uids,
                     series_folders, wait_until)

DATA = Path(__file__).parent / "data"


# -- choosing a shard -----------------------------------------------------------------------

@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"},
     settings.Shard(2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"},
     settings.Shard(1, 4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_STEP": "2"}, settings.Shard(2, 5)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "0"},
     None),                                       # an array of one is the whole collection
])
def test_the_shard_comes_from_the_slurm_array(environ, expected):
    assert cli.parse_shard(None, environ) == expected


def test_an_explicit_shard_wins_and_none_turns_sharding_off():
    array = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert cli.parse_shard("0/2", array) == settings.Shard(0, 2)
    assert cli.parse_shard("none", array) is None
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(errors_module.UsageError, match="--shard"):
            cli.parse_shard(bad, {})


def test_shards_partition_a_real_collection_exactly_and_evenly():
    records = json.loads((DATA / "Pancreas-CT.series.json").read_text())
    planned = plan.plan_collection("Pancreas-CT", records)
    parts = [plan.shard_of(planned, settings.Shard(i, 3)) for i in range(3)]
    uids = [s.uid for part in parts for s in part]
    assert sorted(uids) == sorted(s.uid for s in planned)          # all, none twice
    loads = [sum(s.file_size for s in part) for part in parts]
    biggest = max(s.file_size for s in planned)
    assert max(loads) - min(loads) <= biggest                       # greedy bound
    # every task computes the same partition from its own (differently ordered) list
    assert plan.shard_of(list(reversed(planned)), settings.Shard(1, 3)) == parts[1]


def test_three_shards_extract_side_by_side_into_the_whole_collection(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    members: dict[str, str] = {}
    for index in range(3):
        run = Run(tmp_path, fake, "--shard", f"{index}/3", output=tmp_path / "out")
        assert run.code == errors_module.EXIT_OK, run.log
        archive = tmp_path / "out" / f"DEMO.shard-{index}-of-3.tar.xz"
        part = archive_members(archive)
        assert not set(part) & set(members), "a file is in two shards"
        assert f"DEMO/MD5SUMS.shard-{index}-of-3" in part
        members |= part
    assert series_folders(members) == expected_folders(fake)
    extract = tmp_path / "x"
    extract.mkdir()
    for index in range(3):
        subprocess.run(["tar", "-xJf", str(tmp_path / "out" / f"DEMO.shard-{index}-of-3.tar.xz"),
                        "-C", str(extract)], check=True)
    for index in range(3):
        subprocess.run(["md5sum", "-c", "--quiet", f"MD5SUMS.shard-{index}-of-3"],
                       cwd=extract / "DEMO", check=True)


def test_shards_of_a_folder_tree_share_the_collection_folder(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory()
    for index in range(2):
        assert Run(tmp_path, fake, "--shard", f"{index}/2", compression=False).code == errors_module.EXIT_OK
    root = tmp_path / "out" / "DEMO"
    for index in range(2):
        subprocess.run(["md5sum", "-c", "--quiet", f"MD5SUMS.shard-{index}-of-2"], cwd=root,
                       check=True)
    dicoms = [p for p in root.rglob("*.dcm")]
    assert len(dicoms) == sum(len(fake.instances(s["SeriesInstanceUID"]))
                              for s in fake.series("DEMO"))


# -- SIGUSR1: checkpoint before the time limit ----------------------------------------------

def start(fake, tmp_path: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--api-url", fake.url, "--no-progress",
            "--compression", "--workers", "2", "--retry-wait", "0.05", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def fetched_uids(fake) -> set[str]:
    return {uid for uid, n in fake.counters.snapshot()["complete_downloads"].items() if n}


def test_sigusr1_lets_series_in_progress_finish_then_exits_75(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(include_md5="honour", demo_series=10, conn_bandwidth=60_000)
    process = start(fake, tmp_path)
    # The first series runs alone (it settles the MD5 endpoint); after the second commit
    # the workers run side by side, so series are in flight when the signal comes.
    wait_until(lambda: len(journal_uids(tmp_path / "out")) >= 2, 60, "two commits")
    process.send_signal(signal.SIGUSR1)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == errors_module.EXIT_CHECKPOINT, errors
    assert "starting no new series" in errors
    committed = journal_uids(tmp_path / "out")
    # Every zip the server sent to the end went into the archive: nothing in flight was lost.
    assert fetched_uids(fake) == committed
    assert 2 <= len(committed) < 10
    assert (tmp_path / "out" / "DEMO.tar.xz.part").exists()

    rerun = start(fake, tmp_path)
    _, errors = rerun.communicate(timeout=120)
    assert rerun.returncode == errors_module.EXIT_OK, errors
    assert all(fake.counters.complete_downloads(uid) == 1 for uid in committed)
    assert series_folders(archive_members(tmp_path / "out" / "DEMO.tar.xz")) == \
        expected_folders(fake)


def test_sigusr1_drops_what_cannot_finish_within_the_grace(tmp_path, fake_nbia_factory):
    # ~40 kB per series at 4 kB/s: each takes ~10 s, far longer than the grace.
    fake = fake_nbia_factory(include_md5="honour", demo_series=6, conn_bandwidth=4_000)
    process = start(fake, tmp_path, "--stop-grace", "0.5")
    wait_until(lambda: fake.counters.requests("getImage") >= 1, 60, "a first request")
    process.send_signal(signal.SIGUSR1)
    _, errors = process.communicate(timeout=20)
    assert process.returncode == errors_module.EXIT_CHECKPOINT, errors
    assert "grace period is over" in errors
    assert "Traceback" not in errors
    assert journal_uids(tmp_path / "out") == set()
