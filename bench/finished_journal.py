#!/usr/bin/env python3
"""Build a finished <Collection>.tar.xz and its journal for a whole collection, without
downloading it: the set-up of the "resume of a finished 50,000-series journal" check.

    python bench/finished_journal.py --downloader tcia_downloader.py --api-url URL \
        --collection DEMO --output DIR --temp-dir DIR [--preset 1]

Running the downloader to completion on 50,000 series would take far longer than the check
itself, so this uses the downloader's own classes (plan_collection, TarXzTarget, Journal,
UnitWriter, finalize) to write what such a run leaves behind: one journal row per series
(with its planned path and one file), a valid .tar.xz with one small placeholder member per
series (one xz stream for all of them but the last, one for the last, which a rerun checks
against its journal row since 0.4; then the real closing stream with LICENSE, metadata.csv
and MD5SUMS), 'finished' set. The only shortcut besides the placeholder contents
is PRAGMA synchronous=OFF while the rows are inserted (one fsync per row would take minutes);
the journal is fsynced as a whole at the end.

Prints one JSON line: series, seconds, archive bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import requests


def load(path: Path):
    """The downloader's package (src/tcia_dl beside the script): every module's names in one
    namespace, as the single file had them."""
    import pkgutil
    import types
    sys.path.insert(0, str(path.resolve().parent / "src"))
    package = importlib.import_module("tcia_dl")
    names = {}
    for info in pkgutil.walk_packages(package.__path__, "tcia_dl."):
        names.update(vars(importlib.import_module(info.name)))
    return types.SimpleNamespace(**names)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--downloader", required=True, type=Path)
    p.add_argument("--api-url", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--temp-dir", required=True, type=Path)
    p.add_argument("--preset", type=int, default=1)
    args = p.parse_args()
    started = time.monotonic()
    td = load(args.downloader)
    url = args.api_url if args.api_url.endswith("/") else args.api_url + "/"
    records = requests.get(url + "getSeries", params={"Collection": args.collection}, timeout=300).json()
    planned = td.plan_collection(args.collection, records)
    args.output.mkdir(parents=True, exist_ok=True)
    args.temp_dir.mkdir(parents=True, exist_ok=True)
    target = td.TarXzTarget(args.collection, args.output, args.temp_dir, args.preset)
    journal = target.journal
    journal._db.execute("PRAGMA synchronous=OFF")
    stream = target.scratch / "placeholders.tar.xz"
    mtime = int(time.time())
    name = "1-1.dcm"
    tar_end = 0
    # The last series gets a stream of its own: a rerun of a finished archive (0.4) checks the
    # last series' stream, from the previous row's end, against its journal row.
    for group in (planned[:-1], planned[-1:]):
        if not group:
            continue
        writer = td.UnitWriter(stream, td.XZ.compressor(args.preset))
        members = {}
        for s in group:
            data = f"placeholder for {s.uid}\n".encode()
            members[s.uid] = td.Member(entry=name, name=name, size=len(data), md5=hashlib.md5(data).hexdigest())
            writer.add_file(f"{s.collection}/{s.path}/{name}", len(data), mtime, lambda sink, d=data: sink(d))
        writer.close()
        appended = target._append(td.Prepared(stream))
        # 0.4 returns (end, sha256 of the stream); 0.3 the end alone
        archive_end, stream_sha = appended if isinstance(appended, tuple) else (appended, None)
        stream.unlink()
        tar_end += writer.tar_bytes
        target.archive_end, target.tar_end = archive_end, tar_end
        for s in group:
            verified = td.VerifiedSeries(path=stream, members=[members[s.uid]], license_text=None, dropped=[])
            journal.record(s, verified, archive_end, tar_end,
                           *([stream_sha] if stream_sha else []))
    journal._db.execute("PRAGMA synchronous=FULL")
    with open(journal.path, "rb") as handle:
        os.fsync(handle.fileno())
    target.archive_end, target.tar_end = archive_end, tar_end
    target.finalize()
    size = target.final.stat().st_size
    target.close()
    print(json.dumps({"series": len(planned), "seconds": round(time.monotonic() - started, 2),
                      "archive_bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
