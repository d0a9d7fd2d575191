#!/usr/bin/env python3
"""Limit (d): a plain parallel fetch of every series zip to /dev/null.

    python bench/fetch_all.py --api-url URL --collection NAME [--connections N]

Asks for the zips exactly as tcia_downloader does (getImage, NewFileNames=Yes, IncludeMD5=Yes),
reads them in 1 MiB pieces and throws them away: what the network (the shaped fake) can deliver
with nothing else to do. Prints one JSON line: bytes, seconds, first-byte latency (median and
max) and the longest silence inside a healthy transfer (what a stall timeout must exceed).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import threading
import time

import requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-url", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()
    url = args.api_url if args.api_url.endswith("/") else args.api_url + "/"
    started = time.monotonic()
    series = requests.get(url + "getSeries", params={"Collection": args.collection}, timeout=60).json()
    local = threading.local()

    def fetch(uid: str) -> tuple[int, float, float]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        asked = time.monotonic()
        first = None
        last = asked
        gap = 0.0
        total = 0
        with session.get(url + "getImage", stream=True, timeout=(30, 300),
                         params={"SeriesInstanceUID": uid, "NewFileNames": "Yes", "IncludeMD5": "Yes"}) as r:
            r.raise_for_status()
            for chunk in r.raw.stream(1 << 20, decode_content=False):
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    gap = max(gap, now - last)
                last = now
                total += len(chunk)
        return total, (first or last) - asked, gap

    with concurrent.futures.ThreadPoolExecutor(args.connections) as pool:
        results = list(pool.map(fetch, [s["SeriesInstanceUID"] for s in series]))
    elapsed = time.monotonic() - started
    firsts = [f for _, f, _ in results]
    print(json.dumps({"series": len(series), "bytes": sum(b for b, _, _ in results),
                      "seconds": round(elapsed, 3),
                      "first_byte_median_s": round(statistics.median(firsts), 3) if firsts else None,
                      "first_byte_max_s": round(max(firsts), 3) if firsts else None,
                      "longest_silence_s": round(max((g for _, _, g in results), default=0.0), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
