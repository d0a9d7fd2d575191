"""Helpers shared by more than one test module: runs of the tool, what an archive or a
tree holds, what a fake should have given, small DICOM/zip builders, a forward proxy.
Fixtures live in conftest.py; the fakes in fakes/."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import io
import os
import http.client
import http.server
import pty
import sqlite3
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import zipfile
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tcia_dl import cli, plan
from tcia_dl.formats import FORMATS, base as formats_base, codec_of
from tcia_dl.sources import nbia
from fakes.fake_nbia import dicom_file_bytes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tcia_downloader.py"

# The archive formats of the registry: tests of the archive run on each, so that a new
# format gets them by its registry line (and a line below, if standard tools read it).
ARCHIVE_FORMATS = [name for name, target in FORMATS.items() if target.codec is not None]

# How the standard tools read an archive of each codec: its own integrity test, tar's flag,
# and decompression to stdout. These are the users' tools: the archive must pass them.
STANDARD_TOOLS = {"xz": (["xz", "-t"], "-J", ["xz", "-dc"]),
                  "zstd": (["zstd", "-q", "-t"], "--zstd", ["zstd", "-q", "-dc"])}


# The quick path, requirements-test.txt alone, leaves out --mode idc's test packages and
# zstandard: their tests skip there, each saying what to install. CI installs
# requirements-dev.txt, and there a skip would hide a missing install: it fails instead.
IDC_TEST_MODULES = ("boto3", "moto", "duckdb")


def missing_modules(*names: str) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def skip_unless_ci(message: str, module: bool = False) -> None:
    """A test (or a whole module) that needs what the quick path leaves out."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=module)


def skip_without_idc_test_packages() -> None:
    """At the top of a module of --mode idc's tests (moto's S3 server, boto3, duckdb)."""
    missing = missing_modules(*IDC_TEST_MODULES)
    if missing:
        skip_unless_ci(f"{', '.join(missing)} not installed: pip install -r "
                       "requirements-dev.txt (or requirements-idc-test.txt)", module=True)


# -- runs of the tool and what they leave (were in test_downloader_e2e) ----------------

class Run:
    """One downloader run in this process, with its exit code and logs."""

    def __init__(self, tmp_path: Path, fake, *extra: str, collection: str = "DEMO",
                 compression: bool = True, output: Path | None = None, name: str = "run",
                 fmt: str | None = None):
        self.output = output or tmp_path / "out"
        self.cache = tmp_path / "cache"
        self.argv = [*(["--collection", collection] if collection else []),
                     "--output", str(self.output),
                     "--cache_dir", str(self.cache), "--api-url", fake.url, "--no-progress",
                     "--workers", "3", "--retry-wait", "0.05", "--stall-timeout", "1",
                     *(["--format", fmt] if fmt else ["--compression"] if compression else []),
                     *extra]
        before = set(self.cache.glob("logs/*-info.log"))
        self.code = cli.main(self.argv)
        new_logs = sorted(set(self.cache.glob("logs/*-info.log")) - before) or \
            sorted(self.cache.glob("logs/*-info.log"))
        self.log = new_logs[-1].read_text() if new_logs else ""


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def standard_tar(path: Path) -> tarfile.TarFile:
    """The archive as tarfile reads the tar that the codec's own command line tool
    decompresses from it (not our reader: the archive is for everybody's tools)."""
    _, _, decompress = STANDARD_TOOLS[codec_of(path).name]
    tar = subprocess.run([*decompress, str(path)], check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar))


