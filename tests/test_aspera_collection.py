"""A collection's downloads from TCIA's website API: --list-downloads, and --mode aspera
--collection NAME (its Faspex packages into one archive, each under its own folder), against
the fake website API (tests/fakes/fake_website.py) on 127.0.0.1 and the stand-in ascli."""
from __future__ import annotations

import hashlib
import random
import tarfile
from pathlib import Path

import pytest

from fakes.fake_ascli import FakeAscli, public_link, write_package
from fakes.fake_website import FakeWebsite
from tcia_dl import cli, errors
from tcia_dl.sources.tcia_website import download_ids, download_of, text_of

KIB = 1024
COLLECTION = "HER2-Tumor-ROIs"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def website():
    fake = FakeWebsite().start()
    try:
        yield fake
    finally:
        fake.stop()


def slides(seed: int, count: int, folder: str) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{folder}/slide-{n}.svs": rng.randbytes(40 * KIB + n) for n in range(count)}


class Collection:
    """Two Faspex packages served by the stand-in ascli (each its own link), listed among a
    collection's downloads on the fake website, with a DICOM download and a decoy
    collection whose text matches the same search."""

    def __init__(self, tmp_path: Path, monkeypatch, website: FakeWebsite):
        self.tmp, self.website = tmp_path, website
        self.packages = {
            "762": ("Yale_HER2_v3", slides(1, 3, "Yale_HER2/SVS")),
            "811": ("HER2_masks", {**slides(2, 2, "Masks"), "README.txt": b"masks\n"}),
        }
        dirs = {pid: write_package(tmp_path / f"package-{pid}", files, sums_name=f"{stem}.sums")
                for pid, (stem, files) in self.packages.items()}
        self.fake = FakeAscli(tmp_path / "fake", dirs["762"], chunk=16 * KIB, others={
            "811": {"package_dir": str(dirs["811"].resolve()), "passcode": "other-pass-811"}})
        for key, value in self.fake.environ().items():
            if key in ("PATH", "FAKE_ASCLI_CONFIG", "FAKE_ASCLI_PYTHON"):
                monkeypatch.setenv(key, value)
        self.links = {"762": self.fake.link,
                      "811": public_link("811", "other-pass-811", "faspex.example.org")}
        website.add_download(1, "Slides &#8211; SVS", self.links["762"], "Aspera", "2.5")
        website.add_download(2, "DICOM images", "https://example.org/HER2.tcia", "Images",
                             120, "MB")
        website.add_download(3, "Masks", self.links["811"], "Aspera", "0.2")
        website.add_download(4, "Clinical data", "", "Clinical", "34", "kB",
                             download_file={"ID": 55, "url": "https://example.org/c.xlsx"})
        website.add_download(9, "Decoy's slides", "https://example.org/decoy.zip")
        website.add_collection(COLLECTION, [3, 1, 2, 4])
        website.add_collection(f"{COLLECTION}-Extra", [9])
        for n in range(130):         # a search answer of two pages (WordPress: 100 at most)
            website.add_collection(f"Other-{n:03d}", [], collection_summary="cites HER2-Tumor-ROIs")
        self.output, self.scratch, self.cache = (tmp_path / "out", tmp_path / "scratch",
                                                 tmp_path / "cache")

    def run(self, *extra: str) -> int:
        return cli.main(["--mode", "aspera", "--collection", COLLECTION, "--website-api",
                         self.website.url, "--output", str(self.output), "--temp_dir",
                         str(self.scratch), "--cache_dir", str(self.cache), "--no-progress",
                         "--stall-timeout", "1", "--retry-wait", "0.05", "--compression",
                         *extra])

    def expected(self) -> dict[str, str]:
        """Archive member -> MD5: each package's files and .sums under its own folder at the
        archive's root (a collection of the archive, as with several --aspera-url)."""
        found = {}
        for pid, (stem, files) in self.packages.items():
            found.update({f"{stem}/{path}": md5(data) for path, data in files.items()})
            found[f"{stem}/{stem}.sums"] = md5(
                (self.tmp / f"package-{pid}" / f"{stem}.sums").read_bytes())
        return found

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in
                       sorted(self.cache.glob("logs/*-debug.log")))


