#!/usr/bin/env python3
"""Contender (b): TCIA's official client, tcia_utils, the way its users get an archive.

    python bench/tcia_utils_client.py --api-url URL --collection NAME --path DIR \
        [--archive OUT.tar.xz --preset N]

1. nbia.getSeries(collection=NAME), then nbia.downloadSeries(series, path=DIR) with its own
   thread pool at its default size (max_workers=10). tcia_utils builds every URL with
   nbia.setApiUrl(endpoint, api_url); the harness replaces that function so that the URLs point
   at the fake server (as tests/test_tcia_utils_compat.py does). Nothing else is changed.
2. With --archive: `tar -cf - -C DIR . | xz -T0 -<preset> > OUT`, the archive its users make.

Prints one JSON line on stdout: seconds per phase, series asked for, series folders saved.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-url", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--path", required=True, type=Path)
    p.add_argument("--archive", type=Path)
    p.add_argument("--preset", type=int, default=1)
    args = p.parse_args()

    started = time.monotonic()
    import tcia_utils.nbia as nbia            # imports pandas, plotly...: part of its cost
    logging.getLogger("tcia_utils.nbia").setLevel(logging.WARNING)   # no line per series
    url = args.api_url if args.api_url.endswith("/") else args.api_url + "/"
    nbia.setApiUrl = lambda endpoint, api_url="": url
    imported = time.monotonic()
    series = nbia.getSeries(collection=args.collection) or []
    nbia.downloadSeries(series, path=str(args.path))
    downloaded = time.monotonic()
    saved = sum(1 for e in os.scandir(args.path) if e.is_dir()) if args.path.is_dir() else 0
    result = {"import_s": round(imported - started, 3), "download_s": round(downloaded - imported, 3),
              "series": len(series), "saved": saved}
    if args.archive is not None:
        # bash for pipefail: a failing tar must not hide behind a succeeding xz.
        cmd = f'set -o pipefail; tar -cf - -C "$1" . | xz -T0 -{args.preset} > "$2"'
        rc = subprocess.call(["bash", "-c", cmd, "bash", str(args.path), str(args.archive)])
        result["archive_s"] = round(time.monotonic() - downloaded, 3)
        result["archive_rc"] = rc
        if rc:
            print(json.dumps(result))
            return rc
    print(json.dumps(result))
    return 0 if saved == len(series) and series else 1


if __name__ == "__main__":
    sys.exit(main())
