"""A real one-node slurm cluster for tests (see cluster.sh next to this file).

Fixture ``slurm_cluster`` (session scope) starts a cluster of its own for the session, in a
fresh state directory (ports, cluster name, config: all its own, so a slurm the machine runs
already, or another test run's cluster, is neither used nor disturbed), and stops it at the
end; the directory (logs) is removed unless a test failed. With TCIA_SLURM_DIR set, the
cluster of that directory is used, started if it does not run (and then stopped at the end).
It yields a :class:`SlurmCluster`:

    env                       dict for subprocess: os.environ without SLURM_*/SBATCH_*
                              variables of an outer job, plus SLURM_CONF of the test cluster
                              (every slurm command the tests run, and the jobs, use it)
    submit(script, *args, sbatch_args=[], cwd=None) -> job id (str, e.g. "7")
    cancel(*job_ids)          scancel and wait until they no longer run
    (jobs a test submitted and left running are cancelled after the test)
    wait(job_id, timeout=60, until=TERMINAL) -> final JobState, e.g. "COMPLETED"
    job_info(job_id) -> dict of `scontrol show job` fields (strings)
    records(job_id) -> list of such dicts (one per array task; [] when unknown/purged)
    run(*argv, check=True) -> CompletedProcess of a slurm command run with env

Without slurm on a developer machine the tests are skipped; with CI=true, slurm is installed
if missing, and any skipped test under tests/slurm is reported as a failure instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"

# Job states in which a job stays until purged (SPECIAL_EXIT: requeued and held, needs a human).
TERMINAL = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
POLL_INTERVAL = 0.2
# Binaries a working cluster needs (daemons live in /usr/sbin, often not on a user's PATH).
NEEDED = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _ci() -> bool:
    return os.environ.get("CI") == "true"


# `scontrol -o show job`: one line per job record, "Key=Value" fields separated by spaces.
# Values may contain "=" (TRES=cpu=1,mem=1G) and, rarely, spaces (Command, Reason), so a field
# starts only where a space is followed by a key and "=".
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:.\-]*)=")


def parse_scontrol_line(line: str) -> dict[str, str]:
    matches = list(_FIELD.finditer(line))
    info: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        info[m.group(1)] = line[m.end() : end].strip()
    return info


class SlurmError(RuntimeError):
    pass


def _record_name(rec: dict[str, str]) -> str:
    if "ArrayTaskId" in rec:
        return f"{rec.get('ArrayJobId')}_{rec['ArrayTaskId']}"
    return rec.get("JobId", "?")


class SlurmCluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"
        env = {
            k: v
            for k, v in os.environ.items()
            # Variables of an outer slurm job (users run pytest inside jobs) would leak into
            # sbatch's options and into the jobs.
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = SEARCH_PATH
        self.env = env
        self._last_seen: dict[str, list[dict[str, str]]] = {}
        self.submitted: list[str] = []

    def run(self, *argv: str, check: bool = True, cwd=None, timeout: float = 60):
        proc = subprocess.run(
            [str(a) for a in argv],
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(map(str, argv))} exited {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def submit(self, script_path, *args, sbatch_args=(), cwd=None) -> str:
        """sbatch the script with its arguments; returns the job id (a string)."""
        proc = self.run(
            "sbatch", "--parsable", *sbatch_args, str(script_path), *map(str, args), cwd=cwd
        )
        job_id = proc.stdout.strip().split(";")[0]
        if not re.fullmatch(r"\d+", job_id):
            raise SlurmError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
        self.submitted.append(job_id)
        return job_id

    def cancel(self, *job_ids, timeout: float = 30) -> None:
        """scancel the jobs and wait until none of them runs any more."""
        job_ids = [str(j) for j in job_ids]
        if not job_ids:
            return
        self.run("scancel", *job_ids, check=False)
        for job_id in job_ids:
            try:
                self.wait(job_id, timeout=timeout)
            except SlurmError:
                pass  # unknown or already purged: nothing left to wait for

    def cancel_leftovers(self) -> None:
        """Cancel the jobs submitted through this object that have not ended."""
        active = [
            j
            for j in self.submitted
            if any(r.get("JobState") not in TERMINAL for r in self.records(j))
        ]
        self.submitted.clear()
        self.cancel(*active)

    def records(self, job_id) -> list[dict[str, str]]:
        """All `scontrol show job` records of job_id (several for an array); [] if unknown."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise SlurmError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
        recs = [parse_scontrol_line(l) for l in proc.stdout.splitlines() if l.strip()]
        if recs:
            self._last_seen[str(job_id)] = recs
        return recs

    def job_info(self, job_id) -> dict[str, str]:
        """Fields of the job (first record for an array). After slurm has purged the job
        (MinJobAge after it ended) this is the last record seen by this object."""
        recs = self.records(job_id) or self._last_seen.get(str(job_id))
        if not recs:
            raise SlurmError(f"job {job_id} is unknown to slurm")
        return recs[0]

    def wait(self, job_id, timeout: float = 60, until=TERMINAL) -> str:
        """Poll until every record of the job is in a state of `until` (default: ended);
        returns that state (for an array whose tasks ended differently: the states joined
        by ","). Raises TimeoutError with the job's fields after `timeout` seconds."""
        job_id = str(job_id)
        until = frozenset(until)
        deadline = time.monotonic() + timeout
        last: list[dict[str, str]] = []
        while True:
            recs = self.records(job_id)
            if recs:
                last = recs
            elif last:
                # Purged between two polls: what we saw last is what we have.
                break
            elif job_id not in self._last_seen:
                raise SlurmError(f"job {job_id} is unknown to slurm")
            else:
                last = self._last_seen[job_id]
                break
            if all(r.get("JobState") in until for r in recs):
                break
            if until != TERMINAL and all(r.get("JobState") in TERMINAL for r in recs):
                states = ",".join(sorted({r.get("JobState", "?") for r in recs}))
                raise SlurmError(f"job {job_id} ended ({states}) without reaching {sorted(until)}")
            if time.monotonic() >= deadline:
                states = ", ".join(
                    f"{_record_name(r)} {r.get('JobState')} (Reason={r.get('Reason')})"
                    for r in recs
                )
                goal = "ended" if until == TERMINAL else f"in {'/'.join(sorted(until))}"
                raise TimeoutError(f"job {job_id} not {goal} after {timeout}s: {states}")
            time.sleep(POLL_INTERVAL)
        states = sorted({r.get("JobState", "?") for r in last})
        if not set(states) <= until:
            raise SlurmError(
                f"job {job_id} was purged by slurm while still {','.join(states)}"
            )
        return ",".join(states)