def archive_md5s(path: Path) -> dict[str, str]:
    with tarfile.open(path, "r:xz") as tar:
        return {m.name: md5(tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}


def test_list_downloads_prints_a_row_per_download_from_the_documented_fields(
        tmp_path, monkeypatch, website, capsys):
    collection = Collection(tmp_path, monkeypatch, website)
    website.fail_next(1, 503)                     # an outage: retried
    assert cli.main(["--list-downloads", "--collection", COLLECTION.lower(), "--website-api",
                     website.url, "--cache_dir", str(tmp_path / "cache"), "--retry-wait",
                     "0.01"]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert rows == [["title", "type", "size", "link"],
                    ["Masks", "Aspera", "0.2 GB", collection.links["811"]],
                    ["Slides \u2013 SVS", "Aspera", "2.5 GB", collection.links["762"]],
                    ["DICOM images", "Images", "120 MB", "https://example.org/HER2.tcia"],
                    ["Clinical data", "Clinical", "34 kB", "https://example.org/c.xlsx"]]
    assert "HER2-Tumor-ROIs: 4 download(s) on TCIA's website, 2 of them Aspera Faspex " \
           "packages (--mode aspera --collection HER2-Tumor-ROIs fetches those)" in captured.err
    # the search's second page was followed (its Link header), the decoy not taken, only
    # the documented v1 endpoints asked, never more than WordPress' 100 a page
    pages = [q.get("page", "1") for q in website.asked("collections")]
    assert pages == ["1", "1", "2"]                      # (the 503, its retry, page 2)
    assert all(path.startswith("/api/v1/") for path, _ in website.requests)
    downloads = website.asked("downloads")
    assert len(downloads) == 1 and downloads[0]["include"] == "3,1,2,4"
    assert set(downloads[0]["_fields"].split(",")) >= {"download_title", "download_url"}
    for secret in ("fake-passcode-0123456789", "other-pass-811"):
        assert secret not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.log"))


def test_a_collection_not_on_the_website_is_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                 website, capsys):
    Collection(tmp_path, monkeypatch, website)
    assert cli.main(["--list-downloads", "--collection", "HER2", "--website-api", website.url,
                     "--cache_dir", str(tmp_path / "cache")]) == errors.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--collection HER2: no collection of that short title" in err[0]
    assert "did you mean HER2-Tumor-ROIs" in err[0]


def test_a_collection_the_search_misses_is_found_in_the_whole_list(tmp_path, monkeypatch,
                                                                   website, capsys):
    Collection(tmp_path, monkeypatch, website)
    website.add_collection("Pancreas-CT", [2], collection_title="Pancreatic CT scans",
                           collection_summary="<p>82 contrast-enhanced CT scans.</p>")
    assert cli.main(["--list-downloads", "--collection", "Pancreas-CT", "--website-api",
                     website.url, "--cache_dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("DICOM images\tImages\t")
    asked = website.asked("collections")
    assert asked[0]["search"] == "Pancreas-CT" and "search" not in asked[1]


def test_list_downloads_needs_a_collection(capsys):
    assert cli.main(["--list-downloads"]) == errors.EXIT_USAGE
    assert "give --collection NAME" in capsys.readouterr().err


def test_the_collections_faspex_packages_become_one_archive_each_under_its_folder(
        tmp_path, monkeypatch, website, capsys):
    collection = Collection(tmp_path, monkeypatch, website)
    assert collection.run("--temp-limit", "150K") == 0
    archive = collection.output / f"{COLLECTION}.tar.xz"
    got = archive_md5s(archive)
    ours = {f"{stem}/{name}.{COLLECTION}" for stem, _ in collection.packages.values()
            for name in ("LICENSE", "CITATION", "metadata", "MD5SUMS")}
    assert {k: v for k, v in got.items() if k.rsplit(".", 1)[0] + "." + COLLECTION not in ours
            and not k.endswith(f".{COLLECTION}.md") and not k.endswith(f".{COLLECTION}.csv")} \
        == collection.expected()
    log = collection.logs()
    assert "HER2-Tumor-ROIs: 2 Aspera Faspex package(s) of its 4 downloads" in log
    left_out = [line for line in log.splitlines() if "not fetched by --mode aspera" in line]
    assert len(left_out) == 2 and any("'DICOM images' (Images, 120 MB): not an Aspera "
                                      "Faspex package" in line for line in left_out)
    assert cli.main(["--verify", str(archive), "--cache_dir", str(collection.cache)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": OK")
    written = b"".join(p.read_bytes() for folder in (collection.output, collection.cache)
                       for p in folder.rglob("*") if p.is_file())
    with tarfile.open(archive, "r:xz") as tar:
        written += b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    for secret in (b"fake-passcode-0123456789", b"other-pass-811", b"context="):
        assert secret not in written
    # a rerun has nothing to do
    assert collection.run("--temp-limit", "150K") == 0
    assert f"{COLLECTION} is finished; nothing to do" in collection.logs()


def test_a_collection_without_faspex_packages_is_exit_2(tmp_path, monkeypatch, website,
                                                          capsys):
    collection = Collection(tmp_path, monkeypatch, website)
    website.collections[0]["collection_downloads"] = [2, 4]
    assert collection.run() == errors.EXIT_USAGE
    assert "none of its 2 downloads on TCIA's website is an Aspera Faspex package" in \
        capsys.readouterr().err
    assert not [r for r in collection.fake.runs() if r.get("command") == "receive"]


def test_documented_fields_in_their_documented_shapes():
    assert text_of("A &#8211; B <b>bold</b>\tx") == "A \u2013 B bold x"
    assert text_of(["Images", "Clinical"]) == "Images; Clinical"
    assert text_of(False) == "" and text_of(12.5) == "12.5" and text_of({"rendered": "T"}) == "T"
    assert download_ids([3, "4", {"ID": 5}, True]) == ["3", "4"]
    assert download_ids(False) == []
    row = download_of({"id": 7, "download_title": "T", "download_size": 3,
                       "download_size_unit": "TB", "download_url": "",
                       "download_file": {"ID": 1}})
    assert (row.size, row.link, row.faspex) == ("3 TB", "", False)
    assert download_of({"id": 8, "download_url": "https://faspex.x/aspera/faspex/public/"
                        "package?context=abc"}).faspex


def test_a_damaged_collection_archive_is_repaired_without_its_links(tmp_path, monkeypatch,
                                                                     website, capsys):
    """The repair list records the collection and the website API, never a link: the
    --retry-failed finds the packages again by the website."""
    from helpers import flip
    from tcia_dl.formats.xz import xz_stream_spans
    collection = Collection(tmp_path, monkeypatch, website)
    assert collection.run("--temp-limit", "150K") == 0
    archive = collection.output / f"{COLLECTION}.tar.xz"
    start, end = xz_stream_spans(archive)[2]
    flip(archive, (start + end) // 2)
    assert cli.main(["--verify", str(archive), "--cache_dir", str(collection.cache)]) == 1
    manifest = collection.output / f"{COLLECTION}.damaged.tcia"
    text = manifest.read_text()
    assert f"aspera-collection={COLLECTION}" in text and "context=" not in text
    asked = len(website.requests)
    assert cli.main(["--retry-failed", str(manifest), "--temp_dir", str(collection.scratch),
                     "--cache_dir", str(collection.cache), "--no-progress",
                     "--stall-timeout", "1", "--retry-wait", "0.05"]) == 0
    assert len(website.requests) > asked              # the links were found again
    assert cli.main(["--verify", str(archive), "--cache_dir", str(collection.cache)]) == 0
    assert archive_md5s(archive).items() >= collection.expected().items()


def test_filters_do_not_apply_to_a_collections_packages(capsys):
    assert cli.main(["--mode", "aspera", "--collection", COLLECTION, "--patient", "P1"]) == \
        errors.EXIT_USAGE
    assert "filters such as --patient do not apply" in capsys.readouterr().err


def test_dry_run_lists_the_parts_of_every_package_and_receives_none(tmp_path, monkeypatch,
                                                                     website, capsys):
    collection = Collection(tmp_path, monkeypatch, website)
    assert collection.run("--dry-run", "--temp-limit", "150K") == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[1:]
    assert rows and {row.split("\t")[-1].split("/")[0] for row in rows} == \
        {"Yale_HER2_v3", "HER2_masks"}
    assert "context=" not in out
    assert not [r for r in collection.fake.runs() if r.get("command") == "receive" and
                not all(p.endswith(".sums") for p in r["paths"])]
    assert not collection.output.exists() or not any(collection.output.iterdir())
