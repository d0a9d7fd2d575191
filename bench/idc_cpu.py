#!/usr/bin/env python3
"""The CPU that `--mode idc` spends per object, apart from compression, and where it goes.

    python3 bench/idc_cpu.py [--series 80 --instances 20 --image-size 256] [--repeat 3]
        [--downloader tcia_downloader.py] [--profile FILE.txt]

Starts bench/fake_s3_server.py in its own process (its CPU is not counted: it is not our
child until it ends), then runs ours (`--mode idc`, default flags, tar.xz at -1) --repeat
times, each a fresh output. For every run: ours' CPU (user + system, from wait4 of its
process), then `xz -T0 -1` of the same tar (ours' archive decompressed into a file first;
--format tar.zst: zstd -T0 -3), and per object (ours - xz) / objects: the issue's figure (bench/README.md "IDC results":
4.4 ms per object). The median of the repeats is printed, then each run.

--profile FILE: one more run of ours under `py-spy record --format raw` (pip install py-spy),
summarised into FILE: the functions with the most samples on top of the stack (self), and the
source files whose functions are anywhere on it (inclusive), as shares of all samples.
Only 127.0.0.1 is used. A shared machine: CPU time, not wall time, is what this measures.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: S3Fake, verify_archive, child_env)


def cpu_of(cmd: list[str], *, stdin=None, stdout=None, env=None) -> tuple[float, float, int]:
    """(CPU seconds of cmd's process and the children it waited for, wall seconds, exit)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=stdin or subprocess.DEVNULL,
                            stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env or bench.child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-3000:])
    proc.stderr.close()
    return usage.ru_utime + usage.ru_stime, time.monotonic() - started, proc.returncode


COMPRESSORS = {"tar.xz": ["xz", "-T0", "-1"], "tar.zst": ["zstd", "-T0", "-3", "-c"]}


def ours_command(downloader: Path, fake: bench.S3Fake, d: Path, fmt: str) -> list[str]:
    for sub in ("out", "tmp", "cache"):
        (d / sub).mkdir(parents=True)
    return [sys.executable, str(downloader), "--mode", "idc", "--idc-endpoint", fake.endpoint,
            "--idc-index", str(fake.index), "--collection", fake.stats["collection"]["name"],
            "--format", fmt, "--output", str(d / "out"), "--temp_dir", str(d / "tmp"),
            "--cache_dir", str(d / "cache"), "--no-progress",
            "--api-url", "http://127.0.0.1:9/nbia-api/services/v4/"]


def one_run(downloader: Path, fake: bench.S3Fake, d: Path, fmt: str) -> dict[str, float]:
    ours, wall, rc = cpu_of(ours_command(downloader, fake, d, fmt))
    if rc:
        raise SystemExit(f"ours exited {rc}")
    archive = d / "out" / f"{fake.stats['collection']['name']}.{fmt}"
    ok, why = bench.verify_archive(archive, fake.stats, with_collection_files=True)
    if not ok:
        raise SystemExit(f"ours' archive is wrong: {why}")
    tar = d / "same.tar"
    with open(tar, "wb") as out:
        subprocess.run([COMPRESSORS[fmt][0], "-dc", str(archive)], stdout=out, check=True)
    with open(tar, "rb") as src:
        xz, _, _ = cpu_of(COMPRESSORS[fmt], stdin=src)
    shutil.rmtree(d)
    n = fake.stats["instances"]
    return {"ours": ours, "wall": wall, "xz": xz, "per_object_ms": 1000 * (ours - xz) / n}


def profile(downloader: Path, fake: bench.S3Fake, d: Path, report: Path, fmt: str) -> None:
    raw = d.with_suffix(".raw")
    py_spy = shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    # --gil: only the thread holding the GIL is sampled. Without it, py-spy counts threads
    # blocked in Condition.wait or recv as busy (a third of all samples here), which is not
    # CPU; with it, native work that releases the GIL (lzma, hashlib on big buffers) is missed.
    cmd = [py_spy, "record", "--format", "raw", "--rate", "250", "--gil", "-o", str(raw), "--",
           *ours_command(downloader, fake, d, fmt)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=bench.child_env())
    report.write_text(summarise(raw.read_text()))
    shutil.rmtree(d)


