"""Tests of the stand-in ascli (tests/fakes/fake_ascli.py, run as tests/fakes/bin/ascli): the
command lines tcia_downloader runs, parsed as aspera-cli parses them, ascli's output shapes,
ascp's .partial/.aspera-ckpt files and their resume, and every fault it can be told to make.

Each test runs the wrapper on PATH in a subprocess, as the tool does, and fails if the
behaviour it names broke."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fakes.fake_ascli import FakeAscli, parse_command_line, public_link, split_arguments, \
    write_package

COMMON = ["--interactive=no", "--version-check-days=0", "--format=json", "--display=data",
          "--progress-bar=no"]
FILES = {"Cohort/slides/a.svs": bytes(range(256)) * 800,          # 204,800 bytes
         "Cohort/slides/b.svs": b"B" * 70_000,
         "Cohort/tables/clinical.csv": b"id,age\n1,50\n",
         "README.txt": b"read me\n"}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def fake(tmp_path: Path) -> FakeAscli:
    package = write_package(tmp_path / "package", FILES, sums_name="PKG_v1.sums")
    return FakeAscli(tmp_path / "fake", package, chunk=16 * 1024)


def ascli(fake: FakeAscli, *argv: str, url: bool = True, timeout: float = 30,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = fake.environ()
    if url:
        environ["ASCLI_URL"] = fake.link
    environ.update(env or {})
    return subprocess.run(["ascli", *argv], env=environ, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def browse(fake: FakeAscli, *argv: str, **kw) -> subprocess.CompletedProcess:
    return ascli(fake, *COMMON, "faspex5", "packages", "browse", *argv, **kw)


def receive(fake: FakeAscli, to: Path, *paths: str, **kw) -> subprocess.CompletedProcess:
    return ascli(fake, *COMMON, "faspex5", "packages", "receive", f"--to-folder={to}",
                 *paths, **kw)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# -- the command line ----------------------------------------------------------------------

def test_version_and_the_wrapper_on_path(fake):
    done = ascli(fake, "--version", url=False)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "4.26.0", "")
    fake.set(version="4.26.2")
    assert ascli(fake, "-v", url=False).stdout.strip() == "4.26.2"


def test_options_stand_anywhere_and_the_link_may_come_from_the_environment(fake):
    first = browse(fake, "/")
    anywhere = ascli(fake, "faspex5", "--format=json", "packages", "--interactive=no",
                     "browse", "--display=data", "/", "--progress-bar=no",
                     "--version-check-days=0", url=False, env={"ASCLI_URL": fake.link})
    on_the_line = ascli(fake, *COMMON, f"--url={fake.link}", "faspex5", "packages", "browse",
                        "/", url=False)
    assert first.returncode == anywhere.returncode == on_the_line.returncode == 0
    assert json.loads(first.stdout) == json.loads(anywhere.stdout) == \
        json.loads(on_the_line.stdout)


def test_a_value_after_a_space_is_not_the_options_value_as_in_ascli(fake, tmp_path):
    # ascli moves VALUE to the positional arguments, and OptionParser takes the next option
    # as --to-folder's value: the receive cannot go where it was asked to.
    options, arguments = split_arguments(["--to-folder", "/x", "--format=json", "faspex5"])
    assert options == ["--to-folder", "--format=json"] and arguments == ["/x", "faspex5"]
    line = parse_command_line(["--to-folder", "/x", "--format=json"], {})
    assert line.options == {"to-folder": "--format=json"} and line.arguments == ["/x"]
    done = ascli(fake, *COMMON, "faspex5", "packages", "receive", "/README.txt",
                 "--to-folder", str(tmp_path / "dest"))
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == \
        "ERRR Other(OptionParser::MissingArgument): missing argument: --to-folder"
    assert not (tmp_path / "dest").exists()


def test_an_unknown_option_runs_the_command_then_fails_as_ascli_does(fake, tmp_path):
    done = receive(fake, tmp_path / "dest", "/README.txt", "--no-such-option=1")
    assert done.returncode == 1
    assert json.loads(done.stdout) == [{"package": "762", "status": "success"}]
    assert done.stderr.splitlines() == [
        'ERRR Argument: unprocessed options: ["--no-such-option=1"]']
    assert files_in(tmp_path / "dest") == {"README.txt": FILES["README.txt"]}


def test_bad_values_and_missing_link_are_errors(fake):
    assert browse(fake, "/", "--interactive=maybe").stderr.startswith(
        "ERRR Argument: unknown value for interactive: maybe")
    done = ascli(fake, *COMMON, "faspex5", "packages", "browse", url=False)
    assert (done.returncode, done.stderr.strip()) == (1, "ERRR Missing: Missing mandatory "
                                                         "option: url")
    wrong = public_link("762", "not-the-passcode")
    done = browse(fake, "/", env={"ASCLI_URL": wrong})
    assert done.returncode == 1 and done.stderr.startswith(
        "ERRR Rest: faspex.example.org 401 Unauthorized")
    assert browse(fake, "/", "/extra").stderr.strip() == \
        'ERRR Argument: unprocessed values: ["/extra"]'


# -- browse --------------------------------------------------------------------------------

def test_root_listing_has_leading_slashes_links_and_string_sizes(fake):
    done = browse(fake, "/")
    assert done.returncode == 0 and done.stdout.startswith('[{"path":"/Cohort"')
    items = {item["path"]: item for item in json.loads(done.stdout)}
    assert set(items) == {"/Cohort", "/PKG_v1.sums", "/README.txt"}
    assert items["/Cohort"]["type"] == "directory"
    assert items["/PKG_v1.sums"]["type"] == "file" and isinstance(items["/PKG_v1.sums"]["size"],
                                                                  int)
    readme = items["/README.txt"]
    assert readme["type"] == "symbolic_link" and readme["target"]["type"] == "file"
    assert readme["target"]["size"] == str(len(FILES["README.txt"]))
    assert readme["size"] != readme["target"]["size"]      # the link's own size is no use


def test_sub_folder_listing_has_no_leading_slash_and_a_folder_without_one_is_a_500(fake):
    items = json.loads(browse(fake, "/Cohort/slides").stdout)
    assert [i["path"] for i in items] == ["Cohort/slides/a.svs", "Cohort/slides/b.svs"]
    assert [i["target"]["size"] for i in items] == ["204800", "70000"]
    done = browse(fake, "Cohort/slides")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.strip() == "ERRR Rest: faspex.example.org 500 Internal Server Error"


def test_recursive_browse_fails_below_the_first_level_as_at_tcia(fake, tmp_path):
    query = '--query=@json:{"recursive":true}'
    done = browse(fake, query, "/")
    assert done.returncode == 1 and "500 Internal Server Error" in done.stderr
    flat = write_package(tmp_path / "flat", {"a.bin": b"a", "b.bin": b"b"})
    fake.set(package_dir=str(flat))
    done = browse(fake, query, "/")
    assert done.returncode == 0
    assert [i["path"] for i in json.loads(done.stdout)] == ["/PKG.sums", "/a.bin", "/b.bin"]


def test_recursive_browse_timeout_and_hang_faults(fake):
    fake.set(faults=[{"kind": "browse-timeout"}, {"kind": "browse-hang"}])
    query = '--query=@json:{"recursive":true}'
    done = browse(fake, query, "/")
    assert done.stderr.strip() == \
        "ERRR Other(Net::ReadTimeout): Net::ReadTimeout with #<TCPSocket:(closed)>"
    with pytest.raises(subprocess.TimeoutExpired):
        browse(fake, query, "/", timeout=1)
    assert browse(fake, "/").returncode == 0        # not recursive: no fault applies


def test_browse_error_fault_and_listing_extra(fake):
    fake.set(faults=[{"kind": "browse-error", "path": "/Cohort", "times": 2}],
             listing_extra={"/": [{"path": "/../escape", "basename": "escape",
                                   "type": "file", "size": 1, "mtime": "x"}]})
    assert browse(fake, "/Cohort").returncode == 1
    assert browse(fake, "/Cohort").returncode == 1
    assert browse(fake, "/Cohort").returncode == 0
    assert json.loads(browse(fake, "/").stdout)[-1]["path"] == "/../escape"


# -- receive -------------------------------------------------------------------------------

def test_receive_of_paths_flattens_and_of_nothing_keeps_the_tree(fake, tmp_path):
    done = receive(fake, tmp_path / "a", "/Cohort/slides/b.svs", "/Cohort/tables")
    assert done.returncode == 0 and done.stdout.strip() == \
        '[{"package":"762","status":"success"}]'
    assert files_in(tmp_path / "a") == {"b.svs": FILES["Cohort/slides/b.svs"],
                                        "tables/clinical.csv": FILES["Cohort/tables/clinical.csv"]}
    assert receive(fake, tmp_path / "b").returncode == 0
    whole = files_in(tmp_path / "b")
    assert {k: v for k, v in whole.items() if not k.endswith(".sums")} == FILES
    assert whole["PKG_v1.sums"].decode().splitlines()[0] == \
        f"{md5(FILES['README.txt'])} README.txt"
    assert receive(fake, tmp_path / "c", "Cohort/tables").returncode == 1   # no leading /


def test_versions_from_4_26_1_get_a_500_for_a_partial_receive(fake, tmp_path):
    fake.set(version="4.26.1")
    done = receive(fake, tmp_path / "a", "/README.txt")
    assert done.returncode == 1 and done.stderr.strip() == \
        "ERRR Rest: faspex.example.org 500 Internal Server Error"
    assert receive(fake, tmp_path / "b").returncode == 0          # the whole package: fine
    fake.set(version="4.26.0")
    assert receive(fake, tmp_path / "a", "/README.txt").returncode == 0


def test_mid_file_error_leaves_partial_and_checkpoint_and_the_rerun_resumes(fake, tmp_path):
    fake.set(faults=[{"kind": "mid-file-error", "path": "a.svs"}])
    dest = tmp_path / "dest"
    done = receive(fake, dest, "/Cohort/slides")
    assert done.returncode == 1 and done.stderr.startswith("ERRR Transfer: Data transfer "
                                                           "stopped")
    left = sorted(p.name for p in (dest / "slides").iterdir())
    assert left == ["a.svs.aspera-ckpt", "a.svs.partial"]
    assert (dest / "slides" / "a.svs.partial").stat().st_size == 102_400
    assert receive(fake, dest, "/Cohort/slides").returncode == 0
    assert files_in(dest) == {"slides/a.svs": FILES["Cohort/slides/a.svs"],
                              "slides/b.svs": FILES["Cohort/slides/b.svs"]}
    last = fake.runs()[-1]
    assert last["resumed"] == [{"path": "/Cohort/slides/a.svs", "from": 102_400}]
    assert last["delivered"][0] == {"path": "/Cohort/slides/a.svs", "from": 102_400,
                                    "bytes": 102_400}
    # whole files are skipped by a rerun
    assert receive(fake, dest, "/Cohort/slides").returncode == 0
    assert fake.runs()[-1]["delivered"] == []


def test_corrupt_and_truncated_files_are_reported_as_received(fake, tmp_path):
    fake.set(faults=[{"kind": "corrupt", "path": "a.svs"}, {"kind": "truncate",
                                                            "path": "b.svs"}])
    done = receive(fake, tmp_path / "d", "/Cohort/slides")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["status"] == "success"
    got = files_in(tmp_path / "d")
    a, b = got["slides/a.svs"], got["slides/b.svs"]
    assert len(a) == len(FILES["Cohort/slides/a.svs"]) and md5(a) != \
        md5(FILES["Cohort/slides/a.svs"])
    assert b == FILES["Cohort/slides/b.svs"][:35_000]


def test_refused_session_and_extra_file(fake, tmp_path):
    fake.set(faults=[{"kind": "refuse", "times": 1}, {"kind": "extra-file"}])
    done = receive(fake, tmp_path / "d", "/README.txt")
    assert done.returncode == 1 and done.stderr.strip() == \
        "ERRR Transfer: Server aborted session: Session initiation failed"
    assert not (tmp_path / "d").exists()
    assert receive(fake, tmp_path / "d", "/README.txt").returncode == 0
    assert sorted(files_in(tmp_path / "d")) == ["README.txt", "unlisted-extra.bin"]


def test_a_hanging_receive_writes_nothing_and_ends_only_when_killed(fake, tmp_path):
    fake.set(faults=[{"kind": "hang", "path": "b.svs"}])
    environ = fake.environ()
    environ["ASCLI_URL"] = fake.link
    process = subprocess.Popen(["ascli", *COMMON, "faspex5", "packages", "receive",
                                f"--to-folder={tmp_path / 'd'}", "/Cohort/slides"],
                               env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
        hanging = [r for r in fake.runs() if r.get("hanging")]
        assert hanging and hanging[0]["hanging"] == "/Cohort/slides/b.svs"
        assert not (tmp_path / "d" / "slides" / "b.svs.partial").exists()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_faults_are_counted_across_runs_and_the_watch_keeps_the_peak(fake, tmp_path):
    peak = tmp_path / "peak"
    fake.set(faults=[{"kind": "corrupt", "path": "README", "times": 2}],
             watch={"folder": str(tmp_path), "peak": str(peak)})
    outcomes = []
    for n in range(3):
        receive(fake, tmp_path / f"d{n}", "/README.txt")
        outcomes.append(files_in(tmp_path / f"d{n}")["README.txt"] == FILES["README.txt"])
    assert outcomes == [False, False, True]
    assert int(peak.read_text()) >= len(FILES["README.txt"])


def test_table_output_without_format_json(fake):
    done = ascli(fake, "--interactive=no", "faspex5", "packages", "browse", "/")
    assert done.returncode == 0 and not done.stdout.startswith("[")
    assert done.stdout.splitlines()[0].startswith("basename | mtime")
