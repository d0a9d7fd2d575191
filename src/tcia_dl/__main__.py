"""`python -m tcia_dl`: the same as tcia_downloader.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
