#!/usr/bin/env python3
"""tcia_downloader: a TCIA collection becomes one verified, kill-safe .tar.xz.

This file is the entry point; the code is the package tcia_dl (src/tcia_dl/ in a checkout, or
installed by `pip install .`). From a checkout it uses the src/ beside it. The package's map
and the exit codes are in src/tcia_dl/__init__.py.
"""

import sys

# Before anything a newer Python needs: on RHEL 8's python3 (3.6) a user gets one line that
# says what to do, not a SyntaxError or a traceback from deep in the file. (This is why the
# file compiles on 3.6: no `from __future__ import annotations`, no `:=`.)
if sys.version_info < (3, 9):
    sys.stderr.write("tcia_downloader: error: it needs Python 3.9 or newer; this is Python "
                     "%d.%d. Load a newer one (e.g. `module load python/3.11`) or run it with "
                     "python3.9 ... python3.13\n" % sys.version_info[:2])
    sys.exit(2)

import os  # noqa: E402

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "tcia_dl")):
    sys.path.insert(0, _SRC)
try:
    import tcia_dl  # noqa: E402,F401
except ImportError as missing:
    if missing.name != "tcia_dl":
        raise
    sys.stderr.write("tcia_downloader: error: this script is only the entry point of the "
                     "package tcia_dl, which is neither beside it (src/) nor installed: copy "
                     "tcia_downloader.pyz instead (one file), or pip install the repository\n")
    sys.exit(2)

try:
    import requests
    import requests_cache
    import urllib3
except ImportError as missing:
    sys.stderr.write(f"tcia_downloader: error: the Python package {missing.name!r} is missing: "
                     "install requirements.txt (python3 -m pip install -r requirements.txt, "
                     "in a venv: see the README)\n")
    sys.exit(2)

from tcia_dl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
