"""A stand-in for IBM's `ascli` (aspera-cli 4.x) receiving a Faspex 5 public link, for tests.

The tests run it as `ascli` (tests/fakes/bin/ascli, put on PATH). It serves one package, the
files of a folder the test prepares (their root `.sums` among them), through exactly the
command lines tcia_downloader runs:

    ascli --version
    ascli <common> faspex5 packages browse [/FOLDER]          (--query=@json:{"recursive":true})
    ascli <common> faspex5 packages receive --to-folder=DEST [/PATH ...]
    <common>: --interactive=no --version-check-days=0 --format=json --display=data
              --progress-bar=no, and the link in --url=LINK or $ASCLI_URL

and it is as strict as the real one where aspera-cli's source (IBM/aspera-cli 4.26-4.27,
lib/aspera/cli/manager.rb, runner.rb, formatter.rb, plugins/faspex5.rb, log.rb) decides:

- Arguments that start with `-` are options wherever they stand (until `--`); the rest are
  positional (plugin, resource, verb, then the folder or the paths). An option's value goes
  after `=`. Given as `--opt VALUE`, ascli's split has already moved VALUE to the positional
  arguments, and OptionParser takes the next *option* as the value (or fails: "missing
  argument") - the fake does the same, so a tool that writes `--url LINK` fails here as it
  would there.
- Any option can come from the environment: $ASCLI_<NAME> for --<name> (lower priority).
- An unknown option does not stop the command: ascli runs it, prints its result, then logs
  `ERRR Argument: unprocessed options: [...]` and exits 1. Unused positional arguments:
  `unprocessed values: [...]`.
- Errors are one `ERRR <Kind>: <message>` line on stderr (a REST error's message may go on
  over more lines) and exit code 1; results go to stdout as compact JSON with
  --format=json (Ruby's JSON.generate), as a text table without it.
- `browse` lists one folder: item paths begin with `/` in the root listing only; a folder
  without the leading slash gets TCIA's HTTP 500. Files are `symbolic_link` items whose
  `target` holds the real type, path and size (a string); `.sums` files are plain `file`
  items with a numeric size. `--query=@json:{"recursive":true}` descends as ascli does, by
  the paths the listing gives - so below the first level it asks without the leading slash
  and fails with the 500 (which is why recursive browses of TCIA packages fail).
- `receive` without paths delivers the whole package under DEST; with paths, each lands at
  DEST/<basename> (a folder with its subtree: the tree is flattened). Versions 4.26.1 and
  later answer a receive with paths with HTTP 500 (the body they send; aspera.md). Files are
  written as `<name>.partial` beside `<name>.aspera-ckpt` and renamed when whole; a rerun
  into the same folder resumes a .partial from its size and skips whole files
  (resume_policy sparse_csum). Success: `[{"package":"<id>","status":"success"}]`.

Configuration: $FAKE_ASCLI_CONFIG names a JSON file (written by FakeAscli below):

    package_dir   the package's files; package_id, passcode: what the link must carry
    others        {package_id: {"package_dir": D, "passcode": P}}: more packages served
                  (a collection's), each by its own link; the rest of the settings shared
    host          the Faspex host (in error messages); version: what --version says
    chunk, rate   bytes per write, bytes per second (0: as fast as the disk)
    log           a JSON line per run: argv, pid, command, paths, what was delivered, exit
    state         fault counters, shared by all runs (flocked)
    watch         {"folder": F, "peak": P}: after every write, the bytes under F (all files,
                  .partial ones too), the most ever seen kept in P
    listing_extra {folder: [item, ...]}: items added to a listing (hostile paths)
    faults        [{"kind": K, "path": substring or "", "times": N (-1: always)}], used in
                  order, one per matching event:
                  refuse         a receive fails before any byte: "Server aborted session:
                                 Session initiation failed"
                  mid-file-error half of a matching file is written (.partial and
                                 .aspera-ckpt stay), then the transfer fails
                  hang           no byte of a matching file is written, and the run never
                                 ends (until killed)
                  corrupt        a matching file arrives with 4 bytes inverted, reported as
                                 received
                  truncate       a matching file arrives with its second half missing,
                                 reported as received
                  extra-file     the receive also writes `unlisted-extra.bin` into DEST
                  browse-timeout a recursive browse fails as Net::ReadTimeout
                  browse-hang    a recursive browse never answers (until killed)
                  browse-error   any browse of a matching folder fails with HTTP 500
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import parse_qs, urlsplit

CONFIG_ENV = "FAKE_ASCLI_CONFIG"
ENV_PREFIX = "ASCLI_"
OPTIONS_STOP = "--"
MTIME = "2024-05-14T10:21:07Z"
FIRST_SOURCE_BODY_VERSION = (4, 26, 1)     # sends {"paths":[{"source":...}]}: HTTP 500 at TCIA

# The options the fake knows (all of ascli's that the tool or its tests might name), with
# the kind of value: none (a flag), bool (yes/no/true/false), int, enum, text, hash (@json:).
OPTIONS: dict[str, str] = {
    "help": "none", "version": "none", "show-config": "none",
    "interactive": "bool", "ask-options": "bool", "progress-bar": "bool",
    "cache-tokens": "bool", "insecure": "bool", "once-only": "bool",
    "version-check-days": "int",
    "format": "enum", "display": "enum", "log-level": "enum",
    "url": "text", "to-folder": "text", "home": "text", "box": "text", "fields": "text",
    "query": "hash", "transfer-info": "hash", "ts": "hash",
}
SHORT = {"-h": "help", "-v": "version"}
ENUMS = {"format": ["table", "csv", "json", "yaml", "jsonpp", "ruby", "image", "text",
                    "nagios"],
         "display": ["info", "data", "error"],
         "log-level": ["trace2", "trace1", "debug", "info", "warn", "error", "fatal",
                       "unknown"]}
BOOLS = {"yes": True, "true": True, "no": False, "false": False}


class AsciError(Exception):
    """What ends a run with `ERRR <kind>: <message>` and exit code 1."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Hang(Exception):
    """The run stops making progress and never ends on its own."""


