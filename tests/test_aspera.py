"""--mode aspera end to end, against the stand-in ascli (tests/fakes/fake_ascli.py) on PATH: a
package larger than --temp-limit becomes one verified archive without scratch ever holding
more; every fault of issue 21 ends in a whole archive or in exit 1 with a resumable .part; a
kill -9 loses no committed part; hostile paths are refused; --dry-run, --verify, --extract,
a repair, a folder tree; secrets stay out of every file the tool writes."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from fakes.fake_ascli import FakeAscli, write_package
from helpers import SCRIPT, flip, wait_until
from tcia_dl import cli, errors
from tcia_dl.formats import xz as xzread
from tcia_dl.settings import parse_size
from tcia_dl.sources.ascli import error_lines
from tcia_dl.sources.aspera_package import (PackageFile, Sums, build_tree, listed_path,
                                            parse_link, path_refusal, plan_parts, read_sums,
                                            scratch_need)

KIB = 1024
NAME = "HER2_v3"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def slide_bytes(seed: int, size: int) -> bytes:
    """Incompressible, as JPEG 2000 inside a slide is."""
    return random.Random(seed).randbytes(size)


def package_files(slides: int = 8, size: int = 150 * KIB) -> dict[str, bytes]:
    files = {f"Yale_HER2/SVS/slide-{n:02d}.svs": slide_bytes(n, size + n * KIB)
             for n in range(slides)}
    files.update({"Yale_HER2/Annotations/a1.xml": b"<roi>1</roi>\n",
                  "Yale_HER2/Annotations/deep/a2.xml": b"<roi>2</roi>\n",
                  "README.txt": b"The HER2 package\n",
                  "metadata.csv": b"their,own\n"})        # named like one of ours: renamed
    return files


class Package:
    """A package folder, the fake ascli serving it (on PATH), and runs of the tool on it."""

    def __init__(self, tmp_path: Path, monkeypatch, files: dict[str, bytes], **fake: object):
        self.tmp = tmp_path
        self.files = files
        self.dir = write_package(tmp_path / "package", files, sums_name=f"{NAME}.sums")
        self.fake = FakeAscli(tmp_path / "fake", self.dir, chunk=16 * KIB, **fake)
        for key, value in self.fake.environ().items():
            if key in ("PATH", "FAKE_ASCLI_CONFIG", "FAKE_ASCLI_PYTHON"):
                monkeypatch.setenv(key, value)
        self.output = tmp_path / "out"
        self.scratch = tmp_path / "scratch"
        self.cache = tmp_path / "cache"

    def argv(self, *extra: str, compression: bool = True) -> list[str]:
        return ["--aspera-url", self.fake.link, "--output", str(self.output), "--temp_dir",
                str(self.scratch), "--cache_dir", str(self.cache), "--no-progress",
                "--stall-timeout", "1", "--retry-wait", "0.05",
                *(["--compression"] if compression else []), *extra]

    def run(self, *extra: str, compression: bool = True) -> int:
        return cli.main(self.argv(*extra, compression=compression))

    @property
    def archive(self) -> Path:
        return self.output / f"{NAME}.tar.xz"

    def expected(self) -> dict[str, str]:
        """Archive member -> MD5: the package's files (and its .sums) under <name>/."""
        found = {f"{NAME}/{'package-' if p == 'metadata.csv' else ''}{p}": md5(d)
                 for p, d in self.files.items()}
        found[f"{NAME}/{NAME}.sums"] = md5((self.dir / f"{NAME}.sums").read_bytes())
        return found

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in
                       sorted(self.cache.glob("logs/*.log")))

    def received(self) -> list[str]:
        """Every file the fake delivered (in part or whole), over all its runs."""
        return [d["path"] for run in self.fake.runs() for d in run.get("delivered", [])]


