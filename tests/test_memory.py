"""The C allocator keeps large freed blocks for reuse (src/tcia_dl/memory.py): a new
compressor per series then costs no fresh page faults for its tables. The plan is made with
Python's cyclic collector off and then set aside, out of every later collection's way."""
from __future__ import annotations

import ctypes
import gc
import subprocess
import sys

import pytest

from helpers import ROOT, Run
from tcia_dl import run as run_module
from tcia_dl.memory import lasting_objects

# Twenty xz -1 units in a worker thread, as a worker packs twenty series; prints the minor
# page faults they caused. argv[1] "keep": keep_freed_buffers() first.
UNITS_IN_A_THREAD = """
import lzma, resource, sys, threading
sys.path.insert(0, sys.argv[2])
from tcia_dl.memory import keep_freed_buffers
if sys.argv[1] == "keep":
    assert keep_freed_buffers()
data = bytes(range(256)) * 4096 * 3
def pack_twenty():
    for _ in range(20):
        unit = lzma.LZMACompressor(preset=1)
        unit.compress(data)
        unit.flush()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=pack_twenty)
worker.start()
worker.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", UNITS_IN_A_THREAD, mode, str(ROOT / "src")],
                         check=True, capture_output=True, text=True).stdout
    return int(out)


@pytest.mark.skipif(not glibc(), reason="mallopt is glibc's; elsewhere nothing is changed")
def test_a_new_compressor_per_series_reuses_the_memory_of_the_last_one():
    # Measured here: about 25,000 faults without, 4,300 with (each unit's ~7 MB of tables
    # mapped afresh, against once).
    default, kept = faults("default"), faults("keep")
    assert kept * 3 < default, (default, kept)


@pytest.mark.skipif(not glibc(), reason="mallopt is glibc's; elsewhere nothing is changed")
def test_every_run_sets_the_allocator_up(tmp_path, fake_nbia):
    run = Run(tmp_path, fake_nbia)
    assert run.code == 0
    debug = "".join(p.read_text() for p in run.cache.glob("logs/*-debug.log"))
    assert "malloc: blocks up to 8 MiB from the heap, 16 MiB of free heap kept: set" in debug


def test_the_plan_is_made_with_the_collector_off_and_then_never_scanned(tmp_path, fake_nbia,
                                                                       monkeypatch):
    seen = {}
    make_plan, run_plan = run_module.make_plan, run_module._run_plan

    def spied_make_plan(source, options):
        seen["collector on while planning"] = gc.isenabled()
        return make_plan(source, options)

    def spied_run_plan(source, plan, *rest):
        # in the permanent generation: no generation a collection scans holds the series
        planned = {id(series) for series in plan.series}
        seen["planned"] = len(planned)
        seen["scanned"] = len(planned & {id(o) for o in gc.get_objects()})
        seen["collector on after"] = gc.isenabled()
        return run_plan(source, plan, *rest)
    monkeypatch.setattr(run_module, "make_plan", spied_make_plan)
    monkeypatch.setattr(run_module, "_run_plan", spied_run_plan)
    try:
        assert Run(tmp_path, fake_nbia).code == 0
    finally:
        gc.unfreeze()
    assert seen == {"collector on while planning": False, "planned": 12, "scanned": 0,
                    "collector on after": True}


def test_the_collector_is_back_as_it_was_whatever_happens_in_planning():
    try:
        with pytest.raises(KeyError), lasting_objects():
            assert not gc.isenabled()
            raise KeyError("planning failed")
        assert gc.isenabled()
        gc.disable()                     # a caller that had it off keeps it off
        with lasting_objects():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
