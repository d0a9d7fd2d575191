#!/usr/bin/env python3
"""tcia_downloader: a TCIA collection becomes one verified, kill-safe .tar.xz.

Downloads every series of a collection from TCIA's NBIA v4 REST API, verifies each
DICOM file against the server's MD5 list, drops files that do not belong to the
series, names folders by patient, study date and description, and appends each
finished series to a .tar.xz as an independent xz stream. A journal next to the
archive records every committed series after fsync, so a kill at any instant loses
no finished work and a rerun continues where the last one stopped.

The file reads top to bottom:
    1. command line                      (Options, parse_options)
    2. sources                           (NbiaSource over TciaApi, TokenManager; DoiResolver)
    3. planning                          (PlannedSeries, plan_collection, names)
    4. per-series work                   (download, verify, clean)
    5. archive writing                   (Journal, TarXzTarget, DirectoryTarget, --verify,
                                          repair, --extract, CITATION.md)
    6. orchestration                     (progress, workers, report, main)

Exit codes (documented in the README):
    0    every requested series is in the output and verified
    1    some series failed; the archive stays <name>.tar.xz.part and a rerun resumes it
    2    bad usage or input (flags, unknown collection, rejected credentials, busy output)
    75   stopped early on SIGUSR1 (slurm's warning before a time limit): what finished is
         committed, work remains; rerun (the sbatch template requeues itself)
    130  interrupted by SIGINT (Ctrl-C)       143  terminated by SIGTERM
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

import argparse
import contextlib
import concurrent.futures
import csv
import dataclasses
import difflib
import errno
import fcntl
import gc
import getpass
import hashlib
import io
import itertools
import json
import logging
import lzma
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import tarfile
import tempfile
import threading
import time
import unicodedata
import zipfile
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

try:
    import requests
    import requests_cache
    import urllib3
except ImportError as missing:
    sys.stderr.write(f"tcia_downloader: error: the Python package {missing.name!r} is missing: "
                     "install requirements.txt (python3 -m pip install -r requirements.txt, "
                     "in a venv: see the README)\n")
    sys.exit(2)

__version__ = "0.4.0"

log = logging.getLogger("tcia_downloader")

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 75        # sysexits' EX_TEMPFAIL: try again later
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

DEFAULT_API_URL = "https://nbia.cancerimagingarchive.net/nbia-api/services/v4/"
DEFAULT_DOI_RESOLVER = "https://doi.org/"
DEFAULT_DOI_TIMEOUT = 30.0      # seconds for all the BibTeX lookups of a run
NLST_API_URL = "https://nlst.cancerimagingarchive.net/nbia-api/services/v4/"
DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "tcia_downloader")
# xz preset 1 compresses CT about 6x faster than preset 6 for about 10 % more output
# (shared/measured.md); on a cluster node the preset, not the network, sets the run time.
DEFAULT_COMPRESSION_LEVEL = 1
CHUNK_SIZE = 1 << 20
COMPRESS_BLOCK = 4 << 20   # bytes of tar handed to the xz compressor at once
TAR_BLOCK = tarfile.BLOCKSIZE           # 512
TAR_RECORD = tarfile.RECORDSIZE         # 10240: GNU tar pads archives to whole records
MD5_TABLE = "md5hashes.csv"
LICENSE_ENTRY = "LICENSE"


def usable_cores() -> int:
    """The cores this job may use: slurm's grant, else the process's CPU affinity."""
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, int(slurm_cpus) if slurm_cpus.isdigit() else len(os.sched_getaffinity(0)))


def default_workers() -> int:
    """Series in flight: four per usable core, at most 16. Each core packs one series at a
    time (about 16 MB/s of DICOM at preset 1), and at the 2-3 MB/s per connection users
    see from TCIA it takes about three downloads to keep a core fed (bench/ sweep on 2
    cores at 2.5 MB/s per connection: 4 workers 21.5 s, 8 workers 13.7 s; at 10 MB/s, 4 to
    16 are level). At most 16: TCIA's own client opens 10 connections."""
    return min(4 * usable_cores(), 16)


# ==========================================================================================
# 1. Command line
# ==========================================================================================

class UsageError(Exception):
    """Bad flags or input: one line for the user, exit code 2."""


@dataclass(frozen=True)
class Selection:
    """What to download: a collection, filters on getSeries, manifests, or a failure list."""
    collection: Optional[str] = None
    manifests: tuple[Path, ...] = ()
    patients: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    retry_failed: Optional[Path] = None
    retry_name: Optional[str] = None       # the output's name, as that manifest records it

    def filters(self) -> dict[str, tuple[str, ...]]:
        """getSeries parameter (exact NBIA v4 spelling) -> the values asked for."""
        pairs = (("PatientID", self.patients), ("StudyInstanceUID", self.study_uids),
                 ("SeriesInstanceUID", self.series_uids), ("Modality", self.modalities),
                 ("BodyPartExamined", self.body_parts))
        return {parameter: values for parameter, values in pairs if values}


@dataclass(frozen=True)
class Options:
    selection: Selection
    output: Path
    temp_dir: Path
    cache_dir: Path
    api_url: str
    user: Optional[str]
    password: Optional[str] = field(repr=False)
    proxy: Optional[str]
    ca_bundle: Optional[Path]
    compression: bool
    compression_level: int
    workers: int
    retries: int
    retry_wait: float
    stop_grace: float
    stall_timeout: float
    shard: Optional["Shard"]
    update: bool
    dry_run: bool
    force: bool
    list_collections: bool
    connect_timeout: float
    cache_expiry_hours: float
    log_level: str
    progress: bool
    summary_interval: float
    verify: Optional[Path] = None      # --verify: check this output instead of downloading
    extract: Optional[Path] = None     # --extract: write (part of) this archive into output
    doi_resolver: Optional[str] = DEFAULT_DOI_RESOLVER    # None: no BibTeX in CITATION.md
    doi_timeout: float = DEFAULT_DOI_TIMEOUT   # for all the BibTeX lookups of a run
    repair: bool = False               # --retry-failed of a .damaged.tcia: replace them
    mode: str = "nbia"                 # where series come from: nbia, idc
    idc_index: Optional[Path] = None   # another parquet of IDC's schema
    idc_endpoint: Optional[str] = None         # another S3 endpoint (path-style addressing)
    include_analysis_results: bool = False


EXAMPLES = """examples:
  # a whole collection into /data/tcia/Pancreas-CT.tar.xz
  tcia_downloader.py --collection Pancreas-CT --output /data/tcia --compression
  # what a manifest from the TCIA portal needs, without downloading anything
  tcia_downloader.py --manifest cart.tcia --output /data/tcia --compression --dry-run
  # only the CT and MR series of two patients
  tcia_downloader.py --collection CPTAC-GBM --patient C3L-00016 C3L-00365 --modality CT MR

exit codes: 0 complete and verified; 1 some series failed (rerun to resume);
  2 bad usage or input; 75 checkpointed on SIGUSR1 (rerun); 130/143 SIGINT/SIGTERM.
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (not the 20 lines of usage), with the close flag
    when one was misspelled."""

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = re.search(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown[1].split("=")[0]
            close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1)
            message = f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else
                                               "; --help lists the flags")
        raise UsageError(message)


# The filters on a selection: flag -> the getSeries parameter (and metadata.csv column).
FILTER_FLAGS = {"--patient": "PatientID", "--study-uid": "StudyInstanceUID",
                "--series-uid": "SeriesInstanceUID", "--modality": "Modality",
                "--body-part": "BodyPartExamined"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tcia_downloader.py",
        description="Download TCIA series (from NBIA v4, or IDC's public buckets) into one "
                    "verified, resumable .tar.xz (or a folder tree).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)

    what = parser.add_argument_group("what to download")
    what.add_argument("--collection", metavar="NAME",
                      help="a TCIA collection, e.g. Pancreas-CT (alone: all of it)")
    what.add_argument("--manifest", action="append", default=[], metavar="FILE.tcia",
                      help="exactly the series of a .tcia manifest from the TCIA portal "
                           "(repeatable; may span collections)")
    for flag, parameter in FILTER_FLAGS.items():
        aliases = ["--series"] if flag == "--series-uid" else []
        what.add_argument(flag, *aliases, nargs="+", action="extend", default=[],
                          metavar="VALUE", help=f"only series with one of these {parameter} "
                                                "values (with or without --collection)")
    what.add_argument("--update", action="store_true",
                      help="after a complete archive: only the series published since, into "
                           "<name>.update-<YYYY-MM-DD>.tar.xz")
    what.add_argument("--retry-failed", metavar="FILE.tcia",
                      help="exactly the series of a <name>.failed.tcia, into that run's output")
    what.add_argument("--shard", metavar="I/N",
                      help="part I of N (0 <= I < N), balanced by size; default in a slurm "
                           "job array: the task's place in the array; 'none' turns it off")
    what.add_argument("--list-collections", action="store_true",
                      help="print the server's collection names, one per line, and exit")
    what.add_argument("--dry-run", action="store_true",
                      help="say what would be downloaded and whether it fits; write nothing")
    # (no `choices`: an unknown mode gets parse_options' one line, not argparse's usage)
    what.add_argument("--mode", metavar="{nbia,idc,auto}",
                      help="where series come from: nbia (TCIA's NBIA v4, default), idc "
                           "(NCI's Imaging Data Commons: public S3 buckets and an offline "
                           "index; needs requirements-idc.txt), auto (NBIA, and IDC for "
                           "what NBIA cannot serve)")
    what.add_argument("--include-analysis-results", action="store_true",
                      help="--mode idc: also the series IDC files under a collection as "
                           "analysis results (NBIA serves only the original ones)")

    where = parser.add_argument_group("where")
    where.add_argument("--output", default=".", metavar="DIR",
                       help="where <name>.tar.xz (or the <Collection>/ folders) go (default: .)")
    where.add_argument("--temp-dir", "--temp_dir", dest="temp_dir", metavar="DIR",
                       help="scratch: one file per worker (a zip, then its compressed stream); "
                            "node-local disk on a cluster (default: --output)")
    where.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=DEFAULT_CACHE_DIR,
                       metavar="DIR", help=f"logs and HTTP metadata cache (default: {DEFAULT_CACHE_DIR})")
    where.add_argument("--force", action="store_true",
                       help="start even when the free space looks too small")

    how = parser.add_argument_group("how")
    how.add_argument("--compression", action="store_true",
                     help="write <output>/<name>.tar.xz instead of a folder tree")
    how.add_argument("--compression-level", "--compression_level", dest="compression_level",
                     type=int, default=DEFAULT_COMPRESSION_LEVEL, metavar="0-9",
                     help=f"xz preset (default: {DEFAULT_COMPRESSION_LEVEL}; 6 is ~10%% smaller "
                          "and ~6x slower)")
    how.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                     help="series downloaded in parallel (1 to 64); one per usable core is "
                          "verified and compressed at a time (default: 4 per core, at most 16)")
    how.add_argument("--retries", type=int, default=6, metavar="N",
                     help="attempts per series before it is reported as failed (default: 6)")
    how.add_argument("--retry-wait", type=float, default=2.0, metavar="SECONDS",
                     help="first wait before a retry; it doubles per attempt, with jitter, "
                          "up to 5 minutes (default: 2)")
    how.add_argument("--stop-grace", type=float, default=120.0, metavar="SECONDS",
                     help="after SIGUSR1, how long series in progress may take to finish "
                          "before they are left for the next run (default: 120)")
    how.add_argument("--stall-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="abort and retry a transfer that sends no byte, or less than 64 kB, "
                          "in this many seconds: a 1 byte/s trickle is a stall, a slow but "
                          "real link (even 1 kB/s) is not (default: 120)")

    network = parser.add_argument_group("network and account")
    network.add_argument("--api-url", metavar="URL",
                         help=f"NBIA v4 base URL (default: {DEFAULT_API_URL})")
    network.add_argument("--proxy", metavar="URL",
                         help="HTTP(S) proxy for every request (default: $HTTPS_PROXY/$HTTP_PROXY)")
    network.add_argument("--ca-bundle", metavar="FILE",
                         help="CA certificates to trust, e.g. a site proxy's (PEM)")
    network.add_argument("--user", metavar="NAME",
                         help="account on a private NBIA server (public TCIA needs none)")
    network.add_argument("--password", metavar="PASSWORD",
                         help="visible to other users in `ps`: prefer TCIA_PASSWORD or the prompt")
    network.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                         help="give up a connection attempt after this long (default: 30)")
    network.add_argument("--idc-index", metavar="FILE.parquet",
                         help="--mode idc: this index instead of idc-index-data's (same schema; "
                              "default: $TCIA_IDC_INDEX, else the installed one)")
    network.add_argument("--idc-endpoint", metavar="URL",
                         help="--mode idc: another S3-compatible endpoint, addressed path-style "
                              "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS's "
                              "public buckets)")
    network.add_argument("--doi-resolver", metavar="URL",
                         default=os.environ.get("TCIA_DOI_RESOLVER", DEFAULT_DOI_RESOLVER),
                         help="where CITATION.md's BibTeX comes from, by content negotiation; "
                              "'none': DOI links only (default: $TCIA_DOI_RESOLVER or "
                              f"{DEFAULT_DOI_RESOLVER})")
    network.add_argument("--doi-timeout", type=float, default=DEFAULT_DOI_TIMEOUT,
                         metavar="SECONDS",
                         help="the most time all BibTeX lookups of a run may take, however "
                              "slowly the resolver answers (default: "
                              f"{DEFAULT_DOI_TIMEOUT:g})")
    network.add_argument("--cache-expiry", type=float, default=6.0, metavar="HOURS",
                         help="how long cached metadata answers stay fresh (default: 6)")

    check = parser.add_argument_group("checking what is on disk")
    check.add_argument("--verify", metavar="PATH",
                       help="check an archive (.tar.xz or .part) or a folder tree this tool "
                            "wrote, against its own MD5SUMS; no network, no journal needed")
    check.add_argument("--extract", metavar="ARCHIVE",
                       help="write the files of an archive into --output, verified against "
                            "its MD5SUMS; with --series-uid/--patient/--study-uid (or "
                            "--modality, --body-part, --collection) only those series, "
                            "decompressing only their streams")

    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--log-level", default="INFO", type=str.upper,
                               choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                               help="what stderr shows (the debug log file always has everything)")
    logging_group.add_argument("--no-progress", action="store_true",
                               help="no progress bars, only log lines")
    logging_group.add_argument("--summary-interval", type=float, default=30.0, metavar="SECONDS",
                               help="without a terminal: one progress line this often "
                                    "(default: 30)")
    logging_group.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


MAX_WORKERS = 64     # beyond this, threads and connections only load the service

# (flag, lowest, highest, unit): every number a user types is finite and in a sane range, so
# that no later arithmetic (backoff, timers, the outage breaker's limit) can overflow or
# switch itself off. Timeouts and intervals start above zero.
NUMERIC_FLAGS: tuple[tuple[str, float, float, str], ...] = (
    ("--compression-level", 0, 9, "an xz preset"),
    ("--workers", 1, MAX_WORKERS, "series in flight"),
    ("--retries", 1, 100, "attempts"),
    ("--retry-wait", 0, 3600, "seconds"),
    ("--stop-grace", 0, 86400, "seconds"),
    ("--stall-timeout", 0.01, 86400, "seconds"),
    ("--connect-timeout", 0.01, 3600, "seconds"),
    ("--cache-expiry", 0, 87600, "hours"),
    ("--summary-interval", 0.01, 86400, "seconds"),
    ("--doi-timeout", 0.01, 3600, "seconds"),
)


def check_number(flag: str, value: float, low: float, high: float, unit: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{flag} must be a number from {low:g} to {high:g} ({unit}); "
                         f"got {value}")


def parse_options(argv: Optional[list[str]] = None) -> Options:
    """Parse and validate the command line; raise UsageError with one clear line."""
    args = build_parser().parse_args(argv)
    selection = parse_selection(args)
    origin = failed_run_origin(selection.retry_failed) if selection.retry_failed else {}
    fill_source_flags(args, origin)
    if args.mode == "aspera":
        raise UsageError("--mode aspera is not available in this version; use --mode nbia, "
                         "idc or auto")
    if args.mode not in ("nbia", "idc", "auto"):
        raise UsageError(f"--mode {printable(args.mode)}: choose nbia, idc or auto")
    idc_endpoint = args.idc_endpoint
    if idc_endpoint and urlsplit(idc_endpoint).scheme not in ("http", "https"):
        raise UsageError(f"--idc-endpoint {idc_endpoint!r} is not an http(s) URL")
    idc_index = Path(args.idc_index).expanduser() if args.idc_index else None
    if idc_index is not None and args.mode != "nbia" and not idc_index.is_file():
        raise UsageError(f"--idc-index {args.idc_index} (or $TCIA_IDC_INDEX): no such file")
    for flag, low, high, unit in NUMERIC_FLAGS:
        check_number(flag, getattr(args, flag[2:].replace("-", "_")), low, high, unit)
    if args.doi_resolver.lower() != "none" and \
            urlsplit(args.doi_resolver).scheme not in ("http", "https"):
        raise UsageError(f"--doi-resolver {args.doi_resolver!r}: give an http(s) URL or none")
    if urlsplit(args.api_url).scheme not in ("http", "https"):
        raise UsageError(f"--api-url {args.api_url!r} is not an http(s) URL")
    if args.proxy and urlsplit(args.proxy).scheme not in ("http", "https"):
        raise UsageError(f"--proxy {args.proxy!r}: give an http:// or https:// proxy URL")
    ca_bundle = Path(args.ca_bundle).expanduser() if args.ca_bundle else None
    if ca_bundle and not ca_bundle.is_file():
        raise UsageError(f"--ca-bundle {args.ca_bundle}: no such file")
    output = Path(args.output).expanduser()
    compression = args.compression
    repair = False
    if selection.retry_failed:
        # The failed series go back into the output of the run that failed them, whatever
        # --output and --compression say: anything else would start a second, partial output.
        output = Path(origin["output"]) if "output" in origin else output
        compression = origin.get("compression", "yes" if compression else "no") == "yes"
        repair = origin.get("repair") == "yes"
        name = recorded_name(selection.retry_failed, origin)
        selection = dataclasses.replace(selection, retry_name=name)
    password = resolve_password(args.user, args.password)
    return Options(
        selection=selection,
        output=output,
        temp_dir=Path(args.temp_dir).expanduser() if args.temp_dir else output,
        cache_dir=Path(args.cache_dir).expanduser(),
        api_url=args.api_url if args.api_url.endswith("/") else args.api_url + "/",
        user=args.user,
        password=password,
        proxy=args.proxy,
        ca_bundle=ca_bundle,
        compression=compression,
        compression_level=args.compression_level,
        workers=args.workers,
        retries=args.retries,
        retry_wait=args.retry_wait,
        stop_grace=args.stop_grace,
        stall_timeout=args.stall_timeout,
        shard=parse_shard(args.shard, os.environ),
        update=args.update,
        dry_run=args.dry_run,
        force=args.force,
        list_collections=args.list_collections,
        connect_timeout=args.connect_timeout,
        cache_expiry_hours=args.cache_expiry,
        log_level=args.log_level,
        progress=not args.no_progress,
        summary_interval=args.summary_interval,
        verify=Path(args.verify).expanduser() if args.verify else None,
        extract=Path(args.extract).expanduser() if args.extract else None,
        doi_resolver=None if args.doi_resolver.lower() == "none" else args.doi_resolver,
        doi_timeout=args.doi_timeout,
        repair=repair,
        mode=args.mode,
        idc_index=idc_index,
        idc_endpoint=idc_endpoint if args.mode in ("idc", "auto") else None,
        include_analysis_results=args.include_analysis_results,
    )


def fill_source_flags(args: argparse.Namespace, origin: dict[str, str]) -> None:
    """--api-url, --mode, --idc-endpoint and --idc-index as given; else, for --retry-failed,
    as its manifest recorded them (the series go back into an output made from there);
    else the environment's and the defaults."""
    args.api_url = args.api_url or origin.get("api-url") or DEFAULT_API_URL
    args.mode = args.mode or origin.get("mode") or "nbia"
    args.idc_endpoint = args.idc_endpoint or origin.get("idc-endpoint") or \
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    args.idc_index = args.idc_index or origin.get("idc-index") or \
        os.environ.get("TCIA_IDC_INDEX") or None


def recorded_name(manifest: Path, origin: dict[str, str]) -> Optional[str]:
    """The output's name a failure or repair list records (None before 0.4): the file may
    have been saved under another name ("DEMO.damaged (1).tcia")."""
    name = origin.get("name")
    if name is None:
        return None
    if not name or "/" in name or name.startswith(".") or len(name) > 200 or \
            not name.isprintable():
        raise UsageError(f"{manifest}: its {FAILED_RUN_KEY}name {name[:80]!r} is not the name "
                         "of an output")
    return name


def parse_selection(args: argparse.Namespace) -> Selection:
    """One way of saying what to download, and files that exist."""
    collection = (args.collection or "").strip() or None
    if args.collection is not None and collection is None:
        raise UsageError("--collection is empty: give a collection name such as Pancreas-CT")
    selection = Selection(
        collection=collection,
        manifests=tuple(Path(m).expanduser() for m in args.manifest),
        patients=tuple(args.patient), study_uids=tuple(args.study_uid),
        series_uids=tuple(args.series_uid), modalities=tuple(args.modality),
        body_parts=tuple(args.body_part),
        retry_failed=Path(args.retry_failed).expanduser() if args.retry_failed else None)
    by_name = bool(collection or selection.filters())
    ways = sum([by_name and not args.extract, bool(selection.manifests),
                bool(selection.retry_failed), bool(args.list_collections), bool(args.verify),
                bool(args.extract)])
    if ways == 0:
        raise UsageError("say what to download: --collection NAME, --manifest FILE.tcia, "
                         "filters such as --patient ID, or --list-collections (or --verify "
                         "PATH to check an output, --extract ARCHIVE to unpack one)")
    if ways > 1:
        raise UsageError("choose one of --collection/filters, --manifest, --retry-failed, "
                         "--list-collections, --verify and --extract (which takes filters)")
    if args.extract and (args.update or args.dry_run or args.shard not in (None, "none")):
        raise UsageError("--extract takes filters (--series-uid, --patient, --study-uid, "
                         "--modality, --body-part, --collection) and --output, nothing else")
    if args.update and (selection.retry_failed or args.list_collections):
        raise UsageError("--update goes with --collection, filters or --manifest")
    for path in (*selection.manifests, *([selection.retry_failed] if selection.retry_failed else [])):
        if not path.is_file():
            raise UsageError(f"{path}: no such manifest file")
    return selection


@dataclass(frozen=True)
class Shard:
    index: int      # 0-based
    count: int

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"


def parse_shard(value: Optional[str], environ: dict[str, str]) -> Optional[Shard]:
    """--shard I/N, else the slurm array task's place in its array, else no sharding."""
    if value is not None:
        if value.lower() == "none":
            return None
        match = re.fullmatch(r"(\d+)/(\d+)", value.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise UsageError(f"--shard {value!r}: give I/N with 0 <= I < N, e.g. --shard 0/4")
        shard = Shard(int(match[1]), int(match[2]))
    else:
        shard = shard_from_slurm(environ)
    return shard if shard is not None and shard.count > 1 else None


def shard_from_slurm(environ: dict[str, str]) -> Optional[Shard]:
    """Arrays may start anywhere and step (--array=1-9:2): count places, not IDs."""
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", task))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        if "SLURM_ARRAY_TASK_COUNT" in environ:
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = (int(environ["SLURM_ARRAY_TASK_MAX"]) - first) // step + 1
    except (KeyError, ValueError):
        return None
    index = (task - first) // step
    if not 0 <= index < count:
        raise UsageError(f"slurm array task {task} does not fit an array of {count} from {first}; "
                         "pass --shard I/N")
    return Shard(index, count)


def resolve_password(user: Optional[str], password: Optional[str]) -> Optional[str]:
    """--password, else $TCIA_PASSWORD, else a prompt on a terminal."""
    if user is None:
        if password is not None:
            raise UsageError("--password was given without --user")
        return None
    if password is not None:
        # Printed before logging starts on purpose: it is about this command line.
        print("warning: --password is visible to other users in `ps`; "
              "prefer TCIA_PASSWORD or the prompt", file=sys.stderr)
        return password
    if os.environ.get("TCIA_PASSWORD"):
        return os.environ["TCIA_PASSWORD"]
    if sys.stdin.isatty():
        return getpass.getpass(f"NBIA password for {user}: ")
    raise UsageError("--user needs a password: set TCIA_PASSWORD (stdin is not a terminal, "
                     "so there is no prompt)")


# ==========================================================================================
# 2. Sources: NBIA v4 (its API client, and NbiaSource over it); the DOI resolver
# ==========================================================================================

class TransientError(Exception):
    """Worth another attempt: reset, stall, 5xx, 429, truncated zip, MD5 mismatch."""

    def __init__(self, reason: str, retry_after: Optional[float] = None,
                 immediate: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.immediate = immediate        # nothing to wait for (e.g. a renewed token)


class SeriesUnavailable(Exception):
    """The server refuses this series for good (400 "not granted"): no retry."""


class Md5ParameterRefused(Exception):
    """A server build older than 2025-11 answers IncludeMD5 with 400."""


class FatalRunError(Exception):
    """Stops the whole run: rejected credentials, a full disk, a broken journal."""

    def __init__(self, message: str, exit_code: int = EXIT_INCOMPLETE):
        super().__init__(message)
        self.exit_code = exit_code


class ApiError(FatalRunError):
    """A metadata request the server refuses (4xx): retrying will not help. 404 means the
    URL is not an NBIA v4 API: a mistake in --api-url (exit 2)."""

    def __init__(self, endpoint: str, status: int, body: str):
        if status == 404:
            super().__init__(f"{endpoint} answered HTTP 404 (not found): check --api-url, "
                             "which ends in /nbia-api/services/v4/", EXIT_USAGE)
        else:
            super().__init__(f"{endpoint} answered HTTP {status}: {body}")
        self.status = status


# getaddrinfo's answers for a name that does not exist (EAI_AGAIN, a resolver that did not
# answer, may pass: it is retried like an outage).
UNKNOWN_HOST = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                if hasattr(socket, name)}


# OpenSSL's reasons for a handshake that can never succeed as configured (TLS spoken to a
# plain-HTTP port, no common protocol); a reset mid-handshake is an outage, not one of these.
TLS_MISMATCH = {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                "NO_PROTOCOLS_AVAILABLE", "RECORD_LAYER_FAILURE"}


def misconfiguration(exc: BaseException, host: str, address_flag: str) -> Optional[str]:
    """What to fix when a request failed for a reason that waiting will not cure: a host
    name that does not exist, or TLS that fails (a site proxy inspecting TLS). None: retry."""
    for cause in exception_chain(exc):
        if isinstance(cause, socket.gaierror) and cause.errno in UNKNOWN_HOST:
            return (f"the host {host} does not exist (DNS): check {address_flag}; on a "
                    "compute node without internet, set --proxy (or HTTPS_PROXY)")
        if isinstance(cause, ssl.SSLCertVerificationError) or (
                isinstance(cause, ssl.SSLError) and cause.reason in TLS_MISMATCH):
            return (f"TLS with {host} failed ({cause.reason or cause}): a site proxy "
                    f"that inspects TLS needs --ca-bundle; check {address_flag} and --proxy")
    return None


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything behind it: causes, contexts, and what requests and urllib3 wrap
    (MaxRetryError.reason, exceptions passed as arguments)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *current.args]


class Interrupted(Exception):
    """A stop was requested (signal); the worker leaves without committing."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 300.0

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Exponential backoff with jitter; a server's Retry-After wins when it says more."""
        backoff = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 32))
        jittered = backoff * random.uniform(0.5, 1.0)
        if retry_after is not None:
            return min(self.max_delay, max(retry_after, jittered))
        return jittered


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in either of its forms (RFC 9110): delay-seconds or an HTTP-date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def token_url_for(api_url: str) -> str:
    """The OAuth endpoint lives at <host>/nbia-api/oauth/token beside .../services/v4/."""
    parts = urlsplit(api_url)
    prefix = parts.path.split("/nbia-api/")[0] if "/nbia-api/" in parts.path else ""
    return urlunsplit((parts.scheme, parts.netloc, f"{prefix}/nbia-api/oauth/token", "", ""))


