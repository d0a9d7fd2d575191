"""The sources --mode chooses from: one entry each (sources.base.SourceEntry), defined in
the source's own module. A new source is its module, one line in SOURCES, its tests and
the README."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from ..errors import UsageError
from ..logs import printable

from .aspera import ASPERA
from .auto import AUTO
from .base import SourceEntry
from .idc_index import idc_installed
from .idc import IDC
from .nbia import NBIA

# In --mode's order (its help, its error messages); default_mode() says which is the default.
SOURCES: tuple[SourceEntry, ...] = (
    NBIA,
    IDC,
    AUTO,
    ASPERA,
)

# Sources announced but not in this version: --mode <name> says so in one line.
NOT_YET: tuple[str, ...] = ()


# The default --mode: IDC first and NBIA as the fallback, as TCIA routes since 2026, where
# IDC's requirements are installed; else NBIA alone. $TCIA_MODE chooses another (a site's
# setting; the tests' nbia).
DEFAULT_WITH_IDC, DEFAULT_WITHOUT_IDC = "auto", "nbia"
MODE_VARIABLE = "TCIA_MODE"


def default_mode() -> str:
    chosen = os.environ.get(MODE_VARIABLE, "").strip()
    if chosen:
        return chosen
    return DEFAULT_WITH_IDC if idc_installed() else DEFAULT_WITHOUT_IDC


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """Each source's own flags, in a --help group of its own (hidden when it has none)."""
    for entry in SOURCES:
        entry.add_flags(parser.add_argument_group(entry.title))


def selecting_mode(args: argparse.Namespace) -> Optional[str]:
    """The --mode that a source's own flag chooses by naming what to download (SourceEntry.
    selects: --aspera-url), if one was given."""
    for entry in SOURCES:
        if entry.selects and getattr(args, entry.selects, None):
            return entry.name
    return None


def mode_names() -> str:
    """"nbia, idc or auto": the names for a message."""
    names = [entry.name for entry in SOURCES]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def mode_metavar() -> str:
    return "{" + ",".join(entry.name for entry in SOURCES) + "}"


def mode_help() -> str:
    described = [f"{entry.name} ({entry.help})" for entry in SOURCES]
    return (f"where series come from: {', '.join(described)}; default: "
            f"{DEFAULT_WITH_IDC} when IDC's requirements are installed, else "
            f"{DEFAULT_WITHOUT_IDC} (${MODE_VARIABLE} sets another)")


def source_named(mode: str) -> SourceEntry:
    """The entry of a --mode value, or a one-line UsageError."""
    for entry in SOURCES:
        if entry.name == mode:
            return entry
    if mode in NOT_YET:
        raise UsageError(f"--mode {mode} is not available in this version; use --mode "
                         f"{mode_names()}")
    raise UsageError(f"--mode {printable(mode)}: choose {mode_names()}")
