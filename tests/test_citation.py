"""CITATION.md in every collection folder: each DOI of the series present with its license,
BibTeX from a DOI resolver by content negotiation when it answers (a resolver the test
starts on 127.0.0.1 stands in for doi.org), TCIA's paper, how the copy was made; covered by
MD5SUMS; and an archive that finishes, with links only, when no resolver answers."""
from __future__ import annotations

import http.server
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

import tcia_dl
from tcia_dl import cli, collection_files, errors, plan
from helpers import Run

PATIENTS = ("PANCREAS_0001", "PANCREAS_0002")     # each has series of both of its DOIs
# (the SEG series of the second DOI are an analysis result: the fake serves them when asked)
CT_DOI = "10.7937/k9/tcia.2016.tnb1kqbu"
LABELS_DOI = "10.5281/zenodo.12130275"
CT_BIBTEX = "@misc{pancreas_ct, doi = {10.7937/K9/TCIA.2016.TNB1KQBU}, title = {Pancreas-CT}}"


class Resolver(http.server.ThreadingHTTPServer):
    """A DOI resolver: BibTeX for the DOIs it knows, to a client that asks for BibTeX."""

    def __init__(self, entries: dict[str, bytes], hang: bool = False):
        self.entries, self.hang, self.asked = entries, hang, []
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), ResolverHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class ResolverHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server: Resolver = self.server          # type: ignore[assignment]
        server.asked.append((self.path, self.headers.get("Accept", "")))
        if server.hang:
            server.release.wait(30)
            return
        body = server.entries.get(self.path.lstrip("/"))
        if body is None or "application/x-bibtex" not in self.headers.get("Accept", ""):
            self.send_response(404 if body is None else 406)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-bibtex; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def resolver():
    started: list[Resolver] = []

    def start(entries: dict[str, bytes], hang: bool = False) -> Resolver:
        started.append(Resolver(entries, hang))
        return started[-1]
    yield start
    for server in started:
        server.close()


def run_pancreas(tmp_path: Path, fake, doi_resolver: str, *extra: str) -> Run:
    return Run(tmp_path, fake, "--patient", *PATIENTS, "--doi-resolver", doi_resolver,
               *extra, collection="Pancreas-CT")


def citation_of(archive: Path) -> str:
    with tarfile.open(archive, "r:xz") as tar:
        name = next(n for n in tar.getnames() if n.startswith("Pancreas-CT/CITATION"))
        return tar.extractfile(name).read().decode()


def test_citation_lists_every_doi_with_its_license_and_the_bibtex_the_resolver_gave(
        tmp_path, fake_nbia_factory, resolver):
    fake = fake_nbia_factory(instances=1, analysis_results=True)     # series of two DOIs
    doi_org = resolver({CT_DOI: CT_BIBTEX.encode()})
    run = run_pancreas(tmp_path, fake, doi_org.url)
    assert run.code == errors.EXIT_OK, run.log
    archive = next(run.output.glob("*.tar.xz"))
    text = citation_of(archive)
    series = [s for s in fake.series("Pancreas-CT") if s["PatientID"] in PATIENTS]
    for doi, license_url in ((CT_DOI, "https://creativecommons.org/licenses/by/3.0/"),
                             (LABELS_DOI, "https://creativecommons.org/licenses/by/4.0/")):
        count = sum(collection_files.doi_of(s["DataDescriptionURI"]) == doi for s in series)
        block = text.split(f"- <https://doi.org/{doi}>")[1].split("\n- ")[0]
        assert f"series in this copy: {count}" in block and license_url in block
    assert CT_BIBTEX in text and text.count("```bibtex") == 1      # the other DOI: 404
    assert sorted(path for path, _ in doi_org.asked) == sorted([f"/{CT_DOI}", f"/{LABELS_DOI}"])
    assert all("application/x-bibtex" in accept for _, accept in doi_org.asked)
    assert "10.1007/s10278-013-9622-7" in text                       # TCIA's paper
    assert f"tcia_downloader {tcia_dl.__version__}" in text
    assert f"--collection Pancreas-CT --patient {' '.join(PATIENTS)}" in text
    assert f"NBIA v4 at {fake.url}" in text
    # MD5SUMS covers it, like the other collection files
    unpacked = tmp_path / "x"
    unpacked.mkdir()
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(unpacked)], check=True)
    sums = next(unpacked.glob("Pancreas-CT/MD5SUMS*"))
    assert "  CITATION" in sums.read_text()
    assert subprocess.run(["md5sum", "--quiet", "-c", sums.name], cwd=sums.parent).returncode == 0
    cite = [line for line in run.log.splitlines() if "  cite: " in line]
    assert cite and f"https://doi.org/{CT_DOI}" in cite[0] and f"https://doi.org/{LABELS_DOI}" \
        in cite[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_resolver_the_archive_still_finishes_with_links(tmp_path, fake_nbia_factory,
                                                                  resolver):
    fake = fake_nbia_factory(instances=1, analysis_results=True)
    nobody = f"http://127.0.0.1:{free_port()}/"
    run = run_pancreas(tmp_path, fake, nobody)
    assert run.code == errors.EXIT_OK
    assert "cannot be reached" in run.log and "DOI links only" in run.log
    text = citation_of(next(run.output.glob("*.tar.xz")))
    assert f"<https://doi.org/{CT_DOI}>" in text and "```" not in text

    hanging = resolver({}, hang=True)
    second = tmp_path / "second"
    second.mkdir()
    run = Run(second, fake, "--patient", *PATIENTS, "--doi-resolver", hanging.url,
              collection="Pancreas-CT", compression=False)
    # A resolver that never answers: the read timeout and the stall watchdog both end the
    # wait after the stall window, whichever fires first (ReadTimeout, or the watchdog's
    # cut, which requests reports as a ConnectionError).
    assert run.code == errors.EXIT_OK
    assert "cannot be reached (ReadTimeout)" in run.log or \
        "cannot be reached (ConnectionError)" in run.log
    citation = next((second / "out" / "Pancreas-CT").glob("CITATION*.md"))
    assert f"<https://doi.org/{LABELS_DOI}>" in citation.read_text()
    assert cli.main(["--verify", str(second / "out"), "--cache_dir", str(second / "v")]) == 0


def test_hostile_bibtex_cannot_break_out_of_its_block(tmp_path, fake_nbia_factory, resolver):
    fake = fake_nbia_factory(instances=1, analysis_results=True)
    doi_org = resolver({CT_DOI: b"@misc{x,\n```\n# injected heading\x1b[31m\n}",
                        LABELS_DOI: b"@misc{" + b"y" * 70000 + b"}"})
    run = run_pancreas(tmp_path, fake, doi_org.url)
    assert run.code == errors.EXIT_OK
    text = citation_of(next(run.output.glob("*.tar.xz")))
    assert text.count("```") == 2 and "\x1b" not in text          # one block, fence intact
    assert "  # injected heading" in text                          # inside the block
    assert "yyyy" not in text                                      # over 64 kB: dropped


def test_a_patient_named_citation_gets_its_own_folder_name():
    assert plan._unique_patient_dirs(["CITATION.md", "citation"]) == {
        "CITATION.md": "CITATION.md-patient", "citation": "citation-patient"}