class TokenManager:
    """Keycloak password-grant tokens for private NBIA servers, renewed before expiry and
    after a 401; one renewal is shared by every worker thread."""

    RENEW_MARGIN = 120.0  # seconds before expiry (a tenth of a shorter lifetime)

    def __init__(self, token_url: str, user: Optional[str], password: Optional[str],
                 session: requests.Session, timeout: tuple[float, float],
                 transport: dict[str, object], stop: threading.Event):
        self._url = token_url
        self._stop = stop
        self._transport = transport
        self._user = user
        self._password = password
        self._session = session
        self._timeout = timeout
        self._lock = threading.Lock()
        self._access: Optional[str] = None
        self._refresh: Optional[str] = None
        self._renew_at = 0.0
        self._refresh_until = 0.0

    @property
    def enabled(self) -> bool:
        return self._user is not None

    def secrets(self) -> list[str]:
        """What the log filter must never let through."""
        return [s for s in (self._password, self._access, self._refresh) if s]

    def headers(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        with self._lock:
            if self._access is None or time.monotonic() > self._renew_at:
                self._renew_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def rejected(self, sent_headers: dict[str, str]) -> None:
        """A request carrying these headers got 401: renew, unless another worker already has."""
        if not self.enabled:
            raise FatalRunError("the server wants a login (401): pass --user for this NBIA server",
                                EXIT_USAGE)
        with self._lock:
            if sent_headers.get("Authorization") == f"Bearer {self._access}":
                self._access = None
                self._renew_locked()

    def _renew_locked(self) -> None:
        if self._refresh and time.monotonic() < self._refresh_until:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh,
                    "client_id": "NBIA"}
            if self._request_token(form):
                log.debug("access token renewed with the refresh token")
                return
        form = {"grant_type": "password", "username": self._user, "password": self._password,
                "client_id": "NBIA"}
        if not self._request_token(form):
            raise FatalRunError(f"the server rejected the login of user {self._user!r}: "
                                "check --user and the password", EXIT_USAGE)
        log.debug("new access token for user %s", self._user)

    def _lifetime_less_margin(self, lifetime: float) -> float:
        return lifetime - min(self.RENEW_MARGIN, lifetime / 10)

    def _request_token(self, form: dict[str, Optional[str]]) -> bool:
        for attempt in range(1, 5):
            try:
                response = self._session.post(self._url, data=form, timeout=self._timeout,
                                              **self._transport)
            except requests.RequestException as exc:
                log.warning("token request failed (%s); retrying", type(exc).__name__)
                self._wait(RetryPolicy().delay(attempt))
                continue
            if response.status_code >= 500 or response.status_code == 429:
                self._wait(RetryPolicy().delay(attempt, parse_retry_after(
                    response.headers.get("Retry-After"))))
                continue
            if response.status_code != 200:
                return False
            try:
                body = response.json()
                access = str(body["access_token"])
                lifetime = float(body.get("expires_in", 300))
                refresh_lifetime = float(body.get("refresh_expires_in", 0))
            except (ValueError, TypeError, KeyError, AttributeError):
                raise FatalRunError("the token service answered without a usable token: is "
                                    "--api-url an NBIA server?") from None
            now = time.monotonic()
            self._access = access
            self._refresh = body.get("refresh_token")
            self._renew_at = now + self._lifetime_less_margin(lifetime)
            self._refresh_until = now + self._lifetime_less_margin(refresh_lifetime)
            return True
        raise FatalRunError("the token service did not answer: try again later")

    def _wait(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Interrupted()


# -- the transfer watchdog --------------------------------------------------------------------

STALL_FLOOR = 64 * 1024     # bytes a transfer must deliver in every --stall-timeout window


class WatchedSocket:
    """A connected socket that counts what it receives, for the watchdog. http.client reads
    a response through makefile(), so the file returned here reads through this object."""

    def __init__(self, sock: socket.socket, watchdog: "TransferWatchdog"):
        self._sock = sock
        self._watchdog = watchdog
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.readers = 0                    # threads blocked in recv on it right now
        self.reader: Optional[int] = None   # the thread that read last

    def __getattr__(self, name: str) -> object:     # the rest is the socket's own
        return getattr(self._sock, name)

    def sendall(self, data: bytes, *args: int) -> None:
        self.window_start, self.window_bytes = time.monotonic(), 0   # a request: a new window
        self._sock.sendall(data, *args)

    def recv_into(self, buffer: memoryview, *args: int) -> int:
        self.readers += 1
        self.reader = threading.get_ident()
        try:
            received = self._sock.recv_into(buffer, *args)
        finally:
            self.readers -= 1
        self.window_bytes += received
        return received

    def makefile(self, mode: str = "r", buffering: Optional[int] = None,
                 **kwargs: object) -> io.IOBase:
        if mode != "rb":
            return self._sock.makefile(mode, buffering, **kwargs)
        self._sock._io_refs += 1            # as socket.makefile does: close waits for the file
        return io.BufferedReader(socket.SocketIO(self, "rb"),  # type: ignore[arg-type]
                                 buffering or io.DEFAULT_BUFFER_SIZE)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()
        if self._sock._closed and self._sock._io_refs <= 0:      # the last reader is gone
            self._watchdog.forget(self)

    def close(self) -> None:
        # http.client closes its socket as soon as it has read the headers of an answer that
        # ends the connection (HTTP/1.0, "Connection: close"), and reads the body through
        # makefile(): the socket is watched until that file is closed too, or a server that
        # says "close" could trickle a body unwatched.
        self._sock.close()
        if self._sock._io_refs <= 0:
            self._watchdog.forget(self)

    def cut(self) -> None:
        """End the transfer from another thread: its blocked read returns at once. The plain
        socket's shutdown, also under TLS, whose own shutdown would race the reader."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)


class TransferWatchdog:
    """One thread that watches every socket of the run. The read timeout only bounds the
    silence between two bytes, so a server trickling a byte a second would hold a worker
    forever: a transfer that delivers less than STALL_FLOOR bytes in a window of
    --stall-timeout seconds is cut (a real link of 1 kB/s delivers twice that in 120 s).
    When the run must stop, every socket is cut, so no signal waits for a slow server."""

    def __init__(self, window: float, stop: threading.Event):
        self.window = window
        self._stop = stop
        self._lock = threading.Lock()
        self._sockets: set[WatchedSocket] = set()
        self._reasons: dict[int, str] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket) -> WatchedSocket:
        watched = WatchedSocket(sock, self)
        with self._lock:
            self._sockets.add(watched)
        return watched

    def forget(self, sock: WatchedSocket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def close(self) -> None:
        self._closed.set()

    def cut_reason(self) -> Optional[str]:
        """Why the watchdog cut this thread's last transfer, if it did."""
        with self._lock:
            return self._reasons.pop(threading.get_ident(), None)

    def _watch(self) -> None:
        while not self._closed.wait(min(0.25, self.window / 4)):
            with self._lock:
                sockets = list(self._sockets)
            now = time.monotonic()
            for sock in sockets:
                if self._stop.is_set():
                    self._cut(sock, "the run is stopping")
                elif now - sock.window_start >= self.window:
                    if sock.readers and sock.window_bytes < STALL_FLOOR:
                        self._cut(sock, f"stalled: {sock.window_bytes} bytes in "
                                        f"{now - sock.window_start:.0f} s, less than "
                                        f"{STALL_FLOOR // 1024} kB")
                    sock.window_start, sock.window_bytes = now, 0

    def cut_threads(self, threads: set[int], reason: str) -> None:
        """End the transfers these threads are blocked in right now (an IDC series whose
        attempt failed: a stalled sibling object would otherwise hold it for a window)."""
        with self._lock:
            blocked = [s for s in self._sockets if s.readers and s.reader in threads]
        for sock in blocked:
            self._cut(sock, reason)

    def _cut(self, sock: WatchedSocket, reason: str) -> None:
        with self._lock:
            if sock.reader is not None:
                self._reasons[sock.reader] = reason
            self._sockets.discard(sock)
        sock.cut()


def watched_pool_classes(watchdog: TransferWatchdog) -> dict[str, type]:
    """urllib3 pool classes whose connections hand their sockets to the watchdog."""
    def watched(connection_class: type) -> type:
        class Watched(connection_class):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                self.sock = watchdog.watch(self.sock)
        return Watched

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = watched(urllib3.connection.HTTPConnection)

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = watched(urllib3.connection.HTTPSConnection)

    return {"http": HTTPPool, "https": HTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with the watchdog on every connection it opens (proxied too)."""

    def __init__(self, watchdog: TransferWatchdog):
        self._pool_classes = watched_pool_classes(watchdog)
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs: object) -> urllib3.PoolManager:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):       # SOCKS pools are classes of their own
            manager.pool_classes_by_scheme = self._pool_classes
        return manager


def watched_session(session: requests.Session, watchdog: TransferWatchdog,
                    user_agent: str) -> requests.Session:
    adapter = WatchedAdapter(watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    return session


class TciaApi:
    """One object per concern of talking to NBIA v4: cached metadata GETs with retries,
    streamed series zips with a stall watchdog, and optional tokens."""

    def __init__(self, base_url: str, *, cache_path: Optional[Path], cache_expiry: timedelta,
                 user: Optional[str], password: Optional[str], connect_timeout: float,
                 stall_timeout: float, retry: RetryPolicy, stop: threading.Event,
                 proxy: Optional[str] = None, ca_bundle: Optional[Path] = None):
        self.base_url = base_url
        self.retry = retry
        self.stop = stop
        self.watchdog = TransferWatchdog(stall_timeout, stop)
        # (connect, read): the read timeout is the stall watchdog. It bounds the time
        # between two received bytes, never the whole transfer, so a 2 GB series over a
        # slow link is fine while a silent connection is dropped after stall_timeout.
        self.timeout = (connect_timeout, stall_timeout)
        # Given per request, because requests lets $HTTPS_PROXY and $REQUESTS_CA_BUNDLE
        # override what a session says, while the user's flags must win.
        self.transport: dict[str, object] = {}
        if proxy:
            self.transport["proxies"] = {"http": proxy, "https": proxy}
        if ca_bundle:
            self.transport["verify"] = str(ca_bundle)
        self._user_agent = f"tcia_downloader/{__version__}"
        if cache_path is not None:
            # Metadata only: image zips and tokens go through plain sessions below.
            metadata = requests_cache.CachedSession(
                str(cache_path), backend="sqlite", expire_after=cache_expiry,
                allowable_methods=("GET",), allowable_codes=(200,), stale_if_error=True)
        else:
            metadata = requests.Session()
        self._metadata = watched_session(metadata, self.watchdog, self._user_agent)
        self._local = threading.local()    # one keep-alive connection per worker thread
        self.tokens = TokenManager(token_url_for(base_url), user, password,
                                   self._plain_session(), (connect_timeout, stall_timeout),
                                   self.transport, stop)

    def _plain_session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = watched_session(requests.Session(), self.watchdog, self._user_agent)
            self._local.session = session
        return session

    def close(self) -> None:
        self.watchdog.close()
        self._metadata.close()

    # -- metadata ---------------------------------------------------------------------------

    def get_json(self, endpoint: str, **params: str) -> list[dict]:
        """GET a metadata endpoint; NBIA answers an empty result with an empty body."""
        return self._json(endpoint, self._metadata_request("GET", endpoint, params=params))

    def post_json(self, endpoint: str, form: dict[str, str]) -> list[dict]:
        return self._json(endpoint, self._metadata_request("POST", endpoint, data=form))

    def _json(self, endpoint: str, response: requests.Response) -> list[dict]:
        """The rows of an answer: a JSON list of objects; anything else is one line."""
        if not response.content.strip():
            return []
        try:
            rows = response.json()
        except ValueError:
            raise FatalRunError(f"{endpoint} answered with something that is not JSON: "
                                f"{response.text[:120]!r}; is --api-url an NBIA v4 "
                                "URL?") from None
        if not isinstance(rows, list):
            raise FatalRunError(f"{endpoint} answered with a JSON {type(rows).__name__}, not "
                                "a list of rows; is --api-url an NBIA v4 URL?")
        objects = [row for row in rows if isinstance(row, dict)]
        if len(objects) < len(rows):
            log.warning("%s: ignored %d of %d rows that are not JSON objects", endpoint,
                        len(rows) - len(objects), len(rows))
        return objects

    def collections(self) -> list[str]:
        return sorted({str(row["Collection"]) for row in self.get_json("getCollectionValues")
                       if row.get("Collection")})

    def series(self, **parameters: str) -> list[dict]:
        """getSeries with exact NBIA v4 parameter names (Collection, PatientID, ...); only
        the rows that can be planned (see usable_records)."""
        return usable_records(self.get_json("getSeries", **parameters), "getSeries")

    def series_metadata(self, uids: list[str]) -> list[dict]:
        """POST getSeriesMetadata: thousands of UIDs per call, unknown ones dropped."""
        return self.post_json("getSeriesMetadata", {"list": ",".join(uids), "format": "json"})

    def _metadata_request(self, method: str, endpoint: str, params: Optional[dict] = None,
                          data: Optional[dict] = None) -> requests.Response:
        url = self.base_url + endpoint
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            self.check_stop()
            headers = self.tokens.headers()
            try:
                response = self._metadata.request(method, url, params=params, data=data,
                                                  headers=headers, timeout=self.timeout,
                                                  **self.transport)
            except requests.RequestException as exc:
                self.check_stop()
                misconfigured = misconfiguration(exc, str(urlsplit(self.base_url).hostname),
                                                 "--api-url")
                if misconfigured:
                    raise FatalRunError(misconfigured, EXIT_USAGE) from None
                last = self._describe_request_error(exc)
                self._pause(attempt, f"{endpoint}: {last}")
                continue
            if response.status_code == 200:
                return response
            if response.status_code == 401:
                self.tokens.rejected(headers)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                self._pause(attempt, f"{endpoint}: {last}",
                            parse_retry_after(response.headers.get("Retry-After")))
                continue
            raise ApiError(endpoint, response.status_code, response.text.strip()[:200])
        raise FatalRunError(f"{endpoint} kept failing ({last}) after {self.retry.attempts} "
                            "attempts; the service may be down, try again later (if it is "
                            "not: check --api-url, and --proxy or HTTPS_PROXY on a node "
                            "without internet)")

    def _describe_request_error(self, exc: requests.RequestException) -> str:
        host = urlsplit(self.base_url).netloc
        cut = self.watchdog.cut_reason()
        if cut:
            return f"{host}: {cut}"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"{host} did not answer in time"
        if isinstance(exc, requests.exceptions.SSLError):
            return f"TLS with {host} failed (a proxy or an old CA bundle?)"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return f"cannot connect to {host}"
        return f"{type(exc).__name__} from {host}"

    def _pause(self, attempt: int, what: str, retry_after: Optional[float] = None) -> None:
        if attempt >= self.retry.attempts:
            return
        delay = self.retry.delay(attempt, retry_after)
        log.warning("%s; retrying in %.0f s", what, delay)
        if self.stop.wait(delay):
            raise Interrupted()

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    # -- images -----------------------------------------------------------------------------

    def download_zip(self, endpoint: str, series_uid: str, dest: Path,
                     on_bytes: Callable[[int], None], limit: Optional[int] = None) -> int:
        """One attempt at streaming a series zip to dest; returns the bytes written. More
        than limit bytes is a bad transfer: a server must not fill the scratch disk.

        Raises TransientError for anything worth retrying, SeriesUnavailable for a refusal,
        Md5ParameterRefused when an old server build refuses IncludeMD5."""
        params = {"SeriesInstanceUID": series_uid}
        if endpoint == "getImage":
            params.update(NewFileNames="Yes", IncludeMD5="Yes")
        headers = self.tokens.headers()
        session = self._plain_session()
        written = 0
        try:
            with session.get(self.base_url + endpoint, params=params, headers=headers,
                             stream=True, timeout=self.timeout, **self.transport) as response:
                self._raise_for_image_status(response, headers)
                with open(dest, "wb") as out:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        if self.stop.is_set():
                            raise Interrupted()
                        out.write(chunk)
                        written += len(chunk)
                        on_bytes(len(chunk))
                        if limit is not None and written > limit:
                            raise TransientError(f"the server sent more than {limit} bytes, "
                                                 "more than the series' FileSize allows; "
                                                 "cut off")
        except requests.RequestException as exc:
            if self.stop.is_set():
                raise Interrupted() from None
            raise TransientError(self._describe_transfer_error(exc, written)) from None
        except OSError as exc:
            raise_if_disk_full(exc, dest.parent)
            raise
        return written

    def _describe_transfer_error(self, exc: requests.RequestException, written: int) -> str:
        cut = self.watchdog.cut_reason()
        if cut:
            return f"{cut}, after {written} bytes"
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return f"no connection within {self.timeout[0]:.0f} s"
        # requests reports a read timeout inside a body as a ConnectionError.
        if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in str(exc):
            return f"stalled: no byte for {self.timeout[1]:.0f} s after {written} bytes"
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            return f"connection broke after {written} bytes"
        return f"connection failed after {written} bytes ({type(exc).__name__})"

    def _raise_for_image_status(self, response: requests.Response,
                                sent_headers: dict[str, str]) -> None:
        status = response.status_code
        if status == 200:
            return
        body = response.text.strip()
        if status == 400 and "IncludeMD5" in body and "Invalid query parameter" in body:
            raise Md5ParameterRefused()
        if status == 400 and "not been granted" in body:
            raise SeriesUnavailable("the server refuses it (400: not granted, or no such series)")
        if status == 401:
            self.tokens.rejected(sent_headers)
            raise TransientError("401: the token was rejected; renewed it", immediate=True)
        if status == 429:
            raise TransientError("HTTP 429 (rate limited)",
                                 parse_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise TransientError(f"HTTP {status} from the server")
        raise SeriesUnavailable(f"HTTP {status}: {body[:200]}")


class ImageEndpoint:
    """Which image endpoint the run uses; switches once, for the whole run, to
    getImageWithMD5Hash when the server ignores or refuses IncludeMD5=Yes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.name = "getImage"

    def fall_back(self, why: str) -> None:
        with self._lock:
            if self.name == "getImage":
                self.name = "getImageWithMD5Hash"
                log.info("this server %s; using getImageWithMD5Hash for the rest of the run", why)


class DoiResolver:
    """BibTeX for DOIs from doi.org by content negotiation: the one request of a run that
    is not to NBIA. Best effort and bounded: a cluster without a route to doi.org still
    finishes its archive, whose CITATION.md then gives the DOI links only.

    The budget is a deadline for all the lookups together. Socket timeouts cannot make one:
    they bound the silence between two bytes, so a resolver that sends a byte every few
    seconds (headers or body) would hold the run until the stall window cuts it (120 s by
    default). The lookups therefore run in a thread of their own, which is abandoned at the
    deadline: its transfer is cut and the run goes on with what had arrived."""

    LIMIT = 64 * 1024             # a BibTeX entry is a few hundred bytes

    def __init__(self, base_url: str, watchdog: TransferWatchdog, transport: dict[str, object],
                 timeout: tuple[float, float], budget: float = DEFAULT_DOI_TIMEOUT):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.budget = budget
        self._watchdog = watchdog
        self._session = watched_session(requests.Session(), watchdog,
                                        f"tcia_downloader/{__version__}")
        self._transport = transport
        self._connect_timeout, self._read_timeout = (min(t, 10.0) for t in timeout)
        self._lock = threading.Lock()
        self._found: dict[str, str] = {}
        self._abandoned = threading.Event()

    def bibtex(self, dois: list[str]) -> dict[str, str]:
        """doi -> its BibTeX entry, for those the resolver gave within the budget."""
        deadline = time.monotonic() + self.budget
        lookups = threading.Thread(target=self._look_up_all, args=(dois, deadline),
                                   name="bibtex", daemon=True)
        lookups.start()
        lookups.join(self.budget)
        if lookups.is_alive():
            self._abandon(lookups)
        self._session.close()
        with self._lock:
            return dict(self._found)

    def _abandon(self, lookups: threading.Thread) -> None:
        """The deadline has passed: cut the lookup's transfer, keep what had arrived. A
        lookup still in a connect or a TLS handshake ends by its own timeouts, harmlessly:
        its thread is a daemon and writes nothing but self._found, no longer read."""
        self._abandoned.set()
        self._watchdog.cut_threads({lookups.ident or 0}, "no more time for BibTeX")
        log.info("no more time for BibTeX from %s (%g s for all the DOIs); CITATION.md gives "
                 "links for the other DOIs", self.base_url, self.budget)

    def _look_up_all(self, dois: list[str], deadline: float) -> None:
        for doi in dois:
            left = deadline - time.monotonic()
            if left <= 0 or self._abandoned.is_set():
                return
            try:
                entry = self._entry(doi, min(self._connect_timeout, left),
                                    min(self._read_timeout, left))
            except requests.RequestException as exc:
                if not self._abandoned.is_set():
                    log.info("%s cannot be reached (%s): CITATION.md gives DOI links only",
                             self.base_url, type(exc).__name__)
                    log.debug("BibTeX request for %s failed", doi, exc_info=True)
                return
            if entry and not self._abandoned.is_set():
                with self._lock:
                    self._found[doi] = entry

    def _entry(self, doi: str, connect: float, read: float) -> Optional[str]:
        response = self._session.get(
            self.base_url + quote(doi, safe="/"), stream=True, timeout=(connect, read),
            headers={"Accept": "application/x-bibtex; charset=utf-8"}, **self._transport)
        with response:
            body = bytearray()
            for chunk in response.iter_content(8192):
                body += chunk
                if len(body) > self.LIMIT or self._abandoned.is_set():
                    break
        if self._abandoned.is_set():
            return None
        text = bytes(body).decode("utf-8", "replace").strip()
        if response.status_code != 200 or len(body) > self.LIMIT or not text.startswith("@"):
            log.info("no BibTeX for %s (HTTP %d); CITATION.md links it", doi,
                     response.status_code)
            return None
        # Server text inside a fenced Markdown block: no control characters, no fence.
        return CSV_UNSAFE.sub("", text).replace("```", "'''")


# -- NBIA as a source of series ----------------------------------------------------------------

@dataclass
class Selected:
    """A source's answer to a selection: the series records, the UIDs it does not know,
    and the manifests it read (their names name the output)."""
    records: list[dict]
    unknown: list[str]
    manifests: list["Manifest"]


class AttemptBytes:
    """Bytes received by one attempt: reported to the progress as they come, and taken
    back whole when the attempt is thrown away (a retry starts from zero). IDC's objects
    of one series arrive on several threads at once, hence the lock."""

    def __init__(self, report: Callable[[int], None]):
        self._report = report
        self._lock = threading.Lock()
        self.received = 0

    def __call__(self, n: int) -> None:
        with self._lock:
            self.received += n
        self._report(n)

    def take_back(self) -> None:
        with self._lock:
            taken, self.received = self.received, 0
        self._report(-taken)


class Source(Protocol):
    """Where series come from (NBIA, IDC). The planning asks it for the records of a
    selection; the per-series loop asks it to fetch one series, verified, into a sink, and
    hears back only TransientError (retry the series), SeriesUnavailable (skip it),
    FatalRunError or Interrupted (stop)."""

    name: str
    scratch_suffix: str             # of the one scratch file a series in flight gets
    watchdog: TransferWatchdog      # the run's network settings, for other requests
    transport: dict[str, object]
    timeout: tuple[float, float]

    def describe(self) -> str: ...

    def collections(self) -> list[str]: ...

    def records(self, selection: Selection) -> "Selected": ...

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]": ...

    def close(self) -> None: ...


def from_nbia(records: list[dict]) -> list[dict]:
    """metadata.csv says which source served each series (an archive may mix them)."""
    return [{**record, "Source": "nbia"} for record in records]


class NbiaSource:
    """NBIA v4 as a source of series, the one object the planning and the per-series loop
    talk to: the records of a selection, and "fetch this series, verified, into a sink",
    raising only TransientError (retry), SeriesUnavailable (skip) or FatalRunError / Interrupted
    (stop). Zips, endpoints and md5hashes.csv stay in here.

    Which image endpoint works is settled by the first fetch of a run, while the others
    wait: getImage with IncludeMD5=Yes (MD5s in the zip) if the server honours it, else
    getImageWithMD5Hash; a zip fetched from the wrong one would only be thrown away."""

    name = "nbia"
    scratch_suffix = ".zip"          # what it downloads into a series' scratch file

    def __init__(self, api: TciaApi):
        self.api = api
        self.watchdog, self.transport, self.timeout = api.watchdog, api.transport, api.timeout
        self._endpoint = ImageEndpoint()
        self._settled = threading.Event()
        self._settling = threading.Lock()

    def describe(self) -> str:
        """The server, without credentials (it goes into logs and CITATION.md)."""
        parts = urlsplit(self.api.base_url)
        server = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
        return f"NBIA v4 at {server}"

    def collections(self) -> list[str]:
        return self.api.collections()

    def records(self, selection: Selection) -> Selected:
        """getSeries records for a manifest (or failure list), filters, or a collection."""
        if selection.manifests or selection.retry_failed:
            manifests, uids = manifests_of(selection)
            records, unknown = records_for_uids(self.api, uids)
            log.info("%d series listed in %s; the server knows %d", len(uids),
                     ", ".join(str(m.path) for m in manifests), len(records))
            return Selected(from_nbia(records), unknown, manifests)
        if selection.filters():
            records = records_for_filters(self.api, selection)
            listed = {r["SeriesInstanceUID"] for r in records}
            if not records:
                if selection.collection and not self.api.series(Collection=selection.collection):
                    raise FatalRunError(unknown_collection_message(self.api,
                                                                   selection.collection),
                                        EXIT_USAGE)
                raise FatalRunError("no series matches these filters: check the values (NBIA "
                                    "compares them exactly)", EXIT_USAGE)
            return Selected(from_nbia(records),
                            [u for u in selection.series_uids if u not in listed], [])
        records = self.api.series(Collection=selection.collection)
        if not records:
            raise FatalRunError(unknown_collection_message(self.api, selection.collection),
                                EXIT_USAGE)
        return Selected(from_nbia(records), [], [])

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        """Download the series' zip into scratch, then hand pack() the verification, which
        pack runs on the sink it makes (packing is the caller's: it chooses when a core is
        free). count(n) reports bytes received, and takes back those of a zip that the
        endpoint switch throws away."""
        if not self._settled.is_set():
            with self._settling:
                if not self._settled.is_set():
                    # An attempt that fails before a zip is read settles nothing: the next
                    # fetch, of whichever series, tries again while the others wait.
                    fetched = self._fetch(series, scratch, count, pack, stop)
                    self._settled.set()
                    return fetched
        return self._fetch(series, scratch, count, pack, stop)

    def _fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
               pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        while True:
            endpoint = self._endpoint.name
            counted = AttemptBytes(count)
            try:
                self.api.download_zip(endpoint, series.uid, scratch, counted, series.byte_limit)
                return pack(lambda sink: verify_zip(scratch, series, sink, stop))
            except Md5ParameterRefused:
                self._endpoint.fall_back("refuses IncludeMD5 (a build older than 2025-11)")
            except Md5TableMissing:
                if endpoint != "getImage":
                    raise TransientError("the zip has no md5hashes.csv (cut short)") from None
                counted.take_back()
                self._endpoint.fall_back("ignores IncludeMD5=Yes (its zips have no "
                                         "md5hashes.csv)")

    def close(self) -> None:
        self.api.close()


# -- IDC as a source of series: its offline index and its public S3 buckets --------------------

IDC_INSTALL = "pip install -r requirements-idc.txt"
IDC_INDEX_COLUMNS = {"collection_id", "analysis_result_id", "PatientID", "SeriesInstanceUID",
                     "StudyInstanceUID", "instanceCount", "aws_bucket", "crdc_series_uuid",
                     "series_size_MB", "license_short_name", "source_DOI"}
S3_NAMESPACE = re.compile(r"^\{[^}]*\}")
S3_OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
MULTIPART_SIZES = (8, 16, 5, 15, 32, 64, 100, 128)   # MiB: the AWS CLI's default first
OBJECTS_IN_FLIGHT = 8          # objects of one series fetched at once
OBJECT_ATTEMPTS = 3            # before the series' attempt fails (then it is retried whole)
MOST_OBJECTS = 100_000         # in a series whose index row has no instanceCount


def idc_date(value: object) -> Optional[str]:
    """IDC's YYYY-MM-DD as NBIA's MM-DD-YYYY: one archive, one way of writing dates."""
    match = re.match(r"^(\d{4})-(\d{2})-(\d{2})", str(value or ""))
    return f"{match[2]}-{match[3]}-{match[1]}" if match else None


@dataclass(frozen=True)
class IdcCollection:
    name: str                     # TCIA's: Pancreas-CT
    id: str                       # IDC's: pancreas_ct
    licenses: dict[str, str]      # source DOI -> license URL


class IdcIndex:
    """IDC's offline index: idc-index-data's parquet of one row per series (or another of
    the same schema), read with duckdb (measured: a collection out of 1 M rows in 0.27 s,
    pyarrow 0.7-1.2 s), and its collections index (TCIA's names, DOIs, licenses)."""

    def __init__(self, path: Optional[Path]):
        try:
            import duckdb
        except ImportError:
            raise FatalRunError(f"IDC (--mode idc or auto) needs duckdb: {IDC_INSTALL}",
                                EXIT_USAGE) from None
        collections_path: Optional[Path] = None
        if path is None:
            try:
                import idc_index_data
            except ImportError:
                raise FatalRunError(f"IDC (--mode idc or auto) needs IDC's index "
                                    f"(idc-index-data), or --idc-index FILE: {IDC_INSTALL}",
                                    EXIT_USAGE) from None
            path = Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
            collections_path = Path(idc_index_data.INDEX_METADATA["collections_index"]
                                    ["parquet_filepath"])
            self.version = getattr(idc_index_data, "__version__", "?")
        else:
            beside = path.with_name("collections_index.parquet")
            collections_path = beside if beside.is_file() else None
            self.version = path.name
        self.path = path
        self._db = duckdb.connect()
        try:
            self._db.execute(f"CREATE VIEW series AS SELECT * FROM read_parquet({sql_text(path)})")
            columns = {row[0] for row in self._db.execute("DESCRIBE series").fetchall()}
        except duckdb.Error as exc:
            raise FatalRunError(f"{path}: not a parquet file duckdb can read ({exc})",
                                EXIT_USAGE) from None
        missing = sorted(IDC_INDEX_COLUMNS - columns)
        if missing:
            raise FatalRunError(f"{path} is not an IDC index: it has no {', '.join(missing)} "
                                "column(s)", EXIT_USAGE)
        self.collections = self._read_collections(collections_path)

    def _read_collections(self, path: Optional[Path]) -> dict[str, IdcCollection]:
        """collection_id -> its TCIA name and licenses; without a collections index the
        IDC id stands in for the name."""
        found: dict[str, IdcCollection] = {}
        if path is not None:
            rows = self._db.execute(f"SELECT collection_id, collection_name, sources FROM "
                                    f"read_parquet({sql_text(path)})").fetchall()
            for collection_id, name, sources in rows:
                licenses = {str(s.get("source_doi") or "").lower():
                            str((s.get("license") or {}).get("license_url") or "")
                            for s in (sources or []) if isinstance(s, dict)}
                found[collection_id] = IdcCollection(name or collection_id, collection_id,
                                                     licenses)
        for (collection_id,) in self._db.execute("SELECT DISTINCT collection_id FROM series"
                                                 ).fetchall():
            found.setdefault(collection_id, IdcCollection(collection_id, collection_id, {}))
        return found

    def collection(self, name: str) -> Optional[IdcCollection]:
        """By TCIA's name (any case) or IDC's id."""
        wanted = name.casefold()
        return next((c for c in self.collections.values()
                     if wanted in (c.name.casefold(), c.id.casefold())), None)

    def rows(self, conditions: list[tuple[str, list[str]]], original_only: bool) -> list[dict]:
        """The series whose column is one of the values, for every (column, values)."""
        # Values as quoted literals, not bound parameters: duckdb imports pandas to bind a
        # Python value (measured: 87 -> 165 MB of RSS, most of an IDC run's peak).
        where = [f'"{column}" IN ({", ".join(sql_text(value) for value in values)})'
                 for column, values in conditions if values]
        where += ["FALSE" for _, values in conditions if not values]
        if original_only:
            where.append("analysis_result_id IS NULL")
        query = "SELECT * FROM series" + (" WHERE " + " AND ".join(where) if where else "")
        cursor = self._db.execute(query)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        self._db.close()


def sql_text(text: object) -> str:
    """A string literal of SQL (duckdb: quotes doubled, no backslash escapes)."""
    if "\0" in str(text):
        raise FatalRunError(f"{str(text)[:40]!r}: a NUL character cannot be in a query",
                            EXIT_USAGE)
    return "'" + str(text).replace("'", "''") + "'"


def idc_record(row: dict, collection: IdcCollection) -> dict:
    """An index row in the shape of NBIA's getSeries record, so that planning, folder names,
    metadata.csv, LICENSE and CITATION.md are the same whichever source served a series."""
    doi = str(row.get("source_DOI") or "").strip()
    license_name = str(row.get("license_short_name") or "")
    size_mb = row.get("series_size_MB")
    return {
        "SeriesInstanceUID": row["SeriesInstanceUID"],
        "StudyInstanceUID": row.get("StudyInstanceUID"),
        "Modality": row.get("Modality"), "SeriesDate": idc_date(row.get("SeriesDate")),
        "SeriesDescription": row.get("SeriesDescription"),
        "BodyPartExamined": row.get("BodyPartExamined"),
        "SeriesNumber": row.get("SeriesNumber"), "Collection": collection.name,
        "PatientID": row.get("PatientID"), "PatientSex": row.get("PatientSex"),
        "PatientAge": row.get("PatientAge"), "Manufacturer": row.get("Manufacturer"),
        "ManufacturerModelName": row.get("ManufacturerModelName"),
        "ImageCount": row.get("instanceCount"),
        "LicenseName": license_name,
        "LicenseURI": collection.licenses.get(doi.lower()) or license_url(license_name, None),
        "DataDescriptionURI": f"https://doi.org/{doi}" if doi else None,
        "FileSize": int(float(size_mb) * 1e6) if size_mb else None,
        "StudyDesc": row.get("StudyDescription"), "StudyDate": idc_date(row.get("StudyDate")),
        "Source": "idc", "crdc_series_uuid": row.get("crdc_series_uuid"),
        "aws_bucket": row.get("aws_bucket"),
        "analysis_result_id": row.get("analysis_result_id"),
    }


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str                     # without quotes: <md5 hex> or <hex>-<parts>


class S3Client:
    """Anonymous S3 REST: ListObjectsV2 of a prefix, and GET of an object into a file at
    an offset. The one place where S3's answers become TransientError (retry) or
    SeriesUnavailable (refused). Against AWS the bucket is in the host name; against
    another endpoint (--idc-endpoint) in the path, as s5cmd and the AWS CLI address it."""

    LIST_LIMIT = 16 * 1024 * 1024          # one page of 1,000 keys is ~300 kB of XML

    def __init__(self, endpoint: Optional[str], watchdog: TransferWatchdog,
                 transport: dict[str, object], timeout: tuple[float, float],
                 stop: threading.Event):
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self._watchdog = watchdog
        self._transport = transport
        self._timeout = timeout
        self._stop = stop
        self._idle: list[requests.Session] = []
        self._idle_lock = threading.Lock()
        self._settings: dict[str, dict[str, object]] = {}

    @contextlib.contextmanager
    def _session(self) -> Iterator[requests.Session]:
        """An idle session (a new one when all are busy), given back after the request: its
        open connection, and against AWS its TLS, serve the next object of any series."""
        with self._idle_lock:
            session = self._idle.pop() if self._idle else None
        if session is None:
            session = watched_session(requests.Session(), self._watchdog,
                                      f"tcia_downloader/{__version__}")
            # The environment (proxies, CA bundle) is read once per host (_request_settings),
            # not for every object: that and ~/.netrc cost more than the GET itself.
            session.trust_env = False
        try:
            yield session
        finally:
            with self._idle_lock:
                self._idle.append(session)

    def _request_settings(self, url: str) -> dict[str, object]:
        """proxies and verify for a request to url: the flags', else the environment's
        (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE), as requests would merge them."""
        host = "://".join(urlsplit(url)[:2])
        settings = self._settings.get(host)
        if settings is None:
            with requests.Session() as probe:
                merged = probe.merge_environment_settings(
                    url, dict(self._transport.get("proxies") or {}), True,  # type: ignore
                    self._transport.get("verify"), None)
            settings = {"proxies": merged["proxies"], "verify": merged["verify"]}
            self._settings[host] = settings
        return settings

    def close(self) -> None:
        with self._idle_lock:
            sessions, self._idle = self._idle, []
        for session in sessions:
            session.close()

    def url(self, bucket: str, key: str = "") -> str:
        if self.endpoint:
            return f"{self.endpoint}/{bucket}/{quote(key)}"
        return f"https://{bucket}.s3.amazonaws.com/{quote(key)}"

    def list(self, bucket: str, prefix: str, most: Optional[int] = None) -> list[S3Object]:
        """Every object under prefix, page by page; more than `most` objects, or a page that
        says "more" but lists nothing, is a listing to distrust (and would never end)."""
        objects: list[S3Object] = []
        token: Optional[str] = None
        while True:
            params = {"list-type": "2", "prefix": prefix,
                      **({"continuation-token": token} if token else {})}
            body = self._get(self.url(bucket), params, self.LIST_LIMIT)
            page, token = parse_list_page(body)
            objects += page
            if most is not None and len(objects) > most:
                raise TransientError(f"the listing of {prefix} goes on beyond {most} objects")
            if not token:
                return objects
            if not page:
                raise TransientError(f"a listing page of {prefix} that lists nothing but "
                                     "says there is more")

    def _get(self, url: str, params: dict[str, str], limit: int) -> bytes:
        try:
            with self._session() as session, \
                    session.get(url, params=params, stream=True, timeout=self._timeout,
                                **self._request_settings(url)) as response:
                self._raise_for_status(response)
                body = bytearray()
                for chunk in response.iter_content(CHUNK_SIZE):
                    body += chunk
                    if len(body) > limit:
                        raise TransientError(f"a listing page of more than {limit} bytes")
                return bytes(body)
        except requests.RequestException as exc:
            raise self._transfer_error(exc, 0, url) from None

    def download(self, bucket: str, item: S3Object, handle: int, offset: int,
                 on_bytes: Callable[[int], None], abandon: threading.Event) -> "hashlib._Hash":
        """The object's bytes written at offset of the open file, hashed as they come:
        exactly its listed size, or TransientError (whose text does not name the object:
        the caller does, once). Returns the MD5 of what was written.
        abandon: the series' attempt has failed elsewhere; this object no longer matters."""
        digest = hashlib.md5()
        written = 0
        try:
            with self._session() as session, \
                    session.get(self.url(bucket, item.key), stream=True,
                                timeout=self._timeout,
                                **self._request_settings(self.url(bucket, item.key))) \
                    as response:
                self._raise_for_status(response)
                for chunk in response.iter_content(CHUNK_SIZE):
                    if self._stop.is_set():
                        raise Interrupted()
                    if abandon.is_set():
                        raise SeriesAttemptAbandoned()
                    if written + len(chunk) > item.size:
                        raise TransientError(f"more bytes than its listed {item.size}")
                    os.pwrite(handle, chunk, offset + written)
                    digest.update(chunk)
                    written += len(chunk)
                    on_bytes(len(chunk))
        except requests.RequestException as exc:
            raise self._transfer_error(exc, written, self.url(bucket, item.key)) from None
        if written != item.size:
            raise TransientError(f"{written} of its {item.size} bytes arrived")
        return digest

    def _raise_for_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        head = next(response.iter_content(4096), b"")      # an error body, never all of it
        code = re.search(r"<Code>([^<]{1,64})</Code>", head.decode("utf-8", "replace"))
        what = f"HTTP {status}" + (f" {code[1]}" if code else "")
        if status == 403 or (code and code[1] == "NoSuchBucket"):
            raise SeriesUnavailable(f"{what}: the bucket refuses anonymous reading")
        if status in (429, 500, 502, 503, 504) or status == 404:
            # 503 SlowDown is S3 throttling; 404 means the listing changed under us.
            raise TransientError(what, parse_retry_after(response.headers.get("Retry-After")))
        raise TransientError(what)

    def _transfer_error(self, exc: requests.RequestException, written: int,
                        url: str) -> Exception:
        if self._stop.is_set():
            return Interrupted()
        # An endpoint that cannot exist or whose TLS cannot pass: one line, not hours of retries
        misconfigured = misconfiguration(exc, str(urlsplit(url).hostname), "--idc-endpoint")
        if misconfigured:
            return FatalRunError(misconfigured, EXIT_USAGE)
        cut = self._watchdog.cut_reason()
        if cut:
            return TransientError(f"{cut}, after {written} bytes")
        return TransientError(f"connection failed after {written} bytes "
                              f"({type(exc).__name__})")


def parse_list_page(body: bytes) -> tuple[list[S3Object], Optional[str]]:
    """The objects of a ListObjectsV2 page, and the token of the next page (None: last)."""
    import xml.etree.ElementTree as ElementTree
    refuse_dtd(body)
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"a listing that is not S3's XML ({exc})") from None

    def text(element: ElementTree.Element, name: str) -> str:
        for child in element:
            if S3_NAMESPACE.sub("", child.tag) == name:
                return (child.text or "").strip()
        return ""
    objects = []
    for element in root:
        if S3_NAMESPACE.sub("", element.tag) != "Contents":
            continue
        size = as_count(text(element, "Size"))
        if size is None:
            raise TransientError(f"a listing with no size for {text(element, 'Key')!r}")
        objects.append(S3Object(text(element, "Key"), size, text(element, "ETag").strip('"')))
    truncated = text(root, "IsTruncated").lower() == "true"
    token = text(root, "NextContinuationToken") if truncated else ""
    if truncated and not token:
        raise TransientError("a truncated listing without a continuation token")
    return objects, token or None


