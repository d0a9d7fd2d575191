"""The test cluster really schedules and runs jobs the way users' clusters do."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def slurm_out(tmp_path: Path) -> list[str]:
    # Keep slurm's own stdout/stderr next to the test's files (helps when a test fails).
    return ["--output", str(tmp_path / "slurm-%x-%A_%a.out"), "--open-mode=append"]


def test_batch_job_completes(slurm_cluster, tmp_path):
    script = write_script(
        tmp_path / "job.sh",
        """
        set -eu
        echo "$SLURM_JOB_ID $SLURM_CPUS_PER_TASK" > "$1"
        """,
    )
    out = tmp_path / "result.txt"
    job = slurm_cluster.submit(
        script, out, sbatch_args=["--cpus-per-task=2", *slurm_out(tmp_path)], cwd=tmp_path
    )

    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert out.read_text().split() == [job, "2"]
    info = slurm_cluster.job_info(job)
    assert info["ExitCode"] == "0:0"
    assert info["NumCPUs"] == "2"


def test_array_job(slurm_cluster, tmp_path):
    script = write_script(
        tmp_path / "array.sh",
        """
        set -eu
        echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" \\
            > "$1/task-$SLURM_ARRAY_TASK_ID"
        """,
    )
    job = slurm_cluster.submit(
        script, tmp_path, sbatch_args=["--array=0-2", *slurm_out(tmp_path)], cwd=tmp_path
    )

    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    results = sorted(p.read_text().split() for p in tmp_path.glob("task-*"))
    assert results == [[job, "0", "3"], [job, "1", "3"], [job, "2", "3"]]


def test_warning_signal_then_requeue(slurm_cluster, tmp_path):
    """A job warned before its time limit (--signal=B:USR1@N) requeues itself and, on its
    second run (SLURM_RESTART_COUNT=1), completes.

    slurmctld checks time limits (and sends warning signals) only every 30 s, and sends the
    signal as soon as a check finds less than N+30 s left. With --time=1 and @28 the first
    check at least 2 s into the job sends it: 2..32 s after the start (never before the
    script has set its trap). A requeued job is eligible again after AuthInfo cred_expire
    (5 s in cluster.sh, default 120 s).
    """
    script = write_script(
        tmp_path / "requeue.sh",
        """
        dir=$1
        restart=${SLURM_RESTART_COUNT:-0}
        on_usr1() {
            echo "$restart $(date +%s.%N)" > "$dir/usr1-$restart"
            scontrol requeue "$SLURM_JOB_ID" || echo "requeue failed: $?" > "$dir/requeue-error"
        }
        trap on_usr1 USR1
        echo "$(date +%s.%N)" > "$dir/start-$restart"
        if [ "$restart" -ge 1 ]; then
            echo done > "$dir/done"
            exit 0
        fi
        # Until slurm kills the requeued run; `wait` returns at once when USR1 arrives.
        while :; do sleep 1 & wait $!; done
        """,
    )
    t0 = time.monotonic()
    job = slurm_cluster.submit(
        script,
        tmp_path,
        sbatch_args=["--time=1", "--signal=B:USR1@28", *slurm_out(tmp_path)],
        cwd=tmp_path,
    )

    assert slurm_cluster.wait(job, timeout=150) == "COMPLETED", slurm_cluster.job_info(job)
    total = time.monotonic() - t0

    assert not (tmp_path / "requeue-error").exists(), (tmp_path / "requeue-error").read_text()
    assert (tmp_path / "done").read_text().strip() == "done"
    restart, usr1_at = (tmp_path / "usr1-0").read_text().split()
    assert restart == "0"
    assert not (tmp_path / "usr1-1").exists()
    start0 = float((tmp_path / "start-0").read_text())
    start1 = float((tmp_path / "start-1").read_text())
    signal_after = float(usr1_at) - start0
    assert 0 < signal_after < 60, "USR1 must arrive before the 1-minute time limit"
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1"
    assert info["Requeue"] == "1"
    print(
        f"\nwarning signal {signal_after:.1f} s after start; second run started "
        f"{start1 - float(usr1_at):.1f} s after the requeue; total {total:.1f} s"
    )
