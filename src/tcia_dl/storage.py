"""Locks, scratch files, fsync, reading a range, a full disk."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import EXIT_USAGE, FatalRunError
from .settings import CHUNK_SIZE


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


def read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of the file at path, opened for this read alone."""
    with open(path, "rb", buffering=0) as handle:
        yield from pread_range(handle.fileno(), start, end)


def pread_range(handle: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of an open file descriptor, by pread: one system call a chunk
    (an IDC object of 128 kB read from its series' open file: one pread instead of the
    seven calls of opening, statting, seeking and closing, each a pass of the GIL among
    the threads)."""
    at = start
    while at < end:
        chunk = os.pread(handle, min(4 * CHUNK_SIZE, end - at), at)
        if not chunk:
            return
        at += len(chunk)
        yield chunk


def existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged user may still write on the filesystem of folder."""
    stats = os.statvfs(existing_ancestor(folder))
    return stats.f_bavail * stats.f_frsize


def filesystem_of(folder: Path) -> int:
    return existing_ancestor(folder).stat().st_dev


@dataclass
class SpaceNeed:
    """What a run will put on one filesystem."""
    what: str                  # "--output", "--temp_dir" or both on one filesystem
    folder: Path
    bytes: int
    inodes: int