def _cluster_sh(*args: str, env=None, timeout: float = 600) -> tuple[int, str]:
    # Output to a file, not a pipe: nothing a daemon inherits can then keep us waiting.
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.run(
            ["/bin/bash", str(CLUSTER_SH), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
        out.seek(0)
        return proc.returncode, out.read()


def _missing() -> list[str]:
    return [b for b in NEEDED if shutil.which(b, path=SEARCH_PATH) is None]


def _say(config, line: str) -> None:
    # Not print(): a session fixture's teardown output is captured and usually not shown.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _state_dir() -> tuple[Path, bool]:
    """The cluster's state directory, and whether it is this session's own (to remove)."""
    given = os.environ.get("TCIA_SLURM_DIR")
    if given:
        return Path(given).resolve(), False
    # Short: slurmd's spool holds unix sockets, whose paths must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix="tcia-slurm-")).resolve(), True


@pytest.fixture(scope="session")
def slurm_cluster(request):
    missing = _missing()
    if missing:
        if not _ci():
            pytest.skip(
                "slurm is not installed: run tests/slurm/cluster.sh install "
                f"(missing: {', '.join(missing)})"
            )
        rc, out = _cluster_sh("install")
        if rc != 0:
            pytest.fail(f"cluster.sh install failed ({rc}):\n{out}", pytrace=False)
        if _missing():
            pytest.fail(f"still missing after install: {_missing()}\n{out}", pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("starting the test slurm cluster needs root (tests/slurm/cluster.sh start)")

    state_dir, own_dir = _state_dir()
    env = dict(os.environ, TCIA_SLURM_DIR=str(state_dir))
    # A given directory's cluster may be up already (a developer's): use it, leave it running.
    started = own_dir or _cluster_sh("status", env=env)[0] != 0
    if started:
        rc, out = _cluster_sh("start", env=env)
        if rc != 0:
            _cluster_sh("stop", env=env)  # whatever did start
            pytest.fail(f"cluster.sh start failed ({rc}):\n{out}", pytrace=False)
    try:
        yield SlurmCluster(state_dir)
    finally:
        if started:
            rc, out = _cluster_sh("stop", env=env)
            if rc != 0:
                _say(request.config, f"cluster.sh stop failed ({rc}):\n{out}")
            elif own_dir and not request.session.testsfailed:
                shutil.rmtree(state_dir, ignore_errors=True)
            if own_dir and state_dir.exists():
                _say(request.config, f"the slurm test cluster's logs are in {state_dir}/log")


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request):
    """A test that fails half-way must not leave jobs occupying the node for the next one."""
    yield
    if "slurm_cluster" not in request.fixturenames:
        return
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except (Exception, pytest.skip.Exception, pytest.fail.Exception):
        return  # the cluster never came up: its own skip/failure is already reported
    cluster.cancel_leftovers()


def _skip_reason(rep) -> str:
    if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        return str(rep.longrepr[2])
    return str(rep.longrepr)


def _fail_skip_in_ci(rep, path) -> None:
    if not _ci() or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    try:
        Path(path).resolve().relative_to(HERE)
    except ValueError:
        return
    rep.outcome = "failed"
    rep.longrepr = (
        f"CI=true: tests under tests/slurm must run, not be skipped. "
        f"Skip reason: {_skip_reason(rep)}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    _fail_skip_in_ci(rep, item.path)
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # Module-level skips (pytest.skip(allow_module_level=True), importorskip) happen here.
    rep = yield
    path = getattr(collector, "path", None)
    if path is not None:
        _fail_skip_in_ci(rep, path)
    return rep