# A document type declaration, or an entity or other declaration of one. expat expands
# internal entities within its own limits only (a 16 MiB page may grow a hundredfold), so a
# page is refused before it is parsed: S3 never sends a DTD.
XML_DECLARATION = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)", re.IGNORECASE)


def refuse_dtd(body: bytes) -> None:
    if XML_DECLARATION.search(body):
        raise TransientError("the listing declares a DTD (DOCTYPE or ENTITY), which S3 never "
                             "sends; not parsed")


def multipart_etag_matches(etag: str, handle: int, offset: int, size: int) -> Optional[int]:
    """The part size (MiB) that reproduces a multipart ETag (<md5 of part MD5s>-<parts>)
    from the bytes, or None: S3 does not store the part size, so the usual ones are tried."""
    digest, _, parts = etag.partition("-")
    for mib in MULTIPART_SIZES:
        part = mib * 1024 * 1024
        if -(-size // part) != int(parts):
            continue
        combined = hashlib.md5()
        for start in range(0, size, part):
            piece = hashlib.md5()
            for at in range(start, min(start + part, size), CHUNK_SIZE):
                piece.update(os.pread(handle, min(CHUNK_SIZE, start + part - at, size - at),
                                      offset + at))
            combined.update(piece.digest())
        if combined.hexdigest() == digest:
            return mib
    return None


class SeriesAttemptAbandoned(Exception):
    """Another object of the series failed for good: this one's download stops."""


@dataclass
class FetchedObject:
    item: S3Object
    offset: int
    md5: str
    by_size_only: bool = False
    retries: int = 0               # failed tries before this one (throttling, resets, ...)


class IdcSource:
    """IDC as a source of series: the records of a selection from its offline index, and a
    series fetched from its bucket, one object per instance, into one scratch file (one
    inode per series in flight), every object checked against its ETag and as DICOM of
    this series, then handed to the sink in InstanceNumber order under the names NBIA's
    NewFileNames gives, so the same series lands in the same place from either source."""

    name = "idc"
    scratch_suffix = ".objects"

    def __init__(self, index: IdcIndex, s3: S3Client, include_analysis_results: bool,
                 watchdog: TransferWatchdog, transport: dict[str, object],
                 timeout: tuple[float, float]):
        self.index = index
        self.s3 = s3
        self.include_analysis_results = include_analysis_results
        self.watchdog, self.transport, self.timeout = watchdog, transport, timeout

    def describe(self) -> str:
        where = self.s3.endpoint or "AWS S3 (public buckets)"
        return f"IDC (index {self.index.version}) at {where}"

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.index.collections.values())

    def records(self, selection: Selection) -> Selected:
        conditions: list[tuple[str, list[str]]] = []
        manifests: list[Manifest] = []
        uids: list[str] = []
        if selection.manifests or selection.retry_failed:
            manifests, uids = manifests_of(selection)
            conditions.append(("SeriesInstanceUID", uids))
        if selection.collection:
            collection = self.index.collection(selection.collection)
            if collection is None:
                raise FatalRunError(self._unknown_collection(selection.collection), EXIT_USAGE)
            conditions.append(("collection_id", [collection.id]))
        conditions += [(column, list(values)) for column, values in selection.filters().items()]
        # Named series are fetched whatever they are; a collection means what NBIA serves
        # for it: its original data, not the analysis results IDC files beside it.
        original_only = not (uids or selection.series_uids or self.include_analysis_results)
        rows = self.index.rows(conditions, original_only)
        records = [idc_record(row, self.index.collections[row["collection_id"]])
                   for row in rows]
        found = {r["SeriesInstanceUID"] for r in records}
        unknown = [u for u in (uids or list(selection.series_uids)) if u not in found]
        if manifests:
            log.info("%d series listed in %s; IDC's index has %d", len(uids),
                     ", ".join(str(m.path) for m in manifests), len(records))
        elif not records:
            raise FatalRunError("no series of IDC's index matches these filters: check the "
                                "values (compared exactly)", EXIT_USAGE)
        return Selected(records, unknown, manifests)

    def _unknown_collection(self, name: str) -> str:
        names = self.collections()
        close = suggest_collections(name, names)
        return (f"IDC's index has no collection {name!r}" +
                (f"; did you mean: {', '.join(close)}?" if close else
                 "; --mode idc --list-collections prints its names"))

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        bucket = str(series.record.get("aws_bucket") or "")
        uuid = str(series.record.get("crdc_series_uuid") or "")
        if not bucket or not uuid:
            raise SeriesUnavailable("IDC's index gives no bucket for it")
        listed = self._listing(series, bucket, uuid)
        fetched = self._download_all(series, bucket, listed, scratch, count, stop)
        return pack(lambda sink: self._verify_into(series, scratch, fetched, sink, stop))

    def _listing(self, series: "PlannedSeries", bucket: str, uuid: str) -> list[S3Object]:
        """The series' objects: exactly instanceCount of them, named like instances, and no
        more bytes than the index's size allows. A series prefix never changes in IDC (a
        revision gets a new uuid): anything else is a listing to distrust."""
        objects = self.s3.list(bucket, f"{uuid}/", series.image_count or MOST_OBJECTS)
        if len({item.key for item in objects}) != len(objects):
            raise TransientError(f"the listing of {uuid}/ names an object twice")
        for item in objects:
            inside = item.key.startswith(f"{uuid}/")
            name = item.key[len(uuid) + 1:] if inside else item.key
            if not inside or not S3_OBJECT_NAME.match(name):
                raise TransientError(f"the listing of {uuid}/ holds {name[:80]!r}, not an "
                                     "instance of the series")
        if series.image_count is not None and len(objects) != series.image_count:
            raise TransientError(f"the bucket lists {len(objects)} objects for it, IDC's "
                                 f"index {series.image_count}")
        total = sum(item.size for item in objects)
        if series.byte_limit is not None and total > series.byte_limit:
            raise TransientError(f"the listing adds up to {total} bytes, more than the index's "
                                 "size for the series allows")
        return objects

    def _download_all(self, series: "PlannedSeries", bucket: str, listed: list[S3Object],
                      scratch: Path, count: Callable[[int], None],
                      stop: threading.Event) -> list[FetchedObject]:
        """All objects at once (OBJECTS_IN_FLIGHT), each at its own offset of scratch, each
        retried a few times before the series' attempt fails. The first object that fails
        for good ends the attempt at once: the others stop mid-body, the queued never start."""
        offsets = list(itertools.accumulate([0] + [item.size for item in listed[:-1]]))
        abandon = threading.Event()
        threads: set[int] = set()
        handle = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            def fetch_one(pair: tuple[S3Object, int]) -> FetchedObject:
                threads.add(threading.get_ident())
                return self._download_one(series, bucket, pair[0], handle, pair[1], count,
                                          stop, abandon)
            with concurrent.futures.ThreadPoolExecutor(OBJECTS_IN_FLIGHT) as pool:
                futures = [pool.submit(fetch_one, pair) for pair in zip(listed, offsets)]
                done, _ = concurrent.futures.wait(
                    futures, return_when=concurrent.futures.FIRST_EXCEPTION)
                failed = next((f for f in futures if f in done and f.exception()), None)
                if failed is not None:
                    abandon.set()
                    for future in futures:
                        future.cancel()
                    self.watchdog.cut_threads(threads, "another object of the series failed")
                    raise failed.exception()       # type: ignore[misc]
                return [future.result() for future in futures]
        except OSError as exc:
            raise_if_disk_full(exc, scratch.parent)
            raise
        finally:
            os.close(handle)

    def _download_one(self, series: "PlannedSeries", bucket: str, item: S3Object, handle: int,
                      offset: int, count: Callable[[int], None], stop: threading.Event,
                      abandon: threading.Event) -> FetchedObject:
        for attempt in range(1, OBJECT_ATTEMPTS + 1):
            counted = AttemptBytes(count)
            try:
                digest = self.s3.download(bucket, item, handle, offset, counted, abandon)
                fetched = self._checked(item, handle, offset, digest.hexdigest())
                fetched.retries = attempt - 1
                return fetched
            except TransientError as exc:
                counted.take_back()
                if abandon.is_set():
                    raise SeriesAttemptAbandoned() from None
                if attempt == OBJECT_ATTEMPTS or stop.is_set():
                    raise TransientError(f"{item.key}: {exc}") from None
                log.debug("%s: %s: attempt %d failed: %s", series.label, item.key, attempt, exc)
                # The wait ends at once on a stop; an abandoned series waits out this pause
                # (2 s at most) rather than poll two events.
                if stop.wait(min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)):
                    raise Interrupted() from None
                if abandon.is_set():
                    raise SeriesAttemptAbandoned() from None
            except BaseException:
                counted.take_back()
                raise
        raise AssertionError("unreachable")

    def _checked(self, item: S3Object, handle: int, offset: int, md5: str) -> FetchedObject:
        """The bytes against the ETag: an MD5 for a single-part upload; a multipart ETag is
        recomputed with the usual part sizes, and only where none reproduces it is the
        object trusted by its size, which is logged and counted in the report."""
        if re.fullmatch(r"[0-9a-f]{32}", item.etag):
            if md5 != item.etag:
                raise TransientError(f"MD5 {md5}, but its ETag says {item.etag}")
            return FetchedObject(item, offset, md5)
        if re.fullmatch(r"[0-9a-f]{32}-[0-9]{1,5}", item.etag):
            if multipart_etag_matches(item.etag, handle, offset, item.size) is not None:
                return FetchedObject(item, offset, md5)
        return FetchedObject(item, offset, md5, by_size_only=True)

    def _verify_into(self, series: "PlannedSeries", scratch: Path, fetched: list[FetchedObject],
                     sink: "MemberSink", stop: threading.Event) -> "VerifiedSeries":
        """Every object must be DICOM of this series (header only); then, in InstanceNumber
        order, into the sink as <acquisition>-<instance>.dcm."""
        headers = []
        instances: set[str] = set()
        with open(scratch, "rb") as handle:
            for number, item in enumerate(fetched):
                fields = dicom_naming_fields(FileRegion(handle, item.offset, item.item.size))
                if fields is None or fields.series_uid != series.uid:
                    raise TransientError(f"{item.item.key} is not DICOM of this series")
                if fields.sop_uid in instances:      # one instance under two keys: twice in
                    raise TransientError(f"{item.item.key} repeats the instance "  # the output
                                         f"{fields.sop_uid[:64]}")
                instances.add(fields.sop_uid)
                headers.append((fields.instance if fields.instance is not None else number + 1,
                                fields.acquisition if fields.acquisition is not None else 1,
                                item))
        log_size_only(series, [f.item for f in fetched if f.by_size_only])
        width = len(str(len(fetched)))
        used: set[str] = set()
        members = []
        for instance, acquisition, item in sorted(headers, key=lambda h: (h[0], h[2].item.key)):
            if stop.is_set():
                raise Interrupted()
            name = unique_file_name(f"{acquisition}-{instance:0{width}d}.dcm", used)
            sink.add(name, item.item.size, read_range(scratch, item.offset,
                                                      item.offset + item.item.size))
            members.append(Member(item.item.key, name, item.item.size, item.md5))
        return VerifiedSeries(scratch, members, None, [],
                              by_size_only=sum(f.by_size_only for f in fetched),
                              retries=sum(f.retries for f in fetched))

    def close(self) -> None:
        self.s3.close()
        self.index.close()
        self.watchdog.close()


def log_size_only(series: "PlannedSeries", objects: list[S3Object]) -> None:
    """One line per series in the .out file; every name and ETag in the debug log."""
    for item in objects:
        log.debug("%s: %s has the ETag %s, which no usual part size reproduces",
                  series.label, item.key, item.etag)
    if objects:
        log.warning("%s: %d file(s) verified by their size only (multipart ETags that no "
                    "usual part size reproduces)", series.short_label, len(objects))


class FileRegion(io.RawIOBase):
    """A read-only view of bytes [offset, offset + size) of an open file, for pydicom: a
    header is read as far as it goes (a SEG's per-frame groups run to megabytes), never
    beyond the object, and nothing is copied into memory first."""

    def __init__(self, handle: io.BufferedReader, offset: int, size: int):
        super().__init__()
        self._handle, self._offset, self._size, self._at = handle, offset, size, 0
        self.name = f"{handle.name}@{offset}"      # pydicom names its dataset after it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = min(max(base + position, 0), self._size)
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer: bytearray) -> int:
        wanted = min(len(buffer), self._size - self._at)
        data = os.pread(self._handle.fileno(), wanted, self._offset + self._at) if wanted else b""
        buffer[:len(data)] = data
        self._at += len(data)
        return len(data)


# SOPInstanceUID, SeriesInstanceUID, AcquisitionNumber, InstanceNumber: all a name needs
NAMING_TAGS = [0x00080018, 0x0020000E, 0x00200012, 0x00200013]


def after_instance_number(tag: int, vr: Optional[str], length: int) -> bool:
    return tag > 0x00200013


class DicomNaming(NamedTuple):
    series_uid: str
    sop_uid: str
    instance: Optional[int]        # InstanceNumber and AcquisitionNumber name the file
    acquisition: Optional[int]


def dicom_naming_fields(region: io.RawIOBase) -> Optional[DicomNaming]:
    """What names and places a file, from its DICOM header; None when the bytes are no
    DICOM, or DICOM without the UIDs of an instance."""
    # The package whole first: threads importing its modules at once see them half made
    import pydicom  # noqa: F401
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial
    try:
        # Only as far as the last of the four tags (0020,0013): what follows (an enhanced
        # image's per-frame sequences: megabytes) is never parsed.
        dataset = read_partial(io.BufferedReader(region), stop_when=after_instance_number,
                               specific_tags=NAMING_TAGS)
        series_uid = str(dataset.get("SeriesInstanceUID", ""))
        sop_uid = str(dataset.get("SOPInstanceUID", ""))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
            AttributeError, IndexError):
        return None
    if not series_uid or not sop_uid:
        return None
    return DicomNaming(series_uid, sop_uid, as_count(dataset.get("InstanceNumber")),
                       as_count(dataset.get("AcquisitionNumber")))


# -- NBIA first, IDC where NBIA cannot serve: --mode auto ---------------------------------------

class AutoSource:
    """NBIA first; a series NBIA refuses, or every series once NBIA looks down, comes from
    IDC when IDC's index has it, into the same archive under the same folder. NBIA gone
    before the run could plan: the plan comes from IDC's index."""

    name = "auto"
    DOWN_AFTER = 3        # NBIA attempts failing in a row, across series, that make it "down"

    def __init__(self, nbia: NbiaSource, idc: IdcSource):
        self.nbia, self.idc = nbia, idc
        self.scratch_suffix = ".download"
        self.watchdog, self.transport, self.timeout = nbia.watchdog, nbia.transport, nbia.timeout
        self._idc_records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._nbia_failures = 0
        self.nbia_down = False

    def describe(self) -> str:
        return f"{self.nbia.describe()}, else {self.idc.describe()}"

    def collections(self) -> list[str]:
        try:
            return self.nbia.collections()
        except FatalRunError as exc:
            log.warning("NBIA cannot list its collections (%s): IDC's index does", exc)
            return self.idc.collections()

    def records(self, selection: Selection) -> "Selected":
        try:
            selected = self.nbia.records(selection)
        except FatalRunError as exc:
            log.warning("NBIA cannot plan this run (%s); planning from IDC's index", exc)
            self.nbia_down = True
            selected = self.idc.records(selection)
            self._idc_records = {r["SeriesInstanceUID"]: r for r in selected.records}
            return selected
        uids = [r["SeriesInstanceUID"] for r in selected.records] + selected.unknown
        rows = self.idc.index.rows([("SeriesInstanceUID", uids)], original_only=False)
        self._idc_records = {row["SeriesInstanceUID"]: idc_record(
            row, self.idc.index.collections[row["collection_id"]]) for row in rows}
        log.info("IDC's index has %d of these %d series, for what NBIA cannot serve",
                 len(self._idc_records), len(uids))
        return selected

    def fetch(self, series: "PlannedSeries", scratch: Path, count: Callable[[int], None],
              pack: "Packing", stop: threading.Event) -> "tuple[VerifiedSeries, Prepared]":
        if not self.nbia_down:
            try:
                fetched = self.nbia.fetch(series, scratch, count, pack, stop)
                self._nbia_answered(True)
                return fetched
            except SeriesUnavailable as exc:
                if series.uid not in self._idc_records:
                    raise
                log.info("%s: NBIA refuses it (%s); fetching it from IDC", series.short_label,
                         exc)
            except TransientError:
                self._nbia_answered(False)
                if not self.nbia_down or series.uid not in self._idc_records:
                    raise
        record = self._idc_records.get(series.uid)
        if record is None:
            raise SeriesUnavailable("NBIA cannot serve it and IDC's index does not have it")
        from_idc = dataclasses.replace(series, record=record,
                                       image_count=as_count(record.get("ImageCount")),
                                       file_size=as_count(record.get("FileSize")) or 0)
        verified, prepared = self.idc.fetch(from_idc, scratch, count, pack, stop)
        verified.record = record
        return verified, prepared

    def _nbia_answered(self, ok: bool) -> None:
        with self._lock:
            self._nbia_failures = 0 if ok else self._nbia_failures + 1
            if self._nbia_failures >= self.DOWN_AFTER and not self.nbia_down:
                self.nbia_down = True
                log.warning("NBIA failed %d times in a row: the rest of the run comes from "
                            "IDC", self._nbia_failures)

    def close(self) -> None:
        self.nbia.close()
        self.idc.close()


# ==========================================================================================
# 3. Planning: which series, and where each goes
# ==========================================================================================

@dataclass(frozen=True)
class PlannedSeries:
    uid: str
    collection: str
    path: str                      # <PatientID>/<date>-<StudyDesc>-<uid5>/<No>-<Desc>-<uid5>
    record: dict                   # the getSeries object as served
    image_count: Optional[int]
    file_size: int

    @property
    def label(self) -> str:
        return f"{self.collection}/{self.path}"

    @property
    def short_label(self) -> str:
        """<Collection>/<patient>/<series folder>: enough to find it, short enough for the
        lines of a slurm .out file read in a 100-column terminal (the study is in label)."""
        parts = self.path.split("/")
        return f"{self.collection}/{parts[0]}/{parts[-1]}"

    @property
    def byte_limit(self) -> Optional[int]:
        """The most bytes a zip of this series may hold, inflated or not: twice its FileSize
        plus room for zip headers, LICENSE and md5hashes.csv. None when the server gave no
        FileSize. A server that sends more is cut off instead of filling the disk."""
        if self.file_size <= 0:
            return None
        return 2 * self.file_size + 4096 * (self.image_count or 0) + 16 * 1024 * 1024


SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")
# Names of the collection files (LICENSE, metadata.csv, MD5SUMS, with a part's suffix): no
# patient folder may take one of them.
COLLECTION_FILE_NAME = re.compile(r"^(license|md5sums|metadata|citation)(\..*)?$",
                                  re.IGNORECASE)


def is_uid(text: object) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. A server's text
    must be one before it names anything."""
    return isinstance(text, str) and len(text) <= 64 and UID_PATTERN.match(text) is not None


def as_count(value: object) -> Optional[int]:
    """A non-negative whole number from a JSON value (NBIA sends numbers; a hostile or
    broken server may send "12.5MB"), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and 0 <= number < 2 ** 63 else None


def usable_records(rows: list[dict], endpoint: str) -> list[dict]:
    """The getSeries rows that can be planned: a valid SeriesInstanceUID, scalar values,
    FileSize and ImageCount as numbers (or left out). The rest is counted in one warning."""
    usable: list[dict] = []
    bad: list[object] = []
    for row in rows:
        if not is_uid(row.get("SeriesInstanceUID")):
            bad.append(row.get("SeriesInstanceUID"))
            continue
        record = {str(key): value if value is None or isinstance(value, (str, int, float))
                  else json.dumps(value) for key, value in row.items()}
        for key in ("FileSize", "ImageCount"):
            if key in record and as_count(record[key]) is None:
                log.debug("%s: %s %r of %s is no number; ignored", endpoint, key, record[key],
                          record["SeriesInstanceUID"])
                del record[key]
        usable.append(record)
    if bad:
        log.warning("%s: skipped %d row(s) without a valid SeriesInstanceUID (first: %.80r)",
                    endpoint, len(bad), bad[0])
    return usable


NBIA_DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")


def clean_component(text: object, max_length: int = 64) -> str:
    """One safe path component: ASCII letters, digits and ._+- only, no leading dots
    (so never hidden, never '..'), capped in length; empty becomes NA."""
    ascii_text = unicodedata.normalize("NFKD", str(text) if text is not None else "")
    ascii_text = ascii_text.encode("ascii", "ignore").decode("ascii")
    cleaned = SAFE_CHARS.sub("_", ascii_text).strip("._-")
    cleaned = cleaned[:max_length].rstrip("._-")
    return cleaned or "NA"


def iso_date(nbia_date: Optional[str]) -> Optional[str]:
    """NBIA v4 dates are MM-DD-YYYY; folders use YYYY-MM-DD so they sort."""
    match = NBIA_DATE.match(nbia_date or "")
    if not match:
        return None
    month, day, year = match.groups()
    return f"{year}-{month}-{day}"


def study_date(records: list[dict]) -> str:
    """StudyDate, else the study's earliest SeriesDate, else unknown_date: one folder per
    study even when its series were acquired on different days."""
    for record in records:
        date = iso_date(record.get("StudyDate"))
        if date:
            return date
    series_dates = sorted(d for d in (iso_date(r.get("SeriesDate")) for r in records) if d)
    return series_dates[0] if series_dates else "unknown_date"


