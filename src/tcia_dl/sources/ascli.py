"""IBM's ascli, run for --mode aspera: where it is, the command lines, one run of it in its
own process group (watched for stalls, ended on a stop), its JSON, its error lines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import (EXIT_USAGE, FatalRunError, Interrupted, TciaDownloaderError,
                      TransientError)
from ..logs import log, printable
from ..net import STALL_FLOOR

PINNED_VERSION = "4.26.0"
# aspera-cli 4.26.1 sends a partial receive's paths as {"paths":[{"source":...}]} (4.26.0:
# {"path":...}), which TCIA's server is reported to answer with HTTP 500 (aspera.md).
FIRST_FAILING_VERSION = (4, 26, 1)
INSTALL_HINT = (f"install IBM's aspera-cli {PINNED_VERSION} (Ruby >= 3.1): gem install "
                f"aspera-cli -v {PINNED_VERSION} && ascli config ascp install; or give "
                "--ascli PATH")
# For a job: no prompt (stdin is closed too: an encrypted package would ask for a password),
# no weekly call to RubyGems, JSON of the data only, no progress bar (aspera.md "For jobs").
# Values after '=': ascli moves a value after a space to the positional arguments
# (aspera-cli lib/aspera/cli/manager.rb), whatever aspera.md says.
COMMON_OPTIONS = ("--interactive=no", "--version-check-days=0", "--format=json",
                  "--display=data", "--progress-bar=no")
RECURSIVE_QUERY = '--query=@json:{"recursive":true}'
# ascli takes any option from $ASCLI_<OPTION> (its README, "Options"): the link, which holds
# the package's passcode, is never on a command line that `ps` shows to other users.
LINK_VARIABLE = "ASCLI_URL"
KILL_GRACE = 3.0               # seconds between SIGTERM and SIGKILL of ascli's group
STDOUT_LIMIT = 256 << 20        # a browse of 100,000 items is ~40 MB of JSON
STDERR_KEPT = 2000              # lines of ascli's stderr kept for its error lines
# log.rb: a level is shortened to its first three letters and its last (ERROR -> ERRR).
LEVEL_PREFIX = re.compile(r"^(?:TRA2|TRA1|DEBG|INFO|WARN|ERRR|FATL|UNKN) ")
ERROR_LINE = re.compile(r"^ERRR ([^:]{1,80}): ?(.*)$")
ASCLI_ADVICE = re.compile(r"^Use (?:option -h|--log-level=debug) ")
VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")

# Started instead of ascli itself on Linux: asks the kernel to SIGKILL the process when the
# thread that started it ends (a kill -9 of this tool included), then becomes ascli (execv
# keeps that setting); its children (ascp) die with the session ascli leads.
GUARDIAN = """import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
os.execv(sys.argv[2], sys.argv[2:])
"""


def find_ascli(given: Optional[str]) -> Path:
    """--ascli PATH, else ascli on PATH; missing: one line that says how to install it."""
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FatalRunError(f"--ascli {given}: no such executable; {INSTALL_HINT}",
                                EXIT_USAGE)
        return path.resolve()
    found = shutil.which("ascli")
    if found is None:
        raise FatalRunError(f"ascli (IBM's aspera-cli) is not on PATH: {INSTALL_HINT}",
                            EXIT_USAGE)
    return Path(found)


def version_tuple(text: str) -> tuple[int, ...]:
    match = VERSION.match(text.strip())
    return tuple(int(n) for n in match.groups()) if match else ()


@dataclass(frozen=True)
class AsciError:
    """One `ERRR <Kind>: <message>` of ascli (a REST error's message may go on over more
    lines: they are joined)."""
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def error_lines(lines: list[str]) -> list[AsciError]:
    """ascli's errors from its stderr, one each, continuation lines joined with '; '."""
    errors: list[AsciError] = []
    current: Optional[list[str]] = None
    kind = ""
    for line in lines:
        match = ERROR_LINE.match(line)
        if match:
            if current is not None:
                errors.append(AsciError(kind, "; ".join(p for p in current if p)))
            kind, current = match[1], [match[2].strip()]
        elif current is not None and not LEVEL_PREFIX.match(line) and \
                not ASCLI_ADVICE.match(line) and line.strip():
            current.append(line.strip())
        elif LEVEL_PREFIX.match(line) and current is not None:
            errors.append(AsciError(kind, "; ".join(p for p in current if p)))
            current = None
    if current is not None:
        errors.append(AsciError(kind, "; ".join(p for p in current if p)))
    return errors