def archive_members(path: Path) -> dict[str, str]:
    with standard_tar(path) as tar:
        return {m.name: md5(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}


def tree_members(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): md5(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def series_folders(members: dict[str, str]) -> dict[str, list[str]]:
    """series folder -> sorted MD5s of its DICOM files (file names depend on the endpoint)."""
    folders: dict[str, list[str]] = defaultdict(list)
    for name, digest in members.items():
        if name.count("/") == 4:          # <Collection>/<patient>/<study>/<series>/<file>
            folders[name.rsplit("/", 1)[0]].append(digest)
    return {folder: sorted(d) for folder, d in folders.items()}


def expected_folders(fake, collection: str = "DEMO") -> dict[str, list[str]]:
    planned = plan.plan_collection(collection, fake.series(collection))
    return {f"{collection}/{p.path}": sorted(md5(data) for _, data in fake.instances(p.uid))
            for p in planned}


def verify_with_standard_tools(archive: Path, tmp_path: Path, collection: str = "DEMO") -> None:
    test, flag, _ = STANDARD_TOOLS[codec_of(archive).name]
    subprocess.run([*test, str(archive)], check=True)
    subprocess.run(["tar", flag, "-tf", str(archive)], check=True, capture_output=True)
    extract = tmp_path / f"extract-{archive.stem}"
    extract.mkdir()
    subprocess.run(["tar", flag, "-xf", str(archive), "-C", str(extract)], check=True)
    subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=extract / collection, check=True)


def journal_uids(output: Path, name: str = "DEMO.tar.xz.journal") -> set[str]:
    path = output / name
    if not path.exists():
        return set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return {uid for (uid,) in db.execute("SELECT uid FROM series")}
        except sqlite3.OperationalError:       # created but the schema is not there yet
            return set()


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def terminal_screen(argv: list[str]) -> tuple[int, str]:
    """What a 100-column terminal (a pty) shows of a run, and its exit code."""
    primary, secondary = pty.openpty()
    # A fresh pty is 0 columns wide; a user's terminal is not.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:                 # the terminal closed: the process is gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    return process.wait(timeout=60), screen.decode("utf-8", "replace")


def tool_arguments(fake, output: Path, cache: Path, *extra: str,
                   fmt: str = "tar.xz") -> list[str]:
    """The tool's command line (without the interpreter) of start_subprocess."""
    return [str(SCRIPT), "--collection", "DEMO", "--output", str(output), "--cache_dir",
            str(cache), "--api-url", fake.url, "--no-progress", "--format", fmt, "--workers",
            "2", "--retry-wait", "0.05", "--stall-timeout", "5", *extra]


def start_subprocess(fake, output: Path, cache: Path, *extra: str,
                     fmt: str = "tar.xz") -> subprocess.Popen:
    argv = [sys.executable, *tool_arguments(fake, output, cache, *extra, fmt=fmt)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# -- zips and series without a server (were in dicom_helpers, test_archive) ------------

def dicom_bytes(series_uid: str, instance: int) -> bytes:
    """pydicom's CT_small.dcm re-labelled as instance `instance` of `series_uid`."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = f"{series_uid}.{instance}"
    dataset.InstanceNumber = instance
    return dicom_file_bytes(dataset)


def write_series_zip(path: Path, files: dict[str, bytes], *, listed: dict[str, str] | None = None,
                     license_text: str | None = "License Information. Test.",
                     with_md5_table: bool = True) -> Path:
    """A zip laid out like NBIA's: LICENSE first, the files, md5hashes.csv last.
    `listed` overrides the md5hashes.csv rows (default: every file with its true MD5)."""
    rows = listed if listed is not None else {name: md5(data) for name, data in files.items()}
    with zipfile.ZipFile(path, "w") as archive:
        if license_text is not None:
            archive.writestr("LICENSE", license_text)
        for name, data in files.items():
            archive.writestr(name, data)
        if with_md5_table:
            table = "Filename,MD5Hash\n" + "".join(f"{n},{h}\n" for n, h in rows.items())
            archive.writestr("md5hashes.csv", table)
    return path


def planned(uid: str, path: str, count: int | None = 2, collection: str = "COLL") -> plan.PlannedSeries:
    return plan.PlannedSeries(uid=uid, collection=collection, path=path,
                            record={"SeriesInstanceUID": uid, "PatientID": path.split("/")[0],
                                    "LicenseName": "CC BY 4.0"},
                            image_count=count, file_size=0)


def two_file_series(tmp_path: Path, uid: str) -> tuple[Path, dict[str, bytes]]:
    files = {"1-1.dcm": dicom_bytes(uid, 1), "1-2.dcm": dicom_bytes(uid, 2)}
    return write_series_zip(tmp_path / f"{uid}.zip", files), files


def commit_series(target: formats_base.Target, tmp_path: Path, uid: str, path: str) -> dict[str, bytes]:
    zip_path, files = two_file_series(tmp_path, uid)
    series = planned(uid, path)
    packer = target.packer(series, zip_path)
    verified = nbia.verify_zip(zip_path, series, packer)
    target.commit(series, verified, packer.finish())
    packer.discard()
    return {f"COLL/{path}/{name}": data for name, data in files.items()}


def member_md5s(archive: Path) -> dict[str, str]:
    return archive_members(archive)


# -- a damaged archive (were in test_repair) -------------------------------------------

def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def extract_series(archive: Path, uid: str, tmp_path: Path) -> dict[str, str]:
    """--extract of one series of an archive (by its UID) into tmp_path/alone, which must
    succeed; what it wrote, name -> MD5."""
    alone = tmp_path / "alone"
    assert cli.main(["--extract", str(archive), "--series-uid", uid, "--output", str(alone),
                     "--cache_dir", str(tmp_path / "cache")]) == 0
    return tree_members(alone)


def of_series(members: dict[str, str], folder: str) -> dict[str, str]:
    """The members of one series folder (<Collection>/<path>) and the collection files."""
    return {name: md5 for name, md5 in members.items()
            if name.startswith(f"{folder}/") or name.count("/") == 1}


def verify(path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(["--verify", str(path), "--cache_dir", str(path.parent / "vcache")])
    return code, capsys.readouterr().out.splitlines()


# -- a forward proxy (were in test_selection) ------------------------------------------

class ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP forward proxy on 127.0.0.1 that counts what passes through it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), ForwardProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ForwardProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def relay(self) -> None:
        target = urlsplit(self.path)                     # absolute URI: a proxy request
        self.server.seen.append(f"{self.command} {target.path}")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)}
        upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""),
                         body=body or None, headers=headers)
        pass_answer_on(self, upstream)

    do_GET = do_POST = relay


def pass_answer_on(handler: http.server.BaseHTTPRequestHandler,
                   upstream: http.client.HTTPConnection) -> None:
    """The upstream's answer to the request just sent, whole, as the handler's answer."""
    answer = upstream.getresponse()
    content = answer.read()
    handler.send_response(answer.status)
    for key, value in answer.getheaders():
        if key.lower() not in ("transfer-encoding", "content-length", "connection"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(content)))
    handler.end_headers()
    handler.wfile.write(content)
    upstream.close()


# -- IDC runs (were in test_idc) -------------------------------------------------------

WITHOUT_THE_INDEX_PACKAGE = sys.version_info < (3, 10)

# Three Prostate-3T patients (one 15-24-instance MR series each) of fake_s3's rows.
PATIENTS = ("Prostate3T-01-0001", "Prostate3T-01-0002", "Prostate3T-01-0003")


class _NoNbia:
    """--api-url for runs that must never ask NBIA: a port nothing listens on."""
    url = "http://127.0.0.1:9/nbia-api/services/v4/"


def old_pythons() -> list[Path]:
    """RHEL 8's python3 is 3.6: pyenv's 3.6 to 3.8 on this machine kind. None there: a
    skip, which CI (CI=true) turns into a failure."""
    import pytest
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    pythons = sorted(p for version in ("3.6", "3.7", "3.8")
                     for p in root.glob(f"{version}.*/bin/python3"))
    if not pythons:
        if os.environ.get("CI") == "true":
            pytest.fail("no Python 3.6-3.8 under pyenv to check the version message with")
        pytest.skip("no Python 3.6-3.8 under pyenv")
    return pythons


# -- the sbatch template ----------------------------------------------------------------------

TEMPLATE = ROOT / "tcia_downloader_hpc.sh"


def template_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The template's settings; PYTHON is the interpreter running the tests, whose venv
    need not be on PATH (the template's default, python3 from PATH, may lack the packages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("TMPDIR", None)
    env.update(COLLECTION="DEMO", OUTPUT_DIR=str(tmp_path / "out"), CACHE_DIR=str(tmp_path / "cache"),
               TEMP_DIR=str(tmp_path / "scratch"), PYTHON=sys.executable)
    env.update(extra)
    return env


# -- the .pyz (tools/build_pyz.py) ------------------------------------------------------------

PYZ_BUILDER = ROOT / "tools" / "build_pyz.py"


def pyz_interpreter() -> list[str]:
    """The Python that runs the .pyz, with its flags: TCIA_PYZ_PYTHON (CI: a bare venv of
    3.9 or 3.13), else this one with -S, so that none of this venv's packages is on its path:
    what the tool imports, the .pyz must bring."""
    bare = os.environ.get("TCIA_PYZ_PYTHON")
    return [bare] if bare else [sys.executable, "-S"]


def pyz_env(shiv_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(SHIV_ROOT=str(shiv_root), **extra)
    return env


def run_pyz(pyz: Path, shiv_root: Path, *argv: str, cwd: Path, python=None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*(python or pyz_interpreter()), str(pyz), *argv], cwd=cwd,
                          env=pyz_env(shiv_root), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)

