"""A rerun of a finished output does not name its series' folders (naming was most of a
finished 200,000-series rerun's planning); an output whose journal says finished but that
is not whole any more is named after all and completed with the right folders."""

from __future__ import annotations

import pytest

from tcia_dl import errors, plan
from helpers import Run, archive_members, expected_folders, series_folders, tree_members


def refuse_naming(monkeypatch) -> list[int]:
    """plan_collection, which names folders, counted; it must not run while counted[0]."""
    calls = [0]
    real = plan.plan_collection

    def counted(collection, records):
        calls[0] += 1
        return real(collection, records)
    monkeypatch.setattr(plan, "plan_collection", counted)
    return calls


def test_a_finished_archive_reruns_without_naming_its_series(tmp_path, fake_nbia_factory,
                                                              monkeypatch):
    fake = fake_nbia_factory(demo_series=6)
    first = Run(tmp_path, fake)
    assert first.code == errors.EXIT_OK, first.log
    calls = refuse_naming(monkeypatch)
    again = Run(tmp_path, fake)
    assert again.code == errors.EXIT_OK, again.log
    assert "DEMO is finished; nothing to do" in again.log
    assert "DEMO: 6 series of 1 collection(s)" in again.log
    assert calls[0] == 0


def test_a_series_published_after_the_finish_is_still_counted(tmp_path, fake_nbia_factory,
                                                                monkeypatch):
    fake = fake_nbia_factory(demo_series=4)
    assert Run(tmp_path, fake).code == errors.EXIT_OK
    bigger = fake_nbia_factory(demo_series=5)             # the same 4 series, and one more
    calls = refuse_naming(monkeypatch)
    again = Run(tmp_path, bigger)
    assert again.code == errors.EXIT_OK, again.log
    assert "1 series were published after it was finished" in again.log
    assert calls[0] == 0


@pytest.mark.parametrize("fmt", ["tar.xz", "dir"])
def test_a_finished_journal_beside_a_lost_output_is_planned_whole_and_named(
        tmp_path, fake_nbia_factory, monkeypatch, fmt):
    """The journal says finished, so planning leaves the series unnamed; the output is
    gone (the archive deleted; a folder removed from the tree), so the run names them and
    fetches what is missing, into the folders a first run makes."""
    fake = fake_nbia_factory(demo_series=4)
    first = Run(tmp_path, fake, fmt=fmt)
    assert first.code == errors.EXIT_OK, first.log
    if fmt == "tar.xz":
        (first.output / "DEMO.tar.xz").unlink()
    else:
        members = tree_members(first.output / "DEMO")
        folder = sorted(series_folders({f"DEMO/{m}": d for m, d in members.items()}))[0]
        for path in sorted((first.output / folder).iterdir()):
            path.unlink()
        (first.output / folder).rmdir()
    calls = refuse_naming(monkeypatch)
    again = Run(tmp_path, fake, fmt=fmt)
    assert again.code == errors.EXIT_OK, again.log
    assert calls[0] >= 1                              # named after all
    if fmt == "tar.xz":
        assert series_folders(archive_members(again.output / "DEMO.tar.xz")) == \
            expected_folders(fake)
    else:
        members = tree_members(again.output / "DEMO")
        assert series_folders({f"DEMO/{m}": d for m, d in members.items()}) == \
            expected_folders(fake)