@dataclass
class AsciRun:
    """How one run of ascli ended."""
    code: int
    stdout: str
    stderr: list[str]
    stalled: bool = False          # no bytes under the watched folder for a window
    timed_out: bool = False        # no answer within its time limit (a listing)
    stopped: bool = False          # the run is stopping (a signal)
    errors: list[AsciError] = field(default_factory=list)


@dataclass
class Watch:
    """What a receive is watched by: the bytes under its folder."""
    folder: Path
    on_bytes: Callable[[int], None]


def bytes_under(folder: Path) -> int:
    """Bytes of every file under folder (.partial ones too), never following a link."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class Ascli:
    """ascli for one Faspex link: its command lines, each run in a process group of its own
    (ascli starts ascp: ending ascli alone would leave ascp receiving), ended on a stall, a
    stop or a time limit; every group still alive is ended by close()."""

    def __init__(self, executable: Path, link: str, stall_timeout: float,
                 stop: threading.Event):
        self.executable = executable
        self._link = link
        self.stall_timeout = stall_timeout
        self._stop = stop
        self._live: set[int] = set()
        self._lock = threading.Lock()
        self.version = ""

    # -- the command lines ---------------------------------------------------------------

    @staticmethod
    def browse_arguments(folder: str, recursive: bool) -> list[str]:
        """A folder's listing; the folder with its leading slash (TCIA's server answers 500
        to one without, aspera.md)."""
        return [*COMMON_OPTIONS, "faspex5", "packages", "browse",
                *([RECURSIVE_QUERY] if recursive else []), folder]

    @staticmethod
    def receive_arguments(destination: Path, paths: list[str]) -> list[str]:
        """Paths of the package into destination: each lands at destination/<basename>
        (aspera.md: the tree is flattened), so a receive asks for the items of one folder."""
        return [*COMMON_OPTIONS, "faspex5", "packages", "receive",
                f"--to-folder={destination}", *paths]

    def command(self, arguments: list[str]) -> list[str]:
        if sys.platform.startswith("linux") and sys.executable:
            return [sys.executable, "-I", "-S", "-c", GUARDIAN, str(os.getpid()),
                    str(self.executable), *arguments]
        return [str(self.executable), *arguments]

    # -- the commands ---------------------------------------------------------------------

    def check_version(self) -> str:
        """`ascli --version`, once: a program that does not run as ascli is exit 2."""
        run = self.run(["--version"], time_limit=max(60.0, self.stall_timeout))
        if run.stopped:
            raise Interrupted()
        found = run.stdout.strip().splitlines()[-1:] if run.code == 0 else []
        if not found or not version_tuple(found[0]):
            why = "it did not answer in time" if run.timed_out else \
                f"it exited with {run.code}" if run.code else "it printed no version"
            raise FatalRunError(f"{self.executable} --version: {why}: is it IBM's ascli? "
                                f"{INSTALL_HINT}", EXIT_USAGE)
        self.version = found[0].strip()
        if version_tuple(self.version) >= FIRST_FAILING_VERSION:
            log.warning("ascli %s: TCIA's server is reported to answer the partial receives "
                        "of ascli 4.26.1 and later with HTTP 500; if parts fail so, install "
                        "%s (gem install aspera-cli -v %s)", self.version, PINNED_VERSION,
                        PINNED_VERSION)
        return self.version

    def browse(self, folder: str, recursive: bool, time_limit: float) -> list[dict]:
        """The items of a folder (every folder below it, if recursive), as ascli lists them."""
        run = self.run(self.browse_arguments(folder, recursive), time_limit=time_limit)
        self.raise_for(run, f"the listing of {folder}", partial_receive=False)
        try:
            items = json.loads(run.stdout or "null")
        except ValueError:
            raise TransientError(f"the listing of {folder} is not ascli's JSON") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise TransientError(f"the listing of {folder} is not a list of items")
        return items

    def receive(self, destination: Path, paths: list[str],
                on_bytes: Callable[[int], None]) -> None:
        """The paths into destination, watched for stalls; TransientError (retry),
        FatalRunError (stop) or Interrupted when it did not succeed."""
        run = self.run(self.receive_arguments(destination, paths),
                       watch=Watch(destination, on_bytes))
        self.raise_for(run, "the receive", partial_receive=True)
        try:
            statuses = json.loads(run.stdout or "null")
        except ValueError:
            statuses = None
        # One status per package; a transfer of several sessions joins theirs with ','
        # (runner.rb, result_transfer_multiple).
        if not isinstance(statuses, list) or not statuses or any(
                not isinstance(s, dict) or not isinstance(s.get("status"), str) or
                set(s["status"].split(",")) != {"success"} for s in statuses):
            raise TransientError(f"ascli reported no success for the receive "
                                 f"({printable(run.stdout.strip()[:200])})")

    # -- what a run means -----------------------------------------------------------------

    def raise_for(self, run: AsciRun, what: str, partial_receive: bool) -> None:
        """Nothing when the run succeeded; else each of ascli's errors as one line of our
        log, and what the failure means for the run as an exception."""
        for error in run.errors:
            log.warning("ascli: %s", printable(str(error)))
        if run.stopped:
            raise Interrupted()
        if run.stalled:
            raise TransientError(f"{what} stalled: less than {STALL_FLOOR // 1024} kB arrived "
                                 f"in {self.stall_timeout:g} s; ascli and ascp were ended")
        if run.timed_out:
            raise TransientError(f"{what}: ascli gave no answer in time; it was ended")
        if run.code == 0 and not run.errors:
            return
        raise self.failure(run, what, partial_receive)

    def failure(self, run: AsciRun, what: str, partial_receive: bool) -> TciaDownloaderError:
        if not run.errors:
            return TransientError(f"{what}: ascli exited with {run.code}")
        error = run.errors[0]
        said = printable(f"{what}: ascli: {error}")[:500]
        if error.kind == "Rest" and " 500 " in f" {error.message} " and partial_receive and \
                version_tuple(self.version) >= FIRST_FAILING_VERSION:
            return FatalRunError(
                f"{said}: the known problem of ascli 4.26.1 and later, whose partial receives "
                f"TCIA's server answers with HTTP 500 (this is ascli {self.version}); install "
                f"{PINNED_VERSION}: gem install aspera-cli -v {PINNED_VERSION}, then rerun",
                EXIT_USAGE)
        if error.kind in ("Argument", "Missing", "UnusedArg") or \
                error.kind.startswith("Other(OptionParser"):
            return FatalRunError(f"{said}: ascli {self.version} does not take this tool's "
                                 f"command line; it is written for aspera-cli 4.15 or later "
                                 f"({PINNED_VERSION} recommended)", EXIT_USAGE)
        if error.kind == "Rest" and re.search(r"\b40[13]\b", error.message):
            return FatalRunError(f"{said}: the Faspex server refuses the link (expired, or "
                                 "copied incompletely?): copy it again from the collection's "
                                 "page", EXIT_USAGE)
        if "Session initiation failed" in error.message:
            return TransientError(f"{said} (FASP needs outbound TCP and UDP port 33001, which "
                                  "compute nodes often block: try a login or transfer node)")
        return TransientError(said)

    # -- one run ------------------------------------------------------------------------

    def run(self, arguments: list[str], watch: Optional[Watch] = None,
            time_limit: Optional[float] = None) -> AsciRun:
        """ascli with these arguments, stdin closed, in a session of its own; its output
        lines go to the debug log. A watched receive that brings less than STALL_FLOOR bytes
        in --stall-timeout seconds, a run past its time limit, or a stop ends its group."""
        environment = dict(os.environ)
        environment[LINK_VARIABLE] = self._link
        log.debug("running %s %s", self.executable, " ".join(arguments))
        try:
            process = subprocess.Popen(self.command(arguments), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=environment, start_new_session=True)
        except OSError as exc:
            raise FatalRunError(f"cannot run {self.executable}: {exc.strerror}; "
                                f"{INSTALL_HINT}", EXIT_USAGE) from None
        with self._lock:
            self._live.add(process.pid)
        out: list[bytes] = []
        err: list[str] = []
        readers = [threading.Thread(target=read_stdout, args=(process, out), daemon=True),
                   threading.Thread(target=read_stderr, args=(process, err), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            ending = self._wait(process, watch, time_limit)
        finally:
            self._end_group(process)
            for reader in readers:
                reader.join(KILL_GRACE)
        stdout = b"".join(out).decode("utf-8", "replace")
        return AsciRun(process.returncode if process.returncode is not None else -1, stdout,
                       err, stalled=ending == "stalled", timed_out=ending == "timed out",
                       stopped=ending == "stopped", errors=error_lines(err))

    def _wait(self, process: subprocess.Popen, watch: Optional[Watch],
              time_limit: Optional[float]) -> str:
        """How the run ended: "exited", or why it was ended."""
        poll = min(0.5, self.stall_timeout / 4)
        started = window_start = time.monotonic()
        seen = bytes_under(watch.folder) if watch else 0
        window_bytes = 0
        while process.poll() is None:
            if self._stop.wait(poll):
                return "stopped"
            now = time.monotonic()
            if time_limit is not None and now - started > time_limit:
                return "timed out"
            if watch is None:
                continue
            size = bytes_under(watch.folder)
            if size > seen:
                watch.on_bytes(size - seen)
                window_bytes += size - seen
            seen = max(seen, size)
            if now - window_start >= self.stall_timeout:
                if window_bytes < STALL_FLOOR:
                    return "stalled"
                window_start, window_bytes = now, 0
        if watch is not None:
            size = bytes_under(watch.folder)
            if size > seen:
                watch.on_bytes(size - seen)
        return "exited"

    def _end_group(self, process: subprocess.Popen) -> None:
        """SIGTERM to the whole group (ascli and the ascp it started), SIGKILL after a grace
        period; also after a normal exit, for an ascp left behind."""
        for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if not group_alive(process.pid):
                break
        process.wait()
        with self._lock:
            self._live.discard(process.pid)

    def close(self) -> None:
        """No ascli outlives the run: every group still running is killed."""
        with self._lock:
            groups, self._live = set(self._live), set()
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def read_stdout(process: subprocess.Popen, out: list[bytes]) -> None:
    """ascli's stdout (its JSON), bounded; every line to the debug log."""
    size = 0
    for line in iter(process.stdout.readline, b""):
        size += len(line)
        if size <= STDOUT_LIMIT:
            out.append(line)
        log.debug("ascli stdout: %s", printable(line.decode("utf-8", "replace").rstrip())[:2000])


def read_stderr(process: subprocess.Popen, err: list[str]) -> None:
    """ascli's stderr, its last STDERR_KEPT lines kept (its errors come last); every line to
    the debug log."""
    for raw in iter(process.stderr.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        log.debug("ascli: %s", printable(line)[:2000])
        err.append(line)
        if len(err) > STDERR_KEPT:
            del err[0]
