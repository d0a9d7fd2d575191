"""The command line: the parser, the checks of every flag, main()."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from . import __version__
from .errors import EXIT_SIGINT, EXIT_USAGE, FatalRunError, Interrupted, UsageError
from .extract import extract_output
from .formats import FORMATS, archive_codecs, target_format
from .inflate import FASTEST as FASTEST_INFLATE
from .logs import Secrets, log, printable, setup_logging
from .memory import keep_freed_buffers
from .plan import FAILED_RUN_KEY, failed_run_origin, recorded_format
from .run import StopControl, run
from .settings import (DEFAULT_CACHE_DIR, DEFAULT_DOI_RESOLVER, DEFAULT_DOI_TIMEOUT,
                       FILTER_FLAGS, NetworkSettings, Options, Selection, Shard, default_workers,
                       parse_size)
from .sources.registry import (add_source_flags, default_mode, mode_help, mode_metavar,
                               selecting_mode, source_named)
from .sources.tcia_website import check_website_api, list_downloads
from .storage import disk_full
from .trust import say_if_journal_ignored
from .verify import verify_output

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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tcia_downloader.py",
        description="Download TCIA series (from NBIA v4, or IDC's public buckets) into one "
                    "verified, resumable .tar.xz or .tar.zst (or a folder tree).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)

    what = parser.add_argument_group("what to download")
    what.add_argument("--collection", metavar="NAME",
                      help="a TCIA collection, e.g. Pancreas-CT (alone: all of it)")
    what.add_argument("--manifest", action="append", default=[], metavar="FILE",
                      help="exactly the series of a manifest: a .tcia manifest, IDC's .s5cmd "
                           "manifest, or a CSV/TSV with a SeriesInstanceUID column "
                           "(repeatable; may span collections)")
    for flag, parameter in FILTER_FLAGS.items():
        aliases = ["--series"] if flag == "--series-uid" else []
        what.add_argument(flag, *aliases, nargs="+", action="extend", default=[],
                          metavar="VALUE", help=f"only series with one of these {parameter} "
                                                "values (with or without --collection)")
    what.add_argument("--update", action="store_true",
                      help="after a complete archive: only the series published since, into "
                           "<name>.update-<YYYY-MM-DD> of the same format")
    what.add_argument("--retry-failed", metavar="FILE.tcia",
                      help="exactly the series of a <name>.failed.tcia, into that run's output")
    what.add_argument("--shard", metavar="I/N",
                      help="part I of N (0 <= I < N), balanced by size; default in a slurm "
                           "job array: the task's place in the array; 'none' turns it off")
    what.add_argument("--list-collections", action="store_true",
                      help="print the server's collection names, one per line, and exit")
    what.add_argument("--list-downloads", action="store_true",
                      help="with --collection NAME: print its downloads on TCIA's website "
                           "(title, type, size, link; tab-separated), the Aspera Faspex "
                           "packages among them, and exit")
    what.add_argument("--dry-run", action="store_true",
                      help="say what would be downloaded and whether it fits; write nothing")
    # (no `choices`: an unknown mode gets source_named's one line, not argparse's usage)
    what.add_argument("--mode", metavar=mode_metavar(), help=mode_help())

    where = parser.add_argument_group("where")
    where.add_argument("--output", default=".", metavar="DIR",
                       help="where <name>.tar.xz / .tar.zst (or the <Collection>/ folders) go "
                            "(default: .)")
    where.add_argument("--temp-dir", "--temp_dir", dest="temp_dir", metavar="DIR",
                       help="scratch: the series in flight (a zip, then its compressed units), "
                            "within --temp-limit; node-local disk on a cluster (default: "
                            "--output)")
    where.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=DEFAULT_CACHE_DIR,
                       metavar="DIR", help=f"logs and HTTP metadata cache (default: {DEFAULT_CACHE_DIR})")
    where.add_argument("--temp-limit", metavar="SIZE",
                       help="the most scratch the run may hold in --temp-dir, as sbatch --mem "
                            "writes sizes: 500M, 20G, 1.5T (K/M/G/T: powers of 1024; a plain "
                            "number: bytes): series downloaded ahead wait for a core within "
                            "it, and --mode aspera receives its packages in parts that fit it "
                            "(default: half the free space of --temp-dir at the start, less "
                            "the output's estimate when both share a disk)")
    where.add_argument("--force", action="store_true",
                       help="start even when the free space looks too small")

    how = parser.add_argument_group("how")
    # (no `choices`: an unknown format gets parse_options' one line, not argparse's usage)
    how.add_argument("--format", metavar="{" + ",".join(FORMATS) + "}",
                     help="dir: a folder tree under <output> (default); " + "; ".join(
                         f"{name}: one <output>/<name>{target.suffix}" for name, target in
                         FORMATS.items() if target.codec) + "; every file verified either way")
    how.add_argument("--compression", action="store_true",
                     help="the same as --format tar.xz (the first spelling, kept)")
    how.add_argument("--compression-level", "--compression_level", dest="compression_level",
                     type=int, metavar="N", help="on the format's own scale: " + "; ".join(
                         f"{codec.name} {codec.levels[0]}-{codec.levels[1]}, default "
                         f"{codec.default_level} ({codec.level_note})"
                         for codec in archive_codecs()).replace("%", "%%"))
    how.add_argument("--workers", type=int, metavar="N",
                     help="series downloaded in parallel (1 to 64); one per usable core is "
                          "verified and compressed at a time (default: 4 per core, at most "
                          "16; a source may choose fewer: --mode aspera 2, parts of a package)")
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

    network = parser.add_argument_group("network")
    network.add_argument("--proxy", metavar="URL",
                         help="HTTP(S) proxy for every request (default: $HTTPS_PROXY/$HTTP_PROXY)")
    network.add_argument("--ca-bundle", metavar="FILE",
                         help="CA certificates to trust, e.g. a site proxy's (PEM)")
    network.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                         help="give up a connection attempt after this long (default: 30)")
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

    add_source_flags(parser)

    check = parser.add_argument_group("checking what is on disk")
    check.add_argument("--verify", metavar="PATH",
                       help="check an archive (.tar.xz, .tar.zst or their .part) or a folder tree this tool "
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
    # --mode as given; else, for --retry-failed, as its list recorded it (the series go
    # back into an output made from there); else a source's own flag that names what to
    # download (--aspera-url); else the default.
    mode = args.mode or origin.get("mode") or selecting_mode(args) or default_mode()
    source = source_named(mode)
    if args.workers is None:
        args.workers = source.workers or default_workers()
    try:
        args.temp_limit = parse_size(args.temp_limit) if args.temp_limit else None
    except ValueError as exc:
        raise UsageError(f"--temp-limit {exc}") from None
    for flag, low, high, unit in NUMERIC_FLAGS:
        check_number(flag, getattr(args, flag[2:].replace("-", "_")), low, high, unit)
    network = parse_network(args)
    output = Path(args.output).expanduser()
    format_name = asked_format(args)
    repair = False
    if selection.retry_failed:
        # The failed series go back into the output of the run that failed them, whatever
        # --output and --format say: anything else would start a second, partial output.
        output = Path(origin["output"]) if "output" in origin else output
        format_name = recorded_format(origin) or format_name
        repair = origin.get("repair") == "yes"
        name = recorded_name(selection.retry_failed, origin)
        selection = dataclasses.replace(selection, retry_name=name)
    check_format(format_name, args.compression_level)
    check_website_api(args.website_api)
    # Last: it may ask for a password, once the other flags are known to be good.
    source_settings = source.settings(args, origin)
    return Options(
        selection=selection,
        output=output,
        temp_dir=Path(args.temp_dir).expanduser() if args.temp_dir else output,
        cache_dir=Path(args.cache_dir).expanduser(),
        network=network,
        source=source_settings,
        format=format_name,
        compression_level=args.compression_level,
        workers=args.workers,
        stop_grace=args.stop_grace,
        shard=parse_shard(args.shard, os.environ),
        update=args.update,
        dry_run=args.dry_run,
        force=args.force,
        list_collections=args.list_collections,
        log_level=args.log_level,
        progress=not args.no_progress,
        summary_interval=args.summary_interval,
        verify=Path(args.verify).expanduser() if args.verify else None,
        extract=Path(args.extract).expanduser() if args.extract else None,
        repair=repair,
        mode=mode,
        temp_limit=args.temp_limit,
        list_downloads=args.list_downloads,
        website_api=args.website_api,
    )


def asked_format(args: argparse.Namespace) -> str:
    """--format, or --compression (the seed's word for tar.xz), or a folder tree."""
    if args.compression and args.format not in (None, "tar.xz"):
        raise UsageError(f"--compression means --format tar.xz; give only --format "
                         f"{printable(args.format)}")
    return args.format or ("tar.xz" if args.compression else "dir")


def check_format(name: str, level: Optional[int]) -> None:
    """A format this tool knows and this Python can write, and a level on its scale."""
    target = target_format(name)
    missing = target.missing()
    if missing:
        raise UsageError(missing)
    if level is None:
        return
    if target.codec is not None:
        low, high = target.codec.levels
        if not low <= level <= high:
            raise UsageError(f"--compression-level must be from {low} to {high} for --format "
                             f"{name} ({target.codec.level_note}); got {level}")
        return
    # A folder tree is not compressed: the seed accepted a level without --compression, so
    # one that some archive format takes is still accepted (and has no effect).
    low = min(codec.levels[0] for codec in archive_codecs())
    high = max(codec.levels[1] for codec in archive_codecs())
    if not low <= level <= high:
        raise UsageError(f"--compression-level must be from {low} to {high}; got {level}")


def parse_network(args: argparse.Namespace) -> NetworkSettings:
    """The network flags, checked (their numbers are, with the others, in NUMERIC_FLAGS)."""
    if args.doi_resolver.lower() != "none" and \
            urlsplit(args.doi_resolver).scheme not in ("http", "https"):
        raise UsageError(f"--doi-resolver {args.doi_resolver!r}: give an http(s) URL or none")
    if args.proxy and urlsplit(args.proxy).scheme not in ("http", "https"):
        raise UsageError(f"--proxy {args.proxy!r}: give an http:// or https:// proxy URL")
    ca_bundle = Path(args.ca_bundle).expanduser() if args.ca_bundle else None
    if ca_bundle and not ca_bundle.is_file():
        raise UsageError(f"--ca-bundle {args.ca_bundle}: no such file")
    return NetworkSettings(
        proxy=args.proxy, ca_bundle=ca_bundle, connect_timeout=args.connect_timeout,
        stall_timeout=args.stall_timeout, retries=args.retries, retry_wait=args.retry_wait,
        cache_dir=Path(args.cache_dir).expanduser(), cache_expiry_hours=args.cache_expiry,
        doi_resolver=None if args.doi_resolver.lower() == "none" else args.doi_resolver,
        doi_timeout=args.doi_timeout)


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
    # A source's own flag may name what to download (--aspera-url); a --retry-failed list
    # names it instead, and --verify and --extract download nothing.
    packages = selecting_mode(args) is not None and not (selection.retry_failed or
                                                         args.verify or args.extract)
    if args.list_downloads and (not collection or selection.filters()):
        raise UsageError("--list-downloads lists one collection's downloads: give "
                         "--collection NAME, and no filters")
    ways = sum([by_name and not (args.extract or args.list_downloads), packages,
                bool(selection.manifests), bool(selection.retry_failed),
                bool(args.list_collections), bool(args.verify), bool(args.extract),
                bool(args.list_downloads)])
    if ways == 0:
        raise UsageError("say what to download: --collection NAME, --manifest FILE, "
                         "filters such as --patient ID, --aspera-url LINK, or "
                         "--list-collections (or --verify PATH to check an output, --extract "
                         "ARCHIVE to unpack one)")
    if ways > 1:
        raise UsageError("choose one of --collection/filters, --manifest, --aspera-url, "
                         "--retry-failed, --list-collections, --list-downloads, --verify and "
                         "--extract (which takes filters)")
    if args.extract and (args.update or args.dry_run or args.shard not in (None, "none")):
        raise UsageError("--extract takes filters (--series-uid, --patient, --study-uid, "
                         "--modality, --body-part, --collection) and --output, nothing else")
    if args.update and (selection.retry_failed or args.list_collections):
        raise UsageError("--update goes with --collection, filters or --manifest")
    for path in (*selection.manifests, *([selection.retry_failed] if selection.retry_failed else [])):
        if not path.is_file():
            raise UsageError(f"{path}: no such manifest file")
    return selection


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
    source = source_named(options.mode)
    secrets.add(lambda: source.secrets(options.source))
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
    keep_freed_buffers()
    log.debug("zip entries inflated by %s", FASTEST_INFLATE.name)
    try:
        if options.verify:
            return verify_output(options.verify, stopping.abort)
        if options.list_downloads:
            return list_downloads(str(options.selection.collection), options.website_api,
                                  options.network, stopping.abort)
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
