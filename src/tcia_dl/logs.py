"""Logging (secrets kept out), the progress line, printable, human_bytes."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, TYPE_CHECKING

from .errors import EXIT_USAGE, FatalRunError

if TYPE_CHECKING:
    from .settings import Options

log = logging.getLogger("tcia_downloader")


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


# urllib3's line for each response (connectionpool, urllib3 1.26 and 2.x): scheme, host,
# port, method, URL, HTTP version, status, length.
URLLIB3_RESPONSE = '%s://%s:%s "%s %s %s" %s %s'


class AnsweredRequests(logging.Filter):
    """urllib3's line for a request answered 2xx stays out of the debug log; a failed or
    redirected one, a retry and a new connection stay in. IDC is one GET per DICOM object:
    about 200 bytes of log each, 2 GB per 10 million objects in --cache-dir (home, under a
    quota, on most clusters). Writing them cost CPU too: 0.05 ms per object on a quiet
    2-core machine, 0.2 ms with other jobs on it (bench/idc_cpu.py --format tar.zst, 1,582
    objects, 4 interleaved runs each: 2.33 -> 2.28 ms; 2.28 -> 2.06 ms). Each series' line
    says what it fetched, and the report counts the retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (record.msg == URLLIB3_RESPONSE and isinstance(args, tuple)
                    and len(args) == 8 and isinstance(args[6], int) and 200 <= args[6] < 300)


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
    # On the logger, not the debug file's handler: only urllib3's response lines are looked
    # at, not every line of the run, and a 2xx one ends before any handler is called.
    responses = logging.getLogger("urllib3.connectionpool")
    answered = AnsweredRequests()
    responses.addFilter(answered)
    log.debug("logs: %s", log_dir / f"{stamp}-debug.log")
    prune_logs(log_dir)

    def teardown() -> None:
        responses.removeFilter(answered)
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
        self.received = 0       # what the series done and in flight hold now (net)
        self.shown = 0          # what the bar and the summary say: never less than before
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
        """Bytes received (n > 0), or taken back (n < 0: a failed attempt is thrown away
        whole, and its retry starts from zero)."""
        with self._lock:
            self.received += n
            self._show()

    def series_finished(self, ok: bool, received: int, expected: int) -> None:
        """Count a series; its bytes are set to FileSize so the total stays meaningful."""
        with self._lock:
            correction = (expected - received) if ok else -received
            self.received += correction
            if ok:
                self.done += 1
            else:
                self.failed += 1
            self._show()
            if self._bars:
                self._bars[1].update(1)

    def _show(self) -> None:
        """What is shown follows the net count up, never down: bytes taken back (a failed
        attempt, a zip larger than its series' FileSize) hold the bar where it is until
        the retry has received as much again. A bar going backwards reads as data lost,
        which it is not; capped at the total, so that it ends at 100 % when all is done."""
        now = min(self.received, self.total_bytes)
        if now > self.shown:
            if self._bars:
                self._bars[0].update(now - self.shown)
            self.shown = now

    def summary(self) -> str:
        with self._lock:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            rate = self.shown / elapsed
            left = max(self.total_bytes - self.shown, 0)
            eta = human_seconds(left / rate) if rate > 0 else "unknown"
            return (f"progress: {self.done + self.failed}/{self.total_series} series "
                    f"({self.failed} failed), {human_bytes(self.shown)} of "
                    f"{human_bytes(self.total_bytes)}, {human_bytes(rate)}/s, ETA {eta}")

    def _summaries(self, interval: float) -> None:
        while not self._stop.wait(interval):
            log.info("%s", self.summary(), extra=ALWAYS)

    def close(self) -> None:
        self._stop.set()
        if self._bars:
            for bar in self._bars:
                bar.close()
