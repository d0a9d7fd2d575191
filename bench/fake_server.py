#!/usr/bin/env python3
"""tests/fakes/fake_nbia.py for benchmarks: the same server, the same flags, plus a cache of the
zips it sends.

Why: the fake builds every DICOM file (numpy pixels, pydicom) and deflates every zip on each
request. On a 2-core machine that costs about 1.8 cores for 60 MB/s of DICOM, taken from the
very cores the contenders compress on. A real TCIA server costs the client's machine nothing,
so a benchmark that let the fake burn the client's CPU would measure the fake.

What changes: before it prints READY, this launcher builds every series' zip once, in both
variants the contenders ask for (getImage with NewFileNames=Yes, with and without
IncludeMD5=Yes), and answers fault-free image requests from that cache. The MD5 of every
DICOM file, computed meanwhile, stays in the fake's cache, so getMD5Hierarchy (which a client
of a server that ignores IncludeMD5 asks for each series) regenerates nothing either. The bytes are those
fake_nbia.py would send (its zips are byte-identical across requests by design, apart from
the order of md5hashes.csv rows); shaping (first-byte delay, per-connection and total
bandwidth), chunked encoding, counters and every fault path are fake_nbia.py's own code.
Requests with a fault, and variants not pre-built, go through fake_nbia.py unchanged.

    python bench/fake_server.py [fake_nbia.py flags] [--no-cache] [--stats FILE] [--warm-procs N]

prints 'READY <url>' on its first stdout line, like fake_nbia.py. --stats writes a JSON file
with the collection's sizes (DICOM bytes, zip bytes per variant, largest zip).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fakes import fake_nbia  # noqa: E402

# (license, new_names, md5): what ours asks for (getImage, NewFileNames=Yes, IncludeMD5=Yes,
# honoured) and what tcia_utils asks for (getImage?NewFileNames=Yes, no IncludeMD5).
VARIANTS = {"ours": (True, True, True), "tcia_utils": (True, True, False)}

_ZIPS: dict[tuple[str, bool, bool, bool], bytes] = {}
_FAKE: fake_nbia.FakeNbia | None = None


class _Collector:
    """An unseekable sink like fake_nbia._ChunkedWire (no tell(): zipfile writes data
    descriptors, as over the wire)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def trip(self) -> None:
        pass


def _handler_for(fake: fake_nbia.FakeNbia) -> Any:
    """A _Handler instance with no connection, enough to call its zip writer."""
    handler = object.__new__(fake_nbia._Handler)
    handler.server = type("S", (), {"fake": fake})()
    return handler


_original_write_zip = fake_nbia._Handler._write_zip


def _build(fake: fake_nbia.FakeNbia, uid: str, variant: tuple[bool, bool, bool]) -> bytes:
    s = fake._catalogue.series[uid]
    license, new_names, md5 = variant
    sink = _Collector()
    h = fake_nbia._digest(fake.config.seed, uid, 1)
    _original_write_zip(_handler_for(fake), sink, s, None, h, license=license,
                        new_names=new_names, md5=md5)
    return b"".join(sink.parts)


def _cached_write_zip(self: Any, wire: Any, s: Any, fault: Any, h: bytes, *, license: bool,
                      new_names: bool, md5: bool) -> None:
    data = _ZIPS.get((s.uid, license, new_names, md5)) if fault is None else None
    if data is None:
        _original_write_zip(self, wire, s, fault, h, license=license, new_names=new_names, md5=md5)
        return
    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):
        wire.write(view[i:i + (1 << 20)])
    wire.drain()


def _warm_task(task: tuple[str, tuple[str, ...]]) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """Both zips of a series, and the MD5s of its DICOM files (from the fake's own cache)."""
    uid, names = task
    assert _FAKE is not None
    zips = [(uid, name, _build(_FAKE, uid, VARIANTS[name])) for name in names]
    s = _FAKE._catalogue.series[uid]
    return zips, [_FAKE._instance_md5(s, k) for k in range(s.n)]


