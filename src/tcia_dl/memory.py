"""The C allocator, told to keep the buffers a run frees for its next series; Python's
cyclic collector, kept off the objects of the plan.

Every series is compressed by a new compressor (one independent unit each), and each one
allocates its dictionary and match-finder tables (xz -1: about 7 MB) and 1-4 MiB chunks of
read and inflated data pass through every worker. glibc hands blocks that large out as fresh
mmap()s, or gives the freed top of a thread's heap back to the kernel, so every unit paid
for its memory again in page faults: 683,000 minor faults and 2.3 s of system time in a run
of 416 small series (bench/run.py --only small, 2 cores). With blocks up to 8 MiB taken
from the heap and up to 16 MiB of free heap kept: 64,000 faults, 0.9 s, for about 60 MB
more peak RSS (190 -> 254 MB). Larger blocks (xz -6's 64 MiB tables) still come from mmap,
and anything above 16 MiB of free heap still goes back to the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
from typing import Iterator

log = logging.getLogger("tcia_downloader")

# mallopt(3) parameters, as glibc's malloc.h numbers them.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20   # COMPRESS_BLOCK (4 MiB) and the xz -1 tables fit under it
TRIM_THRESHOLD = 16 << 20  # two such blocks per heap kept for reuse


def keep_freed_buffers() -> bool:
    """Tell glibc's malloc to reuse large freed blocks rather than map fresh memory each
    time. False where there is no glibc (macOS, musl): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version        # glibc's own; musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc: blocks up to %d MiB from the heap, %d MiB of free heap kept: %s",
              MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20, "set" if done else "refused")
    return done


@contextlib.contextmanager
def lasting_objects() -> Iterator[None]:
    """Make the objects that last the whole run (the plan: a dict per getSeries record, a
    planned series each; millions of objects for 200,000 series) with the cyclic collector
    off, then set them aside (gc.freeze) until the downloads end, so that no collection
    scans them meanwhile. The collector would otherwise walk the growing heap again and
    again as planning allocates (0.35 s of 1.8 s planning 200,000 series), and the whole
    plan in each full collection before the downloads. Together: the first download of a
    200,000-series collection 10.0-10.7 -> 8.9-9.1 s after launch (2 cores, 3 runs each).
    What is garbage before is collected first."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def collector_ignoring_what_exists() -> Iterator[None]:
    """What exists before the downloads (modules, the plan, the index) lives as long as
    they do: out of the garbage collector's sight, its passes over their many short-lived
    objects stay short (py-spy: 12 % of an IDC run's busy samples were in the collector).
    Afterwards everything is the collector's again, the plan lasting_objects set aside too."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