def unique_names(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """entries: (key, stem, uid) -> key: f"{stem}-{uid suffix}", lengthening the UID suffix
    of colliding names until they differ. Names compare case-insensitively, because the
    archive may be extracted on macOS or Windows."""
    width = {key: 5 for key, _, _ in entries}
    info = {key: (stem, uid) for key, stem, uid in entries}

    def name_of(key: str) -> str:
        stem, uid = info[key]
        return f"{stem}-{clean_component(uid[-width[key]:], 64)}"

    while True:
        groups: dict[str, list[str]] = defaultdict(list)
        for key in info:
            groups[name_of(key).casefold()].append(key)
        clashes = [keys for keys in groups.values() if len(keys) > 1]
        if not clashes:
            return {key: name_of(key) for key in info}
        grew = False
        for keys in clashes:
            for key in keys:
                if width[key] < len(info[key][1]):
                    width[key] += 1
                    grew = True
        if not grew:
            # Whole UIDs still clash (e.g. identical UIDs): number them, deterministically.
            names = {key: name_of(key) for key in info}
            for keys in clashes:
                for n, key in enumerate(sorted(keys)[1:], start=2):
                    names[key] = f"{names[key]}-{n}"
            return names


def plan_collection(collection: str, records: list[dict]) -> list[PlannedSeries]:
    """Give every series its folder: <PatientID>/<date>-<StudyDesc>-<uid5>/<No>-<Desc>-<uid5>."""
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_patient[str(record.get("PatientID", ""))].append(record)
    patient_dirs = _unique_patient_dirs(sorted(by_patient))

    planned: list[PlannedSeries] = []
    for patient_id, patient_records in sorted(by_patient.items()):
        by_study: dict[str, list[dict]] = defaultdict(list)
        for record in patient_records:
            by_study[str(record.get("StudyInstanceUID") or "")].append(record)
        study_dirs = unique_names([
            (study_uid, f"{study_date(rs)}-{clean_component(rs[0].get('StudyDesc'))}", study_uid)
            for study_uid, rs in by_study.items()])
        for study_uid, study_records in by_study.items():
            series_dirs = unique_names([
                (r["SeriesInstanceUID"],
                 f"{clean_component(r.get('SeriesNumber'), 16)}-"
                 f"{clean_component(r.get('SeriesDescription'))}",
                 r["SeriesInstanceUID"])
                for r in study_records])
            for record in study_records:
                uid = record["SeriesInstanceUID"]
                count = as_count(record.get("ImageCount"))
                planned.append(PlannedSeries(
                    uid=uid, collection=collection,
                    path=f"{patient_dirs[patient_id]}/{study_dirs[study_uid]}/{series_dirs[uid]}",
                    record=record, image_count=count or None,
                    file_size=as_count(record.get("FileSize")) or 0))
    return planned


def _unique_patient_dirs(patient_ids: list[str]) -> dict[str, str]:
    """Two IDs that clean to the same folder ('A/B', 'A_B') get -2, -3... in sorted order;
    an ID named like a collection file (MD5SUMS, LICENSE, CITATION, metadata) gets -patient."""
    taken: dict[str, int] = defaultdict(int)
    dirs = {}
    for patient_id in patient_ids:
        base = clean_component(patient_id, 64)
        if COLLECTION_FILE_NAME.match(base):
            base = f"{base}-patient"
        taken[base.casefold()] += 1
        n = taken[base.casefold()]
        dirs[patient_id] = base if n == 1 else f"{base}-{n}"
    return dirs


@dataclass(frozen=True)
class Manifest:
    path: Path
    basket: Optional[str]                  # databasketId, as the TCIA portal names the cart
    uids: list[str]
    stray: list[tuple[int, str]]           # (line number, text): the first lines not a UID
    stray_count: int = 0                   # how many lines were not a UID


MANIFEST_MARKER = "ListOfSeriesToDownload="
MANIFEST_HEADER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*=")     # key=value, before the list
MANIFEST_LINE = 1024       # longer lines are read in pieces, each a stray line
STRAY_SHOWN = 5            # stray lines quoted in the log
STRAY_LIMIT = 1000         # past this many stray lines, a file that is mostly not UIDs is refused


def failed_run_origin(path: Path) -> dict[str, str]:
    """The tcia_downloader.* keys of a <name>.failed.tcia header (none in other manifests)."""
    origin: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for line in iter(lambda: handle.readline(MANIFEST_LINE), ""):
                if line.strip().startswith(MANIFEST_MARKER):
                    break
                key, _, value = line.strip().partition("=")
                if key.startswith(FAILED_RUN_KEY):
                    origin[key[len(FAILED_RUN_KEY):]] = value.strip()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    return origin


def manifests_of(selection: Selection) -> tuple[list[Manifest], list[str]]:
    """The manifests (or failure list) of a selection, read, and their UIDs once each."""
    manifests = [read_manifest(path) for path in
                 (selection.manifests or (selection.retry_failed,))]
    for manifest in manifests:
        warn_stray_lines(manifest)
    return manifests, list(dict.fromkeys(uid for m in manifests for uid in m.uids))


def warn_stray_lines(manifest: Manifest) -> None:
    for number, text in manifest.stray:
        log.warning("%s line %d is not a SeriesInstanceUID; skipped: %r", manifest.path,
                    number, text)
    if manifest.stray_count > len(manifest.stray):
        log.warning("%s: %d more lines are not SeriesInstanceUIDs; skipped", manifest.path,
                    manifest.stray_count - len(manifest.stray))


def read_manifest(path: Path) -> Manifest:
    """A .tcia manifest: key=value lines, then one SeriesInstanceUID per line after
    ListOfSeriesToDownload=. CRLF, blank lines, a missing last newline and stray lines
    (one official test file has one) are tolerated; a bare list of UIDs is too. Read line
    by line: a file that is mostly not UIDs (the wrong file, random bytes) is refused early
    instead of being queried line by line."""
    basket = None
    uids: dict[str, None] = {}
    stray: list[tuple[int, str]] = []
    stray_count = 0
    in_list = False
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for number, line in enumerate(iter(lambda: handle.readline(MANIFEST_LINE), ""),
                                          start=1):
                candidate = line.strip()
                if not in_list and candidate.startswith(MANIFEST_MARKER):
                    # What came before was the header: UIDs there are not in the list.
                    in_list, uids, stray, stray_count = True, {}, [], 0
                    candidate = candidate[len(MANIFEST_MARKER):].strip()
                key, _, value = candidate.partition("=")
                if not in_list and key == "databasketId" and value.strip():
                    basket = value.strip()
                if not candidate:
                    continue
                if is_uid(candidate):
                    uids[candidate] = None
                elif in_list or not MANIFEST_HEADER.match(candidate):
                    stray_count += 1
                    if len(stray) < STRAY_SHOWN:
                        stray.append((number, printable(candidate[:80])))
                    if stray_count > STRAY_LIMIT and stray_count > len(uids):
                        raise FatalRunError(f"{path} is mostly not SeriesInstanceUIDs "
                                            f"({stray_count} of its first {number} lines): is "
                                            "it a .tcia manifest?", EXIT_USAGE)
    except OSError as exc:
        raise FatalRunError(f"{path}: cannot read it ({exc.strerror})", EXIT_USAGE) from None
    if not uids and failed_run_origin(path).get("repair") != "yes":
        # (A repair manifest may list none: only the collection files were damaged.)
        raise FatalRunError(f"{path} lists no SeriesInstanceUID: is it a .tcia manifest?",
                            EXIT_USAGE)
    return Manifest(path, basket, list(uids), stray, stray_count)


def records_for_uids(api: TciaApi, uids: list[str]) -> tuple[list[dict], list[str]]:
    """getSeries records of these UIDs, in their order, and the UIDs the server does not
    know. getSeriesMetadata (thousands of UIDs per call) says which collections they are in;
    each collection's getSeries (cached) then gives the same records a collection run uses."""
    collections: set[str] = set()
    try:
        for start in range(0, len(uids), 1000):
            for row in api.series_metadata(uids[start:start + 1000]):
                # NBIA's own column is "Project"; the documented form says "Collection".
                name = row.get("Collection") or row.get("Project")
                if name:
                    collections.add(str(name))
    except ApiError as exc:
        log.warning("getSeriesMetadata is unavailable (%s); asking getSeries per series", exc)
    wanted = set(uids)
    found: dict[str, dict] = {}
    for collection in sorted(collections):
        for record in api.series(Collection=collection):
            if record.get("SeriesInstanceUID") in wanted:
                found[record["SeriesInstanceUID"]] = record
    for uid in [u for u in uids if u not in found]:
        for record in api.series(SeriesInstanceUID=uid):
            found[uid] = record
    return [found[u] for u in uids if u in found], [u for u in uids if u not in found]


def records_for_filters(api: TciaApi, selection: Selection) -> list[dict]:
    """One getSeries call per combination of filter values (NBIA takes one value per
    parameter), united by SeriesInstanceUID."""
    filters = selection.filters()
    combinations: list[dict[str, str]] = [{}]
    for parameter, values in filters.items():
        combinations = [{**c, parameter: v} for c in combinations for v in dict.fromkeys(values)]
    base = {"Collection": selection.collection} if selection.collection else {}
    found: dict[str, dict] = {}
    for combination in combinations:
        for record in api.series(**base, **combination):
            found.setdefault(record["SeriesInstanceUID"], record)
    return list(found.values())


def selection_name(selection: Selection, manifests: list[Manifest]) -> str:
    """The archive's name: the collection; a manifest's databasketId or file name; for
    filters the collection plus what was filtered, so that a part never poses as the whole."""
    if selection.retry_name:
        return selection.retry_name
    if selection.retry_failed:
        stem = selection.retry_failed.name
        for ending in (".failed.tcia", ".damaged.tcia", ".tcia"):
            if stem.endswith(ending):
                return stem[:-len(ending)]
        return clean_component(stem, 100)
    if manifests:
        first = manifests[0]
        stem = first.basket or first.path.name
        stem = stem[:-5] if stem.lower().endswith(".tcia") else stem
        more = f"-and-{len(manifests) - 1}-more" if len(manifests) > 1 else ""
        return clean_component(stem, 100) + more
    filters = selection.filters()
    if not filters:
        return clean_component(selection.collection, 100)
    described = "_".join(f"{parameter}-{'+'.join(values)}" for parameter, values in filters.items())
    name = f"{selection.collection or 'TCIA'}.{described}"
    if len(name) > 100:
        digest = hashlib.sha1(described.encode()).hexdigest()[:10]
        name = f"{selection.collection or 'TCIA'}.selection-{digest}"
    return clean_component(name, 120)


def plan_records(records: list[dict]) -> list[PlannedSeries]:
    """Folders for series of one or more collections (each collection planned on its own)."""
    unique = {}
    for record in records:
        unique.setdefault(record["SeriesInstanceUID"], record)
    if len(unique) < len(records):
        log.warning("the server listed %d series twice; each is downloaded once",
                    len(records) - len(unique))
    by_collection: dict[str, list[dict]] = defaultdict(list)
    for record in unique.values():
        by_collection[str(record.get("Collection", "NA"))].append(record)
    return [series for collection, group in sorted(by_collection.items())
            for series in plan_collection(clean_component(collection, 100), group)]


def shard_of(planned: list[PlannedSeries], shard: Shard) -> list[PlannedSeries]:
    """Part shard.index of a partition balanced by FileSize: largest series first, each to
    the lightest part so far. Every array task computes the same partition on its own."""
    loads = [0] * shard.count
    mine: list[PlannedSeries] = []
    for series in sorted(planned, key=lambda s: (-s.file_size, s.uid)):
        lightest = min(range(shard.count), key=lambda i: (loads[i], i))
        loads[lightest] += max(series.file_size, 1)   # a size-less series still counts
        if lightest == shard.index:
            mine.append(series)
    return mine


def suggest_collections(name: str, known: list[str]) -> list[str]:
    """Close names: case and punctuation differences are the usual mistake."""
    def squash(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.casefold())
    exact = [k for k in known if squash(k) == squash(name)]
    if exact:
        return exact
    by_squash = {squash(k): k for k in known}
    close = difflib.get_close_matches(squash(name), list(by_squash), n=5, cutoff=0.6)
    return [by_squash[c] for c in close]


# ==========================================================================================
# 4. Per-series work: download, verify, clean
# ==========================================================================================

@dataclass(frozen=True)
class Member:
    entry: str        # name inside the zip
    name: str         # file name in the output folder
    size: int
    md5: str


@dataclass
class VerifiedSeries:
    """A series as its source delivered it, every file verified: what the output records."""
    path: Path
    members: list[Member]
    license_text: Optional[str]
    dropped: list[tuple[str, str]]
    record: Optional[dict] = None      # the serving source's record, if not the plan's
    by_size_only: int = 0              # files whose checksum could not be checked
    retries: int = 0                   # downloads of single files tried again (IDC objects)

    @property
    def bytes(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def source(self) -> str:
        return str((self.record or {}).get("Source") or "")


class Md5TableMissing(Exception):
    """A readable zip without md5hashes.csv."""


def safe_entry_name(name: str) -> bool:
    """A plain file name: no directories, not absolute, no '..', no control characters."""
    return (bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
            and not any(ord(c) < 32 for c in name))


def unique_file_name(entry: str, used: set[str]) -> str:
    """The entry's name made safe; a clash after cleaning gets -2, -3... before the suffix."""
    name = clean_component(entry, 128)
    stem, dot, suffix = name.rpartition(".")
    candidate, n = name, 1
    while candidate.casefold() in used:
        n += 1
        candidate = f"{stem}-{n}.{suffix}" if dot else f"{name}-{n}"
    used.add(candidate.casefold())
    return candidate


LICENSE_LIMIT = 1024 * 1024          # TCIA's LICENSE is a paragraph
MD5_ROW_LIMIT = 512                  # bytes per md5hashes.csv row: a name and 32 hex digits


def read_small_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A zip entry that is read whole (LICENSE, md5hashes.csv), at most limit bytes: a
    series whose small files are absurdly large is a bad transfer, not a reason to run out
    of memory. The bytes read decide, not the size the zip claims."""
    with archive.open(name) as entry:
        data = entry.read(limit + 1)
    if len(data) > limit:
        raise TransientError(f"{name} in the zip is larger than {limit} bytes; refused")
    return data


def read_md5_table(archive: zipfile.ZipFile) -> dict[str, str]:
    limit = MD5_ROW_LIMIT * len(archive.infolist()) + 64 * 1024
    text = read_small_entry(archive, MD5_TABLE, limit).decode("utf-8", "replace")
    table: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or row[0].strip() == "Filename":
            continue
        table[row[0].strip()] = row[1].strip().lower()
    return table


class MemberSink(Protocol):
    """Where verify_zip streams each file it keeps (a tar/xz stream, a folder)."""

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None: ...


HEAD_SIZE = 64 * 1024          # enough for nearly every DICOM header; more is read if not


def read_head(entry: io.BufferedIOBase, size: int) -> bytes:
    return entry.read(min(size, HEAD_SIZE))


def series_uid_in(head: bytes) -> Optional[str]:
    """SeriesInstanceUID from the first bytes of a DICOM file (pixels never parsed), or
    None when these bytes do not reach it or are no DICOM."""
    import pydicom  # imported here: pydicom takes a while to import and --help needs none of it
    from pydicom.errors import InvalidDicomError
    try:
        dataset = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True,
                                  specific_tags=["SeriesInstanceUID"])
        return str(dataset.get("SeriesInstanceUID", "")) or None
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
            AttributeError, IndexError):
        return None


def verify_zip(path: Path, series: PlannedSeries, sink: Optional[MemberSink] = None,
               stop: Optional[threading.Event] = None) -> VerifiedSeries:
    """Check every listed file's MD5 and keep what belongs to the series, streaming what is
    kept into sink in the same pass: each entry is inflated and hashed once. md5hashes.csv
    is the zip's last entry, but the central directory gives it first.

    Raises TransientError (truncated, mismatching, incomplete: download again; what went
    into sink must then be discarded) or Md5TableMissing (the server sent no md5hashes.csv)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TransientError(f"truncated or unreadable zip ({exc})") from None
    with archive:
        names = archive.namelist()
        if MD5_TABLE not in names:
            raise Md5TableMissing()
        try:
            table = read_md5_table(archive)
            missing = sorted(set(table) - set(names))
            if missing:
                raise TransientError(f"{len(missing)} file(s) listed in md5hashes.csv are "
                                     f"missing from the zip (first: {missing[0]})")
            check_entry_sizes(archive, series)
            return _check_entries(archive, path, series, table, sink, stop)
        except (zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError, OSError,
                csv.Error) as exc:
            raise TransientError(f"damaged zip entry ({exc})") from None
        except (RuntimeError, NotImplementedError) as exc:    # encrypted, unknown method
            raise TransientError(f"unreadable zip entry ({exc})") from None


def check_entry_sizes(archive: zipfile.ZipFile, series: PlannedSeries) -> None:
    """What the zip would inflate to must fit the series' FileSize (a zip bomb, or a
    gigantic entry listed in md5hashes.csv, is a bad series). zipfile stops reading an
    entry at its declared size and checks its CRC, so the declared sizes bound the reads."""
    limit = series.byte_limit
    declared = sum(info.file_size for info in archive.infolist())
    if limit is not None and declared > limit:
        raise TransientError(f"the zip would inflate to {declared} bytes, far more than the "
                             f"server's FileSize of {series.file_size}; refused")


def _check_entries(archive: zipfile.ZipFile, path: Path, series: PlannedSeries,
                   table: dict[str, str], sink: Optional[MemberSink],
                   stop: Optional[threading.Event]) -> VerifiedSeries:
    members: list[Member] = []
    dropped: list[tuple[str, str]] = []
    license_text: Optional[str] = None
    names_used: set[str] = set()
    for info in archive.infolist():
        entry = info.filename
        if entry == MD5_TABLE:
            continue
        if entry == LICENSE_ENTRY:
            license_text = read_small_entry(archive, entry, LICENSE_LIMIT).decode("utf-8",
                                                                                  "replace")
            continue
        if info.is_dir() or not safe_entry_name(entry):
            dropped.append((entry, "unsafe name (a directory, an absolute path or '..')"))
            continue
        if entry not in table:
            dropped.append((entry, "not listed in md5hashes.csv"))
            continue
        with archive.open(info) as stream:
            keep, why, md5 = _take_entry(stream, info, series, sink,
                                         lambda: unique_file_name(entry, names_used), stop)
        if md5 != table[entry]:
            raise TransientError(f"MD5 mismatch for {entry}")
        if keep is None:
            dropped.append((entry, why))
        else:
            members.append(Member(entry=entry, name=keep, size=info.file_size, md5=md5))
    if series.image_count is not None and len(members) != series.image_count:
        raise TransientError(f"{len(members)} DICOM files, but the server's ImageCount is "
                             f"{series.image_count}")
    if not members:
        raise TransientError("the zip holds no DICOM file of this series")
    return VerifiedSeries(path=path, members=members, license_text=license_text, dropped=dropped)


def _take_entry(stream: io.BufferedIOBase, info: zipfile.ZipInfo, series: PlannedSeries,
                sink: Optional[MemberSink], name_for: Callable[[], str],
                stop: Optional[threading.Event]) -> tuple[Optional[str], str, str]:
    """Read one listed entry once: decide from its head whether it belongs to the series,
    stream it into sink if so, and hash all of it. Returns (output name or None, why it was
    dropped, md5)."""
    digest = hashlib.md5()
    head = read_head(stream, info.file_size)
    uid = None
    if head[128:132] == b"DICM":
        uid = series_uid_in(head)
        while uid is None and len(head) < info.file_size:   # a header longer than the head
            more = stream.read(max(len(head), HEAD_SIZE))
            if not more:
                break
            head += more
            uid = series_uid_in(head)
    digest.update(head)

    def chunks() -> Iterator[bytes]:
        yield head
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            if stop is not None and stop.is_set():
                raise Interrupted()
            digest.update(chunk)
            yield chunk

    if head[128:132] != b"DICM":
        keep, why = None, "not a DICOM file"
    elif uid is None:
        keep, why = None, "not a readable DICOM file"
    elif uid != series.uid:
        keep, why = None, f"belongs to another series ({uid})"
    else:
        keep, why = name_for(), ""
    if keep is not None and sink is not None:
        sink.add(keep, info.file_size, chunks())
    else:
        for _ in chunks():     # dropped files are hashed too: a mismatch means a bad transfer
            pass
    return keep, why, digest.hexdigest()


# ==========================================================================================
# 5. Archive writing
# ==========================================================================================

def read_only(journal: Path) -> "contextlib.closing[sqlite3.Connection]":
    """A journal opened for reading only (--verify, --extract and checks that must not
    write to it), closed when the with-block ends. The path is quoted: a '?' or '#' in a
    folder name would end it in the URI."""
    return contextlib.closing(sqlite3.connect(f"file:{quote(str(journal))}?mode=ro", uri=True))


class JournalUnusable(Exception):
    """A file at a journal's name that is not a readable journal of this tool: not sqlite,
    another program's tables, or a row that is not what this tool writes."""


# The tables and columns a journal needs (stream_sha256 came in 0.4: it may be missing).
JOURNAL_TABLES = {
    "meta": {"key", "value"},
    "series": {"uid", "collection", "path", "archive_end", "tar_end", "files", "bytes",
               "record", "license", "committed_at"},
    "files": {"uid", "name", "md5", "size"},
    "requested": {"uid"},
}


def roll_back_hot_journal(path: Path) -> None:
    """A kill mid-commit left a hot journal: a read-only connection cannot roll it back
    (SQLITE_READONLY_ROLLBACK), a read-write one does so on its first read."""
    if Path(f"{path}-journal").exists():
        with contextlib.closing(sqlite3.connect(str(path))) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()


def journal_columns(db: sqlite3.Connection) -> dict[str, set[str]]:
    """table -> columns of the journal's tables that exist (a kill while it was being
    created leaves some out). JournalUnusable when they are not ours: a table of ours with
    other columns, or only other programs' tables."""
    tables = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite%'")]
    ours = {}
    for table in tables:
        if table in JOURNAL_TABLES:
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(JOURNAL_TABLES[table] - columns)
            if missing:
                raise JournalUnusable(f"its table {table} has no column {missing[0]}: it is "
                                      "not a journal of this tool")
            ours[table] = columns
    if tables and not ours:
        raise JournalUnusable(f"it is a database of another program (tables: "
                              f"{', '.join(sorted(tables)[:3])})")
    return ours


def read_journal(path: Path) -> tuple[dict[str, str], bool]:
    """({committed series UID: "<Collection>/<path>"}, finished?) of a journal, read-only;
    nothing if it is absent or was cut short before its tables existed (a kill right after
    it was created). For --dry-run and --update, which must not write, and before a run
    opens it: a journal that is not one of ours is one line, not a traceback later."""
    if not path.exists():
        return {}, False
    try:
        snapshot = read_snapshot(path)
    except JournalUnusable as exc:
        raise FatalRunError(f"the journal {path} is unusable ({exc}); move it away to start "
                            "over", EXIT_USAGE) from None
    committed = {stream.uid: stream.folder for stream in snapshot.streams}
    return committed, snapshot.meta.get("finished") == "yes"


@dataclass(frozen=True)
class JournalStream:
    """A committed series as its journal row has it."""
    uid: str
    folder: str                  # <Collection>/<series path>
    end: int                     # where its stream ends in the archive (0 in a folder tree)
    sha256: Optional[str]        # of its stream (None in a journal of 0.3, or a tree)
    record: dict                 # its getSeries record


@dataclass(frozen=True)
class JournalSnapshot:
    """A journal read once, in one read transaction: a run that writes to it meanwhile
    cannot make one part of what was read disagree with another."""
    path: Path
    streams: list[JournalStream]               # in archive order
    meta: dict[str, str]
    files: dict[str, dict[str, str]]           # uid -> {<Collection>/<name>: MD5}, if read

    def reference(self, count: int) -> dict[str, str]:
        """name -> MD5 of the files of the first count streams."""
        return {name: md5 for stream in self.streams[:count]
                for name, md5 in self.files.get(stream.uid, {}).items()}


def read_snapshot(path: Path, files: bool = False) -> JournalSnapshot:
    """The journal at path (with its files' MD5s if asked: a large table), or
    JournalUnusable with why, in words."""
    try:
        roll_back_hot_journal(path)
        with read_only(path) as db:
            db.execute("BEGIN")                   # one snapshot for every SELECT below
            tables = journal_columns(db)
            meta = dict(db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            sha = "stream_sha256" if "stream_sha256" in tables.get("series", ()) else "NULL"
            rows = db.execute(f"SELECT uid, collection, path, archive_end, {sha}, record "
                              "FROM series ORDER BY archive_end, uid").fetchall() \
                if "series" in tables else []
            listed = db.execute("SELECT f.uid, s.collection || '/' || f.name, f.md5 FROM files f "
                                "JOIN series s ON s.uid = f.uid").fetchall() \
                if files and {"series", "files"} <= set(tables) else []
    except sqlite3.Error as exc:
        raise JournalUnusable(f"it cannot be read as an sqlite journal ({exc})") from None
    by_uid: dict[str, dict[str, str]] = defaultdict(dict)
    for uid, name, md5 in listed:
        by_uid[uid][name] = md5
    return JournalSnapshot(path, [journal_stream(row) for row in rows],
                           {str(k): str(v) for k, v in meta.items()}, dict(by_uid))


def journal_stream(row: tuple) -> JournalStream:
    """One series row, checked: what this tool writes, or JournalUnusable."""
    uid, collection, where, end, sha256, record = row
    try:
        parsed = json.loads(record)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise JournalUnusable(f"the record of series {printable(str(uid))[:80]} is not a JSON "
                              "object")
    if not isinstance(end, int) or not all(isinstance(v, str) for v in (uid, collection, where)):
        raise JournalUnusable(f"the row of series {printable(str(uid))[:80]} is not one this "
                              "tool writes")
    return JournalStream(uid, f"{collection}/{where}", end, sha256, parsed)


class Journal:
    """sqlite3 record of committed series: what is in the output and where the archive
    ends after each one. A row is written only after the data it describes is fsynced."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS series (
            uid TEXT PRIMARY KEY, collection TEXT NOT NULL, path TEXT NOT NULL,
            archive_end INTEGER NOT NULL, tar_end INTEGER NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL,
            record TEXT NOT NULL, license TEXT, committed_at TEXT NOT NULL,
            stream_sha256 TEXT);
        CREATE TABLE IF NOT EXISTS files (
            uid TEXT NOT NULL, name TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL);
        CREATE INDEX IF NOT EXISTS files_uid ON files(uid);
        CREATE TABLE IF NOT EXISTS requested (uid TEXT PRIMARY KEY);
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(self.SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(series)")}
            if "stream_sha256" not in columns:      # a journal of version 0.3
                self._db.execute("ALTER TABLE series ADD COLUMN stream_sha256 TEXT")
        except sqlite3.Error as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: sqlite3.Error) -> FatalRunError:
        """One line for a journal that cannot be read or written; a full disk says so."""
        if getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13) \
                or no_space_left(self.path.parent):
            return disk_full(self.path)
        if isinstance(exc, sqlite3.OperationalError):
            return FatalRunError(f"the journal {self.path} cannot be written ({exc}); check "
                                 "the folder and the filesystem, then rerun to resume")
        return FatalRunError(f"the journal {self.path} is unreadable ({exc}); move it away to "
                             "start over", EXIT_USAGE)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing, even under kill -9. The connection is in autocommit mode
        (isolation_level=None), where `with connection:` would NOT open a transaction and
        every statement would commit on its own. sqlite rolls back by itself on some errors
        (a full disk): then there is no transaction left to roll back."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._failure(exc) from None

    def get(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def committed(self) -> dict[str, str]:
        """series uid -> path of every committed series."""
        return dict(self._db.execute("SELECT uid, path FROM series"))

    def locations(self) -> dict[str, str]:
        """series uid -> <Collection>/<path> of every committed series."""
        return dict(self._db.execute("SELECT uid, collection || '/' || path FROM series"))

    def request(self, uids: list[str], replace: bool) -> None:
        """What the output must hold before it is finished: this run's series, or (for
        --retry-failed, which asks for a part) these on top of what earlier runs asked."""
        with self._transaction():
            if replace:
                self._db.execute("DELETE FROM requested")
            self._db.executemany("INSERT OR IGNORE INTO requested VALUES (?)",
                                 [(uid,) for uid in uids])

    def missing_requested(self) -> list[str]:
        return [uid for (uid,) in self._db.execute(
            "SELECT uid FROM requested WHERE uid NOT IN (SELECT uid FROM series) ORDER BY uid")]

    def ends(self) -> tuple[int, int]:
        """(archive bytes, tar bytes) after the last committed series."""
        row = self._db.execute(
            "SELECT archive_end, tar_end FROM series ORDER BY archive_end DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def forget_beyond(self, archive_size: int) -> list[str]:
        """Drop series whose stream is not wholly in an archive of this size."""
        with self._transaction():
            gone = [u for (u,) in self._db.execute(
                "SELECT uid FROM series WHERE archive_end > ?", (archive_size,))]
            self._forget(gone)
        return gone

    def forget(self, uids: list[str]) -> None:
        with self._transaction():
            self._forget(uids)

    def _forget(self, uids: list[str]) -> None:
        for uid in uids:
            self._db.execute("DELETE FROM files WHERE uid=?", (uid,))
            self._db.execute("DELETE FROM series WHERE uid=?", (uid,))
        if uids:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('finished', 'no')")

    def streams(self) -> list[tuple[str, str, int, int, Optional[str]]]:
        """(uid, path, start, end, sha256 or None before 0.4) of every committed stream, in
        archive order; each starts where the one before ends."""
        rows = self._db.execute("SELECT uid, collection || '/' || path, archive_end, "
                                "stream_sha256 FROM series ORDER BY archive_end").fetchall()
        starts = [0] + [end for _, _, end, _ in rows[:-1]]
        return [(uid, label, start, end, sha)
                for (uid, label, end, sha), start in zip(rows, starts)]

    def layout(self) -> list[tuple[str, str, int, int, int, Optional[str]]]:
        """(uid, path, start, end, tar bytes, sha256) of every stream, in archive order."""
        rows = self._db.execute("SELECT uid, collection || '/' || path, archive_end, tar_end, "
                                "stream_sha256 FROM series ORDER BY archive_end").fetchall()
        before = [(0, 0)] + [(end, tar) for _, _, end, tar, _ in rows[:-1]]
        return [(uid, label, start, end, tar - tar_start, sha)
                for (uid, label, end, tar, sha), (start, tar_start) in zip(rows, before)]

    def rearrange(self, kept: list[tuple[str, int, int]], gone: list[str],
                  replacing: int) -> None:
        """After a repair built a new .part: the kept series' new (archive end, tar end),
        the damaged ones forgotten, and the old archive marked as being replaced (it stays
        until the new one is renamed over it). One transaction: a kill leaves the journal
        describing the old archive or the new .part, never a mix."""
        with self._transaction():
            self._forget(gone)
            self._db.executemany("UPDATE series SET archive_end=?, tar_end=? WHERE uid=?",
                                 [(end, tar, uid) for uid, end, tar in kept])
            self._db.execute("DELETE FROM meta WHERE key='closing_end'")
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [("finished", "no"), ("replacing", str(replacing))])

    def record(self, series: PlannedSeries, verified: VerifiedSeries, archive_end: int,
               tar_end: int, stream_sha256: Optional[str] = None) -> None:
        with self._transaction():  # one transaction: the series and its files, or nothing
            self._db.execute(
                "INSERT OR REPLACE INTO series VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (series.uid, series.collection, series.path, archive_end, tar_end,
                 len(verified.members), verified.bytes,
                 json.dumps(verified.record or series.record),
                 (verified.license_text or "").strip() or None,
                 datetime.now().isoformat(timespec="seconds"), stream_sha256))
            self._db.execute("DELETE FROM files WHERE uid=?", (series.uid,))
            self._db.executemany(
                "INSERT INTO files VALUES (?,?,?,?)",
                [(series.uid, f"{series.path}/{m.name}", m.md5, m.size)
                 for m in verified.members])

    def total_bytes(self) -> int:
        return self._db.execute("SELECT coalesce(sum(bytes), 0) FROM series").fetchone()[0]

    def collections(self) -> list[str]:
        return [c for (c,) in self._db.execute("SELECT DISTINCT collection FROM series "
                                               "ORDER BY collection")]

    def files(self, collection: str) -> Iterator[tuple[str, str]]:
        yield from self._db.execute(
            "SELECT f.name, f.md5 FROM files f JOIN series s ON s.uid = f.uid "
            "WHERE s.collection=? ORDER BY f.name", (collection,))

    def series_rows(self, collection: str) -> list[tuple[str, dict, int, int]]:
        return [(path, json.loads(record), files, size) for path, record, files, size in
                self._db.execute("SELECT path, record, files, bytes FROM series "
                                 "WHERE collection=? ORDER BY path", (collection,))]

    def licenses(self, collection: str) -> list[tuple[Optional[str], dict]]:
        """(LICENSE text the server sent, or None; the getSeries record) per series."""
        return [(text, json.loads(record)) for text, record in self._db.execute(
            "SELECT license, record FROM series WHERE collection=?", (collection,))]


# -- the collection-level files: LICENSE, metadata.csv, MD5SUMS -------------------------------

GET_SERIES_FIELDS = [
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag", "Collection",
    "Site", "PatientID", "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName", "LicenseURI",
    "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased", "StudyDesc", "StudyDate",
    "ThirdPartyAnalysis", "Authorized"]


def license_text(journal: Journal, collection: str) -> bytes:
    """Every distinct license of the collection's series: the LICENSE text the server sent
    with a series, or, for series fetched without one (getImageWithMD5Hash), the license
    its metadata names. Collections mix licenses (Pancreas-CT: CC BY 3.0 and 4.0)."""
    texts: set[str] = set()
    for sent, record in journal.licenses(collection):
        if sent:
            texts.add(sent)
        elif record.get("LicenseName") or record.get("LicenseURI"):
            where = record.get("LicenseURI") or record.get("DataDescriptionURI")
            texts.add(f"License Information. Data of the {collection} collection is distributed "
                      f"under the {record.get('LicenseName') or 'license'}"
                      f"{' at ' + where if where else ''}.")
    if not texts:
        texts.add(f"The server sent no license information for {collection}; see "
                  "https://www.cancerimagingarchive.net/ before you use or share this data.")
    return ("\n\n".join(sorted(texts)) + "\n").encode("utf-8")


# Control characters a server may put in metadata: csv refuses NUL on some Pythons (3.9,
# 3.10: "line contains NUL"), and no reader of metadata.csv wants the others. A value keeps
# its tab and line breaks (legal CSV: the writer quotes them); a key has none of them.
CSV_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# What makes a spreadsheet program read a cell as a formula (OWASP's "CSV injection"); a
# leading quote is prefixed too, so that a reader can undo the prefix without ambiguity.
FORMULA_START = re.compile("^[=+@\t\r']|^-(?!\\d+(?:\\.\\d+)?(?:[eE][+-]?\\d+)?$)")
METADATA_TOOL_COLUMNS = ["Path", "FilesInArchive", "BytesInArchive"]
LINE_BREAKS = re.compile("\r\n?")


def spreadsheet_safe(text: str) -> str:
    """A cell no spreadsheet program executes: one that starts with =, +, @, a tab or a
    carriage return, or with - and is no number, gets a leading ' (OWASP's advice), as does
    one that starts with ' itself. Readers of metadata.csv (--extract) drop one leading '."""
    return "'" + text if FORMULA_START.match(text) else text


def csv_key(key: str) -> str:
    """A column name from a server's JSON key: control characters shown escaped (a NUL
    breaks csv readers, a newline the header line), then safe for a spreadsheet."""
    return spreadsheet_safe(printable(key))


def csv_value(value: object) -> object:
    """A cell from a server's value, whole however long (it is the server's data; readers
    raise csv.field_size_limit): without NUL and the other control characters but tab and
    newline, and safe for a spreadsheet. Numbers stay numbers. A carriage return becomes a
    newline: csv quotes a cell for the line terminator's characters only ("\n" here), and
    an unquoted CR ends the row for every reader."""
    if not isinstance(value, str):
        return value
    return spreadsheet_safe(CSV_UNSAFE.sub("", LINE_BREAKS.sub("\n", value)))


def metadata_csv(journal: Journal, collection: str) -> bytes:
    """One row per series: the server's record, each cell made safe (csv_key, csv_value),
    then the tool's own columns as they are. Path is made of letters, digits, ._+- and /
    only: no formula of consequence, and never a leading ', so the reader's rule (drop one
    leading ') holds for it too, and --verify and --extract find the folder it names."""
    rows = journal.series_rows(collection)
    extra = sorted({k for _, r, _, _ in rows for k in r} - set(GET_SERIES_FIELDS) -
                   set(METADATA_TOOL_COLUMNS))
    server_columns = GET_SERIES_FIELDS + extra
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_key(key) for key in server_columns] + METADATA_TOOL_COLUMNS)
    for path, record, files, size in rows:
        writer.writerow([csv_value(record.get(key, "")) for key in server_columns] +
                        [path, files, size])
    return buffer.getvalue().encode("utf-8")


# TCIA's data usage policy: cite each dataset's DOI, and TCIA's own paper.
TCIA_POLICY_URL = "https://www.cancerimagingarchive.net/data-usage-policies-and-restrictions/"
TCIA_CITATION = (
    "Clark K, Vendt B, Smith K, Freymann J, Kirby J, Koppel P, Moore S, Phillips S, Maffitt D, "
    "Pringle M, Tarbox L, Prior F. The Cancer Imaging Archive (TCIA): Maintaining and Operating "
    "a Public Information Repository. Journal of Digital Imaging 26(6), 1045-1057 (2013). "
    "https://doi.org/10.1007/s10278-013-9622-7")
DOI_IN_URI = re.compile(r"^\s*(?:https?://(?:dx\.)?doi\.org/|doi:)(10\.\d{4,9}/\S+?)\s*$", re.I)
CC_LICENSE = re.compile(r"^CC[ -]BY((?:[ -](?:NC|SA|ND))*)[ -](\d\.\d)$", re.I)


def doi_of(uri: object) -> Optional[str]:
    """The DOI in a DataDescriptionURI ("https://doi.org/10.7937/..."), lower case (DOIs
    are case-insensitive; NBIA spells the same one both ways)."""
    match = DOI_IN_URI.match(uri) if isinstance(uri, str) else None
    return match[1].lower() if match else None


def license_url(name: str, uri: Optional[str]) -> str:
    """The license's URL: the server's, else Creative Commons' for a "CC BY..." name."""
    if uri:
        return uri
    match = CC_LICENSE.match(name.strip())
    if not match:
        return ""
    kinds = "".join(f"-{kind.lower()}" for kind in re.findall(r"NC|SA|ND", match[1], re.I))
    return f"https://creativecommons.org/licenses/by{kinds}/{match[2]}/"


@dataclass
class Dataset:
    """One DOI (or description link) of a collection, as its series' metadata give it."""
    link: str                              # https://doi.org/<doi>, or the URI as sent
    doi: Optional[str]
    series: int = 0
    licenses: set[tuple[str, str]] = field(default_factory=set)    # (name, url)


def datasets(journal: Journal, collection: str) -> list[Dataset]:
    """The DOIs of the committed series of a collection, with their licenses; series
    without any DataDescriptionURI are one dataset with an empty link."""
    found: dict[str, Dataset] = {}
    for _, record, _, _ in journal.series_rows(collection):
        uri = str(record.get("DataDescriptionURI") or "").strip()
        doi = doi_of(uri)
        link = f"https://doi.org/{doi}" if doi else printable(uri)
        dataset = found.setdefault(link, Dataset(link, doi))
        dataset.series += 1
        name = str(record.get("LicenseName") or "").strip()
        if name:
            dataset.licenses.add((printable(name), printable(license_url(
                name, str(record.get("LicenseURI") or "").strip() or None))))
    return sorted(found.values(), key=lambda d: (not d.link, d.link))


# Markdown's own characters in text from a server: a backslash before each keeps it text (no
# HTML tag, entity, code span or link can start), and text never starts a line (newlines are
# escaped by printable), so no heading or list item can either.
MARKDOWN_SPECIAL = re.compile(r"([\\`<>&\[\]])")
# An http(s) URL that can stand between < and > as an autolink: nothing that ends it early.
LINKABLE_URL = re.compile(r"https?://[^\s<>\\`\x00-\x1f\x7f-\x9f]+", re.IGNORECASE)


def markdown_text(text: str) -> str:
    """Server text as plain Markdown text: shown as sent, never read as markup."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def markdown_link(url: str) -> str:
    """<url> for an http(s) URL; anything else (javascript:, data:, text with markup in it)
    as plain text, never a link a reader could click."""
    return f"<{url}>" if LINKABLE_URL.fullmatch(url) else markdown_text(url)


def utc_day() -> str:
    """Days, not seconds, in CITATION.md: the same data fetched twice on a day (or resumed
    after a kill) gives the same archive, byte for byte."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def citation_text(journal: Journal, collection: str, file_suffix: str) -> bytes:
    """CITATION.md: what to cite (each DOI with its license and BibTeX when doi.org gave
    it, TCIA's paper) and how this copy was made. Markdown, because it is read by people:
    CITATION.cff describes one work of a software repository, and this lists several."""
    lines = [f"# Citing the {markdown_text(collection)} data in this copy", "",
             "TCIA's data usage policy asks everyone who uses these data to cite each dataset "
             "below and The Cancer Imaging Archive itself, and to follow each license:",
             f"<{TCIA_POLICY_URL}>", "", "## Datasets", ""]
    for dataset in datasets(journal, collection):
        licenses = "; ".join(markdown_text(name) + (f" {markdown_link(url)}" if url else "")
                             for name, url in sorted(dataset.licenses)) or "not stated"
        lines.append(f"- {markdown_link(dataset.link)}" if dataset.link else
                     "- (no DOI in the metadata)")
        lines += [f"  - series in this copy: {dataset.series}", f"  - license: {licenses}"]
        bibtex = journal.get(f"bibtex {dataset.doi}") if dataset.doi else None
        if bibtex:
            lines += ["", "  ```bibtex", *(f"  {line}" for line in bibtex.splitlines()),
                      "  ```"]
    lines += ["", "## The Cancer Imaging Archive", "", TCIA_CITATION, "",
              "## How this copy was made", "",
              f"- tool: tcia_downloader {__version__}",
              f"- source: {markdown_text(journal.get('made source') or 'not recorded')}",
              f"- selection: {markdown_text(journal.get('made selection') or 'not recorded')}"
              + (f" (this part: {file_suffix.lstrip('.')})" if file_suffix else ""),
              f"- started: {journal.get('made started') or 'not recorded'}, finished: "
              f"{utc_day()} (UTC)",
              "- every file was checked against the checksum its source gave for it (NBIA: "
              "its MD5 list; IDC: the object's ETag); MD5SUMS lists them all", ""]
    return "\n".join(lines).encode("utf-8")


def collection_files(journal: Journal, collection: str,
                     file_suffix: str = "") -> list[tuple[str, bytes]]:
    """(name relative to <Collection>/, content); MD5SUMS last and covering the others.
    A part's files (shard, update, selection) carry its suffix, so that parts extract side
    by side with each other and with the whole collection."""
    license_name, citation_name, metadata_name, md5sums_name = \
        collection_file_names(file_suffix)
    extras = [(license_name, license_text(journal, collection)),
              (citation_name, citation_text(journal, collection, file_suffix)),
              (metadata_name, metadata_csv(journal, collection))]
    lines = [f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in extras]
    lines += [f"{md5}  {name}\n" for name, md5 in journal.files(collection)]
    md5sums = "".join(sorted(lines, key=lambda line: line[34:])).encode("utf-8")
    return extras + [(md5sums_name, md5sums)]