def archive_md5s(path: Path) -> dict[str, str]:
    with tarfile.open(path, "r:xz") as tar:
        return {m.name: md5(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}


def package_part(members: dict[str, str]) -> dict[str, str]:
    ours = {f"{NAME}/{n}" for n in ("LICENSE", "CITATION.md", "metadata.csv", "MD5SUMS")}
    return {name: digest for name, digest in members.items() if name not in ours}


def bytes_under(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class ScratchSampler(threading.Thread):
    """The bytes under a folder, as often as it can, until stopped: the most seen."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.peak, self.samples = folder, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, bytes_under(self.folder))
            self.samples += 1
            self.done.wait(0.002)            # a sampling interval, not a synchronisation

    def __enter__(self) -> "ScratchSampler":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()


def verify_and_extract(package: Package, tmp_path: Path, capsys) -> None:
    assert cli.main(["--verify", str(package.archive), "--cache_dir", str(package.cache)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": OK")
    extracted = tmp_path / "extracted"
    assert cli.main(["--extract", str(package.archive), "--output", str(extracted),
                     "--cache_dir", str(package.cache)]) == 0
    got = {str(p.relative_to(extracted)): md5(p.read_bytes())
           for p in extracted.rglob("*") if p.is_file()}
    assert package_part(got) == package.expected()
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=extracted / NAME, check=True)


# -- the whole path ---------------------------------------------------------------------------

def test_a_package_larger_than_the_temp_limit_is_one_verified_archive_within_the_bound(
        tmp_path, monkeypatch, capsys):
    peak = tmp_path / "fake-peak"
    package = Package(tmp_path, monkeypatch, package_files(slides=14, size=100 * KIB),
                      watch={"folder": str(tmp_path / "scratch"), "peak": str(peak)})
    limit = 600 * KIB
    total = sum(len(d) for d in package.files.values())
    assert total > 2 * limit
    with ScratchSampler(package.scratch) as sampler:
        assert package.run("--temp-limit", "600K") == 0
    assert sampler.samples > 50
    assert 0 < sampler.peak <= limit and 0 < int(peak.read_text()) <= limit
    assert package_part(archive_md5s(package.archive)) == package.expected()
    # received in parts (several ascli runs), each file once
    receives = [r for r in package.fake.runs() if r.get("command") == "receive"]
    assert len(receives) >= 4
    assert sorted(package.received()) == sorted(["/" + p for p in package.files] +
                                                [f"/{NAME}.sums"] * 2)   # (the plan's copy)
    assert all(r["argv"][:5] == ["--interactive=no", "--version-check-days=0",
                                 "--format=json", "--display=data", "--progress-bar=no"]
               for r in package.fake.runs() if r.get("command") in ("browse", "receive"))
    log = package.logs()
    assert "listing folder by folder" in log          # TCIA's 500 below the first level
    verify_and_extract(package, tmp_path, capsys)
    assert not list(package.scratch.glob(".tcia_downloader-*"))    # scratch released


def test_a_folder_tree_too_and_a_rerun_has_nothing_to_do(tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=4))
    assert package.run("--temp-limit", "400K", compression=False) == 0
    tree = package.output / NAME
    got = {f"{NAME}/{p.relative_to(tree)}": md5(p.read_bytes()) for p in tree.rglob("*")
           if p.is_file()}
    assert package_part(got) == package.expected()
    assert cli.main(["--verify", str(package.output), "--cache_dir", str(package.cache)]) == 0
    runs = len(package.fake.runs())
    assert package.run("--temp-limit", "400K", compression=False) == 0
    assert not any(r.get("command") == "receive" and r["paths"] != [f"/{NAME}.sums"]
                   for r in package.fake.runs()[runs:])
    assert f"{NAME} is finished; nothing to do" in package.logs()


# -- faults -------------------------------------------------------------------------------

FAULTS = {
    "refuse": "Session initiation failed",
    "mid-file-error": "Data transfer stopped",
    "hang": "stalled: less than 64 kB arrived in 1 s",
    "corrupt": "its MD5 is not the .sums'",
    "truncate": "bytes, its listing says",
    "extra-file": "not a file of the package's .sums",
}


def flat_files(slides: int = 3) -> dict[str, bytes]:
    """A package of one folder (its recursive listing works: fewer ascli runs)."""
    files = {f"slide-{n:02d}.svs": slide_bytes(n, 100 * KIB + n) for n in range(slides)}
    files.update({"clinical.csv": b"id,age\n1,50\n", "metadata.csv": b"their,own\n"})
    return files


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_receive_fault_ends_in_a_whole_archive(tmp_path, monkeypatch, kind):
    package = Package(tmp_path, monkeypatch, flat_files(),
                      faults=[{"kind": kind, "path": "slide-01", "times": 1}])
    assert package.run("--temp-limit", "600K") == 0
    assert package_part(archive_md5s(package.archive)) == package.expected()
    log = package.logs()
    assert FAULTS[kind] in log and "attempt 1/6 failed" in log
    if kind == "mid-file-error":                    # ascp resumed the .partial
        resumed = [r for run in package.fake.runs() for r in run.get("resumed", [])]
        assert resumed and resumed[0]["path"].endswith("slide-01.svs") and resumed[0]["from"] > 0
    if kind == "hang":                              # the hung ascli was ended, its group too
        hung = [run["pid"] for run in package.fake.runs() if run.get("hanging")]
        assert hung and not pid_alive(hung[0])


@pytest.mark.parametrize("kind", ["browse-timeout", "browse-hang"])
def test_a_recursive_listing_that_fails_is_done_folder_by_folder(tmp_path, monkeypatch, kind):
    package = Package(tmp_path, monkeypatch, flat_files(), faults=[{"kind": kind}])
    assert package.run() == 0
    assert "listing folder by folder" in package.logs()
    assert package_part(archive_md5s(package.archive)) == package.expected()


def test_a_fault_that_persists_is_exit_1_with_a_resumable_part_and_no_secret_anywhere(
        tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=4),
                      faults=[{"kind": "corrupt", "path": "slide-02", "times": -1}])
    assert package.run("--temp-limit", "400K", "--retries", "2") == errors.EXIT_INCOMPLETE
    part = package.output / f"{NAME}.tar.xz.part"
    failed = package.output / f"{NAME}.failed.tcia"
    assert part.is_file() and failed.is_file() and not package.archive.exists()
    committed = journal_files(package.output / f"{NAME}.tar.xz.journal")
    assert committed and not any("slide-02" in name for name in committed)
    link_secrets = parse_link(package.fake.link).secrets
    before = len(package.fake.runs())
    package.fake.set(faults=[])
    assert package.run("--temp-limit", "400K") == 0
    again = part_deliveries(package.fake.runs()[before:])
    assert not {f"/{name.split('/', 1)[1]}" for name in committed} & again
    assert package_part(archive_md5s(package.archive)) == package.expected()
    written = [package.logs(), failed.read_text() if failed.exists() else "",
               journal_dump(package.output / f"{NAME}.tar.xz.journal"),
               package.archive.read_bytes().decode("latin-1")]
    assert "2.25." in package.logs()            # (the failed part was named)
    written += [" ".join(run["argv"]) for run in package.fake.runs()]     # (and `ps`)
    for secret in link_secrets:
        assert all(secret not in text for text in written), secret


def test_ascli_4_26_1_and_later_name_the_known_500_and_the_pin(tmp_path, monkeypatch):
    package = Package(tmp_path, monkeypatch, package_files(slides=2), version="4.26.2")
    assert package.run() == errors.EXIT_USAGE
    log = package.logs()
    assert "500 Internal Server Error" in log and "gem install aspera-cli -v 4.26.0" in log
    assert not (package.output / f"{NAME}.tar.xz.part").exists()


# -- kills and signals ----------------------------------------------------------------------

def start_tool(package: Package, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *package.argv(*extra)],
                            env=package.fake.environ(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def hanging_pid(package: Package) -> int | None:
    hung = [run["pid"] for run in package.fake.runs() if run.get("hanging")]
    return hung[0] if hung else None


def test_kill_9_then_a_rerun_receives_no_committed_part_again(tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=6),
                      faults=[{"kind": "hang", "path": "slide-00", "times": 1}])
    tool = start_tool(package, "--temp-limit", "400K", "--workers", "1")
    journal = package.output / f"{NAME}.tar.xz.journal"
    wait_until(lambda: hanging_pid(package) is not None and len(journal_files(journal)) >= 3,
               timeout=60, what="committed parts, then the hang")
    committed = journal_files(journal)
    hung = hanging_pid(package)
    tool.kill()
    tool.wait()
    wait_until(lambda: not pid_alive(hung), timeout=10, what="the hung ascli to die with it")
    before = len(package.fake.runs())
    assert package.run("--temp-limit", "400K") == 0
    again = part_deliveries(package.fake.runs()[before:])
    assert not {f"/{name.split('/', 1)[1]}" for name in committed} & again
    assert package_part(archive_md5s(package.archive)) == package.expected()
    verify_and_extract(package, tmp_path, capsys)


def test_sigterm_ends_the_run_and_its_ascli_within_seconds(tmp_path, monkeypatch):
    package = Package(tmp_path, monkeypatch, package_files(slides=3),
                      faults=[{"kind": "hang", "path": "slide-01", "times": 1}])
    tool = start_tool(package, "--stall-timeout", "300")
    wait_until(lambda: hanging_pid(package) is not None, timeout=60, what="the hang")
    hung = hanging_pid(package)
    tool.send_signal(signal.SIGTERM)
    assert tool.wait(timeout=15) == errors.EXIT_SIGTERM
    assert not pid_alive(hung)
    assert (package.output / f"{NAME}.tar.xz.part").exists()


# -- what is refused, planned, said ---------------------------------------------------------

def test_hostile_paths_are_refused_reported_and_never_received(tmp_path, monkeypatch):
    files = package_files(slides=2)
    files.update({"Yale_HER2/bad\nname.txt": b"newline\n", "Yale_HER2/a\\b.txt": b"bs\n"})
    hostile_sums = "0123456789abcdef0123456789abcdef ../../outside.txt\n"
    package = Package(tmp_path, monkeypatch, files, listing_extra={
        "/": [{"path": "/../escape.bin", "basename": "escape.bin", "type": "file",
               "size": 3, "mtime": "x"}],
        "/Yale_HER2": [{"path": "Yale_HER2/../../evil.bin", "basename": "evil.bin",
                        "type": "symbolic_link", "size": "9",
                        "target": {"type": "file", "size": "5", "path": "/x"}}]})
    sums = package.dir / f"{NAME}.sums"
    sums.write_text(sums.read_text() + hostile_sums)
    assert package.run() == errors.EXIT_INCOMPLETE       # whole, but not all of the package
    members = archive_md5s(package.archive)
    safe = {k: v for k, v in package.expected().items() if "\n" not in k and "\\" not in k}
    safe[f"{NAME}/{NAME}.sums"] = md5(sums.read_bytes())
    assert package_part(members) == safe
    log = package.logs()
    for refused in ("../escape.bin", "Yale_HER2/../../evil.bin", "../../outside.txt",
                    "bad\\nname.txt", "a\\\\b.txt"):
        assert refused in log, refused
    requested = [p for run in package.fake.runs() for p in run.get("paths", [])]
    assert not [p for p in requested if ".." in p or "\n" in p or "\\" in p]
    outside = ("escape.bin", "evil.bin", "outside.txt")
    assert not [p for p in tmp_path.rglob("*") if p.name in outside]


def test_dry_run_says_files_bytes_largest_and_fit_and_writes_nothing(
        tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=3))
    assert package.run("--dry-run", "--temp-limit", "300K") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PatientID\t") and len(out) > 3
    assert all(line.split("\t")[8] == "to download" for line in out[1:])
    log = package.logs()
    assert "8 files, " in log and "largest file: Yale_HER2/SVS/slide-02.svs (155.6 kB)" in log
    assert "within --temp-limit 307.2 kB" in log and ": enough" in log
    assert not package.output.exists() or not any(package.output.iterdir())
    assert not [r for r in package.fake.runs() if r.get("command") == "receive" and
                r["paths"] != [f"/{NAME}.sums"]]


def test_a_file_larger_than_the_temp_limit_is_exit_2_before_any_part(tmp_path, monkeypatch,
                                                                     capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=2))
    assert package.run("--temp-limit", "100K") == errors.EXIT_USAGE
    assert "slide-01.svs is 154.6 kB: more than --temp-limit 102.4 kB allows" in \
        capsys.readouterr().err
    assert [r["paths"] for r in package.fake.runs() if r.get("command") == "receive"] == \
        [[f"/{NAME}.sums"]]


def test_missing_ascli_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=1))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert package.run() == errors.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gem install aspera-cli -v 4.26.0" in err[0]
    assert package.run("--ascli", str(tmp_path / "no-ascli")) == errors.EXIT_USAGE
    assert "--ascli" in capsys.readouterr().err


def test_a_damaged_archive_is_repaired_from_the_package(tmp_path, monkeypatch, capsys):
    package = Package(tmp_path, monkeypatch, package_files(slides=4))
    assert package.run("--temp-limit", "400K") == 0
    spans = xzread.xz_stream_spans(package.archive)
    start, end = spans[2]
    flip(package.archive, (start + end) // 2)
    assert cli.main(["--verify", str(package.archive), "--cache_dir", str(package.cache)]) == 1
    manifest = package.output / f"{NAME}.damaged.tcia"
    assert "1 damaged series are listed in" in capsys.readouterr().out
    assert package.run("--retry-failed", str(manifest), "--temp-limit", "400K") == 0
    assert package_part(archive_md5s(package.archive)) == package.expected()
    assert not manifest.exists()
    verify_and_extract(package, tmp_path, capsys)


# -- the pieces -----------------------------------------------------------------------------

def test_temp_limit_sizes_as_sbatch_writes_them():
    assert parse_size("500M") == 500 << 20 and parse_size("20G") == 20 << 30
    assert parse_size("1.5T") == int(1.5 * (1 << 40)) and parse_size("1048576") == 1 << 20
    assert parse_size("64k") == 64 << 10
    for bad in ("", "0", "1.5", "12X", "-3G", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert cli.main(["--aspera-url", "https://x/y?context=e30", "--temp-limit", "2Q"]) == \
        errors.EXIT_USAGE


def test_paths_sums_and_links():
    assert listed_path("/README.txt", "") == "README.txt"
    assert listed_path("Dir/a.svs", "Dir") == "Dir/a.svs"
    assert path_refusal("Dir/Sub/a b.svs") is None
    for bad in ("../x", "a/../x", "a//b", "./a", "a\tb", "a\\b", "/abs", "x.partial", ""):
        assert path_refusal(bad) is not None, bad
    sums = Sums()
    read_sums("D41D8CD98F00B204E9800998ECF8427E  ./a.txt\r\n"
              "0cc175b9c0f1b6a831c399e269772661 *b/c.txt\n"
              "not a line\n"
              "92eb5ffee6ae2fec3ad71c777531578f /d.txt\n", sums)
    assert sums.md5 == {"a.txt": "d41d8cd98f00b204e9800998ecf8427e",
                        "b/c.txt": "0cc175b9c0f1b6a831c399e269772661",
                        "d.txt": "92eb5ffee6ae2fec3ad71c777531578f"}
    assert sums.bad_lines == 1
    link = parse_link("https://faspex.example.org/aspera/faspex/public/package?context="
                      "eyJwYWNrYWdlX2lkIjoiNzYyIiwicGFzc2NvZGUiOiJzZWNyZXQtMTIzNCJ9")
    assert link.package_id == "762" and "secret-1234" in link.secrets
    for bad in ("http://x/?context=e30", "https://x/package", "https://x/?context=bm9wZQ"):
        with pytest.raises(errors.UsageError):
            parse_link(bad)


def test_parts_fit_their_budget_and_keep_whole_folders_whole():
    files = [PackageFile(f"A/big-{n}.bin", 100_000, "0" * 32) for n in range(5)] + \
        [PackageFile(f"A/small/{n}.txt", 10, "0" * 32) for n in range(3)] + \
        [PackageFile("root.txt", 5, "0" * 32)]
    budget = scratch_need(files[:2])
    parts = plan_parts(build_tree(files, [], ["A", "A/small"]), budget)
    assert sorted(f.path for p in parts for f in p.files) == sorted(f.path for f in files)
    assert all(scratch_need(p.files) <= budget for p in parts)
    small = next(p for p in parts if "small" in p.items)
    assert small.folder == "A" and small.remote_paths()[-1] == "/A/small"
    # a folder with a file left out is never asked for whole
    parts = plan_parts(build_tree(files, ["A/small/unlisted.txt"], ["A", "A/small"]), budget)
    assert not any("small" in p.items for p in parts)
    assert {p.uid("762") for p in parts} == {p.uid("762") for p in plan_parts(
        build_tree(files, ["A/small/unlisted.txt"], ["A", "A/small"]), budget)}
    many = [PackageFile(f"t/{n:05d}.txt", 1, "0" * 32) for n in range(2500)]
    parts = plan_parts(build_tree(many, ["t/left-out.txt"], ["t"]), 1 << 40)
    assert [len(p.items) for p in parts] == [1000, 1000, 500]      # ascli's command line


def test_ascli_error_lines_are_one_each():
    lines = ["WARN Resuming in 2 seconds (retry left:6)",
             "ERRR Rest: faspex.example.org 500 Internal Server Error",
             "Something went wrong",
             "Use option -h to get help.",
             "ERRR Transfer: Server aborted session: Session initiation failed"]
    assert [str(e) for e in error_lines(lines)] == [
        "Rest: faspex.example.org 500 Internal Server Error; Something went wrong",
        "Transfer: Server aborted session: Session initiation failed"]


# -- small helpers ------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                     # a zombie is dead: it only waits to be reaped
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def part_deliveries(runs: list[dict]) -> set[str]:
    """Files delivered by the receives of parts (not of the .sums each run plans from)."""
    return {d["path"] for run in runs if run.get("paths") != [f"/{NAME}.sums"]
            for d in run.get("delivered", [])}


def journal_files(path: Path) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return [f"{c}/{n}" for c, n in db.execute(
                "SELECT s.collection, f.name FROM files f JOIN series s ON s.uid = f.uid")]
        except sqlite3.OperationalError:
            return []


def journal_dump(path: Path) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return "\n".join(str(row) for table in ("meta", "series", "files")
                         for row in db.execute(f"SELECT * FROM {table}"))
