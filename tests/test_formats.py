"""Every archive format of the registry, end to end: a run, the standard tools, --verify,
--extract, a kill -9 and the resume, a repair; and --format's one-line errors. A new format
gets these by its registry line (formats.FORMATS) and its line in helpers.STANDARD_TOOLS."""

from __future__ import annotations


import pytest

from tcia_dl import cli, errors
from tcia_dl.formats import FORMATS, archive_codecs
from tcia_dl.plan import failed_run_origin, write_failed_manifest
from helpers import (Run, archive_members, expected_folders, flip, journal_uids, series_folders,
                     start_subprocess, tree_members, verify, verify_with_standard_tools,
                     wait_until)


def run_in(tmp_path, fake, archive_format, *extra):
    return Run(tmp_path, fake, *extra, fmt=archive_format.format_name)


def test_a_run_writes_an_archive_that_the_standard_tools_verify_and_extract_read(
        tmp_path, fake_nbia_factory, archive_format, capsys):
    fake = fake_nbia_factory(demo_series=4)
    run = run_in(tmp_path, fake, archive_format)
    assert run.code == errors.EXIT_OK, run.log
    archive = run.output / f"DEMO{archive_format.suffix}"
    assert sorted(p.name for p in run.output.iterdir()) == sorted(
        [archive.name, f"{archive.name}.journal"])
    verify_with_standard_tools(archive, tmp_path)           # its own -t, tar, md5sum -c
    members = archive_members(archive)
    assert series_folders(members) == expected_folders(fake)

    code, lines = verify(archive, capsys)
    codec = archive_format.codec
    assert code == errors.EXIT_OK, lines
    assert lines[-1].endswith(": OK") and f"in 5 {codec.name} {codec.unit}s" in lines[-1]

    folder = tmp_path / "extracted"
    assert cli.main(["--extract", str(archive), "--output", str(folder),
                     "--cache_dir", str(tmp_path / "cache")]) == errors.EXIT_OK
    assert tree_members(folder) == members


def test_a_kill_9_loses_no_committed_series_and_the_resume_finishes_the_same_archive(
        tmp_path, fake_nbia_factory, archive_format):
    # Slow enough that four series are still to come when the second commits (0.4 s a
    # series a connection), whatever the pipeline has fetched ahead.
    fake = fake_nbia_factory(demo_series=6, conn_bandwidth=100_000)
    reference = run_in(tmp_path / "ref", fake, archive_format)
    assert reference.code == errors.EXIT_OK
    suffix = archive_format.suffix
    expected = archive_members(reference.output / f"DEMO{suffix}")
    fake.counters.reset()

    output, cache = tmp_path / "out", tmp_path / "cache"
    journal = f"DEMO{suffix}.journal"
    process = start_subprocess(fake, output, cache, fmt=archive_format.format_name)
    try:
        wait_until(lambda: len(journal_uids(output, journal)) >= 2, 60, "two commits")
    finally:
        process.kill()
        process.wait()
    committed = journal_uids(output, journal)
    downloads = {uid: fake.counters.complete_downloads(uid) for uid in committed}
    assert not (output / f"DEMO{suffix}").exists()

    final = start_subprocess(fake, output, cache, fmt=archive_format.format_name)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == errors.EXIT_OK, stderr
    assert archive_members(output / f"DEMO{suffix}") == expected
    assert {uid: fake.counters.complete_downloads(uid) for uid in committed} == downloads


def test_a_damaged_unit_is_named_and_the_repair_restores_the_archive(
        tmp_path, fake_nbia_factory, archive_format, capsys):
    fake = fake_nbia_factory(demo_series=4)
    assert run_in(tmp_path, fake, archive_format).code == errors.EXIT_OK
    archive = tmp_path / "out" / f"DEMO{archive_format.suffix}"
    before = archive_members(archive)
    start, end = archive_format.codec.spans(archive)[1]
    flip(archive, (start + end) // 2)

    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_INCOMPLETE
    manifest = tmp_path / "out" / "DEMO.damaged.tcia"
    assert any(line.startswith(f"1 damaged series are listed in {manifest}") for line in lines)
    assert failed_run_origin(manifest)["format"] == archive_format.format_name

    repair = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None,
                 compression=False)            # the list names the format, not the flags
    assert repair.code == errors.EXIT_OK, repair.log
    assert archive_members(archive) == before
    assert verify(archive, capsys)[0] == errors.EXIT_OK
    assert not manifest.exists()


# -- --format and --compression-level ----------------------------------------------------

def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli.main(argv) == errors.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_format_errors_are_one_line_each(tmp_path, capsys):
    base = ["--collection", "DEMO", "--output", str(tmp_path), "--dry-run"]
    err = one_line_error(capsys, [*base, "--format", "tar.bz2"])
    assert "--format tar.bz2: choose " + ", ".join(FORMATS) in err
    err = one_line_error(capsys, [*base, "--format", "dir", "--compression"])
    assert "--compression means --format tar.xz" in err
    for codec in archive_codecs():
        name = next(n for n, t in FORMATS.items() if t.codec is codec)
        low, high = codec.levels
        err = one_line_error(capsys, [*base, "--format", name, "--compression-level",
                                      str(high + 1)])
        assert f"from {low} to {high} for --format {name}" in err


def test_a_format_this_python_cannot_write_says_what_to_install(tmp_path, capsys, monkeypatch):
    codec = FORMATS["tar.xz"].codec
    monkeypatch.setattr(type(codec), "missing",
                        lambda self: "--format tar.xz needs something: pip install it")
    err = one_line_error(capsys, ["--collection", "DEMO", "--output", str(tmp_path),
                                  "--format", "tar.xz"])
    assert "pip install it" in err
    assert not list(tmp_path.iterdir())          # nothing was made


def test_the_seed_spelling_and_old_failure_lists_still_choose_tar_xz(tmp_path):
    assert cli.parse_options(["--collection", "X", "--compression"]).format == "tar.xz"
    assert cli.parse_options(["--collection", "X"]).format == "dir"
    manifest = tmp_path / "old.failed.tcia"
    # what 0.4.0 wrote: no format key, compression=yes
    manifest.write_text(f"tcia_downloader.output={tmp_path}\ntcia_downloader.name=DEMO\n"
                        "tcia_downloader.compression=yes\nListOfSeriesToDownload=\n1.2.3\n")
    assert cli.parse_options(["--retry-failed", str(manifest)]).format == "tar.xz"


@pytest.mark.parametrize("format_name", list(FORMATS))
def test_a_failure_list_records_its_format_and_the_retry_goes_back_into_it(tmp_path, format_name):
    manifest = tmp_path / "DEMO.failed.tcia"
    write_failed_manifest(manifest, ["1.2.3"], format_name, "DEMO")
    origin = failed_run_origin(manifest)
    assert origin["format"] == format_name
    # 0.4.0 reads only compression=: written while it can say the format
    assert origin.get("compression") == {"tar.xz": "yes", "dir": "no"}.get(format_name)
    other = next(name for name in FORMATS if name != format_name)
    options = cli.parse_options(["--retry-failed", str(manifest), "--format", other])
    assert options.format == format_name


def test_help_names_every_format_and_each_codecs_level_scale(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in FORMATS:
        assert name in text
    for codec in archive_codecs():
        low, high = codec.levels
        assert f"{codec.name} {low}-{high}, default {codec.default_level}" in text
