"""Shared fixtures: a fake NBIA v4 server on 127.0.0.1 (see tests/fakes/fake_nbia.py), a fake
of IDC's S3 buckets (tests/fakes/fake_s3.py), and a finished archive with a damaged series.
Helpers (plain functions and classes) are in tests/helpers.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # `import fakes`, `helpers` anywhere

from fakes.fake_nbia import FakeNbia  # noqa: E402
from fakes.fake_s3 import FakeS3  # noqa: E402
from helpers import (ARCHIVE_FORMATS, PYZ_BUILDER, Run, archive_members, flip,  # noqa: E402
                     skip_unless_ci, verify)
from tcia_dl import errors, journal as journal_module, plan, trust  # noqa: E402
from tcia_dl.formats import FORMATS, xz as xzread  # noqa: E402
from tcia_dl.formats.base import Target  # noqa: E402

# Tests talk only to servers they start: no run (in this process, in a subprocess or in a
# slurm job, which inherit the environment) asks doi.org for BibTeX unless a test points
# --doi-resolver at its own server.
os.environ["TCIA_DOI_RESOLVER"] = "none"
# The tests written for NBIA keep meaning NBIA now that the default --mode is auto wherever
# IDC's requirements are installed (IDC first: real AWS buckets). The tests of the default
# itself unset it (tests/test_manifests.py).
os.environ["TCIA_MODE"] = "nbia"


@pytest.fixture(params=ARCHIVE_FORMATS)
def archive_format(request) -> type[Target]:
    """Each archive format of the registry in turn (its Target class); one this Python
    cannot write (tar.zst without zstandard, on the quick path) is skipped, saying why."""
    missing = FORMATS[request.param].missing()
    if missing:
        skip_unless_ci(missing)
    return FORMATS[request.param]


@pytest.fixture
def fake_nbia_factory() -> Iterator[Callable[..., FakeNbia]]:
    """``fake = fake_nbia_factory(**FakeConfig overrides)``: a started server, stopped at teardown."""
    started: list[FakeNbia] = []

    def make(**overrides: Any) -> FakeNbia:
        fake = FakeNbia(**overrides).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake_nbia(fake_nbia_factory: Callable[..., FakeNbia]) -> FakeNbia:
    """A started FakeNbia with the default configuration."""
    return fake_nbia_factory()


@pytest.fixture
def fake_s3() -> Iterator[FakeS3]:
    """A started FakeS3, stopped at teardown."""
    fake = FakeS3().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def damaged(tmp_path, fake_nbia_factory, capsys):
    """A finished 6-series archive whose 3rd series' stream has a flipped byte; the
    manifest --verify wrote; what the archive held before; the damaged series' uid."""
    fake = fake_nbia_factory(demo_series=6)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    archive = tmp_path / "out" / "DEMO.tar.xz"
    before = archive_members(archive)
    spans = xzread.xz_stream_spans(archive)
    start, end = spans[2]
    label = trust.journal_series_ends(archive)[end]
    flip(archive, (start + end) // 2)
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    assert any(line.startswith(f"1 damaged series are listed in {manifest}") for line in lines)
    journal = journal_module.Journal(tmp_path / "out" / "DEMO.tar.xz.journal")
    uid = next(u for u, where in journal.locations().items() if where == label)
    journal.close()
    assert plan.read_manifest(manifest).uids == [uid]
    fake.counters.reset()
    return fake, archive, manifest, before, uid, (start, end)


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Path:
    """dist/tcia_downloader.pyz: TCIA_PYZ (CI builds it once), else built here, once; a
    failed build fails the tests that need it (CI can install the builder)."""
    given = os.environ.get("TCIA_PYZ")
    if given:
        assert Path(given).is_file(), f"TCIA_PYZ={given}: no such file"
        return Path(given).resolve()
    output = tmp_path_factory.mktemp("dist") / "tcia_downloader.pyz"
    built = subprocess.run([sys.executable, str(PYZ_BUILDER), "--output", str(output)],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert built.returncode == 0 and output.is_file(), built.stdout + built.stderr
    return output


@pytest.fixture(scope="session")
def shiv_root(tmp_path_factory) -> Path:
    """Where the .pyz unpacks in the tests: never ~/.shiv."""
    return tmp_path_factory.mktemp("shiv-root")

