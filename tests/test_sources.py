"""Sources as registry entries: --mode, its help and its errors come from sources.registry; a
source added there with nothing else is planned, dry-run and retried; the flags an output
records never hold a password or a token."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcia_dl import cli, errors
from tcia_dl.errors import FatalRunError, SeriesUnavailable, UsageError
from tcia_dl.sources import registry
from tcia_dl.sources.base import Selected, SourceEntry
from helpers import SCRIPT

# -- a source that is nothing but a registry entry --------------------------------------------


@dataclass(frozen=True)
class DummySettings:
    records: Path          # --dummy-records: the series records, a JSON list


class DummySource:
    """Series records from a JSON file; it serves no images."""

    name = "dummy"
    scratch_suffix = ".dummy"

    def __init__(self, path: Path):
        self.path = path
        self._records = [{**r, "Source": "dummy"} for r in json.loads(path.read_text())]

    def describe(self) -> str:
        return f"dummy records from {self.path}"

    def secrets(self) -> list[str]:
        return []

    def report_lines(self, done) -> list[str]:
        return [f"  served by the dummy:          {sum(o.source == 'dummy' for o in done)}"]

    def collections(self) -> list[str]:
        return sorted({r["Collection"] for r in self._records})

    def records(self, selection) -> Selected:
        rows = [r for r in self._records if selection.collection in (None, r["Collection"])]
        if not rows:
            raise FatalRunError("no dummy record matches", errors.EXIT_USAGE)
        return Selected(rows, [], [])

    def fetch(self, series, scratch, count, pack, stop):
        raise SeriesUnavailable("the dummy source serves no images")

    def reach(self, series) -> None:
        """Nothing to reach: the records are a local file."""

    def close(self) -> None:
        pass


def add_dummy_flags(group) -> None:
    group.add_argument("--dummy-records", metavar="FILE.json",
                       help="--mode dummy: the series records, a JSON list")


def dummy_settings(args, origin) -> DummySettings:
    path = args.dummy_records or origin.get("dummy-records")
    if not path or not Path(path).is_file():
        raise UsageError("--mode dummy needs --dummy-records FILE.json")
    return DummySettings(Path(path))


DUMMY = SourceEntry(
    name="dummy", help="records from a JSON file", title="dummy", add_flags=add_dummy_flags,
    settings=dummy_settings, open=lambda settings, network, stop: DummySource(settings.records),
    provenance=lambda settings: {"dummy-records": str(settings.records.resolve())})

RECORDS = [
    {"Collection": "DUMMY", "PatientID": "P1", "StudyInstanceUID": "1.2.3",
     "SeriesInstanceUID": "1.2.3.1", "Modality": "CT", "SeriesDescription": "head",
     "StudyDate": "01-02-2003", "ImageCount": 2, "FileSize": 1000},
    {"Collection": "DUMMY", "PatientID": "P2", "StudyInstanceUID": "1.2.4",
     "SeriesInstanceUID": "1.2.4.1", "Modality": "MR", "SeriesDescription": "knee",
     "StudyDate": "01-02-2004", "ImageCount": 3, "FileSize": 3000},
]


@pytest.fixture
def with_dummy(monkeypatch, tmp_path) -> Path:
    """The registry with the dummy added (one line, as a new source adds itself), and its
    records file."""
    monkeypatch.setattr(registry, "SOURCES", (*registry.SOURCES, DUMMY))
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    return records


def dummy_argv(tmp_path: Path, records: Path, *extra: str) -> list[str]:
    return ["--mode", "dummy", "--dummy-records", str(records), "--collection", "DUMMY",
            "--output", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--no-progress", "--retries", "1", *extra]


# -- --mode comes from the registry ----------------------------------------------------------

def test_mode_help_lists_every_registered_source_and_the_default():
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, check=True).stdout
    assert "--mode {nbia,idc,auto,aspera}" in text
    assert unwrapped("where series come from: nbia (TCIA's NBIA v4), idc (NCI's "
                     "Imaging Data Commons: public S3 buckets and an offline index; needs "
                     "requirements-idc.txt), auto (IDC first, NBIA for what IDC cannot serve), "
                     "aspera (TCIA's IBM Aspera Faspex packages") in unwrapped(text)
    assert unwrapped("default: auto when IDC's requirements are installed, else nbia "
                     "($TCIA_MODE sets another)") in unwrapped(text)


def unwrapped(text: str) -> str:
    """Help text without its line breaks and spaces: argparse wraps at hyphens too."""
    return "".join(text.split())


def test_a_registered_source_gets_mode_its_help_its_flags_and_the_errors(with_dummy, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = unwrapped(capsys.readouterr().out)
    assert unwrapped("--mode {nbia,idc,auto,aspera,dummy}") in text
    assert unwrapped("needs IBM's ascli), dummy (records from a JSON file)") in text
    assert unwrapped("dummy: --dummy-records FILE.json --mode dummy: the series records") in text
    with pytest.raises(UsageError, match=r"^--mode s3: choose nbia, idc, auto, aspera or dummy$"):
        cli.parse_options(["--collection", "X", "--mode", "s3"])
    with pytest.raises(UsageError, match="needs --dummy-records"):
        cli.parse_options(["--collection", "X", "--mode", "dummy"])


def test_an_unregistered_mode_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["--collection", "X", "--mode", "dummy"]) == errors.EXIT_USAGE
    assert capsys.readouterr().err == \
        "tcia_downloader: error: --mode dummy: choose nbia, idc, auto or aspera\n"


def test_a_source_that_is_only_a_registry_entry_plans_dry_runs_and_is_retried(
        with_dummy, tmp_path, capsys):
    records = with_dummy
    assert cli.main(dummy_argv(tmp_path, records, "--dry-run")) == errors.EXIT_OK
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert sorted((row[4], row[7], row[8]) for row in rows[1:]) == \
        [("1.2.3.1", "dummy", "to download"), ("1.2.4.1", "dummy", "to download")]

    # A run: its series fail (no images), its report has the dummy's own line, and its
    # failure list records where they came from, so --retry-failed needs no other flag.
    assert cli.main(dummy_argv(tmp_path, records)) == errors.EXIT_INCOMPLETE
    info = "".join(path.read_text() for path in (tmp_path / "cache").glob("logs/*-info.log"))
    assert "served by the dummy:          0" in info
    manifest = tmp_path / "out" / "DUMMY.failed.tcia"
    header = manifest.read_text()
    assert f"tcia_downloader.dummy-records={records.resolve()}" in header
    assert "tcia_downloader.mode=dummy" in header
    assert "api-url" not in header and "downloadServerUrl" not in header
    again = cli.parse_options(["--retry-failed", str(manifest)])
    assert (again.mode, again.source) == ("dummy", DummySettings(records.resolve()))


# -- what an output records of its source ----------------------------------------------------

SECRETS = ("hunter2", "url-pass", "secret-key", "tok3n", "me:")


def test_a_source_announced_but_not_here_says_so(monkeypatch):
    monkeypatch.setattr(registry, "NOT_YET", ("s5",))
    with pytest.raises(UsageError, match=r"^--mode s5 is not available in this version; use "
                                         r"--mode nbia, idc, auto or aspera$"):
        cli.parse_options(["--collection", "X", "--mode", "s5"])


# (a Faspex link's context: {"package_id": "762", "passcode": "url-pass"})
LINK = ("https://faspex.example.org/aspera/faspex/public/package?context="
        "eyJwYWNrYWdlX2lkIjogIjc2MiIsICJwYXNzY29kZSI6ICJ1cmwtcGFzcyJ9")


@pytest.mark.parametrize("mode", [entry.name for entry in registry.SOURCES])
def test_no_source_records_a_password_or_a_token(mode, tmp_path, monkeypatch):
    index = tmp_path / "index.parquet"
    index.write_bytes(b"PAR1")
    monkeypatch.setenv("TCIA_PASSWORD", "hunter2")
    what = ["--aspera-url", LINK] if mode == "aspera" else ["--collection", "X"]
    options = cli.parse_options([
        *what, "--output", str(tmp_path), "--mode", mode,
        "--idc-index", str(index),
        "--idc-endpoint", "http://key:secret-key@127.0.0.1:9/s3?X-Amz-Security-Token=tok3n",
        "--api-url", "https://me:url-pass@nbia.example.org/nbia-api/services/v4/?token=tok3n",
        "--user", "me"])
    entry = registry.source_named(mode)
    recorded = entry.provenance(options.source)
    assert recorded and not any(secret in value for value in recorded.values()
                                for secret in SECRETS)
    assert "hunter2" not in repr(options)     # the debug log prints the options (and masks
    #                                           a URL's user:password, whoever's it is)
    # ... and the password is kept out of the logs before the source is even open
    assert ("hunter2" in entry.secrets(options.source)) == (mode in ("nbia", "auto"))
    if mode == "aspera":                    # a Faspex link's passcode is its secret
        assert "url-pass" in entry.secrets(options.source)
        assert "url-pass" not in repr(options) and LINK not in repr(options)