# -- configuration, state, log -----------------------------------------------------------


@dataclass
class Config:
    package_dir: Path
    package_id: str = "762"
    passcode: str = "fake-passcode-0123456789"
    host: str = "faspex.example.org"
    version: str = "4.26.0"
    chunk: int = 64 * 1024
    rate: float = 0.0
    log: Optional[Path] = None
    state: Optional[Path] = None
    watch: Optional[dict] = None
    listing_extra: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    others: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Config":
        raw = json.loads(path.read_text())
        return cls(package_dir=Path(raw["package_dir"]),
                   package_id=str(raw.get("package_id", "762")),
                   passcode=str(raw.get("passcode", cls.passcode)),
                   host=str(raw.get("host", cls.host)), version=str(raw.get("version", "4.26.0")),
                   chunk=int(raw.get("chunk", 64 * 1024)), rate=float(raw.get("rate", 0)),
                   log=Path(raw["log"]) if raw.get("log") else None,
                   state=Path(raw["state"]) if raw.get("state") else path.with_suffix(".state"),
                   watch=raw.get("watch"), listing_extra=raw.get("listing_extra") or {},
                   faults=list(raw.get("faults") or []), others=raw.get("others") or {})

    def serving(self, package_id: str) -> "Config":
        """The configuration of the package a link names (this one, or one of others)."""
        other = self.others.get(package_id)
        if other is None:
            return self
        return dataclasses.replace(self, package_dir=Path(other["package_dir"]),
                                   package_id=package_id, passcode=str(other["passcode"]))

    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split(".")[:3] if part.isdigit())