def warm(fake: fake_nbia.FakeNbia, procs: int) -> dict[str, Any]:
    """Build every zip variant of every series, in `procs` forked processes."""
    global _FAKE
    _FAKE = fake
    series = list(fake._catalogue.series.values())
    md5_variants = ("ours", "tcia_utils") if fake.config.include_md5 == "honour" else ("tcia_utils",)
    # Few series: one task per (series, variant) so that both cores work on a single series.
    if len(series) < 2 * procs:
        tasks = [(s.uid, (v,)) for s in series for v in md5_variants]
    else:
        tasks = [(s.uid, md5_variants) for s in series]
    largest = max((s.record["FileSize"] for s in series), default=0)
    # Each worker keeps a whole series' files in its instance cache so that the second
    # variant does not regenerate them.
    fake._cache = fake_nbia._InstanceCache(limit=max(fake_nbia.CACHE_BYTES, int(largest * 1.05)))
    started = time.monotonic()
    md5s: dict[str, list[str]] = {}

    def keep(result: tuple[list[tuple[str, str, bytes]], list[str]]) -> None:
        zips, hashes = result
        for uid, name, data in zips:
            _ZIPS[(uid, *VARIANTS[name])] = data
        md5s[zips[0][0]] = hashes

    if procs > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for result in pool.imap_unordered(_warm_task, tasks, chunksize=1):
                keep(result)
    else:
        for task in tasks:
            keep(_warm_task(task))
    every_md5 = sorted(h for hashes in md5s.values() for h in hashes)
    fake._cache = fake_nbia._InstanceCache()          # back to the fake's own bound
    # The workers' MD5s into the serving cache's (permanent) map: getMD5Hierarchy, which a
    # client of a server that ignores IncludeMD5 asks for every series, then costs nothing
    # instead of regenerating the series' files on this machine's cores.
    for uid, hashes in md5s.items():
        for k, h in enumerate(hashes):
            fake._cache._md5[(uid, k)] = h
    fake_nbia._Handler._write_zip = _cached_write_zip
    sizes = {name: [len(_ZIPS[(s.uid, *VARIANTS[name])]) for s in series] for name in md5_variants}
    return {"series": len(series), "instances": sum(s.n for s in series),
            "dicom_bytes": sum(s.record["FileSize"] for s in series),
            "largest_series_bytes": largest,
            "zip_bytes": {k: sum(v) for k, v in sizes.items()},
            "largest_zip": {k: max(v, default=0) for k, v in sizes.items()},
            "warm_seconds": round(time.monotonic() - started, 2),
            # What a correct archive must hold: the MD5 of the sorted MD5s of all DICOM files.
            "served_md5_digest": hashlib.md5("\n".join(every_md5).encode()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--no-cache", action="store_true",
                     help="serve exactly as tests/fakes/fake_nbia.py (generate on every request)")
    own.add_argument("--stats", type=Path, help="write collection sizes (JSON) here")
    own.add_argument("--warm-procs", type=int, default=len(os.sched_getaffinity(0)))
    mine, rest = own.parse_known_args(argv)
    args = fake_nbia._parser().parse_args(rest)
    fake = fake_nbia.FakeNbia(fake_nbia.config_from_args(args))
    series = list(fake._catalogue.series.values())
    stats: dict[str, Any] = {"series": len(series), "instances": sum(s.n for s in series),
                             "dicom_bytes": sum(s.record["FileSize"] for s in series),
                             "largest_series_bytes": max((s.record["FileSize"] for s in series),
                                                         default=0),
                             "cached": not mine.no_cache}
    if not mine.no_cache:
        stats.update(warm(fake, max(1, mine.warm_procs)))
    if mine.stats:
        mine.stats.write_text(json.dumps(stats))
    fake_nbia.serve_until_signalled(fake, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