def breakdown(downloader: Path, fake: bench.S3Fake, d: Path, fmt: str) -> str:
    """One run of ours through bench/idc_cpu_wrap.py: each thread's CPU (time.thread_time)
    inside the functions where an object's work happens, summed (inclusive)."""
    out = d.with_suffix(".json")
    cmd = ours_command(downloader, fake, d, fmt)
    cmd[1:2] = [str(HERE / "idc_cpu_wrap.py"), str(downloader.resolve().parent / "src")]
    _, _, rc = cpu_of(cmd, env={**bench.child_env(), "BREAKDOWN_OUT": str(out)})
    if rc:
        raise SystemExit(f"ours (wrapped) exited {rc}")
    data = json.loads(out.read_text())
    shutil.rmtree(d)
    n = fake.stats["instances"]
    lines = [f"breakdown ({fmt}): process CPU {data['total']:.2f} s (user {data['user']:.2f}, "
             f"system {data['sys']:.2f}); inclusive thread CPU per wrapped function:"]
    for name, seconds in sorted(data["acc"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {seconds:7.2f} s  {1000 * seconds / n:6.3f} ms/object  "
                     f"{data['calls'].get(name, 0):6d} calls  {name}")
    return "\n".join(lines)


def summarise(raw: str, top: int = 45) -> str:
    """py-spy's raw lines ("frame;frame;... count", the innermost last) as two tables."""
    self_samples: collections.Counter = collections.Counter()
    files: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        self_samples[frames[-1]] += int(count)
        for name in {f.split(" (")[-1].split(":")[0] for f in frames}:
            files[name] += int(count)
        for name in set(frames):
            functions[name.rsplit(":", 1)[0]] += int(count)
    lines = [f"{total} samples", "", "self (innermost frame):"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in self_samples.most_common(top)]
    lines += ["", "inclusive, by function (anywhere on the stack):"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in functions.most_common(top * 2)]
    lines += ["", "inclusive, by file:"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in files.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--downloader", type=Path, action="append",
                   help="the script to measure (default: this checkout's); repeatable: the "
                        "copies run interleaved (a, b, a, b, ...), so each sees the same load")
    p.add_argument("--series", type=int, default=80)
    p.add_argument("--instances", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--format", choices=sorted(COMPRESSORS), default="tar.xz",
                   help="ours' format; the same tar is compressed by xz -T0 -1 or zstd -T0 -3 "
                        "(ours' defaults), whose CPU is subtracted: tar.zst leaves less noise")
    p.add_argument("--profile", type=Path, help="also one run under py-spy, summarised here")
    p.add_argument("--breakdown", action="store_true",
                   help="also one run with each thread's CPU summed per function")
    p.add_argument("--first-byte-delay", type=float, default=0.025)
    p.add_argument("--conn-bandwidth", type=float, default=20e6)
    a = p.parse_args()
    downloaders = a.downloader or [HERE.parent / "tcia_downloader.py"]
    for downloader in downloaders:
        bench.compile_sources(downloader)
    work = Path(tempfile.mkdtemp(prefix="idc_cpu."))
    fake = bench.S3Fake(work, series=a.series, instances=a.instances, image_size=a.image_size,
                        seed=1, first_byte_delay=a.first_byte_delay,
                        conn_bandwidth=a.conn_bandwidth, total_bandwidth=0, cache=True,
                        cache_ranges="none", label="cpu")
    try:
        n = fake.stats["instances"]
        runs: dict[Path, list[dict[str, float]]] = {d: [] for d in downloaders}
        for i in range(a.repeat):
            for k, downloader in enumerate(downloaders):
                runs[downloader].append(one_run(downloader, fake, work / f"run{i}-{k}",
                                                a.format))
        splits = [breakdown(d, fake, work / f"wrapped{k}", a.format)
                  for k, d in enumerate(downloaders)] if a.breakdown else []
        if a.profile:
            profile(downloaders[-1], fake, work / "profiled", a.profile, a.format)
    finally:
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)
    for downloader, mine in runs.items():
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0]}
        print(f"{downloader} ({a.format}): {n} objects, {a.series} series; medians of "
              f"{len(mine)}: ours {med['ours']:.2f} s CPU ({med['wall']:.1f} s wall), "
              f"{' '.join(COMPRESSORS[a.format][:3])} of the same tar {med['xz']:.2f} s, "
              f"per object {med['per_object_ms']:.2f} ms")
        for r in mine:
            print(f"  ours {r['ours']:.2f} s, compressor {r['xz']:.2f} s, per object "
                  f"{r['per_object_ms']:.2f} ms")
    for downloader, split in zip(downloaders, splits):
        print(f"{downloader}: {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