class Faults:
    """The configured faults, each used at most `times` times over all runs: the counters
    live in the state file, under an flock (runs may overlap)."""

    def __init__(self, config: Config):
        self._faults = config.faults
        self._state = config.state

    def take(self, kinds: tuple[str, ...], subject: str) -> Optional[str]:
        """The kind of the first fault of these kinds whose path matches subject and that is
        not used up, now used once more; None when there is none."""
        candidates = [(n, f) for n, f in enumerate(self._faults)
                      if f.get("kind") in kinds and str(f.get("path", "")) in subject]
        if not candidates or self._state is None:
            return None
        with open(self._state, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            used = json.loads(handle.read() or "{}")
            for number, fault in candidates:
                times = int(fault.get("times", 1))
                if times < 0 or used.get(str(number), 0) < times:
                    used[str(number)] = used.get(str(number), 0) + 1
                    handle.seek(0)
                    handle.truncate()
                    handle.write(json.dumps(used))
                    return str(fault["kind"])
        return None


class RunLog:
    """One JSON line per run, appended when the run ends (and a first line when it starts,
    so that a test sees a run that hangs)."""

    def __init__(self, path: Optional[Path], argv: list[str]):
        self.path = path
        self.entry: dict = {"pid": os.getpid(), "argv": argv, "delivered": [], "resumed": []}

    def write(self, **extra: object) -> None:
        if self.path is None:
            return
        line = json.dumps({**self.entry, **extra}) + "\n"
        with open(self.path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(line)


# -- the command line, as ascli's Manager splits and parses it ---------------------------


@dataclass
class CommandLine:
    options: dict[str, object]
    arguments: list[str]
    unknown: list[str]


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, positional arguments): what starts with '-' is an option wherever it
    stands, until '--' (manager.rb, Manager#initialize)."""
    options, arguments, process = [], [], True
    for value in argv:
        if process and value.startswith("-"):
            if value == OPTIONS_STOP:
                process = False
            else:
                options.append(value)
        else:
            arguments.append(value)
    return options, arguments


def convert(name: str, raw: str) -> object:
    kind = OPTIONS[name]
    if kind == "bool":
        if raw.lower() not in BOOLS:
            raise AsciError("Argument", f"unknown value for {name}: {raw}\nUse one of: "
                                        "no, yes")
        return BOOLS[raw.lower()]
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise AsciError("Other(OptionParser::InvalidArgument)",
                            f"invalid argument: --{name}={raw}") from None
    if kind == "enum":
        if raw not in ENUMS[name]:
            raise AsciError("Argument", f"unknown value for {name}: {raw}")
        return raw
    if kind == "hash":
        if not raw.startswith("@json:"):
            raise AsciError("Argument", f"{name}: expecting a Hash, use @json:")
        try:
            value = json.loads(raw[len("@json:"):])
        except ValueError as exc:
            raise AsciError("Other(JSON::ParserError)", str(exc)) from None
        if not isinstance(value, dict):
            raise AsciError("Argument", f"{name}: expecting a Hash")
        return value
    return raw


def parse_command_line(argv: list[str], environ: dict[str, str]) -> CommandLine:
    """Options from the environment, then the command line (which wins), as ascli parses
    them; unknown ones kept for the end of the run."""
    options: dict[str, object] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower().replace("_", "-")
            if name in OPTIONS and OPTIONS[name] != "none":
                options[name] = convert(name, value)
    listed, arguments = split_arguments(argv)
    unknown: list[str] = []
    while listed:
        item = listed.pop(0)
        if item in SHORT:
            options[SHORT[item]] = True
            continue
        name, equals, raw = item[2:].partition("=") if item.startswith("--") else (item, "", "")
        if not item.startswith("--") or name not in OPTIONS:
            unknown.append(item)
            continue
        kind = OPTIONS[name]
        if kind == "none":
            if equals:
                raise AsciError("Other(OptionParser::NeedlessArgument)",
                                f"needless argument: {item}")
            options[name] = True
            continue
        if not equals:
            # OptionParser takes the next element of what ascli left it - the next option.
            if not listed:
                raise AsciError("Other(OptionParser::MissingArgument)",
                                f"missing argument: --{name}")
            raw = listed.pop(0)
        options[name] = convert(name, raw)
    return CommandLine(options, arguments, unknown)


# -- the package -------------------------------------------------------------------------


@dataclass
class Link:
    package_id: str
    passcode: str


def parse_link(url: str, config: Config) -> Link:
    """A Faspex 5 public link: https://HOST/aspera/faspex/public/package?context=<base64>."""
    parts = urlsplit(url)
    context = parse_qs(parts.query).get("context", [""])[0]
    if parts.scheme != "https" or not context:
        raise AsciError("Argument", f"not a Faspex 5 public link: {url[:40]}")
    try:
        decoded = json.loads(base64.b64decode(context + "=" * (-len(context) % 4)))
    except (ValueError, binascii.Error):
        raise AsciError("Rest", f"{config.host} 400 Bad Request") from None
    if not isinstance(decoded, dict):
        raise AsciError("Rest", f"{config.host} 400 Bad Request")
    link = Link(str(decoded.get("package_id") or decoded.get("id") or ""),
                str(decoded.get("passcode") or ""))
    config = config.serving(link.package_id)
    if link.package_id != config.package_id or link.passcode != config.passcode:
        raise AsciError("Rest", f"{config.host} 401 Unauthorized\nInvalid passcode")
    return link


def package_path(config: Config, remote: str) -> Path:
    """The file or folder a remote path names (leading slash or not), inside the package."""
    relative = remote.strip("/")
    root = config.package_dir.resolve()
    local = (root / relative).resolve()
    if local != root and root not in local.parents:
        raise AsciError("Rest", f"{config.host} 403 Forbidden")
    if not local.exists():
        raise AsciError("Rest", f"{config.host} 404 Not Found\nPath not found: {remote}")
    return local


def listing_item(config: Config, local: Path, shown: str) -> dict:
    """One browse item: a directory, a plain file (.sums), or a symbolic link to the file."""
    if local.is_dir():
        return {"path": shown, "basename": local.name, "type": "directory", "size": 0,
                "mtime": MTIME, "permissions": [{"name": "view"}]}
    size = local.stat().st_size
    if local.name.endswith(".sums"):
        return {"path": shown, "basename": local.name, "type": "file", "size": size,
                "mtime": MTIME, "permissions": [{"name": "view"}]}
    target = f"/srv/faspex/storage/{config.package_id}/{shown.lstrip('/')}"
    return {"path": shown, "basename": local.name, "type": "symbolic_link",
            "size": str(len(target)), "mtime": MTIME, "permissions": [{"name": "view"}],
            "target": {"path": target, "type": "file", "size": str(size), "mtime": MTIME}}


def list_folder(config: Config, folder: str, faults: Faults) -> list[dict]:
    """One page set of one folder, as TCIA's server answers it."""
    if not folder.startswith("/") or faults.take(("browse-error",), folder):
        raise AsciError("Rest", f"{config.host} 500 Internal Server Error")
    local = package_path(config, folder)
    if not local.is_dir():
        raise AsciError("Rest", f"{config.host} 400 Bad Request\nNot a folder: {folder}")
    relative = folder.strip("/")
    items = []
    for child in sorted(local.iterdir(), key=lambda p: p.name):
        inner = f"{relative}/{child.name}" if relative else child.name
        items.append(listing_item(config, child, "/" + inner if not relative else inner))
    return items + list(config.listing_extra.get(folder, []))


def browse(config: Config, line: CommandLine, faults: Faults, log: RunLog) -> list[dict]:
    """ascli's browse_folder: one folder, or (recursive) every folder the items name."""
    folder = line.arguments.pop(0) if line.arguments else "/"
    query = dict(line.options.get("query") or {})
    recursive = bool(query.pop("recursive", False))
    log.entry.update(command="browse", folder=folder, recursive=recursive)
    if recursive:
        kind = faults.take(("browse-timeout", "browse-hang"), folder)
        if kind == "browse-hang":
            log.write(started=True)
            raise Hang()
        if kind == "browse-timeout":
            raise AsciError("Other(Net::ReadTimeout)",
                            "Net::ReadTimeout with #<TCPSocket:(closed)>")
    pending, items = [folder], []
    while pending:
        page = list_folder(config, pending.pop(0), faults)
        items += page
        if recursive:
            pending += [item["path"] for item in page if item["type"] == "directory"]
    return items


# -- receiving ---------------------------------------------------------------------------


def files_under(local: Path, landing: Path) -> Iterator[tuple[Path, Path]]:
    """(package file, where it lands) for a file, or every file of a folder's subtree."""
    if local.is_file():
        yield local, landing
        return
    for root, folders, names in os.walk(local):
        folders.sort()
        for name in sorted(names):
            source = Path(root, name)
            yield source, landing / source.relative_to(local)


def used_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class Receiver:
    """Delivers files into DEST as ascp does: <name>.partial and <name>.aspera-ckpt while
    a file arrives, renamed when it is whole; a .partial found is resumed from its size."""

    def __init__(self, config: Config, faults: Faults, log: RunLog):
        self.config, self.faults, self.log = config, faults, log

    def deliver(self, source: Path, landing: Path, remote: str) -> None:
        if landing.is_file() and landing.stat().st_size == source.stat().st_size and \
                landing.read_bytes() == source.read_bytes():
            return                                     # whole already: skipped on resume
        landing.parent.mkdir(parents=True, exist_ok=True)
        partial = landing.with_name(landing.name + ".partial")
        checkpoint = landing.with_name(landing.name + ".aspera-ckpt")
        data = source.read_bytes()
        start = partial.stat().st_size if partial.is_file() else 0
        if start and (start > len(data) or data[:start] != partial.read_bytes()[:start]):
            start = 0                                  # not a beginning of this file
        if start:
            self.log.entry["resumed"].append({"path": remote, "from": start})
        fault = self.faults.take(("mid-file-error", "hang", "corrupt", "truncate"), remote)
        if fault == "hang":
            self.log.write(started=True, hanging=remote)
            raise Hang()
        end = len(data) // 2 if fault in ("mid-file-error", "truncate") else len(data)
        with open(partial, "r+b" if start else "wb") as out:
            out.seek(start)
            for at in range(start, max(end, start), self.config.chunk):
                out.write(data[at:min(at + self.config.chunk, end)])
                out.flush()
                checkpoint.write_text(json.dumps({"offset": out.tell()}))
                self.after_write(min(self.config.chunk, end - at))
            out.truncate(max(end, start))
        self.log.entry["delivered"].append({"path": remote, "from": start, "bytes": end - start})
        if fault == "mid-file-error":
            raise AsciError("Transfer", "Data transfer stopped: connection lost "
                                        "(code 15, ascp exited 1)")
        if fault == "corrupt":
            middle = len(data) // 2
            with open(partial, "r+b") as out:
                out.seek(middle)
                out.write(bytes(b ^ 0xFF for b in data[middle:middle + 4]))
        os.replace(partial, landing)
        checkpoint.unlink(missing_ok=True)

    def after_write(self, written: int) -> None:
        if self.config.rate > 0:
            time.sleep(written / self.config.rate)
        watch = self.config.watch
        if watch:
            used = used_bytes(Path(watch["folder"]))
            peak = Path(watch["peak"])
            with open(peak, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                handle.seek(0)
                before = int(handle.read() or 0)
                if used > before:
                    handle.seek(0)
                    handle.truncate()
                    handle.write(str(used))


def receive(config: Config, line: CommandLine, link: Link, faults: Faults,
            log: RunLog) -> list[dict]:
    paths, line.arguments = list(line.arguments), []
    destination = Path(str(line.options.get("to-folder") or "."))
    log.entry.update(command="receive", paths=paths, to_folder=str(destination))
    if paths and config.version_tuple() >= FIRST_SOURCE_BODY_VERSION:
        raise AsciError("Rest", f"{config.host} 500 Internal Server Error")
    for path in paths:
        if not path.startswith("/"):
            raise AsciError("Rest", f"{config.host} 500 Internal Server Error")
    if faults.take(("refuse",), " ".join(paths) or "/"):
        raise AsciError("Transfer", "Server aborted session: Session initiation failed")
    jobs = []
    for path in paths or ["/"]:
        local = package_path(config, path)
        landing = destination if not paths else destination / local.name
        jobs += [(source, target, "/" + str(source.relative_to(config.package_dir)))
                 for source, target in files_under(local, landing)]
    destination.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(config, faults, log)
    for source, landing, remote in jobs:
        receiver.deliver(source, landing, remote)
    if faults.take(("extra-file",), " ".join(paths) or "/"):
        (destination / "unlisted-extra.bin").write_bytes(b"not in the package's .sums\n")
    return [{"package": link.package_id, "status": "success"}]


# -- output, the run ---------------------------------------------------------------------


def render(result: list[dict], options: dict[str, object]) -> str:
    if options.get("format") == "json":
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    columns = sorted({key for item in result for key, value in item.items()
                      if not isinstance(value, (dict, list))})
    rows = [" | ".join(columns)] + [" | ".join(str(item.get(c, "")) for c in columns)
                                    for item in result]
    return "\n".join(rows)


def error_line(kind: str, message: str) -> str:
    """log.rb's default formatter: a 4-letter level (ERROR -> ERRR), then the message."""
    return f"ERRR {kind}: {message}"


def run(argv: list[str], environ: dict[str, str]) -> int:
    config = Config.load(Path(environ[CONFIG_ENV]))
    log = RunLog(config.log, argv)
    faults = Faults(config)
    code = 0
    try:
        line = parse_command_line(argv, environ)
        if line.options.get("version"):
            print(config.version)
            log.write(command="version", exit=0)
            return 0
        if line.arguments[:1] != ["faspex5"]:
            raise AsciError("Argument", f"unknown value for command: "
                                        f"{(line.arguments or ['(none)'])[0]}")
        if line.arguments[1:2] != ["packages"] or \
                line.arguments[2:3] not in (["browse"], ["receive"]):
            raise AsciError("Argument", "unknown value for command: "
                                        f"{' '.join(line.arguments[1:3]) or '(none)'}")
        verb = line.arguments[2]
        line.arguments = line.arguments[3:]
        url = line.options.get("url")
        if not url:
            raise AsciError("Missing", "Missing mandatory option: url")
        link = parse_link(str(url), config)
        config = config.serving(link.package_id)
        log.write(started=True)
        result = browse(config, line, faults, log) if verb == "browse" else \
            receive(config, line, link, faults, log)
        if line.options.get("display", "data") != "error":
            print(render(result, line.options), flush=True)
        for message in ([f"unprocessed options: {json.dumps(line.unknown)}"] if line.unknown
                        else []) + ([f"unprocessed values: {json.dumps(line.arguments)}"]
                                    if line.arguments else []):
            print(error_line("Argument", message), file=sys.stderr)
            code = 1
    except AsciError as exc:
        print(error_line(exc.kind, str(exc)), file=sys.stderr)
        if exc.kind == "Argument":
            print("Use option -h to get help.", file=sys.stderr)
        code = 1
    except Hang:
        sys.stdout.flush()
        while True:                      # as a stuck session: killed from outside, or never
            time.sleep(3600)
    log.write(exit=code)
    return code


# -- for the tests: a package folder and the configuration ------------------------------


def md5_of(data: bytes) -> str:
    import hashlib
    return hashlib.md5(data).hexdigest()


def write_package(folder: Path, files: dict[str, bytes], sums_name: str = "PKG.sums",
                  sums_extra: str = "", unlisted: tuple[str, ...] = ()) -> Path:
    """The package's files under folder, and its root .sums ("<md5> <path>" lines, one
    space, not sorted, as TCIA writes them), leaving out the paths in unlisted."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, data in files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if path not in unlisted:
            lines.append(f"{md5_of(data)} {path}\n")
    lines.reverse()
    (folder / sums_name).write_text("".join(lines) + sums_extra)
    return folder


def public_link(package_id: str, passcode: str, host: str = "faspex.example.org") -> str:
    context = base64.b64encode(json.dumps({
        "resource": "packages", "type": "external_download_package", "id": package_id,
        "passcode": passcode, "package_id": package_id,
        "email": "help@cancerimagingarchive.net"}).encode()).decode()
    return f"https://{host}/aspera/faspex/public/package?context={context}"


class FakeAscli:
    """The fake's configuration in a folder of the test's, the environment that runs it
    (PATH, $FAKE_ASCLI_CONFIG), and what its runs logged."""

    BIN = Path(__file__).resolve().parent / "bin"

    def __init__(self, folder: Path, package_dir: Path, **settings: object):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.config_path = folder / "fake-ascli.json"
        self.log_path = folder / "fake-ascli.log"
        self.settings: dict[str, object] = {
            "package_dir": str(package_dir.resolve()), "package_id": "762",
            "passcode": "fake-passcode-0123456789", "host": "faspex.example.org",
            "version": "4.26.0", "log": str(self.log_path),
            "state": str(folder / "fake-ascli.state"), "faults": [], **settings}
        self.save()

    def save(self) -> None:
        self.config_path.write_text(json.dumps(self.settings))

    def set(self, **settings: object) -> "FakeAscli":
        self.settings.update(settings)
        self.save()
        return self

    @property
    def link(self) -> str:
        return public_link(str(self.settings["package_id"]), str(self.settings["passcode"]),
                           str(self.settings["host"]))

    def environ(self, base: Optional[dict[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.BIN}{os.pathsep}{env.get('PATH', '')}"
        env[CONFIG_ENV] = str(self.config_path)
        env["FAKE_ASCLI_PYTHON"] = sys.executable
        return env

    def runs(self) -> list[dict]:
        """The finished runs (and those that hang: their start line), in order."""
        if not self.log_path.exists():
            return []
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        ended = {e["pid"] for e in entries if "exit" in e}
        return [e for e in entries if "exit" in e or (e["pid"] not in ended and
                                                      e.get("hanging"))]

    def started_pids(self) -> set[int]:
        if not self.log_path.exists():
            return set()
        return {json.loads(line)["pid"] for line in self.log_path.read_text().splitlines()}


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], dict(os.environ)))