def collection_file_names(file_suffix: str) -> tuple[str, str, str, str]:
    """LICENSE, CITATION.md, metadata.csv and MD5SUMS of a collection (or of a part: a
    shard, an update)."""
    return (f"LICENSE{file_suffix}", f"CITATION{file_suffix}.md", f"metadata{file_suffix}.csv",
            f"MD5SUMS{file_suffix}")


# -- shared parts of the two targets ----------------------------------------------------------

@dataclass
class Prepared:
    """A series made ready in scratch by a worker: an xz stream, which starts at `offset`
    in its file, or a folder."""
    path: Path
    offset: int = 0
    tar_bytes: int = 0
    sha256: Optional[str] = None      # of the xz stream, as it was compressed

    def discard(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


class Target:
    """Where the series end up, with its journal, lock and scratch folder. Subclasses
    say how a verified zip becomes output (prepare: in a worker, in parallel), how it
    is made durable (commit: one at a time, under commit_lock), and how what the journal
    says is checked against the disk (audit)."""

    def __init__(self, name: str, output: Path, temp_dir: Path, final: Path, journal_path: Path,
                 lock_path: Path, file_suffix: str = ""):
        self.name = name
        self.file_suffix = file_suffix
        self.output = output
        self.final = final
        self.commit_lock = threading.Lock()
        self._closed = False
        self._scratch_numbers = itertools.count(1)
        output.mkdir(parents=True, exist_ok=True)
        self._lock_path = lock_path
        self._lock_file = acquire_lock(lock_path, f"{name} in {output}")
        try:
            self.journal = Journal(journal_path)
            self.scratch, self._scratch_owner = claim_scratch(temp_dir, name)
        except BaseException:
            release_lock(lock_path, self._lock_file)
            raise

    def close(self) -> None:
        """No commit after this; waits for one in progress."""
        with self.commit_lock:
            self._closed = True
            self.journal.close()
        release_scratch(self.scratch, self._scratch_owner)
        release_lock(self._lock_path, self._lock_file)

    def check_open(self) -> None:
        if self._closed:
            raise Interrupted()

    @property
    def complete(self) -> bool:
        return self.journal.get("finished") == "yes"

    def committed(self) -> dict[str, str]:
        return self.journal.committed()

    def scratch_path(self, suffix: str) -> Path:
        """A new name in this run's scratch, chosen here: no server text ever names a file."""
        return self.scratch / f"series-{next(self._scratch_numbers)}{suffix}"

    def audit(self, full: bool = True) -> list[str]:
        """Forget committed series the disk no longer holds intact; returns their UIDs."""
        raise NotImplementedError

    def replace_damaged(self, uids: list[str]) -> None:
        """--retry-failed of a <name>.damaged.tcia (written by --verify): take these series
        out of the output, keeping every other one, so that this run fetches them again and
        finishes the output anew (collection files too)."""
        raise NotImplementedError


def acquire_lock(path: Path, what: str) -> io.TextIOWrapper:
    """One run per output: an flock on path, held until release_lock. A run that ends
    unlinks its lock file, so a run that opened the old file just before may get the lock
    on a file nobody else will open again: the lock counts only while path still names the
    locked file, else it is taken again on the new one."""
    refuse_symlink(path)
    while True:
        try:
            handle = open(path, "a+", opener=lambda name, flags: os.open(
                name, flags | getattr(os, "O_NOFOLLOW", 0), 0o666))
        except OSError as exc:
            if exc.errno == errno.ELOOP:                 # planted since the check above
                refuse_symlink(path)
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise FatalRunError(f"{what} is being written by {owner}; wait for that run to "
                                "end or stop it", EXIT_USAGE) from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def release_lock(path: Path, handle: io.TextIOWrapper) -> None:
    path.unlink(missing_ok=True)      # while still holding it: see acquire_lock
    handle.close()


SCRATCH_PREFIX = ".tcia_downloader-"


def claim_scratch(temp_dir: Path, name: str) -> tuple[Path, io.TextIOWrapper]:
    """A scratch folder that belongs to this run alone, for runs may share --temp_dir
    (two outputs of one collection; a tar run beside a folder run). Its owner file beside
    it stays flocked while the run lives; only folders whose owner is gone are swept. The
    owner file is locked before the folder exists, so no sweep can take a live folder."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_scratch(temp_dir, name)
    fd, owner_name = tempfile.mkstemp(prefix=f"{SCRATCH_PREFIX}{name[:60]}-", suffix=".owner",
                                      dir=temp_dir)
    owner = os.fdopen(fd, "w")
    fcntl.flock(owner, fcntl.LOCK_EX)
    owner.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    owner.flush()
    scratch = Path(owner_name[:-len(".owner")] + ".tmp")
    scratch.mkdir(mode=0o700)     # no one else may plant a name in it: files open by name there
    return scratch, owner


def sweep_abandoned_scratch(temp_dir: Path, name: str) -> None:
    """Remove the scratch of runs that were killed: their owner file is no longer locked."""
    for owner_path in temp_dir.glob(f"{SCRATCH_PREFIX}*.owner"):
        folder = owner_path.with_suffix(".tmp")
        try:
            handle = open(owner_path, "a")
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                                    # its run is alive
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                owner_path.unlink(missing_ok=True)
    legacy = temp_dir / f"{SCRATCH_PREFIX}{name}.tmp"        # version 0.3: one per name
    if legacy.is_dir() and not legacy.is_symlink() and \
            not legacy.with_suffix(".owner").exists():
        shutil.rmtree(legacy, ignore_errors=True)


def release_scratch(scratch: Path, owner: io.TextIOWrapper) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    Path(str(scratch)[:-len(".tmp")] + ".owner").unlink(missing_ok=True)
    owner.close()


def journal_path(output: Path, name: str, compression: bool) -> Path:
    return output / (f"{name}.tar.xz.journal" if compression else f"{name}.journal")


def lock_path(output: Path, name: str, compression: bool) -> Path:
    return output / (f"{name}.tar.xz.lock" if compression else f"{name}.lock")


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """path holds data, whole, or keeps what it held: written under a hidden temporary name
    beside it, then renamed over it. Whatever another user planted at the temporary name
    (a symbolic link to a file of theirs or of ours) is removed, never written through:
    the name is created anew, exclusively, and a link there is not followed."""
    temporary = path.with_name(f".{path.name}.incoming")
    if temporary.is_dir() and not temporary.is_symlink():
        shutil.rmtree(temporary)
    else:
        temporary.unlink(missing_ok=True)            # a link: the link goes, not its target
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o666)                                  # (the umask decides, as before)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def refuse_symlink(path: Path) -> None:
    """The tool never makes a symbolic link at the names it writes (lock, .part): one there
    was planted, and writing through it would write a file outside --output."""
    if path.is_symlink():
        raise FatalRunError(f"{path} is a symbolic link, which this tool never makes; remove "
                            "it (writing through it would write where it points)", EXIT_USAGE)


def open_no_follow(path: Path, mode: str) -> io.BufferedRandom:
    """open(path, mode) that refuses (ELOOP) a symbolic link at path, for files the tool
    reopens by name while it runs (the .part): a link swapped in meanwhile is not followed."""
    return open(path, mode, opener=lambda name, flags: os.open(
        name, flags | getattr(os, "O_NOFOLLOW", 0), 0o666))  # type: ignore[return-value]


def mount_point(path: Path) -> Path:
    """The root of the filesystem that holds path: what a user must free space on."""
    path = existing_ancestor(path)
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def disk_full(where: Path) -> FatalRunError:
    return FatalRunError(f"no space or no free inodes left on the filesystem at "
                         f"{mount_point(where)} (writing {where}); free some or move "
                         "--temp_dir/--output, then rerun to resume")


def no_space_left(folder: Path) -> bool:
    """Decided from the filesystem's numbers (for errors that do not say why)."""
    try:
        stats = os.statvfs(existing_ancestor(folder))
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 1024 or (stats.f_files > 0
                                                           and stats.f_favail == 0)


def raise_if_disk_full(exc: OSError, where: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise disk_full(where) from None


# -- the .tar.xz ------------------------------------------------------------------------------

def read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            chunk = handle.read(min(4 * CHUNK_SIZE, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def stream_sha256(path: Path, start: int, end: int) -> str:
    digest = hashlib.sha256()
    for chunk in read_range(path, start, end):
        digest.update(chunk)
    return digest.hexdigest()


def xz_stream_intact(path: Path, start: int, end: int) -> bool:
    """One whole xz stream between start and end, by its own checks (CRC64, index)."""
    try:
        for _ in xz_decompressed(path, start, end):
            pass
    except (lzma.LZMAError, EOFError, ValueError):
        return False
    return True


XZ_HEADER_MAGIC = b"\xfd7zXZ\x00"
XZ_FOOTER_MAGIC = b"YZ"


def xz_stream_in_place(path: Path, start: int, end: int) -> bool:
    """A stream's header magic at start and its footer magic just before end."""
    with open(path, "rb") as handle:
        handle.seek(start)
        head = handle.read(len(XZ_HEADER_MAGIC))
        handle.seek(end - len(XZ_FOOTER_MAGIC))
        return head == XZ_HEADER_MAGIC and handle.read(len(XZ_FOOTER_MAGIC)) == XZ_FOOTER_MAGIC


def first_damaged_stream(path: Path, streams: list[tuple[str, str, int, int, Optional[str]]],
                         full: bool = True) -> Optional[int]:
    """The index of the first stream that is not what its journal row says, or None. On
    all usable cores: hashing releases the GIL."""
    def intact(stream: tuple[str, str, int, int, Optional[str]]) -> bool:
        _, _, start, end, sha256 = stream
        if not full:
            return xz_stream_in_place(path, start, end)
        if sha256 is None:
            return xz_stream_intact(path, start, end)
        return stream_sha256(path, start, end) == sha256
    with concurrent.futures.ThreadPoolExecutor(usable_cores()) as pool:
        for index, ok in enumerate(pool.map(intact, streams)):
            if not ok:
                return index
    return None


def copy_stream(path: Path, start: int, end: int, out: io.BufferedWriter,
                sha256: Optional[str]) -> bool:
    """Append one committed stream of path to out if it is the one its journal row
    describes (by its sha256; a 0.3 row has none: by xz's own checks). False: not copied
    whole, and out must be cut back."""
    if sha256 is None and not xz_stream_intact(path, start, end):
        return False
    digest = hashlib.sha256()
    for chunk in read_range(path, start, end):
        digest.update(chunk)
        out.write(chunk)
    return sha256 is None or digest.hexdigest() == sha256


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """A ustar header, preceded by a pax header only where a name is too long for ustar."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_padding(size: int) -> bytes:
    return tarfile.NUL * (-size % TAR_BLOCK)


class XzStreamWriter:
    """One complete xz stream in a file: tar fragments go in, compressed bytes come out.
    With after_existing, the stream goes after what the file already holds, from `start`."""

    def __init__(self, path: Path, preset: int, after_existing: bool = False):
        self._file = open(path, "r+b" if after_existing else "wb")
        self.start = self._file.seek(0, os.SEEK_END)
        self._compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                               preset=preset)
        self.tar_bytes = 0
        self.digest = hashlib.sha256()      # of the compressed stream, as it is produced
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        # The compressor gets a block at a time, not each header, padding and small chunk:
        # every call lets go of the GIL and must win it back from the downloading threads,
        # a wait of up to the switch interval (5 ms) each time (an IDC run of 1,200 small
        # objects: 10.9 s -> 10.3 s). The output is the same: LZMA's does not depend on how
        # its input is cut.
        self.tar_bytes += len(data)
        self._pending += data
        if len(self._pending) >= COMPRESS_BLOCK:
            self._compress_pending()

    def _compress_pending(self) -> None:
        pending, self._pending = self._pending, bytearray()
        self._emit(self._compressor.compress(pending))

    def _emit(self, compressed: bytes) -> None:
        self.digest.update(compressed)
        self._file.write(compressed)

    def add_file(self, name: str, size: int, mtime: int,
                 fill: Callable[[Callable[[bytes], None]], None]) -> None:
        """A tar member whose size bytes fill() passes to the callable it is given."""
        self.write(tar_header(name, size, mtime))
        before = self.tar_bytes
        fill(self.write)
        if self.tar_bytes - before != size:
            raise TransientError(f"{name}: {self.tar_bytes - before} bytes instead of {size}")
        self.write(tar_padding(size))

    def close(self) -> None:
        self._compress_pending()
        self._emit(self._compressor.flush())
        self._file.close()

    def abort(self) -> None:
        """Close after a failure; a full disk must not fail the flush again and hide why."""
        with contextlib.suppress(OSError):
            self._file.close()


class XzPacker:
    """A MemberSink that turns a series into one tar fragment in one xz stream, written
    after the series' zip in the zip's own scratch file: one file per series in flight
    (inode quotas), and the zip is read, never rewritten, while the stream grows."""

    def __init__(self, zip_path: Path, preset: int, prefix: str, scratch: Path):
        self._writer = XzStreamWriter(zip_path, preset, after_existing=True)
        self.prepared = Prepared(zip_path, offset=self._writer.start)
        self._prefix = prefix
        self._scratch = scratch
        self._mtime = int(time.time())

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        def fill(write: Callable[[bytes], None]) -> None:
            for chunk in chunks:
                write(chunk)
        try:
            self._writer.add_file(self._prefix + name, size, self._mtime, fill)
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise

    def finish(self) -> Prepared:
        try:
            self._writer.close()
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise
        self.prepared.tar_bytes = self._writer.tar_bytes
        self.prepared.sha256 = self._writer.digest.hexdigest()
        return self.prepared

    def discard(self) -> None:
        self._writer.abort()
        self.prepared.discard()


class FolderPacker:
    """A MemberSink that writes a series' files into a scratch folder."""

    def __init__(self, folder: Path, scratch: Path):
        self.prepared = Prepared(folder)
        self._scratch = scratch
        folder.mkdir()

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        try:
            with open(self.prepared.path / name, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
        except OSError as exc:
            raise_if_disk_full(exc, self._scratch)
            raise

    def finish(self) -> Prepared:
        return self.prepared

    def discard(self) -> None:
        self.prepared.discard()


class TarXzTarget(Target):
    """<output>/<name>.tar.xz written as one xz stream per committed series.

    xz readers and tar accept concatenated streams, so each series is compressed on its
    own by a worker and appended whole; only the closing stream carries the collection
    files and tar's end-of-archive blocks. Until then the file is <name>.tar.xz.part, and
    the journal holds its length after every series."""

    def __init__(self, name: str, output: Path, temp_dir: Path, preset: int,
                 file_suffix: str = ""):
        super().__init__(name, output, temp_dir, output / f"{name}.tar.xz",
                         journal_path(output, name, compression=True),
                         lock_path(output, name, compression=True), file_suffix)
        self.part = output / f"{name}.tar.xz.part"
        self.preset = preset
        self.archive_end = self.tar_end = 0
        self._resume()

    @property
    def complete(self) -> bool:
        return self.final.exists() and self.journal.get("finished") == "yes"

    def _resume(self) -> None:
        refuse_symlink(self.part)
        repairing = bool(self.journal.get("replacing")) and self.part.exists()
        if self.final.exists() and not repairing:
            closing_end = self.journal.get("closing_end")
            if closing_end and int(closing_end) == self.final.stat().st_size:
                self.journal.put("finished", "yes")   # killed between rename and journal
                self.journal.put("replacing", "")
                return
            if closing_end and int(closing_end) > self.final.stat().st_size and \
                    self.journal.get("finished") == "yes":
                return      # cut short since: damage, which --verify names and a repair mends
            raise FatalRunError(f"{self.final} exists but its journal "
                                f"{self.journal.path.name} does not describe it; move one of "
                                "them away", EXIT_USAGE)
        if repairing and self.final.exists():
            log.info("repairing %s: it stays as it is until %s replaces it", self.final.name,
                     self.part.name)
        self.journal.put("finished", "no")
        if not self.part.exists():
            if self.journal.forget_beyond(0):
                log.info("%s is gone: starting the archive over", self.part)
            open_no_follow(self.part, "ab").close()
        size = self.part.stat().st_size
        lost = self.journal.forget_beyond(size)
        if lost:
            log.warning("%s is shorter than its journal says: %d series will be downloaded again",
                        self.part, len(lost))
        self.archive_end, self.tar_end = self.journal.ends()
        if size > self.archive_end:
            log.info("cutting %d bytes of an unfinished append from %s",
                     size - self.archive_end, self.part.name)
            self._cut_back()
        if self.archive_end:
            started = time.monotonic()
            self.audit()
            log.info("checked the %s of committed streams in %s against the journal in %.1f s",
                     human_bytes(self.archive_end), self.part.name, time.monotonic() - started)

    def audit(self, full: bool = True) -> list[str]:
        """Check every committed stream against the sha256 its row keeps (a stream of 0.3,
        without one, against its own xz checks); not full: only that each stream still
        starts and ends where its row says (two small reads a stream), enough before the
        rename, as every stream was read back when it was appended. At the first damaged
        stream the archive is cut back: that series and the ones after it are fetched
        again, for a stream cannot stay behind a gap."""
        self._check_size()
        streams = self.journal.streams()
        damaged = first_damaged_stream(self.part, streams, full)
        if damaged is None:
            return []
        _, label, start, _, _ = streams[damaged]
        lost = self.journal.forget_beyond(start)
        self.archive_end, self.tar_end = self.journal.ends()
        self._cut_back()
        log.warning("%s: the stream of %s does not match the journal (changed on disk); it "
                    "and the %d series after it will be downloaded again", self.part.name,
                    label, len(lost) - 1)
        return lost

    def _check_size(self) -> None:
        if self.part.stat().st_size != self.archive_end:
            raise FatalRunError(f"{self.part} changed size while this run wrote it; rerun "
                                "to check and resume it")

    def _cut_back(self) -> None:
        """Cut the .part back to the end of the last committed stream."""
        with open_no_follow(self.part, "r+b") as handle:
            handle.truncate(self.archive_end)
            os.fsync(handle.fileno())

    def replace_damaged(self, uids: list[str]) -> None:
        """A new .part of the intact streams of the finished archive, each checked against
        its journal row as it is copied (a stream found damaged here is dropped too), and
        the journal moved onto it in one transaction. The damaged archive stays, readable,
        until finalize renames the repaired one over it. A kill anywhere leaves either the
        old archive, finished, or a resumable repair."""
        if not self.complete:
            return            # a .part: its resume check already cut off what is damaged
        bad = set(uids)
        building = self.part.with_name(self.part.name + ".repair")
        kept: list[tuple[str, int, int]] = []
        end = tar_end = 0
        building.unlink(missing_ok=True)      # a link planted there goes; "x" never follows one
        with open(building, "xb") as out:
            for uid, label, start, stop, tar_bytes, sha256 in self.journal.layout():
                if uid in bad:
                    continue
                if not copy_stream(self.final, start, stop, out, sha256):
                    log.warning("%s: the stream of %s is damaged too; it is fetched again",
                                self.final.name, label)
                    out.seek(end)
                    out.truncate()
                    bad.add(uid)
                    continue
                end, tar_end = end + stop - start, tar_end + tar_bytes
                kept.append((uid, end, tar_end))
            out.flush()
            os.fsync(out.fileno())
        os.replace(building, self.part)
        fsync_directory(self.output)
        gone = sorted(bad & set(self.journal.committed()))
        self.journal.rearrange(kept, gone, replacing=self.final.stat().st_size)
        self.archive_end, self.tar_end = self.journal.ends()
        log.info("repairing %s: %d intact series copied into %s (%s), %d to fetch again",
                 self.final.name, len(kept), self.part.name, human_bytes(end), len(gone))

    def packer(self, series: PlannedSeries, zip_path: Path) -> "XzPacker":
        """Compresses the series into its own xz stream in scratch (in a worker, in parallel)."""
        return XzPacker(zip_path, self.preset, f"{series.collection}/{series.path}/",
                        self.scratch)

    def commit(self, series: PlannedSeries, verified: VerifiedSeries, prepared: Prepared) -> None:
        """Append the stream, fsync, then journal it: a row never runs ahead of its data."""
        with self.commit_lock:
            self.check_open()
            new_end, sha256 = self._append(prepared)
            self.journal.record(series, verified, new_end, self.tar_end + prepared.tar_bytes,
                                sha256)
            self.archive_end, self.tar_end = new_end, self.tar_end + prepared.tar_bytes

    def _append(self, prepared: Prepared) -> tuple[int, str]:
        """Copy the stream behind the committed ones, fsync, and read it back: what the
        archive now holds must be what was compressed, so that a torn write, or another
        process writing to the .part or to scratch, is caught before a row describes it.
        Returns the archive's new end and the stream's sha256."""
        try:
            copied = hashlib.sha256()
            with open_no_follow(self.part, "r+b") as out, open(prepared.path, "rb") as stream:
                out.seek(self.archive_end)
                stream.seek(prepared.offset)
                for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
                    copied.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                end = out.tell()
            written = stream_sha256(self.part, self.archive_end, end)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._cut_back()                   # no half stream behind a live run
            raise_if_disk_full(exc, self.output)
            raise
        if copied.hexdigest() != written or prepared.sha256 not in (None, written):
            self._cut_back()
            raise TransientError("the stream in the archive is not the one compressed "
                                 "(did another process write to the .part or to scratch?)")
        return end, written

    def finalize(self) -> None:
        """Closing stream (collection files, end-of-archive), fsync, rename to .tar.xz."""
        closing = Prepared(self.scratch / "closing.tar.xz")
        writer = XzStreamWriter(closing.path, self.preset)
        mtime = int(time.time())
        for collection in self.journal.collections():
            for name, data in collection_files(self.journal, collection, self.file_suffix):
                writer.add_file(f"{collection}/{name}", len(data), mtime,
                                lambda sink, d=data: sink(d))
        writer.write(tarfile.NUL * (2 * TAR_BLOCK))
        writer.write(tarfile.NUL * (-(self.tar_end + writer.tar_bytes) % TAR_RECORD))
        writer.close()
        closing.sha256 = writer.digest.hexdigest()
        with self.commit_lock:
            self.check_open()
            self._check_size()
            end, _ = self._append(closing)
            self.journal.put("closing_end", str(end))
            os.replace(self.part, self.final)
            fsync_directory(self.output)
            self.journal.put("finished", "yes")
            self.journal.put("replacing", "")
        closing.discard()

    def describe(self) -> str:
        return str(self.final if self.complete else self.part)


# -- the folder tree --------------------------------------------------------------------------

class DirectoryTarget(Target):
    """<output>/<name>/...: each series is extracted into scratch and moved into place
    only when verified, so a series folder under <output> is always whole."""

    def __init__(self, name: str, output: Path, temp_dir: Path, file_suffix: str = ""):
        # Parts of a collection (shards, updates, selections) share its folder (their series
        # folders are disjoint); each keeps its own journal and suffixed LICENSE, metadata
        # and MD5SUMS.
        # A move cut short by a kill leaves a hidden .incoming folder beside its series:
        # never a series, and removed when that series is moved in again. Not swept here:
        # another shard may be moving one in right now.
        super().__init__(name, output, temp_dir, output,
                         journal_path(output, name, compression=False),
                         lock_path(output, name, compression=False), file_suffix)
        self.audit()

    def audit(self, full: bool = True) -> list[str]:
        """The journal never outranks the disk: a series folder that is gone (deleted or
        moved) is forgotten, and fetched again. Existence only, one stat per series:
        reading every file of a large tree would take hours (--verify does that)."""
        gone = [uid for uid, where in self.journal.locations().items()
                if not (self.output / where).is_dir()]
        self.journal.forget(gone)
        missing_files = [collection for collection in self.journal.collections()
                         for name in collection_file_names(self.file_suffix)
                         if not (self.output / collection / name).is_file()]
        if missing_files and self.complete:
            self.journal.put("finished", "no")     # the collection files are written again
        return gone

    def series_folder(self, series: PlannedSeries) -> Path:
        return self.output / series.collection / series.path

    def replace_damaged(self, uids: list[str]) -> None:
        """Each damaged series folder is hidden at once (renamed), then removed and
        forgotten; the collection files are written anew when the run finishes."""
        locations = self.journal.locations()
        gone = [uid for uid in uids if uid in locations]
        for uid in gone:
            folder = self.output / locations[uid]
            stale = folder.parent / f".{folder.name}.stale"
            if folder.exists():
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(folder, stale)
        self.journal.forget(gone)
        self.journal.put("finished", "no")
        for uid in gone:
            folder = self.output / locations[uid]
            shutil.rmtree(folder.parent / f".{folder.name}.stale", ignore_errors=True)
        log.info("repairing %s: %d damaged series folders removed, to fetch again",
                 self.output, len(gone))

    def packer(self, series: PlannedSeries, zip_path: Path) -> "FolderPacker":
        return FolderPacker(self.scratch_path(".d"), self.scratch)

    def commit(self, series: PlannedSeries, verified: VerifiedSeries, prepared: Prepared) -> None:
        destination = self.series_folder(series)
        with self.commit_lock:
            self.check_open()
            try:
                move_folder(prepared.path, destination)
            except OSError as exc:
                raise_if_disk_full(exc, destination)
                raise
            self.journal.record(series, verified, 0, 0)

    def finalize(self) -> None:
        for collection in self.journal.collections():
            root = self.output / collection
            root.mkdir(parents=True, exist_ok=True)
            for name, data in collection_files(self.journal, collection, self.file_suffix):
                write_file_atomically(root / name, data)
        self.journal.put("finished", "yes")

    def describe(self) -> str:
        return str(self.final)


def move_folder(folder: Path, destination: Path) -> None:
    """Put a finished series folder in place so that it appears whole or not at all."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    incoming = destination.parent / f".{destination.name}.incoming"
    stale = destination.parent / f".{destination.name}.stale"
    for planted in (incoming, stale):     # rmtree refuses a link: it would stay in the way
        if planted.is_symlink():
            planted.unlink()
    shutil.rmtree(incoming, ignore_errors=True)
    if destination.exists():            # moved by a run killed before its journal row:
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(destination, stale)   # hidden at once, so a kill never shows half of it
    shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(folder, incoming)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Across filesystems rename fails (node-local scratch -> shared output): copy
        # next to the destination, then rename there.
        shutil.copytree(folder, incoming)
        shutil.rmtree(folder)
    for child in incoming.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    os.rename(incoming, destination)
    fsync_directory(destination.parent)


# -- checking an output: --verify ------------------------------------------------------------
#
# --verify and --extract read archives that may come from anywhere (a colleague's copy, a
# damaged disk, a crafted file), so the reader here trusts nothing it reads: every xz stream
# is bounded by checked headers, footers and indexes and must decompress to exactly its
# span; every tar header is read as GNU tar reads it (pax size, mtime and path, the last
# path winning) or the member is refused; output is decompressed in bounded pieces; what it
# learns goes to a temporary database on disk, not to lists in memory; and a signal stops
# it within a chunk.

@dataclass
class VerifiedMember:
    name: str
    size: int
    md5: str
    stream: int                  # which xz stream of the archive holds it (0 for a tree)


class ProblemLines:
    """The problems found, one line each. The first LIMIT are kept, the rest only counted:
    an archive crafted to hold millions of bad members must not cost a line of memory
    each."""

    LIMIT = 10_000

    def __init__(self, lines: Iterable[str] = ()):
        self._lines: list[str] = []
        self.count = 0
        self.extend(lines)

    def append(self, line: str) -> None:
        self.count += 1
        if len(self._lines) < self.LIMIT:
            self._lines.append(line)

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.append(line)

    def __iadd__(self, lines: Iterable[str]) -> "ProblemLines":
        self.extend(lines)
        return self

    def __iter__(self) -> Iterator[str]:
        yield from self._lines
        if self.count > len(self._lines):
            yield f"... and {self.count - len(self._lines)} more problem(s)"

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


LEDGER_SCHEMA = """
    PRAGMA journal_mode = OFF;
    PRAGMA synchronous = OFF;
    CREATE TABLE members (name TEXT, md5 TEXT, size INTEGER, stream INTEGER, folder TEXT);
    CREATE TABLE listed (name TEXT, md5 TEXT, source TEXT);  -- MD5SUMS lines, journal MD5s
    CREATE TABLE rows (folder TEXT, record TEXT);            -- metadata.csv, or the journal
    CREATE TABLE extracted (name TEXT, size INTEGER, folder TEXT);
    CREATE TABLE links (name TEXT);                         -- link members (refused)
"""
OWN_DIGEST = "own digest"        # a listed row that is an MD5SUMS' own MD5, as it was read


def series_folder(name: str) -> Optional[str]:
    """<Collection>/<patient>/<study>/<series> of a series file's name, else None."""
    return name.rsplit("/", 1)[0] if name.count("/") == 4 else None


class Ledger:
    """What --verify and --extract learn of an output: its members, the MD5s its MD5SUMS
    (or journal) list, the rows of its metadata.csv. Held in a private temporary sqlite
    database, which keeps a 2 MB page cache and spills the rest to a file it deletes when
    closed: lists and dicts of these took about 1 kB of RAM per file (489 MB for 500,000
    files), and an archive of millions of empty members is a few MB. Threads share it
    under a lock; each reader hands it members in batches."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)
        self._db.executescript(LEDGER_SCHEMA)
        self._lock = threading.Lock()
        self._indexed = False

    def close(self) -> None:
        self._db.close()

    def add_members(self, members: list[VerifiedMember]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?)",
                                 [(m.name, m.md5, m.size, m.stream, series_folder(m.name))
                                  for m in members])
            self._indexed = False

    def add_listed(self, rows: Iterable[tuple[str, str]], source: str) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO listed VALUES (?, ?, ?)",
                                 ((name, md5, source) for name, md5 in rows))
            self._indexed = False

    def add_rows(self, rows: Iterable[dict]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO rows VALUES (?, ?)",
                                 ((row["_folder"], json.dumps(row)) for row in rows))

    def add_link(self, name: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO links VALUES (?)", (name,))

    def add_extracted(self, member: VerifiedMember) -> None:
        with self._lock:
            self._db.execute("INSERT INTO extracted VALUES (?, ?, ?)",
                             (member.name, member.size, series_folder(member.name)))

    def forget_members(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM members")

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        """Rows of a query; the indexes are built once, after the inserts (faster than
        keeping them up to date row by row)."""
        with self._lock:
            if not self._indexed:
                self._db.executescript(
                    "CREATE INDEX IF NOT EXISTS members_name ON members (name);"
                    "CREATE INDEX IF NOT EXISTS members_folder ON members (folder);"
                    "CREATE INDEX IF NOT EXISTS listed_name ON listed (name);")
                self._indexed = True
            return self._db.execute(sql, parameters).fetchall()

    def _iterate(self, sql: str) -> Iterator[tuple]:
        """Rows of a query one page at a time (a table may be larger than memory)."""
        last = 0
        while True:
            page = self._query(sql + " AND rowid > ? ORDER BY rowid LIMIT 1000", (last,))
            if not page:
                return
            yield from (row[1:] for row in page)
            last = page[-1][0]

    def expected_md5(self, name: str) -> Optional[str]:
        rows = self._query("SELECT md5 FROM listed WHERE name = ? LIMIT 1", (name,))
        return rows[0][0] if rows else None

    def has_listed(self) -> bool:
        return bool(self._query("SELECT 1 FROM listed LIMIT 1"))

    def rows(self) -> Iterator[dict]:
        return (json.loads(record) for (record,) in
                self._iterate("SELECT rowid, record FROM rows WHERE 1"))

    def member_totals(self) -> tuple[int, int, int]:
        """(files, bytes, series) of the members read."""
        files, size = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM members")[0]
        series = self._query("SELECT COUNT(DISTINCT folder) FROM members")[0][0]
        return files, size, series

    def extracted_totals(self) -> tuple[int, int, int]:
        return self._query("SELECT COUNT(*), COALESCE(SUM(size), 0), COUNT(DISTINCT folder) "
                           "FROM extracted")[0]

    def twice(self) -> list[tuple[str, int]]:
        return self._query("SELECT name, COUNT(*) FROM members GROUP BY name "
                           "HAVING COUNT(*) > 1 ORDER BY name")

    def files_over_folders(self) -> list[str]:
        """Members whose name is also a folder of another member's path: tar -x cannot
        write both (the second fails or replaces the first)."""
        return [name for (name,) in self._query(
            "SELECT DISTINCT m.name FROM members m WHERE EXISTS (SELECT 1 FROM members o "
            "WHERE o.name > m.name || '/' AND o.name < m.name || '0') ORDER BY m.name")]

    def through_links(self) -> list[tuple[str, str]]:
        """(member, link) where a member's path goes through a link member: tar -x would
        write it wherever the link points."""
        return self._query("SELECT m.name, l.name FROM members m JOIN links l ON "
                           "m.name > l.name || '/' AND m.name < l.name || '0' ORDER BY m.name")

    def md5sums_names(self) -> list[str]:
        return [name for (name,) in self._query(
            "SELECT DISTINCT name FROM listed WHERE source = 'own digest' ORDER BY name")]

    def listed_missing(self, folders: Optional[set[str]] = None) -> Iterator[tuple[str, str]]:
        """(name, source) of listed files that no member is, in folders if given."""
        for name, source in self._iterate(
                "SELECT rowid, name, source FROM listed l WHERE source != 'own digest' AND "
                "NOT EXISTS (SELECT 1 FROM members m WHERE m.name = l.name)"):
            if folders is None or series_folder(name) in folders:
                yield name, source

    def listed_differing(self) -> Iterator[tuple[str, str, str, str]]:
        """(name, MD5 read, MD5 listed, source) where a member differs from its line."""
        return self._iterate(
            "SELECT l.rowid, l.name, (SELECT m.md5 FROM members m WHERE m.name = l.name "
            "LIMIT 1) AS got, l.md5, l.source FROM listed l WHERE source != 'own digest' "
            "AND got IS NOT NULL AND got != l.md5")

    def unlisted(self) -> Iterator[str]:
        """Members no MD5SUMS line (or journal row) lists, MD5SUMS files aside."""
        return (name for (name,) in self._iterate(
            "SELECT rowid, name FROM members m WHERE NOT EXISTS (SELECT 1 FROM listed l "
            "WHERE l.name = m.name)"))

    def rows_without_files(self) -> Iterator[tuple[str, str]]:
        """(series folder, metadata file) of the rows no member belongs to."""
        return ((folder, json.loads(record).get("_file", "metadata.csv"))
                for folder, record in self._iterate(
                    "SELECT rowid, folder, record FROM rows r WHERE NOT EXISTS (SELECT 1 "
                    "FROM members m WHERE m.folder = r.folder)"))


@dataclass
class Findings:
    """What --verify (or --extract) found: the members (in the ledger), problems, notes."""
    ledger: Ledger = field(default_factory=Ledger)
    problems: ProblemLines = field(default_factory=ProblemLines)
    streams: int = 0
    affected: set[str] = field(default_factory=set)    # series folders with a problem
    notes: list[str] = field(default_factory=list)       # worth saying, not a problem
    whole_streams: Optional[list[tuple[int, int]]] = None   # the spans checked

    def problem(self, name: str, text: str) -> None:
        """A problem with one file; its series (if it is a series' file) is damaged."""
        self.problems.append(text)
        folder = series_folder(name)
        if folder is not None:
            self.affected.add(folder)


def read_exactly(handle: io.BufferedIOBase, offset: int, size: int) -> bytes:
    if offset < 0:
        raise ValueError("the file is too short to hold that xz stream")
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"the file ends before byte {offset + size}")
    return data


def xz_varint(data: bytes, position: int) -> tuple[int, int]:
    """An xz variable-length integer (at most 9 bytes) at position; ValueError past the
    data's end or when longer."""
    value = 0
    for shift in range(0, 63, 7):
        if position >= len(data):
            raise ValueError("an xz index ends inside a number")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
    raise ValueError("an xz index holds a number longer than 9 bytes")


# An xz index holds one record of a few bytes per block; Python's lzma writes one block per
# stream and `xz -T0` one per 3 dictionary sizes (24 MiB at -6), so 16 MiB of index is over
# a million blocks: a larger Backward Size is damage, not an index worth reading.
XZ_INDEX_LIMIT = 16 << 20
XZ_CHECK_FLAGS = {b"\0\0", b"\0\x01", b"\0\x04", b"\0\x0a"}   # none, CRC32, CRC64, SHA-256


def before_stream_padding(handle: io.BufferedIOBase, end: int) -> int:
    """Where the NUL stream padding (whole groups of 4) before end begins, reading back
    64 kB at a time (4 bytes at a time took 10 s for 16 MiB)."""
    while end >= 4:
        size = min(end, 64 * 1024) & ~3
        block = read_exactly(handle, end - size, size)
        zeros = size - len(block.rstrip(b"\0"))
        end -= zeros & ~3
        if zeros < size:
            break
    return end


def xz_index_blocks(index: bytes, where: int) -> int:
    """The bytes of the blocks an xz index (as read, CRC32 included) describes."""
    if index[0] != 0 or zlib.crc32(index[:-4]) != int.from_bytes(index[-4:], "little"):
        raise ValueError(f"the xz index before byte {where} is damaged")
    count, position = xz_varint(index, 1)
    if count > len(index):                       # each record takes at least 2 bytes
        raise ValueError(f"the xz index before byte {where} is damaged")
    blocks = 0
    for _ in range(count):
        unpadded, position = xz_varint(index, position)
        _, position = xz_varint(index, position)
        blocks += (unpadded + 3) & ~3
    if index[position:-4].strip(b"\0") or (len(index) - 4 - position) >= 4:
        raise ValueError(f"the xz index before byte {where} is damaged")
    return blocks


def xz_stream_span_ending(handle: io.BufferedIOBase, end: int) -> int:
    """The start of the xz stream that ends at end, from its footer and index, every
    field's CRC32 checked (a bit flipped in a footer's Backward Size once made this read a
    claimed 2 GiB "index"). Where an index lies about its blocks, the span is wrong, and
    decompressing it (which must end exactly at end) says so."""
    footer = read_exactly(handle, end - 12, 12)
    if footer[10:] != XZ_FOOTER_MAGIC:
        raise ValueError(f"no xz stream ends at byte {end}")
    if zlib.crc32(footer[4:10]) != int.from_bytes(footer[:4], "little") or \
            footer[8:10] not in XZ_CHECK_FLAGS:
        raise ValueError(f"the xz stream footer before byte {end} is damaged")
    index_size = (int.from_bytes(footer[4:8], "little") + 1) * 4
    if index_size > min(XZ_INDEX_LIMIT, end - 24):
        raise ValueError(f"the xz stream footer before byte {end} is damaged "
                         f"(an index of {index_size} bytes)")
    blocks = xz_index_blocks(read_exactly(handle, end - 12 - index_size, index_size), end - 12)
    start = end - 12 - index_size - blocks - 12
    header = read_exactly(handle, start, 12)
    if header[:6] != XZ_HEADER_MAGIC or header[6:8] != footer[8:10] or \
            zlib.crc32(header[6:8]) != int.from_bytes(header[8:12], "little"):
        raise ValueError(f"the xz stream ending at byte {end} has no header")
    return start


def xz_stream_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every xz stream in the file, found from its end as `xz --list` does:
    a stream's footer gives the size of its index, the index the sizes of its blocks; NUL
    padding may stand between streams. Reads a few bytes a stream. ValueError where the
    bytes are not whole xz streams (a .part cut in an append, a damaged footer)."""
    spans, failure = xz_stream_spans_from_end(path)
    if failure is not None:
        raise failure
    return spans


def xz_stream_spans_from_end(path: Path) -> tuple[list[tuple[int, int]], Optional[ValueError]]:
    """The streams found walking back from the end of the file, in file order, and why the
    walk stopped before byte 0 (None: it reached it). The streams found are whole and in
    place even when an earlier one is damaged."""
    spans: list[tuple[int, int]] = []
    with open(path, "rb") as handle:
        end = before_stream_padding(handle, handle.seek(0, os.SEEK_END))
        try:
            while end > 0:
                start = xz_stream_span_ending(handle, end)
                spans.append((start, end))
                end = before_stream_padding(handle, start)
        except ValueError as exc:
            return spans[::-1], exc
    return spans[::-1], None


def recovered_spans(path: Path) -> list[tuple[int, int]]:
    """The streams of a file whose streams cannot all be walked from its end (a .part cut
    in an append; damage). From its journal if it describes the file (a finished archive
    gains its closing stream: from the last series to the end); else the whole streams
    from the start, found by their headers, and for a finished archive the streams walked
    from the end, with what lies between as one span (decompressing it says what is
    wrong): damage in one stream never hides the others."""
    size = path.stat().st_size
    finished = not path.name.endswith(".part")
    journal = journal_spans(path)
    if journal:
        if finished and journal[-1][1] < size:
            journal.append((journal[-1][1], size))
        return journal
    head = xz_stream_spans_from_headers(path)
    if not finished:
        return head
    head_end = head[-1][1] if head else 0
    tail = [span for span in xz_stream_spans_from_end(path)[0] if span[0] >= head_end]
    tail_start = tail[0][0] if tail else size
    return head + ([(head_end, tail_start)] if tail_start > head_end else []) + tail


def xz_stream_spans_from_headers(path: Path) -> list[tuple[int, int]]:
    """The whole streams at the start of a file whose end is not a stream's (a .part cut
    in an append, at another site without its journal): each stream header, recognised by
    its magic and the CRC32 of its flags, ends the stream before it, whose footer magic
    must stand just before it (after any padding). Stops at the first stream without one."""
    with open(path, "rb") as handle:
        starts = xz_header_offsets(handle)
        size = handle.seek(0, os.SEEK_END)
        spans = []
        for start, following in zip(starts, starts[1:] + [size]):
            end = before_stream_padding(handle, following)
            if end - 2 <= start or read_exactly(handle, end - 2, 2) != XZ_FOOTER_MAGIC:
                break
            spans.append((start, end))
    return spans


def xz_header_offsets(handle: io.BufferedIOBase) -> list[int]:
    """Where the file holds an xz stream header (its magic, and the CRC32 of its flags),
    read 1 MiB at a time (a mapped file's pages counted as the process's memory: 1.3 GB
    for a 600 MiB archive)."""
    starts: list[int] = []
    handle.seek(0)
    offset, carry = 0, b""
    while True:
        block = handle.read(CHUNK_SIZE)
        if not block:
            return starts
        data = carry + block
        base = offset - len(carry)
        position = data.find(XZ_HEADER_MAGIC)
        while position >= 0:
            header = data[position:position + 12]
            if len(header) < 12:
                break                               # its end comes with the next block
            if zlib.crc32(header[6:8]) == int.from_bytes(header[8:12], "little"):
                starts.append(base + position)
            position = data.find(XZ_HEADER_MAGIC, position + 1)
        # a header cut by the block's end, or the start of a magic, comes again next time
        carry = data[position:] if position >= 0 else data[-11:]
        offset += len(block)


# Decompressed output is taken 1 MiB at a time: a 157 kB stream can hold 1 GiB of zeros,
# and decompress() without max_length returned it in one piece (4.3 GB peak).
XZ_OUTPUT_PIECE = 1 << 20


def xz_decompressed(path: Path, start: int, end: int,
                    stop: Optional[threading.Event] = None) -> Iterator[bytes]:
    """The content of the one xz stream between start and end, in pieces of at most
    XZ_OUTPUT_PIECE, its CRCs and index checked by lzma. The stream must end exactly at
    end: bytes after it (another stream, garbage) are damage, never ignored. Interrupted
    when stop is set (checked every piece)."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    position = start
    for chunk in read_range(path, start, end):
        position += len(chunk)
        if decompressor.eof:
            raise ValueError(f"{end - position + len(chunk)} bytes follow the stream's end")
        piece = decompressor.decompress(chunk, max_length=XZ_OUTPUT_PIECE)
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted()
            if piece:
                yield piece
            if decompressor.eof or decompressor.needs_input:
                break
            piece = decompressor.decompress(b"", max_length=XZ_OUTPUT_PIECE)
        if decompressor.eof and (decompressor.unused_data or position < end):
            raise ValueError(f"{end - position + len(decompressor.unused_data)} bytes "
                             "follow the stream's end")
    if not decompressor.eof:
        raise ValueError("the stream is cut short")


# -- tar members as GNU tar reads them --------------------------------------------------------

# A pax record is "<length> <keyword>=<value>\n", length counting the whole record. A length
# of 0 (or one that does not reach a newline) is malformed, as GNU tar says; advancing by it
# once looped forever.
PAX_RECORD = re.compile(rb"(\d{1,20}) ")
PAX_APPLIED = {"path", "size", "mtime"}              # what changes how tar reads the member
PAX_IGNORED = {"atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset"}
PAX_LIMIT = 1 << 20             # our pax headers hold one long path; tar's limit is similar
TAR_TIME_LIMIT = 8 ** 11        # the largest mtime a ustar header holds (the year 2242)
MEMBER_BATCH = 4096             # members handed to the ledger at once


def pax_records(data: bytes) -> list[tuple[str, bytes]]:
    """(keyword, value) of every record of a pax extended header, in order; ValueError
    for a malformed one (GNU tar: "Malformed extended header")."""
    records, position = [], 0
    while position < len(data):
        match = PAX_RECORD.match(data, position)
        length = int(match[1]) if match else 0
        if not match or length < len(match[0]) + 2 or position + length > len(data) or \
                data[position + length - 1] != 0x0A:
            raise ValueError(f"malformed pax extended header (record at byte {position})")
        keyword, equals, value = data[match.end():position + length - 1].partition(b"=")
        if not equals or not keyword:
            raise ValueError(f"malformed pax extended header (record at byte {position})")
        records.append((keyword.decode("utf-8", "surrogateescape"), value))
        position += length
    return records


@dataclass
class TarEntry:
    """One tar member as GNU tar reads it: its pax records applied (size, mtime and path,
    the last of each winning), and why it must not be written, if it must not."""
    name: str
    size: int
    mtime: float
    type: bytes
    refusal: Optional[str] = None


def pax_overrides(records: list[tuple[str, bytes]]) -> tuple[dict[str, bytes], list[str]]:
    """The records that change how the member is read (the last of each keyword wins, as
    in tar), and the keywords this reader does not know."""
    applied: dict[str, bytes] = {}
    unknown: list[str] = []
    for keyword, value in records:
        if keyword in PAX_APPLIED:
            applied[keyword] = value
        elif keyword not in PAX_IGNORED:
            unknown.append(keyword)
    return applied, unknown


def tar_entry(info: tarfile.TarInfo, records: list[tuple[str, bytes]]) -> TarEntry:
    """The member a ustar header and the pax records before it describe."""
    applied, unknown = pax_overrides(records)
    entry = TarEntry(info.name, info.size, float(info.mtime), info.type)
    refusals = []
    if "path" in applied:
        entry.name = applied["path"].decode("utf-8", "surrogateescape")
    if "size" in applied:
        if not applied["size"].isdigit():
            raise ValueError(f"malformed pax extended header (size={applied['size'][:20]!r})")
        entry.size = int(applied["size"])
    if "mtime" in applied:
        try:
            entry.mtime = float(applied["mtime"])
        except ValueError:
            refusals.append("a pax mtime that is not a number")
    if unknown:
        refusals.append(f"pax records this tool never writes ({', '.join(sorted(unknown))})")
    reason = member_refusal(entry)
    entry.refusal = "; ".join(refusals + ([reason] if reason else [])) or None
    return entry


TAR_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
             tarfile.DIRTYPE: "folder", tarfile.CHRTYPE: "character device",
             tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo",
             tarfile.CONTTYPE: "contiguous file", tarfile.GNUTYPE_SPARSE: "sparse file"}
# Types whose header says nothing of content; tar skips no data after them, so a size
# there means the reader and tar would disagree on where the next header is.
TAR_NO_CONTENT = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE,
                  tarfile.BLKTYPE, tarfile.FIFOTYPE)
# Headers that change the members after them (GNU long names, pax global headers): our
# archives never hold them, and reading past them as tar does is not worth the risk.
TAR_CHANGES_NEXT = {tarfile.GNUTYPE_LONGNAME: "a GNU long-name header",
                    tarfile.GNUTYPE_LONGLINK: "a GNU long-link header",
                    tarfile.XGLTYPE: "a pax global header"}
UNSAFE_NAME_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def member_refusal(entry: TarEntry) -> Optional[str]:
    """Why a member must not be written under an extraction folder, or None. The rules of
    tarfile's `data` filter, stricter where our archives never need more: regular files
    only (no links, devices or modes to honour), relative paths of plain components (no
    `..`, `.`, empty or control characters), a modification time a ustar header can hold.
    --verify applies the same rules: an archive it calls whole extracts whole."""
    if entry.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"a {TAR_KINDS.get(entry.type, 'special file')}, not a regular file"
    name = entry.name
    if not name.strip("/") or name.startswith("/"):
        return "an absolute or empty path"
    if UNSAFE_NAME_CHARACTERS.search(name):
        return "a path with control characters"
    parts = name.split("/")
    if ".." in parts:
        return "a path that leaves the folder (..)"
    if any(part in ("", ".") for part in parts):
        return "a path with an empty or '.' component"
    if not 0 <= entry.mtime < TAR_TIME_LIMIT:
        return f"an implausible modification time ({entry.mtime:.0f})"
    return None


class MemberOutput(Protocol):
    """Where a TarFragmentReader puts the members it reads (--extract)."""

    def begin(self, entry: TarEntry) -> bool: ...    # False: not written

    def write(self, data: bytes) -> None: ...

    def end(self, member: VerifiedMember) -> None: ...

    def abort(self) -> None: ...


# Collection files are kept (on disk past 8 MiB) while they stream by, then read into the
# ledger: MD5SUMS, metadata.csv. Only at the top of a collection folder, where we write
# them, and at most COLLECTION_FILE_LIMIT each (an MD5SUMS line is about 130 bytes: 8
# million files); a larger one is a problem, not a reason to fill a disk.
COLLECTION_FILE = re.compile(r"^[^/]+/(MD5SUMS|metadata)[^/]*$")
COLLECTION_FILE_LIMIT = 1 << 30


class TarFragmentReader:
    """The tar members of one xz stream of our archives (whole members, a series each; the
    closing stream adds the end-of-archive blocks), hashed as they stream by, never kept
    whole in memory; with an output, written (--extract)."""

    def __init__(self, stream: int, findings: Findings, output: Optional[MemberOutput] = None):
        self._stream = stream
        self._findings = findings
        self._output = output
        self._writing = False
        self._buffer = bytearray()
        self._entry: Optional[TarEntry] = None              # the member being read
        self._pax: Optional[bytearray] = None               # a pax header being read
        self._records: list[tuple[str, bytes]] = []         # the pax records for the next
        self._content_left = self._padding_left = 0
        self._digest = hashlib.md5()
        self._text: Optional[tempfile.SpooledTemporaryFile] = None
        self._text_size = 0
        self._batch: list[VerifiedMember] = []
        self.ended = False                                  # end-of-archive blocks seen

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._entry is not None or self._pax is not None:
                if not self._take_content():
                    return
            elif len(self._buffer) >= TAR_BLOCK:
                block = bytes(self._buffer[:TAR_BLOCK])
                del self._buffer[:TAR_BLOCK]
                self._take_header(block)
            else:
                return

    def _take_header(self, block: bytes) -> None:
        if block == tarfile.NUL * TAR_BLOCK:
            if self._records:
                raise ValueError("a pax header before the end-of-archive blocks")
            self.ended = True                   # end-of-archive blocks and record padding
            return
        if self.ended:
            raise ValueError("data after the end-of-archive blocks")
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        if info.type in TAR_CHANGES_NEXT:
            raise ValueError(f"{TAR_CHANGES_NEXT[info.type]}, which no archive of this tool "
                             "holds")
        if info.type == tarfile.XHDTYPE:
            if self._records:
                raise ValueError("two pax headers in a row")
            if info.size > PAX_LIMIT:
                raise ValueError(f"a pax header of {info.size} bytes")
            self._pax = bytearray()
            self._content_left, self._padding_left = info.size, -info.size % TAR_BLOCK
            return
        entry = tar_entry(info, self._records)
        self._records = []
        if entry.type in TAR_NO_CONTENT and entry.size:
            raise ValueError(f"{entry.name}: a {TAR_KINDS[entry.type]} with {entry.size} "
                             "bytes of content")
        self._begin_member(entry)

    def _begin_member(self, entry: TarEntry) -> None:
        self._entry = entry
        size = 0 if entry.type in TAR_NO_CONTENT else entry.size
        self._content_left, self._padding_left = size, -size % TAR_BLOCK
        self._digest = hashlib.md5()
        self._text, self._text_size = None, 0
        if entry.type == tarfile.DIRTYPE and entry.refusal is not None and \
                member_refusal(TarEntry(entry.name, 0, entry.mtime, tarfile.REGTYPE)) is None:
            entry.refusal = "folder"            # a safe folder: its files' paths make it
        elif entry.refusal is None and self._output is None and \
                COLLECTION_FILE.match(entry.name):      # (--extract read them already)
            self._text = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        if entry.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            self._findings.ledger.add_link(entry.name)
        if self._output is not None and entry.refusal != "folder":
            self._writing = self._output.begin(entry)
        elif entry.refusal is not None and entry.refusal != "folder":
            self._findings.problem(entry.name, f"{printable(entry.name)}: {entry.refusal}; "
                                               "refused")

    def _take_content(self) -> bool:
        """Consume what the buffer holds of the current member; True when it is done."""
        piece = bytes(self._buffer[:self._content_left])
        del self._buffer[:len(piece)]
        self._content_left -= len(piece)
        if self._pax is not None:
            self._pax += piece
        else:
            self._take_member_piece(piece)
        padding = min(self._padding_left, len(self._buffer))
        del self._buffer[:padding]
        self._padding_left -= padding
        if self._content_left or self._padding_left:
            return False
        if self._pax is not None:
            self._records, self._pax = pax_records(bytes(self._pax)), None
        else:
            self._end_member()
        return True

    def _take_member_piece(self, piece: bytes) -> None:
        self._digest.update(piece)
        if self._writing:
            self._output.write(piece)
        if self._text is not None:
            self._text_size += len(piece)
            if self._text_size > COLLECTION_FILE_LIMIT:
                self._findings.problems.append(
                    f"{self._entry.name}: larger than any collection file this tool writes "
                    f"({human_bytes(COLLECTION_FILE_LIMIT)}); not read")
                self._text.close()
                self._text = None
            else:
                self._text.write(piece)

    def _end_member(self) -> None:
        entry, self._entry = self._entry, None
        if entry.refusal == "folder":
            return
        member = VerifiedMember(entry.name, entry.size, self._digest.hexdigest(), self._stream)
        if self._writing:
            self._writing = False
            self._output.end(member)
        self._batch.append(member)
        if len(self._batch) >= MEMBER_BATCH:
            self.flush()
        if self._text is not None:
            with self._text:
                self._text.seek(0)
                read_collection_file(member, self._text, self._findings)
            self._text = None

    def flush(self) -> None:
        """Hand the members read so far to the ledger."""
        if self._batch:
            self._findings.ledger.add_members(self._batch)
            self._batch = []

    def close(self) -> None:
        self.flush()
        if self._entry is not None or self._pax is not None or self._records or \
                self._buffer.strip(b"\0"):
            raise ValueError("the stream ends inside a tar member")

    def abort(self) -> None:
        """The stream is damaged: a member being written is not kept."""
        self.flush()
        if self._text is not None:
            self._text.close()
            self._text = None
        if self._writing:
            self._writing = False
            self._output.abort()


MD5SUMS_LINE = re.compile(r"^([0-9a-f]{32})  (.+)$")
MD5SUMS_LINE_LIMIT = 64 * 1024        # a line longer than any path is not an MD5SUMS line
# A metadata.csv value can be long (a server's free text: 200,000 characters were seen);
# the csv module's default limit is 128 kB.
CSV_FIELD_LIMIT = 16 << 20


def read_collection_file(member: VerifiedMember, text: io.BufferedIOBase,
                         findings: Findings) -> None:
    """An MD5SUMS or metadata.csv of an output, into the ledger, a line at a time."""
    if re.search(r"(^|/)MD5SUMS[^/]*$", member.name):
        findings.ledger.add_listed([(member.name, member.md5)], OWN_DIGEST)
        findings.ledger.add_listed(md5sums_lines(member.name, text, findings), member.name)
    elif member.name.endswith(".csv"):
        findings.ledger.add_rows(metadata_csv_rows(member.name, text, findings))


def md5sums_lines(name: str, text: io.BufferedIOBase,
                  findings: Findings) -> Iterator[tuple[str, str]]:
    """(file name as in the archive, MD5) of every line of an MD5SUMS; one problem per line
    that is not an MD5SUMS line."""
    folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    number = 0
    while True:
        raw = text.readline(MD5SUMS_LINE_LIMIT)
        if not raw:
            return
        number += 1
        if len(raw) == MD5SUMS_LINE_LIMIT and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):           # the rest of the long line
                raw = text.readline(MD5SUMS_LINE_LIMIT)
            findings.problems.append(f"{name} line {number} is not an MD5SUMS line")
            continue
        match = MD5SUMS_LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
        if not match:
            findings.problems.append(f"{name} line {number} is not an MD5SUMS line")
            continue
        yield folder + match[2], match[1]


def as_written(cell: str) -> str:
    """A metadata.csv cell as the server sent it: the file puts a ' before a cell that a
    spreadsheet would run as a formula (and before one that starts with '), so one goes."""
    return cell[1:] if cell.startswith("'") else cell


def bounded_lines(text: io.BufferedIOBase, limit: int) -> Iterator[str]:
    """The lines of a UTF-8 text, NULs dropped; ValueError for a line longer than limit
    (a file of 64 MiB of one line once took 200 MB to read)."""
    while True:
        raw = text.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit:
            raise csv.Error(f"a line longer than {human_bytes(limit)}")
        yield raw.decode("utf-8", "replace").replace("\0", "")


def metadata_csv_rows(name: str, text: io.BufferedIOBase, findings: Findings) -> Iterator[dict]:
    """The rows of a metadata.csv, each with its series folder as "_folder". A NUL (which
    Python 3.9's csv refuses and later ones keep) is dropped, so that every Python reads the
    same rows; a row the csv module cannot read ends the file with one problem."""
    collection = name.split("/")[0]
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(bounded_lines(text, CSV_FIELD_LIMIT))
    try:
        for row in reader:
            path = row.get("Path")
            yield {**{as_written(str(k)): as_written(v) for k, v in row.items()
                      if isinstance(v, str)},
                   "_folder": f"{collection}/{path if isinstance(path, str) else ''}",
                   "_file": name}
    except csv.Error as exc:
        findings.problems.append(f"{name} line {reader.line_num} cannot be read as CSV: {exc}")


def check_stream(path: Path, index: int, start: int, end: int, findings: Findings,
                 stop: Optional[threading.Event] = None,
                 output: Optional[Callable[[Findings], MemberOutput]] = None,
                 closing: bool = False) -> ProblemLines:
    """Decompress one stream (its CRC64 and index checked by lzma, and that it ends where
    its span does) and read its members into findings' ledger; with output, also write them
    (--extract). Only the closing stream (the archive's last) may hold the end-of-archive
    blocks. Returns the stream's problems."""
    found = Findings(ledger=findings.ledger)
    reader = TarFragmentReader(index, found, output(found) if output else None)
    try:
        for piece in xz_decompressed(path, start, end, stop):
            reader.feed(piece)
        reader.close()
    except (lzma.LZMAError, EOFError, ValueError, tarfile.TarError) as exc:
        reader.abort()
        found.problems.append(f"stream {index + 1} (bytes {start}-{end}) is damaged: "
                              f"{printable(str(exc))}")
    except BaseException:
        reader.abort()                  # --extract cannot write: no half file stays behind
        raise
    if reader.ended and not closing:
        found.problems.append(f"stream {index + 1} (bytes {start}-{end}) holds "
                              "end-of-archive blocks, but is not the last: tar stops there")
    findings.affected |= found.affected
    return found.problems


def bounded_map(function: Callable, items: Iterable, window: int = 0) -> Iterator:
    """function over items on all usable cores, results in order, at most window (twice
    the cores) in flight: pool.map would queue every item at once (a tree of millions of
    files). Items not started when the caller stops (an exception) are cancelled."""
    cores = usable_cores()
    window = window or 2 * cores
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def verify_archive(path: Path, stop: Optional[threading.Event] = None) -> Findings:
    """Every stream, on all usable cores (they are independent): its xz checks, its tar
    headers, every member's MD5. A .part is checked up to its last whole stream."""
    findings = Findings()
    part = path.name.endswith(".part")
    try:
        spans = xz_stream_spans(path)
    except ValueError as exc:
        # Cut inside an append (a kill: normal for a .part) or damaged: the streams are
        # found from the journal, or else from their headers and from the end.
        spans = recovered_spans(path)
        whole_end = spans[-1][1] if spans else 0
        size = path.stat().st_size
        if part:
            findings.notes.append(f"{path.name}: {size - whole_end} bytes after byte "
                                  f"{whole_end} are an append cut short (a resume cuts them "
                                  f"off); the {len(spans)} whole streams before are checked")
        else:
            findings.problems.append(f"{path.name}: {exc}; its {len(spans)} streams are "
                                     "checked one by one")
    findings.streams, findings.whole_streams = len(spans), spans
    series_at = journal_series_ends(path)

    def check(item: tuple[int, tuple[int, int]]) -> ProblemLines:
        index, (start, end) = item
        return check_stream(path, index, start, end, findings, stop,
                            closing=index == len(spans) - 1 and not part)
    for (_, end), problems in zip(spans, bounded_map(check, enumerate(spans))):
        findings.problems += [f"{problem} (series {series_at[end]}, from the journal)"
                              if end in series_at else problem for problem in problems]
        if problems and end in series_at:
            findings.affected.add(series_at[end])
    return findings


def journal_series_ends(path: Path) -> dict[int, str]:
    """Where each committed series' stream ends -> its <Collection>/<path>, from the journal
    beside the archive if it describes it (none at another site: then problems name
    streams only)."""
    journal, _ = trusted_journal(path)
    return {stream.end: stream.folder for stream in journal.streams} if journal else {}


def journal_name_beside(path: Path) -> Path:
    """Where the journal of <name>.tar.xz(.part) is: <name>.tar.xz.journal."""
    name = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    return path.with_name(name + ".journal")


def journal_beside(path: Path) -> Optional[Path]:
    """<name>.tar.xz.journal beside <name>.tar.xz(.part), if it is there, readable, has
    committed series and describes that file (see journal_describes)."""
    journal, _ = trusted_journal(path)
    return journal.path if journal else None


def trusted_journal(path: Path, files: bool = False) -> tuple[Optional[JournalSnapshot],
                                                               Optional[str]]:
    """The journal beside an archive, read once, if it describes that archive; else None
    and, when there is a file at the journal's name, the one line that says why it is
    ignored. A journal that lists nothing is no journal (a run that just started)."""
    journal = journal_name_beside(path)
    if not journal.exists():
        return None, None
    try:
        snapshot = read_snapshot(journal, files)
    except JournalUnusable as exc:
        return None, f"{journal.name} is ignored: {exc}"
    if not snapshot.streams:
        return None, None
    why = journal_mismatch(path, snapshot)
    if why:
        return None, f"{journal.name} is ignored: {why}"
    return snapshot, None


def journal_describes(archive: Path, journal: Path) -> bool:
    """Whether a journal describes this archive (or .part), so that what it says of the
    archive's streams (which series, which MD5s) may be believed: see journal_mismatch."""
    try:
        return journal_mismatch(archive, read_snapshot(journal)) is None
    except JournalUnusable:
        return False


def journal_mismatch(archive: Path, journal: JournalSnapshot) -> Optional[str]:
    """Why the journal does not describe the archive, in words; None when it does. A
    journal beside a file may be another file's: a repair moves it onto the new .part
    while the old archive stays, and an earlier run of another selection may have left it.
    It describes the file when its committed streams end exactly where the file's streams
    do (a .part: its first ones, for an append may follow), a finished archive has the size
    it recorded, and the content is the one it recorded: the last committed stream's
    SHA-256 (or, that stream being damaged, the first's) is the file's. A few bytes a
    stream and one or two streams are read: cheap enough for --extract of one series."""
    part = archive.name.endswith(".part")
    ends = [stream.end for stream in journal.streams]
    if not ends:
        return None if part else "it lists no series"
    size = archive.stat().st_size
    if journal.meta.get("replacing") and archive.with_name(archive.name + ".part").exists():
        elsewhere = f"it describes {archive.name}.part, the repair in progress"
    else:
        elsewhere = "it describes another file (an earlier run's?)"
    closing = journal.meta.get("closing_end", "")
    # A finished archive shorter than it was is a copy cut short: damage that the journal
    # can name and repair, once what is left is what it recorded (checked below).
    cut = not part and closing.isdigit() and int(closing) > size
    if not part and closing.isdigit() and int(closing) != size and not cut:
        return f"{elsewhere}: a finished archive of {closing} bytes, not {size}"
    if ends[-1] > size and not cut:
        return f"{elsewhere}: its series run to byte {ends[-1]}, past the end ({size})"
    if not streams_end_at(archive, [end for end in ends if end <= size],
                          finished=not part and not cut):
        return f"{elsewhere}: its {len(ends)} series' streams do not end where {archive.name}'s do"
    if not content_recorded(archive, journal):
        return f"{elsewhere}: the streams it names hold other bytes (SHA-256)"
    return None


def streams_end_at(archive: Path, ends: list[int], finished: bool) -> bool:
    """Whether the file's streams end at ends: exactly, followed by the closing stream in a
    finished archive, or followed by anything in a .part. Where the file's own streams
    cannot be walked from its end (a .part cut in an append, a damaged footer), each
    stream's header and footer magic must stand where ends put them."""
    try:
        found = [end for _, end in xz_stream_spans(archive)]
    except (ValueError, IndexError):
        starts = [0] + ends[:-1]
        misplaced = sum(not xz_stream_in_place(archive, start, end)
                        for start, end in zip(starts, ends))
        return misplaced <= 1             # one damaged stream does not disown the journal
    return found[:-1] == ends if finished else found[:len(ends)] == ends


def content_recorded(archive: Path, journal: JournalSnapshot) -> bool:
    """The last committed stream's SHA-256 is the file's, or the first's is: one damaged
    stream does not disown the journal that can name its series. A journal of 0.3 kept
    none: its stream ends are all there is."""
    streams = journal.streams
    starts = [0] + [stream.end for stream in streams[:-1]]
    for index in dict.fromkeys((len(streams) - 1, 0)):
        if streams[index].sha256 is None or \
                stream_sha256(archive, starts[index], streams[index].end) == streams[index].sha256:
            return True
    return False


def journal_spans(path: Path) -> Optional[list[tuple[int, int]]]:
    """The committed streams of an archive, from the journal beside it, if it describes it."""
    journal, _ = trusted_journal(path)
    if journal is None:
        return None
    ends = [stream.end for stream in journal.streams]
    return list(zip([0] + ends[:-1], ends))


def journal_files(path: Path) -> Optional[dict[str, str]]:
    """name -> MD5 of every committed file, from the journal beside a .part (which has no
    MD5SUMS yet), if it describes it."""
    journal, _ = trusted_journal(path, files=True)
    return journal.reference(len(journal.streams)) if journal else None


def verify_tree(path: Path, stop: Optional[threading.Event] = None) -> Findings:
    """Every file of a collection folder (PATH itself, or the folders with an MD5SUMS in
    an output), hashed on all usable cores; names as in an archive: <Collection>/..."""
    findings = Findings()
    collections = [path] if any(path.glob("MD5SUMS*")) else \
        sorted(d for d in path.iterdir() if d.is_dir() and any(d.glob("MD5SUMS*")))

    def files() -> Iterator[tuple[Path, Path]]:
        """(collection folder, file), hidden names (scratch, extraction) left out."""
        for folder in collections:
            for root, folders, names in os.walk(folder):
                folders[:] = sorted(f for f in folders if not f.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    if Path(root, name).is_file():
                        yield folder, Path(root, name)

    def hashed(item: tuple[Path, Path]) -> tuple[VerifiedMember, Path]:
        folder, file = item
        digest, size = hashlib.md5(), file.stat().st_size
        for chunk in read_range(file, 0, size):
            if stop is not None and stop.is_set():
                raise Interrupted()
            digest.update(chunk)
        return VerifiedMember(str(file.relative_to(folder.parent)), size, digest.hexdigest(),
                              0), file
    batch: list[VerifiedMember] = []
    for member, file in bounded_map(hashed, files()):
        batch.append(member)
        if COLLECTION_FILE.match(member.name):
            with open(file, "rb") as text:
                read_collection_file(member, text, findings)
        if len(batch) >= MEMBER_BATCH:
            findings.ledger.add_members(batch)
            batch = []
    findings.ledger.add_members(batch)
    return findings


def cross_check(findings: Findings, reference: Optional[Iterable[tuple[str, str]]] = None,
                whole: bool = True) -> None:
    """Members against every MD5SUMS (each line has its member with that MD5, each member
    its line, nothing twice, no file where another's folder is) and every metadata.csv's
    series against the series present. A .part has no MD5SUMS yet (whole=False): its
    journal's (name, MD5) stand in, if given."""
    ledger = findings.ledger
    if reference is not None:
        ledger.add_listed(reference, "journal")
    for name, count in ledger.twice():
        findings.problem(name, f"{name} is in the archive {count} times")
    for name, link in ledger.through_links():
        findings.problem(name, f"{name}: a path through a symbolic or hard link of the archive "
                               f"({link}); refused")
    for name in ledger.files_over_folders():
        findings.problem(name, f"{name} is a file and a folder of other files: tar -x "
                               "cannot write both")
    md5sums = ledger.md5sums_names()
    if not md5sums and whole:
        findings.problems.append("no MD5SUMS: the output is not whole (cut short?)")
    for name, source in ledger.listed_missing():
        findings.problem(name, f"{name}: committed in the journal, missing" if source ==
                         "journal" else f"{name}: listed in {source}, missing")
    for name, got, listed, source in ledger.listed_differing():
        says = "the journal" if source == "journal" else source
        findings.problem(name, f"{name}: MD5 {got}, but {says} says {listed}{series_of(name)}")
    if md5sums or reference is not None:
        for name in ledger.unlisted():
            findings.problem(name, f"{name}: in the output but in no MD5SUMS")
    for folder, csv_name in ledger.rows_without_files():
        findings.problems.append(f"{folder}: listed in {csv_name}, no file of it is in the "
                                 "output")


def series_of(name: str) -> str:
    folder = series_folder(name)
    return f" (series {folder})" if folder else ""


def verify_output(path: Path, stop: Optional[threading.Event] = None) -> int:
    """--verify: one line per problem on stdout, then a summary; 0 whole, 1 a problem,
    2 nothing that can be checked."""
    started = time.monotonic()
    journal: Optional[JournalSnapshot] = None
    if path.is_dir():
        findings, kind = verify_tree(path, stop), "folder tree"
        cross_check(findings)
    elif path.is_file():
        part = path.name.endswith(".part")
        findings, kind = verify_archive(path, stop), "unfinished archive" if part else "archive"
        # Read once, after the streams were found: a download appending to a .part adds
        # rows for streams beyond those checked, which are not missing.
        journal, ignored = trusted_journal(path, files=part)
        findings.notes += [ignored] if ignored else []
        reference = journal.reference(findings.streams) if part and journal else None
        cross_check(findings, reference.items() if reference is not None else None,
                    whole=not part)
    else:
        print(f"tcia_downloader: error: --verify {path}: no such file or folder",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        for problem in findings.problems:
            print(printable(problem))
        for note in findings.notes:
            print(printable(note))
        for line in repair_manifests(path, findings, journal):
            print(line)
        files, size, series = findings.ledger.member_totals()
    finally:
        findings.ledger.close()
    elapsed = time.monotonic() - started
    verdict = "OK" if not findings.problems else f"{len(findings.problems)} problem(s)"
    print(f"{path}: {kind}, {series} series, {files} files, "
          f"{human_bytes(size)}" + (f" in {findings.streams} xz streams" if findings.streams
                                    else "")
          + f"; checked in {elapsed:.1f} s ({human_bytes(size / max(elapsed, 1e-6))}/s): "
          + verdict)
    return EXIT_OK if not findings.problems else EXIT_INCOMPLETE


def say_if_journal_ignored(archive: Path) -> None:
    """--extract: one line when a journal beside the archive is not used (unreadable, or
    another file's); the streams' series then come from the archive itself."""
    if archive.is_file():
        _, ignored = trusted_journal(archive)
        if ignored:
            print(printable(ignored))


def repair_manifests(path: Path, findings: Findings,
                     journal: Optional[JournalSnapshot] = None) -> list[str]:
    """For a finished output whose journal is beside it (for an archive: the journal,
    read by verify_output, that describes it): its damaged series as <name>.damaged.tcia,
    which --retry-failed turns into a repaired output (intact series kept, the damaged ones
    fetched again, the collection files written anew). An old one goes when the output is
    whole again. A journal that does not describe the output writes nothing and removes
    nothing: an earlier, right list stays. Returns what to tell the user."""
    if path.name.endswith(".part"):
        return ["the resume of this .part checks every stream against its journal: rerun "
                "the command that made it"] if findings.problems else []
    if path.is_file():
        name = path.name[:-len(".tar.xz")] if path.name.endswith(".tar.xz") else path.stem
        if journal is None:
            return untrusted_journal_lines(path, name, findings)
        journals = [(journal, name, True)]
    else:
        journals, lines = tree_journals(path)
        if lines:
            return lines
    lines = []
    for snapshot, name, compression in journals:
        manifest = snapshot.path.with_name(f"{name}.damaged.tcia")
        where = {stream.folder: stream.uid for stream in snapshot.streams}
        uids = sorted({where[folder] for folder in findings.affected if folder in where})
        if not findings.problems or (not uids and len(journals) > 1):
            manifest.unlink(missing_ok=True)
            continue
        try:
            write_failed_manifest(manifest, uids, compression, name,
                                  recorded_source(snapshot.meta.get), repair=True)
        except OSError as exc:
            lines.append(f"cannot write {manifest} ({exc.strerror}): copy the output where "
                         "it can be repaired")
            continue
        what = f"{len(uids)} damaged series are listed in {manifest.resolve()}" if uids else \
            f"only collection files are damaged ({manifest.resolve()})"
        lines.append(f"{what}; --retry-failed {manifest.resolve()} fetches them again and "
                     "rebuilds the output around its intact series")
    return lines


def untrusted_journal_lines(path: Path, name: str, findings: Findings) -> list[str]:
    """A damaged archive whose journal is absent or describes another file (its problem
    was said already): no repair list, and an existing one is left as it is."""
    if not findings.problems or not journal_name_beside(path).exists():
        return []
    manifest = path.with_name(f"{name}.damaged.tcia")
    kept = f"; {manifest.name} (from an earlier --verify) is left as it is" \
        if manifest.exists() else ""
    return [f"no repair list is written: the journal beside {path.name} does not describe "
            f"it{kept}"]


def tree_journals(path: Path) -> tuple[list[tuple[JournalSnapshot, str, bool]], list[str]]:
    """The journals of a folder tree's output folder, read; or, if one cannot be used, no
    journal and the line that says which and why (no repair list from half the truth)."""
    folder = path.parent if list(path.glob("MD5SUMS*")) else path
    journals = []
    for candidate in sorted(folder.glob("*.journal")):
        if candidate.name.endswith(".tar.xz.journal"):
            continue
        try:
            journals.append((read_snapshot(candidate), candidate.name[:-len(".journal")], False))
        except JournalUnusable as exc:
            return [], [f"{candidate.name} is ignored: {exc}; no repair list is written"]
    return journals, []


# -- using an archive: --extract --------------------------------------------------------------

def inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def fatal_write_error(exc: OSError) -> bool:
    """A full disk or quota ends the extraction (main names the filesystem); any other
    failure to write one member is that member's problem."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class TreeWriter:
    """Writes the members of one stream under a folder. Each goes to a hidden file beside
    its place and is renamed into place only when its MD5 is the one MD5SUMS lists, so the
    folder never shows a file that was not verified, even after a kill. A member that
    cannot be written (a file where a folder is, a folder where a file is) is a problem of
    its own: the others are still written, and no hidden file stays behind."""

    def __init__(self, folder: Path, findings: Findings, stream: int,
                 allowed: Optional[set[str]] = None):
        self._folder = os.path.realpath(folder)
        self._findings = findings
        self._stream = stream
        self._allowed = allowed           # the series folders selected (None: every one)
        self._check_md5 = findings.ledger.has_listed()     # False: xz's own checks only
        self._file: Optional[io.BufferedWriter] = None
        self._target = self._scratch = Path()
        self._mtime = 0.0
        self._foreign = False

    def begin(self, entry: TarEntry) -> bool:
        name = entry.name
        reason = entry.refusal or self._not_selected(name)
        target = Path(self._folder, name)
        # realpath resolves the links that already exist on the way: a folder in DIR that
        # is a symbolic link elsewhere must not carry a member out (checked before mkdir).
        if reason is None and not inside(os.path.realpath(target.parent), self._folder):
            reason = "a path through a symbolic link that leaves the folder"
        if reason is not None:
            self._findings.problem(name, f"{printable(name)}: {reason}; refused")
            return False
        self._target, self._mtime = target, entry.mtime
        self._scratch = target.with_name(f".{target.name}.{self._stream}.tcia-extract")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self._scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                                 getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if fatal_write_error(exc):
                raise
            self._findings.problem(name, f"{printable(name)}: cannot be written "
                                         f"({exc.strerror}); not extracted")
            return False
        self._file = os.fdopen(descriptor, "wb")
        return True

    def _not_selected(self, name: str) -> Optional[str]:
        """Why a member of a selected stream is not written: it belongs to a series that
        was not selected, which means the journal that mapped streams to series does not
        describe this archive (said once a stream)."""
        folder = series_folder(name)
        if self._allowed is None or folder is None or folder in self._allowed:
            return None
        if not self._foreign:
            self._foreign = True
            self._findings.problems.append(
                f"stream {self._stream + 1} holds {folder}, which was not selected: the "
                "journal beside the archive does not describe it (move the journal away "
                "and extract again)")
        return "of a series that was not selected"

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def end(self, member: VerifiedMember) -> None:
        self._file.close()
        self._file = None
        expected = self._findings.ledger.expected_md5(member.name) if self._check_md5 else None
        if self._check_md5 and expected != member.md5:
            self._scratch.unlink()
            why = "in no MD5SUMS" if expected is None else \
                f"MD5 {member.md5}, but MD5SUMS says {expected}"
            self._findings.problem(member.name, f"{member.name}: {why}"
                                                f"{series_of(member.name)}; not extracted")
            return
        try:
            os.utime(self._scratch, (self._mtime, self._mtime))
            os.replace(self._scratch, self._target)
        except OSError as exc:
            self._scratch.unlink(missing_ok=True)
            if fatal_write_error(exc):
                raise
            self._findings.problem(member.name, f"{member.name}: cannot be written "
                                                f"({exc.strerror}); not extracted")
            return
        self._findings.ledger.add_extracted(member)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._scratch.unlink(missing_ok=True)


@dataclass
class ArchiveMap:
    """What --extract learns of an archive before it decompresses a series: where its
    streams are and the series folder of each; the rows of its metadata.csv (or journal)
    and the MD5 each file must have are in the ledger."""
    spans: list[tuple[int, int]]
    folders: dict[int, str]                   # stream -> <Collection>/<series path>
    closing: Optional[int] = None             # the stream with LICENSE, metadata, MD5SUMS
    peeked: dict[int, int] = field(default_factory=dict)   # stream -> bytes read to map it
    problems: list[str] = field(default_factory=list)


def first_member_name(path: Path, start: int, end: int) -> tuple[Optional[str], int]:
    """The name of a stream's first member, decompressing only its first kilobytes; and
    how many compressed bytes that took."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    data, read = bytearray(), 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while read < end - start and not decompressor.eof:
            chunk = handle.read(min(16 * 1024, end - start - read))
            if not chunk:
                break
            read += len(chunk)
            data += decompressor.decompress(chunk, max_length=256 * 1024)
            name = tar_header_name(bytes(data))
            if name is not None or len(data) >= 256 * 1024:
                return name, read
    return tar_header_name(bytes(data)), read


def tar_header_name(data: bytes) -> Optional[str]:
    """The name the first (pax and) ustar header of data gives, once data holds them."""
    if len(data) < TAR_BLOCK:
        return None
    info = tarfile.TarInfo.frombuf(data[:TAR_BLOCK], "utf-8", "surrogateescape")
    if info.type != tarfile.XHDTYPE:
        return info.name
    header_end = TAR_BLOCK + info.size + -info.size % TAR_BLOCK
    if len(data) < header_end + TAR_BLOCK:
        return None
    following = tarfile.TarInfo.frombuf(data[header_end:header_end + TAR_BLOCK], "utf-8",
                                        "surrogateescape")
    return tar_entry(following, pax_records(data[TAR_BLOCK:TAR_BLOCK + info.size])).name


def map_archive(path: Path, findings: Findings,
                stop: Optional[threading.Event] = None) -> ArchiveMap:
    """Streams from the file itself (or its journal, for a .part cut inside an append);
    each stream's series from the journal beside it, else from its first tar header; the
    closing stream decompressed whole (it is small) for MD5SUMS and metadata.csv, read
    into findings' ledger."""
    problems: list[str] = []
    try:
        spans = xz_stream_spans(path)
    except ValueError as exc:
        spans = recovered_spans(path)
        if not path.name.endswith(".part"):      # for a .part, a torn append is normal
            problems.append(f"{path.name}: {exc}; its {len(spans)} streams are extracted "
                            "one by one")
    archive = ArchiveMap(spans, {}, problems=problems)
    if spans and not path.name.endswith(".part"):
        archive.closing = len(spans) - 1
        # Its problems are said when it is extracted (always, with any selection).
        check_stream(path, archive.closing, *spans[-1], findings, stop, closing=True)
        findings.ledger.forget_members()
        findings.affected.clear()
        archive.peeked[archive.closing] = spans[-1][1] - spans[-1][0]
    else:
        findings.ledger.add_rows(journal_records(path) or [])
        reference = journal_files(path)
        if reference is not None:
            findings.ledger.add_listed(reference.items(), "journal")
    ends = journal_series_ends(path)
    for index, (start, end) in enumerate(spans):
        if index == archive.closing:
            continue
        if end in ends:
            archive.folders[index] = ends[end]
            continue
        try:
            name, read = first_member_name(path, start, end)
        except (lzma.LZMAError, EOFError, ValueError, tarfile.TarError) as exc:
            name, read = None, 0
            archive.problems.append(f"stream {index + 1} (bytes {start}-{end}) is damaged: "
                                    f"{printable(str(exc))}")
        archive.peeked[index] = read
        if name is not None:
            archive.folders[index] = name.rsplit("/", 1)[0]
    return archive


def journal_records(path: Path) -> Optional[list[dict]]:
    """The getSeries record of every committed series, from the journal beside a .part, if
    it describes it."""
    journal, _ = trusted_journal(path)
    if journal is None:
        return None
    return [{**stream.record, "_folder": stream.folder} for stream in journal.streams]


def selection_value(row: dict, column: str) -> str:
    """A row's value as a selection compares it (collections without regard to case)."""
    value = row.get(column) or ""
    return value.lower() if column == "Collection" else value


def selected_folders(rows: Iterable[dict], selection: Selection) -> tuple[set[str], list[str]]:
    """The series folders a selection names, and what it names that the archive lacks;
    one pass over the rows (they may be more than fit in memory)."""
    wanted = {column: set(values) for column, values in selection.filters().items()}
    if selection.collection:
        wanted["Collection"] = {selection.collection.lower()}
    seen: dict[str, set[str]] = defaultdict(set)
    chosen: set[str] = set()
    for row in rows:
        values = {column: selection_value(row, column) for column in wanted}
        for column, value in values.items():
            if value in wanted[column]:
                seen[column].add(value)
        if all(value in wanted[column] for column, value in values.items()):
            chosen.add(row["_folder"])
    flags = {**{p: f for f, p in FILTER_FLAGS.items()}, "Collection": "--collection"}
    absent = [f"{flags[column]} {value}" for column, values in wanted.items()
              for value in sorted(values - seen[column])]
    return chosen, absent


def extract_output(path: Path, selection: Selection, folder: Path,
                   stop: Optional[threading.Event] = None) -> int:
    """--extract: the selected series (all without a selection) and the collection files,
    written under folder and verified; one line per problem, then a summary. 0 all
    written and verified, 1 a problem, 2 bad usage (no such archive, nothing selected)."""
    started = time.monotonic()
    if path.is_dir():
        print(f"tcia_downloader: error: --extract {path}: a folder, not an archive (a folder "
              "tree is already extracted; --verify checks it)", file=sys.stderr)
        return EXIT_USAGE
    if not path.is_file():
        print(f"tcia_downloader: error: --extract {path}: no such archive", file=sys.stderr)
        return EXIT_USAGE
    findings = Findings()
    try:
        return extract_mapped(path, selection, folder, findings, stop, started)
    finally:
        findings.ledger.close()


def extract_mapped(path: Path, selection: Selection, folder: Path, findings: Findings,
                   stop: Optional[threading.Event], started: float) -> int:
    archive = map_archive(path, findings, stop)
    everything = not (selection.filters() or selection.collection)
    chosen, absent = selected_folders(findings.ledger.rows(), selection)
    if not everything and (absent or not chosen):
        why = ", ".join(absent) if absent else "the selection"
        source = "metadata.csv" if archive.closing is not None else "journal"
        rows = sum(1 for _ in findings.ledger.rows())
        print(f"tcia_downloader: error: {why}: no series of {path.name} matches (its "
              f"{source} lists {rows} series)", file=sys.stderr)
        return EXIT_USAGE
    streams = [i for i in range(len(archive.spans)) if everything or i == archive.closing
               or archive.folders.get(i) in chosen]
    findings.problems += archive.problems
    if not findings.ledger.has_listed():
        findings.problems.append(f"{path.name} has no MD5SUMS and no journal beside it: "
                                 "files are checked by xz's CRC64 only")
    folder.mkdir(parents=True, exist_ok=True)
    findings.streams = len(streams)
    allowed = None if everything else chosen

    def extract(index: int) -> ProblemLines:
        return check_stream(path, index, *archive.spans[index], findings, stop,
                            output=lambda found: TreeWriter(folder, found, index, allowed),
                            closing=index == archive.closing)
    for problems in bounded_map(extract, streams):
        findings.problems += problems
    report_missing(findings, None if everything else chosen)
    # each byte once: a stream extracted is read whole, its earlier peek included
    whole = set(streams)
    read = sum(end - start if i in whole else archive.peeked.get(i, 0)
               for i, (start, end) in enumerate(archive.spans))
    return summarise_extract(path, folder, findings, archive, read, time.monotonic() - started)


def report_missing(findings: Findings, chosen: Optional[set[str]]) -> None:
    """Files MD5SUMS lists in the extracted series that no stream held; files twice."""
    findings.problems += [f"{name} is in the archive {count} times" for name, count in
                          findings.ledger.twice()]
    findings.problems += [f"{name}: listed in MD5SUMS, missing from the archive" for name, _
                          in findings.ledger.listed_missing(chosen)]


def summarise_extract(path: Path, folder: Path, findings: Findings, archive: ArchiveMap,
                      read: int, elapsed: float) -> int:
    for problem in findings.problems:
        print(printable(problem))
    files, size, series = findings.ledger.extracted_totals()
    verdict = "OK" if not findings.problems else f"{len(findings.problems)} problem(s)"
    total = archive.spans[-1][1] if archive.spans else 0
    print(f"{path} -> {folder.resolve()}: {series} series, {files} files, {human_bytes(size)} "
          f"from {findings.streams} of {len(archive.spans)} xz streams (read "
          f"{human_bytes(read)} of {human_bytes(total)}) in {elapsed:.1f} s: {verdict}")
    return EXIT_OK if not findings.problems else EXIT_INCOMPLETE


# ==========================================================================================
# 6. Orchestration
# ==========================================================================================

# -- logs and progress ------------------------------------------------------------------------

class Secrets:
    """Everything that must never be written: the password and the current tokens."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], list[str]]] = []

    def add(self, source: Callable[[], list[str]]) -> None:
        self._sources.append(source)

    def values(self) -> list[str]:
        return [secret for source in self._sources for secret in source() if secret]


# Where a secret stands in text that this tool or a library could log: a form, query or
# JSON field, an Authorization header, the user:password of a URL (a proxy's). Masked there,
# whatever the secret; elsewhere only secrets long enough never to be ordinary text (tokens)
# are masked, so that a short password does not turn every path containing it into "***".
SECRET_PLACES = re.compile(
    r"((?:password|passwd|access_token|refresh_token|client_secret)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s&\"',;}]+"
    r"|(bearer\s+)[^\s\"',;]+"
    r"|(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)", re.IGNORECASE)
BARE_SECRET_LENGTH = 12


def printable(text: str) -> str:
    """Text with control characters escaped (a server's file names and metadata reach the
    log: no escape sequence or bell may reach a terminal)."""
    return CONTROL_CHARS.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"),
                             text)


CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


class LogSanitiser(logging.Filter):
    """The last step of every log line: secrets masked where they stand, control
    characters escaped."""

    def __init__(self, secrets: Secrets):
        super().__init__()
        self._secrets = secrets

    def sanitise(self, message: str) -> str:
        message = SECRET_PLACES.sub(lambda m: f"{m[1] or m[2] or m[3]}***", message)
        for secret in self._secrets.values():
            if len(secret) >= BARE_SECRET_LENGTH:
                message = message.replace(secret, "***")
        return printable(message)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:    # tracebacks are sanitised too
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = "\n".join(self.sanitise(line)
                                         for line in record.exc_text.splitlines())
        clean = self.sanitise(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


ALWAYS = {"always": True}     # extra= of the lines a person reads last: summaries, the report


class LevelOrAlways(logging.Filter):
    """stderr's --log-level, except for the progress summaries and the final report: a
    user who quietens a slurm .out file with --log-level WARNING still wants those."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or getattr(record, "always", False)


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class PrivateFileHandler(logging.FileHandler):
    """A log file that only this user can read, and that is never a symbolic link: one
    planted at the name (the names are the time of day, easy to guess) would make the log
    write, with the server's text in it, wherever it points."""

    def _open(self) -> io.TextIOWrapper:
        try:
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                         getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FatalRunError(f"{self.baseFilename} is a symbolic link, which this tool "
                                    "never makes; remove it", EXIT_USAGE) from None
            raise
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def private_dir(path: Path) -> Path:
    """A folder only this user can read (logs, the metadata cache): one that belongs to
    someone else, even if anyone may write to it, is refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            raise FatalRunError(f"{path} belongs to another user; give --cache_dir a folder "
                                "of your own", EXIT_USAGE)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise FatalRunError(f"cannot use {path} ({exc.strerror}); give --cache_dir a folder "
                            "of your own", EXIT_USAGE) from None
    return path


def setup_logging(options: Options, bars: bool, secrets: Secrets) -> Callable[[], None]:
    """stderr at --log-level; <cache_dir>/logs/<time>-info.log and -debug.log.
    Returns the function that takes the handlers down again."""
    log_dir = private_dir(private_dir(options.cache_dir) / "logs")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    secret_filter = LogSanitiser(secrets)
    file_format = logging.Formatter("%(asctime)s %(levelname)-7s %(threadName)s %(message)s")
    console = TqdmHandler() if bars else logging.StreamHandler(sys.stderr)
    console.addFilter(LevelOrAlways(logging.getLevelName(options.log_level)))
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    for suffix, level in (("info", logging.INFO), ("debug", logging.DEBUG)):
        try:
            handler = PrivateFileHandler(log_dir / f"{stamp}-{suffix}.log", encoding="utf-8")
        except BaseException:
            for opened in handlers[1:]:
                opened.close()
            raise
        handler.setLevel(level)
        handler.setFormatter(file_format)
        handlers.append(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for handler in handlers:
        handler.addFilter(secret_filter)
        log.addHandler(handler)
    # Connection-level detail (urllib3 retries, cache hits) belongs in the debug file only.
    library_logs = [logging.getLogger(name) for name in ("urllib3", "requests_cache")]
    for library_log in library_logs:
        library_log.setLevel(logging.DEBUG)
        library_log.addHandler(handlers[-1])
        library_log.propagate = False
    log.debug("logs: %s", log_dir / f"{stamp}-debug.log")
    prune_logs(log_dir)

    def teardown() -> None:
        for library_log in library_logs:
            library_log.removeHandler(handlers[-1])
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
    return teardown


# Every invocation (--verify, --extract and --dry-run too) writes two logs; an afternoon of
# trying the tool left 84. The newest LOGS_KEPT runs' logs stay, none older than LOG_DAYS.
LOGS_KEPT = 50
LOG_DAYS = 30
LOG_NAME = re.compile(r"^(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)-(info|debug)\.log$")


def prune_logs(log_dir: Path) -> None:
    """Remove the logs of all but the newest LOGS_KEPT runs, and those older than LOG_DAYS
    (by their modification time). Only names this tool gives its logs are touched."""
    logs = [(match[1], path) for path in log_dir.iterdir()
            for match in [LOG_NAME.match(path.name)] if match]
    newest = sorted({stamp for stamp, _ in logs}, reverse=True)[:LOGS_KEPT]
    cutoff = time.time() - LOG_DAYS * 86400
    for stamp, path in logs:
        with contextlib.suppress(OSError):
            if stamp not in newest or path.lstat().st_mtime < cutoff:
                path.unlink()


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Progress:
    """tqdm bars on a terminal; otherwise one summary line every summary_interval seconds
    (a slurm .out file must stay readable)."""

    def __init__(self, total_series: int, total_bytes: int, bars: bool, interval: float):
        self.total_series = total_series
        self.total_bytes = total_bytes
        self.done = 0
        self.failed = 0
        self.received = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bars = None
        if bars:
            from tqdm import tqdm
            self._bars = (tqdm(total=total_bytes, unit="B", unit_scale=True, desc="data",
                               position=0, file=sys.stderr, dynamic_ncols=True),
                          tqdm(total=total_series, unit="series", desc="series", position=1,
                               file=sys.stderr, dynamic_ncols=True))
            self._thread = None
        else:
            self._thread = threading.Thread(target=self._summaries, args=(interval,),
                                            name="summary", daemon=True)
            self._thread.start()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.received += n
            if self._bars:
                self._bars[0].update(n)

    def series_finished(self, ok: bool, received: int, expected: int) -> None:
        """Count a series; its bytes are set to FileSize so the total stays meaningful."""
        with self._lock:
            correction = (expected - received) if ok else -received
            self.received += correction
            if ok:
                self.done += 1
            else:
                self.failed += 1
            if self._bars:
                self._bars[0].update(correction)
                self._bars[1].update(1)

    def summary(self) -> str:
        with self._lock:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            rate = self.received / elapsed
            left = max(self.total_bytes - self.received, 0)
            eta = human_seconds(left / rate) if rate > 0 else "unknown"
            return (f"progress: {self.done + self.failed}/{self.total_series} series "
                    f"({self.failed} failed), {human_bytes(self.received)} of "
                    f"{human_bytes(self.total_bytes)}, {human_bytes(rate)}/s, ETA {eta}")

    def _summaries(self, interval: float) -> None:
        while not self._stop.wait(interval):
            log.info("%s", self.summary(), extra=ALWAYS)

    def close(self) -> None:
        self._stop.set()
        if self._bars:
            for bar in self._bars:
                bar.close()


# -- one series, from first attempt to commit or failure --------------------------------------

@dataclass
class Outcome:
    series: PlannedSeries
    ok: bool
    reason: str = ""
    refused: bool = False          # the server refuses this series; says nothing of its health
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dropped: int = 0               # files in the zip that were not the series'
    source: str = ""               # which source served it (nbia, idc)
    by_size_only: int = 0          # files verified by their size only (no usable checksum)
    retries: int = 0               # single files downloaded again within the series' attempt


@dataclass
class RunContext:
    source: Source
    target: Target
    progress: Progress
    retry: RetryPolicy
    stopping: "StopControl"
    breaker: "OutageBreaker"
    packing_slots: threading.Semaphore
    fatal: list[FatalRunError] = field(default_factory=list)


class OutageBreaker:
    """Ends the run when the service looks down (NBIA once answered 500 for days): after
    `limit` series in a row failed for server-side reasons, going on would only spend the
    job's time. A refused series says nothing about the service; a success resets."""

    def __init__(self, limit: int):
        self.limit = limit
        self._streak = 0
        self._lock = threading.Lock()

    def record(self, outcome: "Outcome") -> Optional[FatalRunError]:
        with self._lock:
            if outcome.ok:
                self._streak = 0
            elif not outcome.refused:
                self._streak += 1
            if self._streak < self.limit:
                return None
            return FatalRunError(f"the service looks down: {self._streak} series in a row "
                                 f"failed (last: {outcome.reason}); stopping instead of "
                                 "spending the job on it. Rerun later: it resumes")


def process_series(ctx: RunContext, series: PlannedSeries) -> Outcome:
    """One series, retried within its budget: every failed attempt is thrown away whole."""
    started = time.monotonic()
    count = AttemptBytes(ctx.progress.add_bytes)
    failures = 0
    reason = ""
    while failures < ctx.retry.attempts:
        try:
            verified = attempt_series(ctx, series, count)
        except SeriesUnavailable as exc:
            count.take_back()
            ctx.progress.series_finished(False, count.received, series.file_size)
            return Outcome(series, False, reason=str(exc), refused=True,
                           seconds=time.monotonic() - started)
        except TransientError as exc:
            count.take_back()
            error = exc
        else:
            ctx.progress.series_finished(True, count.received, series.file_size)
            return Outcome(series, True, files=len(verified.members), bytes=verified.bytes,
                           seconds=time.monotonic() - started, dropped=len(verified.dropped),
                           source=str((verified.record or series.record).get("Source") or ""),
                           by_size_only=verified.by_size_only, retries=verified.retries)
        if ctx.stopping.abort.is_set():
            raise Interrupted()            # the failure is the stop's doing, not the series'
        failures += 1
        reason = str(error)
        if failures < ctx.retry.attempts:
            delay = 0.0 if error.immediate else ctx.retry.delay(failures, error.retry_after)
            log.warning("%s: attempt %d/%d failed: %s; retrying in %.0f s", series.short_label,
                        failures, ctx.retry.attempts, reason, delay)
            # Waiting ends early on a drain: a series between attempts is not in progress.
            if ctx.stopping.drain.wait(delay):
                raise Interrupted()
    ctx.progress.series_finished(False, count.received, series.file_size)
    return Outcome(series, False, reason=reason, seconds=time.monotonic() - started)


# What a source gets to verify a series into the output: pack(verify) makes the sink (the
# target's packer), runs verify(sink) on it and returns what the series became.
Packing = Callable[[Callable[[MemberSink], "VerifiedSeries"]], "tuple[VerifiedSeries, Prepared]"]


def attempt_series(ctx: RunContext, series: PlannedSeries,
                   count: Callable[[int], None]) -> VerifiedSeries:
    """Fetch from the source, verifying, cleaning and packing in one pass; commit."""
    scratch = ctx.target.scratch_path(ctx.source.scratch_suffix)

    def pack(verify: Callable[[MemberSink], VerifiedSeries]) -> tuple[VerifiedSeries, Prepared]:
        # One series packed per core: more would share the cores and thrash their caches;
        # meanwhile the other workers keep downloading, so the next series is ready.
        with ctx.packing_slots:
            packer = ctx.target.packer(series, scratch)
            try:
                verified = verify(packer)
                return verified, packer.finish()
            except BaseException:
                packer.discard()
                raise
    try:
        verified, prepared = ctx.source.fetch(series, scratch, count, pack, ctx.stopping.abort)
        try:
            log_dropped(series, verified)
            ctx.target.commit(series, verified, prepared)
        finally:
            prepared.discard()            # after a commit, only what is left in scratch
        return verified
    finally:
        scratch.unlink(missing_ok=True)


def log_dropped(series: PlannedSeries, verified: VerifiedSeries) -> None:
    if verified.dropped:
        # One line per series in the .out file; every name and reason in the debug log.
        reasons: dict[str, int] = defaultdict(int)
        for entry, why in verified.dropped:
            log.debug("%s: dropped %s: %s", series.label, entry, why)
            reasons[why.split(" (")[0]] += 1
        log.warning("%s: dropped %d file(s): %s", series.short_label, len(verified.dropped),
                    "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
    if series.file_size and verified.bytes != series.file_size:
        log.debug("%s: %d bytes of DICOM kept; the server's FileSize says %d",
                  series.label, verified.bytes, series.file_size)


def log_outcome(outcome: Outcome, position: int, total: int) -> None:
    series = outcome.series
    if outcome.ok:    # short: a slurm .out file is read in a terminal (the rate: summaries)
        log.info("[%d/%d] done %s: %d files, %s in %.1f s", position, total, series.short_label,
                 outcome.files, human_bytes(outcome.bytes), outcome.seconds)
    else:
        log.error("[%d/%d] FAILED %s (%s): %s", position, total, series.label, series.uid,
                  outcome.reason)


# -- workers, failures and signals ------------------------------------------------------------

class WorkerPool:
    """Daemon worker threads over a queue of series. Daemon threads, because on a signal
    the process must be able to leave while a worker sits in a read: the journal is
    consistent at every instant, so abandoning in-flight work loses nothing committed."""

    def __init__(self, ctx: RunContext, todo: list[PlannedSeries], workers: int,
                 first_position: int, total: int):
        self.ctx = ctx
        self._todo = deque(todo)
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._finished = threading.Event()
        self._position = first_position
        self._total = total
        self._threads = [threading.Thread(target=self._work, name=f"worker-{n + 1}", daemon=True)
                         for n in range(min(workers, len(todo)))]
        self._running = len(self._threads)

    def _next(self) -> Optional[PlannedSeries]:
        with self._lock:
            if self.ctx.stopping.drain.is_set() or self.ctx.fatal or not self._todo:
                return None
            return self._todo.popleft()

    def _work(self) -> None:
        try:
            for series in iter(self._next, None):
                try:
                    outcome = process_series(self.ctx, series)
                except Interrupted:
                    return
                except FatalRunError as exc:
                    if self.ctx.stopping.abort.is_set():
                        return         # the run is already stopping: the first cause wins
                    with self._lock:
                        self.ctx.fatal.append(exc)
                    self.ctx.stopping.drain.set()
                    self.ctx.stopping.abort.set()
                    return
                except Exception as exc:  # a bug must not kill the run silently
                    if self.ctx.stopping.abort.is_set():
                        return         # what a stop cut short (scratch gone, sockets cut)
                    log.exception("unexpected error on %s", series.label)
                    outcome = Outcome(series, False, reason=f"internal error: {exc!r}")
                with self._lock:
                    self._position += 1
                    self.outcomes.append(outcome)
                    log_outcome(outcome, self._position, self._total)
                outage = self.ctx.breaker.record(outcome)
                if outage is not None:
                    with self._lock:
                        self.ctx.fatal.append(outage)
                    self.ctx.stopping.drain.set()
                    self.ctx.stopping.abort.set()
                    return
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._finished.set()

    def run(self) -> None:
        if not self._threads:
            return
        for thread in self._threads:
            thread.start()
        # Wake regularly so the main thread can run signal handlers.
        while not self._finished.wait(0.5):
            if self.ctx.stopping.abort.is_set():
                # The watchdog cuts every transfer, packing checks the stop between chunks:
                # workers leave within moments, before scratch is removed under them.
                self._finished.wait(5.0)
                return


FAILED_RUN_KEY = "tcia_downloader."      # header keys that say which run failed the series


# The settings that say where an output's series come from, as the journal records them
# ("made <flag>") and a manifest of its series carries them (tcia_downloader.<flag>), so
# that --retry-failed fetches from the same place without being told again.
SOURCE_FLAGS = ("api-url", "mode", "idc-endpoint", "idc-index")


def write_failed_manifest(path: Path, uids: list[str], compression: bool, name: str,
                          source: Optional[dict[str, str]] = None, repair: bool = False) -> None:
    """Series as a .tcia manifest, the format TCIA's portal hands out, with header keys of
    our own (other readers skip unknown keys): the output it belongs to (its folder and
    its name, for the manifest may be saved under another name), where its series came
    from, and for damaged series (--verify) that --retry-failed must replace them, not add
    them. downloadServerUrl names TCIA's servlet only when its series came from TCIA."""
    source = source or {}
    servlet = download_servlet(source.get("api-url", ""), source.get("mode", ""))
    ours = {"output": str(path.parent.resolve()), "name": name,
            "compression": "yes" if compression else "no", **source,
            **({"repair": "yes"} if repair else {})}
    lines = [*([f"downloadServerUrl={servlet}"] if servlet else []),
             "includeAnnotation=true", "noOfrRetry=4", f"databasketId={path.name}",
             "manifestVersion=3.0",
             *(f"{FAILED_RUN_KEY}{key}={value}" for key, value in ours.items()
               if value and value.isprintable()),
             "ListOfSeriesToDownload=", *uids]
    write_file_atomically(path, ("\n".join(lines) + "\n").encode())


def download_servlet(api_url: str, mode: str) -> Optional[str]:
    """The NBIA Data Retriever's download servlet of the server the series came from, by
    NBIA's layout (.../nbia-api/services/v4/ -> .../nbia-download/servlet/DownloadServlet);
    None when they came from IDC, or from a server of another layout."""
    if mode not in ("nbia", "auto") or "/nbia-api/" not in api_url:
        return None
    return api_url.split("/nbia-api/", 1)[0] + "/nbia-download/servlet/DownloadServlet"


def without_credentials(url: str) -> str:
    """A URL as it may be written down: no user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def recorded_source(meta: Callable[[str], Optional[str]]) -> dict[str, str]:
    """flag -> value of the source settings a journal recorded (none before 0.4), from its
    meta table's getter."""
    values = {flag: meta(f"made {flag}") for flag in SOURCE_FLAGS}
    return {flag: value for flag, value in values.items() if value}


class StopControl:
    """How a run ends early. drain: start no new series (SIGUSR1: slurm's warning before a
    time limit); abort: leave now (SIGINT, SIGTERM, or a drain whose grace ran out). The
    journal is consistent at every instant, so leaving never costs a committed series."""

    def __init__(self, grace: float = 120.0,
                 leaving: str = "everything committed is kept, rerun to resume"):
        self.leaving = leaving                # what a stop leaves behind, for the user
        self.drain = threading.Event()
        self.abort = threading.Event()
        self.exit_code: Optional[int] = None
        self.grace = grace
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            if not self.drain.is_set():
                self.exit_code = EXIT_CHECKPOINT
                log.warning("received %s: starting no new series; series in progress have "
                            "%.0f s to finish", name, self.grace)
                self.drain.set()
                timer = threading.Timer(self.grace, self._grace_over)
                timer.daemon = True
                timer.start()
            return
        if self.exit_code in (None, EXIT_CHECKPOINT):
            self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
            log.warning("received %s: stopping now; %s", name, self.leaving)
        self.drain.set()
        self.abort.set()

    def _grace_over(self) -> None:
        if not self.abort.is_set():
            log.warning("the grace period is over: series still in progress are left for "
                        "the next run")
            self.abort.set()


def unknown_collection_message(api: TciaApi, name: str) -> str:
    known = api.collections()
    message = f"unknown collection {name!r}"
    suggestions = suggest_collections(name, known)
    if suggestions:
        message += f"; did you mean: {', '.join(suggestions)}?"
    elif known:
        message += "; --list-collections prints the names this server knows"
    if "nlst" in name.casefold():
        message += f". NLST is on its own server: add --api-url {NLST_API_URL}"
    return message


def retry_policy(options: Options) -> RetryPolicy:
    return RetryPolicy(attempts=options.retries, base_delay=options.retry_wait)


# -- planning a run ---------------------------------------------------------------------------

@dataclass
class Plan:
    name: str                          # of the archive (or journal, for a folder tree)
    series: list[PlannedSeries]        # what this run must have in its output
    unknown: list[str]                 # manifest UIDs the server does not know
    file_suffix: str                   # on LICENSE, metadata.csv, MD5SUMS of a part

    def journal(self, options: Options) -> Path:
        return journal_path(options.output, self.name, options.compression)


def make_plan(source: Source, options: Options) -> Plan:
    """Which series, named how, into which archive: selection, then --update, then --shard."""
    selection = options.selection
    selected = source.records(selection)
    records, unknown, manifests = selected.records, selected.unknown, selected.manifests
    name = selection_name(selection, manifests)
    served = {str(r.get("Collection")) for r in records}
    if not selection.filters() and not manifests and len(served) == 1:
        name = clean_component(served.pop(), 100)      # the server's spelling of the name
    planned = plan_records(records)
    base = name
    if options.update:
        planned, name = updates_only(planned, options, name)
    if options.shard:
        everything = planned
        planned = shard_of(planned, options.shard)
        name += options.shard.suffix
        log.info("shard %d of %d (0-based): %d of %d series, %s of %s", options.shard.index,
                 options.shard.count, len(planned), len(everything),
                 human_bytes(sum(s.file_size for s in planned)),
                 human_bytes(sum(s.file_size for s in everything)))
    collections = {s.collection for s in planned} or {base}
    suffix = name[len(base):] if collections == {base} else f".{name}"
    return Plan(name, planned, unknown, suffix)


def updates_only(planned: list[PlannedSeries], options: Options,
                 name: str) -> tuple[list[PlannedSeries], str]:
    """--update: the series no finished archive of this name (whole, shards, earlier
    updates) holds yet, and the name of today's update archive."""
    ending = ".tar.xz.journal" if options.compression else ".journal"
    bases = [p for p in (options.output / f"{name}{ending}",
                         *options.output.glob(f"{name}.shard-*{ending}")) if p.exists()]
    if not bases or not all(read_journal(p)[1] for p in bases):
        raise FatalRunError(f"--update needs a finished {name}{ending[:-8] or ''} in "
                            f"{options.output}: run without --update first", EXIT_USAGE)
    had: set[str] = set()
    for path in [*bases, *options.output.glob(f"{name}.update-*{ending}")]:
        had |= set(read_journal(path)[0])
    listed = {s.uid for s in planned}
    vanished = had - listed
    if vanished:
        log.warning("%d series in the archives are no longer listed by the server (kept): %s",
                    len(vanished), ", ".join(sorted(vanished)[:10]))
    new = [s for s in planned if s.uid not in had]
    log.info("--update: %d series already archived, %d new", len(had & listed), len(new))
    day = datetime.now().strftime("%Y-%m-%d")
    update_name, n = f"{name}.update-{day}", 1
    while read_journal(options.output / f"{update_name}{ending}")[1]:
        n += 1
        update_name = f"{name}.update-{day}-{n}"
    return new, update_name


# -- before anything is written: space --------------------------------------------------------

# xz ratios on CT-like DICOM measured on our machines (shared/measured.md); images that are
# JPEG-compressed inside DICOM (slide microscopy, ultrasound, photos) barely shrink.
XZ_RATIO = {0: 2.7, 1: 2.85, 2: 2.86, 3: 2.89, 4: 3.0, 5: 3.05, 6: 3.15, 7: 3.15, 8: 3.15, 9: 3.15}
PRECOMPRESSED_MODALITIES = {"SM", "US", "XC", "ES", "OP", "GM", "IVUS"}


def estimated_archive_bytes(series: list[PlannedSeries], preset: int) -> int:
    return int(sum(s.file_size / (1.0 if s.record.get("Modality") in PRECOMPRESSED_MODALITIES
                                  else XZ_RATIO[preset]) for s in series))


@dataclass
class SpaceNeed:
    what: str                  # "--output", "--temp_dir" or both on one filesystem
    folder: Path
    bytes: int
    inodes: int


def space_needs(todo: list[PlannedSeries], options: Options) -> list[SpaceNeed]:
    """What the rest of the run will put on each filesystem: the archive (or the tree) on
    --output, one zip and its compressed stream (or a folder) per worker on --temp_dir."""
    if not todo:
        return []
    largest = max(s.file_size for s in todo)
    parallel = min(options.workers, len(todo))
    if options.compression:
        output = SpaceNeed("--output", options.output,
                           int(estimated_archive_bytes(todo, options.compression_level) * 1.05), 4)
        scratch = SpaceNeed("--temp_dir", options.temp_dir, int(parallel * largest * 1.5),
                            parallel + 1)     # one file per worker, in the scratch folder
    else:
        files = sum(s.image_count or 1 for s in todo)
        folders = len({s.path for s in todo}) + len({s.path.rsplit("/", 1)[0] for s in todo})
        output = SpaceNeed("--output", options.output, sum(s.file_size for s in todo)
                           + 4096 * files, files + folders + 8)
        most_files = max(s.image_count or 1 for s in todo)
        scratch = SpaceNeed("--temp_dir", options.temp_dir, parallel * largest * 2,
                            parallel * (most_files + 2))
    if filesystem_of(options.output) == filesystem_of(options.temp_dir):
        return [SpaceNeed("--output and --temp_dir", options.output,
                          output.bytes + scratch.bytes, output.inodes + scratch.inodes)]
    return [output, scratch]


def existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def filesystem_of(folder: Path) -> int:
    return existing_ancestor(folder).stat().st_dev


def space_shortfalls(needs: list[SpaceNeed]) -> list[tuple[str, bool]]:
    """One line per need (what it needs, what is free, what is missing), and whether
    something is missing."""
    lines = []
    for need in needs:
        stats = os.statvfs(existing_ancestor(need.folder))
        free = stats.f_bavail * stats.f_frsize
        inodes = stats.f_favail if stats.f_files else None     # some filesystems don't say
        line = (f"{need.what} {need.folder}: needs about {human_bytes(need.bytes)} and "
                f"{need.inodes} inodes; free: {human_bytes(free)}"
                + (f" and {inodes} inodes" if inodes is not None else ""))
        missing = []
        if free < need.bytes:
            missing.append(f"{human_bytes(need.bytes - free)} missing")
        if inodes is not None and inodes < need.inodes:
            missing.append(f"{need.inodes - inodes} inodes missing")
        lines.append((line + (": " + ", ".join(missing) if missing else ": enough"),
                      bool(missing)))
    return lines


def describe_plan(plan: Plan, todo: list[PlannedSeries], options: Options) -> list[str]:
    series = plan.series
    patients = {(s.collection, s.record.get("PatientID")) for s in series}
    studies = {s.record.get("StudyInstanceUID") for s in series}
    total = sum(s.file_size for s in series)
    lines = [f"{plan.name}: {len(series)} series of {len({s.collection for s in series})} "
             f"collection(s), {len(patients)} patients, {len(studies)} studies, "
             f"{human_bytes(total)} of DICOM ({sum(s.image_count or 0 for s in series)} files)",
             f"  already in the output: {len(series) - len(todo)} series; to download: "
             f"{len(todo)} series, {human_bytes(sum(s.file_size for s in todo))}"]
    if options.compression:
        lines.append(f"  estimated archive: about "
                     f"{human_bytes(estimated_archive_bytes(series, options.compression_level))} "
                     f"(xz preset {options.compression_level}; CT-like images shrink about "
                     f"{XZ_RATIO[options.compression_level]}x, JPEG-compressed ones barely)")
    if plan.unknown:
        lines.append(f"  unknown to the server: {len(plan.unknown)} series "
                     f"({', '.join(plan.unknown[:5])}{', ...' if len(plan.unknown) > 5 else ''})")
    return lines


# -- the run ----------------------------------------------------------------------------------

def check_folders(options: Options) -> None:
    """Before any network traffic: --output and --temp_dir exist or can be made, and are
    writable (a typo should not cost the wait for a slow server)."""
    for flag, folder in (("--output", options.output), ("--temp_dir", options.temp_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FatalRunError(f"{flag} {folder}: cannot create it ({exc.strerror})",
                                EXIT_USAGE) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FatalRunError(f"{flag} {folder} is not writable: choose another folder",
                                EXIT_USAGE)


def still_on_disk(options: Options, plan: Plan, committed: dict[str, str],
                  finished: bool) -> tuple[dict[str, str], bool]:
    """What the journal says is in the output, less what the disk no longer has: a journal
    never outranks the output (a deleted archive, a removed series folder). Cheap: one stat
    per series at most; the targets check the rest when they open."""
    if options.compression:
        if (options.output / f"{plan.name}.tar.xz").exists():
            return committed, finished
        if (options.output / f"{plan.name}.tar.xz.part").exists():
            return committed, False
        if committed:
            log.warning("%s.tar.xz and its .part are gone: its journal is set aside and the "
                        "archive starts over", plan.name)
        return {}, False
    present = {uid: where for uid, where in committed.items()
               if (options.output / where).is_dir()}
    if len(present) < len(committed):
        log.warning("%d series folders that %s lists are gone from %s: they will be "
                    "downloaded again", len(committed) - len(present),
                    plan.journal(options).name, options.output)
    files = {options.output / where.split("/", 1)[0] / name for where in present.values()
             for name in collection_file_names(plan.file_suffix)}
    whole = len(present) == len(committed) and all(path.is_file() for path in files)
    return present, finished and whole


def finished_archive_damage(options: Options, plan: Plan) -> Optional[str]:
    """What is wrong with a finished archive, from what is cheap to check on a rerun: its
    size, and its last series' stream against the journal (an archive cut short, or
    overwritten at its end). Reading all of it is --verify's job."""
    final = options.output / f"{plan.name}.tar.xz"
    journal = plan.journal(options)
    if not options.compression or not journal.exists():
        return None
    with read_only(journal) as db:
        closing = db.execute("SELECT value FROM meta WHERE key='closing_end'").fetchone()
        last = db.execute("SELECT archive_end, stream_sha256 FROM series "
                          "ORDER BY archive_end DESC LIMIT 2").fetchall()
    size = final.stat().st_size
    if closing and int(closing[0]) != size:
        return f"{final} is {size} bytes, but its journal says {closing[0]}: it changed"
    if last and last[0][1]:
        start = last[1][0] if len(last) > 1 else 0
        if stream_sha256(final, start, last[0][0]) != last[0][1]:
            return f"the last series' stream in {final} is not the one that was appended"
    return None


def tidy_after_a_late_kill(options: Options, plan: Plan) -> None:
    """A run killed after its output was finished leaves its lock file and its scratch (a
    repair killed early, a .part); the run that finds the output finished removes them,
    unless a run still uses them."""
    path = lock_path(options.output, plan.name, options.compression)
    part = options.output / f"{plan.name}.tar.xz.part"
    if path.exists() or (options.compression and part.exists()):
        with contextlib.suppress(FatalRunError):
            lock = acquire_lock(path, plan.name)
            # Beside a finished archive, a .part is a repair killed before its journal
            # moved onto it (it would have said "replacing"): nothing describes it.
            if part.exists():
                log.info("removing %s: a repair of the finished archive that did not get "
                         "far; --retry-failed of the .damaged.tcia starts it again", part.name)
                part.unlink()
            release_lock(path, lock)
    sweep_abandoned_scratch(options.temp_dir, plan.name)


def open_target(options: Options, plan: Plan) -> Target:
    if options.compression:
        return TarXzTarget(plan.name, options.output, options.temp_dir,
                           options.compression_level, plan.file_suffix)
    return DirectoryTarget(plan.name, options.output, options.temp_dir, plan.file_suffix)


def run(options: Options, stopping: StopControl, secrets: Secrets) -> int:
    """Plan, check, resume, download in parallel, finalize, report. Returns the exit code."""
    started = time.monotonic()
    writes = not (options.list_collections or options.dry_run)
    if writes:
        check_folders(options)
    source = open_source(options, stopping)
    nbia = source.nbia if isinstance(source, AutoSource) else source
    if isinstance(nbia, NbiaSource):
        secrets.add(nbia.api.tokens.secrets)
    try:
        if options.list_collections:
            for name in source.collections():
                print(name)
            return EXIT_OK
        log.info("tcia_downloader %s from %s", __version__, source.describe())
        plan = make_plan(source, options)
        return _run_plan(source, plan, options, stopping, started)
    finally:
        source.close()


def open_source(options: Options, stopping: StopControl) -> Source:
    """The source --mode names, with the run's network settings."""
    if options.mode == "auto":
        return AutoSource(open_nbia(options, stopping), open_idc(options, stopping))
    if options.mode == "idc":
        return open_idc(options, stopping)
    return open_nbia(options, stopping)


def open_idc(options: Options, stopping: StopControl) -> IdcSource:
    index = IdcIndex(options.idc_index)
    watchdog = TransferWatchdog(options.stall_timeout, stopping.abort)
    transport: dict[str, object] = {}
    if options.proxy:
        transport["proxies"] = {"http": options.proxy, "https": options.proxy}
    if options.ca_bundle:
        transport["verify"] = str(options.ca_bundle)
    timeout = (options.connect_timeout, options.stall_timeout)
    s3 = S3Client(options.idc_endpoint, watchdog, transport, timeout, stopping.abort)
    return IdcSource(index, s3, options.include_analysis_results, watchdog, transport, timeout)


def open_nbia(options: Options, stopping: StopControl) -> NbiaSource:
    api = TciaApi(options.api_url,
                  cache_path=private_dir(options.cache_dir) / "http_cache",
                  cache_expiry=timedelta(hours=options.cache_expiry_hours),
                  user=options.user, password=options.password,
                  connect_timeout=options.connect_timeout,
                  stall_timeout=options.stall_timeout,
                  retry=retry_policy(options), stop=stopping.abort,
                  proxy=options.proxy, ca_bundle=options.ca_bundle)
    return NbiaSource(api)


def _run_plan(source: Source, plan: Plan, options: Options, stopping: StopControl,
              started: float) -> int:
    committed, finished = still_on_disk(options, plan, *read_journal(plan.journal(options)))
    repairing = options.repair and not options.dry_run
    if repairing:                   # the damaged series count as not there
        committed = {uid: where for uid, where in committed.items() if uid not in
                     {s.uid for s in plan.series} | set(plan.unknown)}
    todo = [s for s in plan.series if s.uid not in committed]
    for line in describe_plan(plan, todo, options):
        log.info("%s", line)
    if finished and not repairing:
        damage = finished_archive_damage(options, plan)
        if damage:
            log.error("%s; --verify %s says what is damaged", damage,
                      (options.output / f"{plan.name}.tar.xz").resolve())
            return EXIT_INCOMPLETE
        log.info("%s is finished; nothing to do%s", plan.name,
                 f" (its size and last stream match the journal; --verify "
                 f"{(options.output / f'{plan.name}.tar.xz').resolve()} reads all of it)"
                 if options.compression else "")
        if not options.dry_run:
            tidy_after_a_late_kill(options, plan)
        if todo:
            log.warning("%d series were published after it was finished; --update fetches "
                        "them into an update archive", len(todo))
        return EXIT_OK if not plan.unknown else EXIT_INCOMPLETE
    shortfalls = space_shortfalls(space_needs(todo, options))
    short = any(missing for _, missing in shortfalls)
    for line, _ in shortfalls:
        (log.warning if short else log.info)("%s", line)
    if options.dry_run:
        log.info("dry run: nothing was written")
        return EXIT_OK
    if short and not options.force:
        log.error("not enough space for this run: free space or choose other folders "
                  "(--force starts anyway)")
        return EXIT_USAGE
    if options.update and not plan.series:
        log.info("nothing new since the last archive")
        return EXIT_OK if not plan.unknown else EXIT_INCOMPLETE
    target = open_target(options, plan)
    try:
        if repairing:
            target.replace_damaged([s.uid for s in plan.series] + plan.unknown)
        if target.complete:     # a run killed after its last rename, now recognised
            log.info("%s is finished; nothing to do", target.describe())
            forget_repair_list(options, plan.name)
            return EXIT_OK if not plan.unknown else EXIT_INCOMPLETE
        target.journal.request([s.uid for s in plan.series],
                               replace=options.selection.retry_failed is None)
        record_provenance(target.journal, options, source)
        with collector_ignoring_what_exists():
            return _download_into(target, plan, source, options, stopping, started)
    finally:
        target.close()


def _download_into(target: Target, plan: Plan, source: Source, options: Options,
                   stopping: StopControl, started: float) -> int:
    committed = target.committed()
    # The smallest series goes first: a source that settles something on its first fetch
    # (NBIA: which image endpoint serves MD5s) holds the others back only that long. Then
    # largest first, so that no big series is left to compress on one core at the end
    # while the other workers idle.
    todo = sorted((s for s in plan.series if s.uid not in committed),
                  key=lambda s: (-s.file_size, s.uid))
    if todo:
        todo.insert(0, todo.pop())
    skipped = len(plan.series) - len(todo)
    packing = min(usable_cores(), options.workers)
    log.info("%d to download into %s with %d workers, %d packing at a time", len(todo),
             target.describe(), options.workers, packing)

    bars = options.progress and sys.stderr.isatty()
    progress = Progress(len(todo), sum(s.file_size for s in todo), bars, options.summary_interval)
    ctx = RunContext(source=source, target=target, progress=progress,
                     retry=retry_policy(options), stopping=stopping,
                     breaker=OutageBreaker(max(5, 2 * options.workers)),
                     packing_slots=threading.Semaphore(packing))
    outcomes: list[Outcome] = []
    try:
        for _ in range(AUDIT_ROUNDS):
            if todo:
                pool = WorkerPool(ctx, todo, options.workers, skipped + len(outcomes),
                                  len(plan.series))
                pool.run()
                outcomes += pool.outcomes
            if ctx.fatal or stopping.abort.is_set() or any(not o.ok for o in outcomes):
                break
            # Nothing is finished unchecked: what was committed must still be in place.
            lost = set(target.audit(full=False))
            if not lost:
                break
            log.warning("%d committed series are no longer intact in %s; fetching them "
                        "again", len(lost), target.describe())
            skipped -= len(lost - {o.series.uid for o in outcomes})
            todo = [s for s in plan.series if s.uid in lost]
        else:
            ctx.fatal.append(FatalRunError(f"{target.describe()} keeps changing under this "
                                           "run: is another program writing to it?"))
    finally:
        progress.close()

    if ctx.fatal:
        log.error("%s", ctx.fatal[0])
        report(options, target, plan, skipped, outcomes, started, interrupted=False)
        return ctx.fatal[0].exit_code
    unfinished = len(plan.series) - skipped - len(outcomes)
    if stopping.exit_code is not None and unfinished > 0:
        report(options, target, plan, skipped, outcomes, started, interrupted=True)
        return stopping.exit_code
    # A drain that came after the last series had started changes nothing: finish normally.
    failures = [o for o in outcomes if not o.ok]
    missing = target.journal.missing_requested() if not failures else []
    if not failures and not missing:
        add_bibtex(target.journal, source, options)
        target.finalize()
        forget_repair_list(options, plan.name)
    report(options, target, plan, skipped, outcomes, started, interrupted=False)
    if missing:
        log.error("%d series that an earlier run asked for are not in %s yet; rerun that "
                  "run's command to fetch them", len(missing), target.describe())
    return EXIT_OK if not (failures or missing or plan.unknown) else EXIT_INCOMPLETE


AUDIT_ROUNDS = 3       # downloads, each followed by a check of everything committed


def forget_repair_list(options: Options, name: str) -> None:
    """After a repair that finished the output: the list of damage --verify wrote is
    history, and a second --retry-failed of it would fetch intact series again."""
    if options.repair:
        (options.output / f"{name}.damaged.tcia").unlink(missing_ok=True)


@contextlib.contextmanager
def collector_ignoring_what_exists() -> Iterator[None]:
    """What exists before the downloads (modules, the plan, the index) lives as long as
    they do: out of the garbage collector's sight, its passes over their many short-lived
    objects stay short (py-spy: 12 % of an IDC run's busy samples were in the collector)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def record_provenance(journal: Journal, options: Options, source: Source) -> None:
    """What CITATION.md says of how the copy was made: the source (without credentials),
    when the first run started, and its selection (a --retry-failed run only completes it);
    and the flags of that source, which a manifest of its series carries (never a password
    or a token: URLs lose their user part)."""
    journal.put("made source", source.describe())
    idc = options.mode in ("idc", "auto")
    flags = {"api-url": without_credentials(options.api_url) if options.mode != "idc" else "",
             "mode": options.mode,
             "idc-endpoint": without_credentials(options.idc_endpoint)
             if idc and options.idc_endpoint else "",
             "idc-index": str(options.idc_index.resolve()) if idc and options.idc_index else ""}
    for flag, value in flags.items():
        journal.put(f"made {flag}", value)
    if journal.get("made started") is None:
        journal.put("made started", utc_day())
    if options.selection.retry_failed is None and journal.get("made selection") is None:
        journal.put("made selection", describe_selection(options.selection))


def describe_selection(selection: Selection) -> str:
    """The selection as the flags that make it (manifests by file name)."""
    words = [f"--collection {selection.collection}"] if selection.collection else []
    chosen = selection.filters()
    words += [f"{flag} {' '.join(chosen[parameter])}" for flag, parameter in
              FILTER_FLAGS.items() if parameter in chosen]
    words += [f"--manifest {manifest.name}" for manifest in selection.manifests]
    return printable(" ".join(words))


def add_bibtex(journal: Journal, source: Source, options: Options) -> None:
    """BibTeX of the output's DOIs into the journal, once: CITATION.md is made from it."""
    dois = sorted({dataset.doi for collection in journal.collections()
                   for dataset in datasets(journal, collection)
                   if dataset.doi and journal.get(f"bibtex {dataset.doi}") is None})
    if not dois or not options.doi_resolver:
        return
    resolver = DoiResolver(options.doi_resolver, source.watchdog, source.transport,
                           source.timeout, options.doi_timeout)
    for doi, entry in resolver.bibtex(dois).items():
        journal.put(f"bibtex {doi}", entry)


def report(options: Options, target: Target, plan: Plan, skipped: int,
           outcomes: list[Outcome], started: float, interrupted: bool) -> None:
    elapsed = time.monotonic() - started
    done = [o for o in outcomes if o.ok]
    failures = [o for o in outcomes if not o.ok]
    new_bytes = sum(o.bytes for o in done)
    missing = len(plan.series) - skipped - len(done)
    lines = [
        f"report for {plan.name}: {len(plan.series)} series requested",
        f"  downloaded and verified now: {len(done)} ({human_bytes(new_bytes)})",
        f"  already present:             {skipped}",
        f"  failed:                      {len(failures)}",
        f"  not attempted:               {missing - len(failures)}",
        f"  files dropped (not the series'): {sum(o.dropped for o in done)}",
        *idc_lines(done),
        *source_lines(done),
        f"  elapsed {human_seconds(elapsed)}, {human_bytes(new_bytes / max(elapsed, 1e-6))}/s",
        f"  output: {describe_output(target)}",
        *citation_lines(target.journal),
        f"  logs: {', '.join(log_files()) or 'none'}",
    ]
    for line in lines:
        log.info("%s", line, extra=ALWAYS)
    manifest = options.output / f"{target.name}.failed.tcia"
    if not failures:
        manifest.unlink(missing_ok=True)     # an earlier run's list would mislead
    else:
        write_failed_manifest(manifest, [o.series.uid for o in failures], options.compression,
                              target.name, recorded_source(target.journal.get))
        for outcome in failures:
            log.error("  failed %s (%s): %s", outcome.series.label, outcome.series.uid,
                      outcome.reason)
        log.error("the %d failed series are listed in %s; rerun the same command (or "
                  "--retry-failed %s) to retry them", len(failures), manifest.resolve(),
                  manifest.resolve())
    if plan.unknown:
        log.error("%d series UIDs are unknown to the server (withdrawn, or a typo): %s",
                  len(plan.unknown), ", ".join(plan.unknown[:20])
                  + (", ..." if len(plan.unknown) > 20 else ""))
        log.debug("all unknown UIDs: %s", ", ".join(plan.unknown))
    if interrupted or failures or missing:
        log.info("the output is resumable: rerun the same command to continue", extra=ALWAYS)


def idc_lines(done: list[Outcome]) -> list[str]:
    """Whenever a series came from IDC (a 0 there is worth reading too): how many files
    only their size vouches for (multipart ETags can defeat the checksum), and how many
    object downloads were tried again (many: S3 throttles, or the link is poor)."""
    if not any(o.source == "idc" for o in done):
        return []
    return [f"  files verified by size only:  {sum(o.by_size_only for o in done)} "
            "(the others by their MD5)",
            f"  object downloads retried:     {sum(o.retries for o in done)}"]


def source_lines(done: list[Outcome]) -> list[str]:
    """Which source served how many series, when more than one did."""
    counts: dict[str, int] = defaultdict(int)
    for outcome in done:
        counts[outcome.source or "?"] += 1
    if len(counts) < 2:
        return []
    return ["  from each source:            " + ", ".join(f"{name} {n}" for name, n in
                                                          sorted(counts.items()))]


def citation_lines(journal: Journal) -> list[str]:
    """The DOIs to cite, in the report: TCIA's policy asks every user of the data."""
    links = sorted({d.link for c in journal.collections() for d in datasets(journal, c)
                    if d.link})
    if not links:
        return []
    return [f"  cite: {', '.join(links)} and TCIA (https://doi.org/10.1007/s10278-013-9622-7); "
            "CITATION.md in each collection folder says how"]


def describe_output(target: Target) -> str:
    """Where the output is (absolute: the line is pasted into other shells), how big it is,
    and for an archive how much xz saved."""
    path = Path(target.describe()).resolve()
    if not path.is_file():
        return str(path)
    size = path.stat().st_size
    dicom = target.journal.total_bytes()
    ratio = f", {dicom / size:.2f}x smaller than its DICOM" if dicom and size else ""
    return f"{path} ({human_bytes(size)}{ratio})"


def log_files() -> list[str]:
    return [handler.baseFilename for handler in log.handlers
            if isinstance(handler, logging.FileHandler)]


def main(argv: Optional[list[str]] = None) -> int:
    try:
        options = parse_options(argv)
    except UsageError as exc:
        print(f"tcia_downloader: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stopping = StopControl(options.stop_grace) if not (options.verify or options.extract) \
        else StopControl(leaving="nothing unverified is left behind" if options.extract
                         else "the check is incomplete")
    stopping.install()
    secrets = Secrets()
    secrets.add(lambda: [options.password] if options.password else [])
    bars = options.progress and sys.stderr.isatty()
    try:
        teardown_logging = setup_logging(options, bars, secrets)
    except (OSError, FatalRunError) as exc:
        stopping.uninstall()
        why = exc.strerror if isinstance(exc, OSError) else exc
        print(f"tcia_downloader: error: cannot write logs in {options.cache_dir}: {why}",
              file=sys.stderr)
        return EXIT_USAGE
    log.debug("options %s", options)
    try:
        if options.verify:
            return verify_output(options.verify, stopping.abort)
        if options.extract:
            say_if_journal_ignored(options.extract)
            return extract_output(options.extract, options.selection, options.output,
                                  stopping.abort)
        return run(options, stopping, secrets)
    except Interrupted:
        return stopping.exit_code or EXIT_SIGINT
    except FatalRunError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except OSError as exc:
        # Everything the run writes goes through paths the user chose: one line for what
        # failed where, never a traceback. The journal keeps the run resumable.
        where = Path(exc.filename) if exc.filename else options.output
        error = disk_full(where) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
            FatalRunError(f"cannot write {where}: {exc.strerror or exc}; check the folder, then "
                          "rerun to resume")
        log.error("%s", error)
        log.debug("details", exc_info=True)
        return error.exit_code
    finally:
        stopping.uninstall()
        teardown_logging()


if __name__ == "__main__":
    sys.exit(main())
