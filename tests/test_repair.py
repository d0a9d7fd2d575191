"""Repair: --verify of a finished output with its journal beside it lists the damaged series
in <name>.damaged.tcia; --retry-failed of it keeps every intact series (their streams copied
and checked, never downloaded again), fetches the damaged ones, writes the collection files
anew, and a kill at any point of it leaves the old output or a resumable repair."""
from __future__ import annotations

from tcia_dl import errors, journal as journal_module
from tcia_dl.formats import xz as xzread
from helpers import Run, archive_members, verify


def intact_streams(archive, spans, skip) -> list[bytes]:
    data = archive.read_bytes()
    return [data[a:b] for i, (a, b) in enumerate(spans[:-1]) if i != skip]


def test_retry_of_the_damaged_manifest_fetches_only_the_damaged_series(damaged, tmp_path,
                                                                        capsys):
    fake, archive, manifest, before, uid, _ = damaged
    kept = intact_streams(archive, xzread.xz_stream_spans(archive), 2)
    run = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert "5 intact series copied" in run.log
    # nothing intact fetched again, and the damaged series once
    assert fake.counters.snapshot()["complete_downloads"] == {uid: 1}
    assert archive_members(archive) == before             # the same files, the same MD5s
    repaired = archive.read_bytes()
    assert all(stream in repaired for stream in kept)     # intact streams copied as they were
    assert not archive.with_name("DEMO.tar.xz.part").exists()
    code, lines = verify(archive, capsys)
    assert code == errors.EXIT_OK and lines[-1].endswith(": OK")
    assert not manifest.exists()                          # whole again: the list is gone


def test_a_kill_before_the_journal_moves_keeps_the_old_archive(damaged, tmp_path, monkeypatch):
    fake, archive, manifest, before, uid, _ = damaged

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched:
        patched.setattr(journal_module.Journal, "rearrange", killed)
        assert Run(tmp_path, fake, "--retry-failed", str(manifest),
                   collection=None).code == errors.EXIT_SIGINT
    # the old archive is still the finished one its journal describes
    assert archive.exists() and archive.with_name("DEMO.tar.xz.part").exists()
    plain = Run(tmp_path, fake)
    assert plain.code == errors.EXIT_OK and "nothing to do" in plain.log
    assert not archive.with_name("DEMO.tar.xz.part").exists()     # nothing describes it
    again = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert again.code == errors.EXIT_OK and archive_members(archive) == before


def test_a_repair_cut_short_resumes_from_its_part(damaged, tmp_path, capsys):
    fake, archive, manifest, before, uid, _ = damaged
    fake.script_faults(uid, ["500"] * 3)
    cut = Run(tmp_path, fake, "--retry-failed", str(manifest), "--retries", "1",
              collection=None)
    assert cut.code == errors.EXIT_INCOMPLETE
    part = archive.with_name("DEMO.tar.xz.part")
    assert archive.exists() and part.exists()             # old archive kept while repairing
    resumed = Run(tmp_path, fake)                          # the plain command finishes it
    assert resumed.code == errors.EXIT_OK, resumed.log
    assert "repairing DEMO.tar.xz" in resumed.log
    assert archive_members(archive) == before and not part.exists()
    assert set(fake.counters.snapshot()["complete_downloads"]) == {uid}
    assert verify(archive, capsys)[0] == errors.EXIT_OK


def test_a_damaged_folder_tree_is_repaired(tmp_path, fake_nbia_factory, capsys):
    fake = fake_nbia_factory(demo_series=4)
    assert Run(tmp_path, fake, compression=False).code == errors.EXIT_OK
    tree = tmp_path / "out"
    victim = sorted(tree.rglob("*.dcm"))[5]
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    code, lines = verify(tree, capsys)
    assert code == errors.EXIT_INCOMPLETE
    manifest = tree / "DEMO.damaged.tcia"
    assert any(f"1 damaged series are listed in {manifest}" in line for line in lines)
    fake.counters.reset()
    run = Run(tmp_path, fake, "--retry-failed", str(manifest), collection=None)
    assert run.code == errors.EXIT_OK, run.log
    assert victim.read_bytes() == good
    assert len(fake.counters.snapshot()["complete_downloads"]) == 1
    assert verify(tree, capsys)[0] == errors.EXIT_OK
