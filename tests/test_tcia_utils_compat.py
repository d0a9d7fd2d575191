"""TCIA's official client, tcia_utils (nbia module), against the fake: it must be satisfied, and
the files it saves must be the DICOM files the fake served."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

try:
    from tcia_utils import nbia
except ImportError:            # requirements-test.txt alone: the demo's, without TCIA's client
    if os.environ.get("CI") == "true":
        raise                  # in CI a skip would prove nothing
    pytest.skip("tcia_utils is not installed: python3 -m pip install -r requirements-dev.txt",
                allow_module_level=True)


@pytest.fixture
def fake(fake_nbia_factory, monkeypatch):
    fake = fake_nbia_factory(nasty=set(), include_md5="ignore")
    # Every tcia_utils call builds its URL with setApiUrl(endpoint, api_url); point it at the fake.
    monkeypatch.setattr(nbia, "setApiUrl", lambda endpoint, api_url="": fake.url)
    return fake


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_get_collections(fake):
    assert nbia.getCollections() == [{"Collection": c} for c in fake.collections()]


def test_get_series(fake):
    assert nbia.getSeries(collection="DEMO") == fake.series("DEMO")
    assert nbia.getSeries(collection="Pancreas-CT") == fake.series("Pancreas-CT")
    assert nbia.getSeries(collection="No-Such-Collection") is None          # empty body -> None


def test_download_series_saves_the_served_files(fake, tmp_path):
    series = fake.series("DEMO")[:4] + fake.series("Pancreas-CT")[:2]
    df = nbia.downloadSeries(series, path=str(tmp_path), format="df")
    for rec in series:
        uid = rec["SeriesInstanceUID"]
        folder = tmp_path / uid
        saved = {p.name: p.read_bytes() for p in folder.iterdir()}
        served = dict(fake.instances(uid))
        assert set(saved) == set(served) | {"LICENSE"}
        assert {n: md5(b) for n, b in saved.items() if n != "LICENSE"} == {n: md5(b) for n, b in served.items()}
        assert saved["LICENSE"].startswith(b"License Information. The " + rec["Collection"].encode())
        assert fake.counters.complete_downloads(uid) == 1
    # format="df" makes tcia_utils read getSeriesMetadata's CSV and rename its columns
    assert sorted(df["SeriesInstanceUID"]) == sorted(r["SeriesInstanceUID"] for r in series)
    assert dict(zip(df["SeriesInstanceUID"], df["FileSize"])) == {r["SeriesInstanceUID"]: r["FileSize"] for r in series}


def test_download_series_with_hashes(fake, tmp_path):
    rec = fake.series("DEMO")[0]
    uid = rec["SeriesInstanceUID"]
    nbia.downloadSeries([uid], input_type="list", path=str(tmp_path), hash="y")
    folder = Path(tmp_path) / uid
    served = [b for _, b in fake.instances(uid)]
    names = [f"{i:08d}.dcm" for i in range(1, len(served) + 1)]
    assert sorted(p.name for p in folder.iterdir()) == names + ["md5hashes.csv"]
    assert [(folder / n).read_bytes() for n in names] == served
    rows = (folder / "md5hashes.csv").read_text().splitlines()[1:]
    assert sorted(rows) == sorted(f"{n},{md5(b)}" for n, b in zip(names, served))
    assert fake.counters.requests("getImageWithMD5Hash", 200) == 1
