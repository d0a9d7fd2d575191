"""The folder tree."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional, TYPE_CHECKING

from ..collection_files import collection_file_names, collection_files
from ..logs import log
from ..storage import SpaceNeed, fsync_directory, raise_if_disk_full, write_file_atomically
from .base import Prepared, Target

if TYPE_CHECKING:
    from ..plan import PlannedSeries
    from ..sources.base import VerifiedSeries
    from .base import PackingCores


# A folder tree has no .part name to show that it is not finished, and renaming its folder
# on completion would pull it from under the other parts of the collection (shards, updates,
# selections) that write into the same folder at the same time. So until a run has written
# its collection files, each collection folder it writes into holds UNFINISHED<suffix>.txt
# (its part's suffix, as its MD5SUMS<suffix> has): written before the first series is moved
# in, removed once the collection files are written and before the journal says finished.
# A kill at any instant leaves it in place (or leaves a tree whose collection files are all
# written), and it travels with a copy of the folder.
UNFINISHED_NAME = re.compile(r"^UNFINISHED[^/]*\.txt$")


def unfinished_marker_name(file_suffix: str) -> str:
    return f"UNFINISHED{file_suffix}.txt"


def unfinished_markers(folder: Path) -> list[Path]:
    """The markers of the parts of a collection folder that are not finished yet."""
    return sorted(path for path in folder.glob("UNFINISHED*.txt")
                  if UNFINISHED_NAME.match(path.name))


def is_collection_folder(folder: Path) -> bool:
    """A collection's folder of a tree: its MD5SUMS (finished) or its marker is there."""
    return any(folder.glob("MD5SUMS*")) or bool(unfinished_markers(folder))


def unfinished_marker_text(journal_name: str) -> bytes:
    return ("This folder is not finished: a download into it stopped before its end (Ctrl-C, "
            "a kill, a time limit) or is still running. The series folders here are whole "
            "and verified, but others are missing, and LICENSE, CITATION.md, metadata.csv "
            "and MD5SUMS are not written yet.\n\nRerun the command that made it: it continues "
            "where it stopped and removes this file when the folder is finished. "
            f"tcia_downloader --verify on this folder checks what its journal ({journal_name}, "
            "beside this folder) has committed.\n").encode("utf-8")


class FolderPacker:
    """A MemberSink that writes a series' files into a scratch folder."""

    def __init__(self, folder: Path, scratch: Path):
        self.prepared = Prepared(folder)
        self._scratch = scratch
        folder.mkdir()

    def add(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        try:
            if "/" in name:                 # a source's sub-folder (an Aspera package's)
                (self.prepared.path / name).parent.mkdir(parents=True, exist_ok=True)
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



class DirectoryTarget(Target):
    """--format dir: <output>/<Collection>/<series>/...: each series is extracted into
    scratch and moved into place only when verified, so a series folder under <output> is
    always whole."""

    format_name = "dir"

    @classmethod
    def open(cls, name: str, output: Path, temp_dir: Path, level: Optional[int],
             file_suffix: str) -> "DirectoryTarget":
        return cls(name, output, temp_dir, file_suffix)

    @classmethod
    def still_on_disk(cls, output: Path, name: str, committed: dict[str, str],
                      finished: bool, file_suffix: str) -> tuple[dict[str, str], bool]:
        """The series folders still there, and finished only while every collection file
        is there too."""
        present = {uid: where for uid, where in committed.items() if (output / where).is_dir()}
        if len(present) < len(committed):
            log.warning("%d series folders that %s lists are gone from %s: they will be "
                        "downloaded again", len(committed) - len(present),
                        cls.journal_path(output, name).name, output)
        files = {output / where.split("/", 1)[0] / file for where in present.values()
                 for file in collection_file_names(file_suffix)}
        whole = len(present) == len(committed) and all(path.is_file() for path in files)
        return present, finished and whole

    @classmethod
    def space_needs(cls, todo: list[PlannedSeries], output: Path, temp_dir: Path,
                    parallel: int, level: Optional[int]) -> tuple[SpaceNeed, SpaceNeed]:
        """Every file and folder on --output; a download and its unpacked copy per worker."""
        largest = max(s.file_size for s in todo)
        files = sum(s.image_count or 1 for s in todo)
        folders = len({s.path for s in todo}) + len({s.path.rsplit("/", 1)[0] for s in todo})
        most_files = max(s.image_count or 1 for s in todo)
        return (SpaceNeed("--output", output, sum(s.file_size for s in todo) + 4096 * files,
                          files + folders + 8),
                SpaceNeed("--temp_dir", temp_dir, parallel * cls.scratch_need(largest),
                          parallel * (most_files + 2)))

    @classmethod
    def scratch_need(cls, file_size: int) -> int:
        """The zip and the series' files unpacked beside it, before they move to --output."""
        return file_size * 2

    def __init__(self, name: str, output: Path, temp_dir: Path, file_suffix: str = ""):
        # Parts of a collection (shards, updates, selections) share its folder (their series
        # folders are disjoint); each keeps its own journal and suffixed LICENSE, metadata
        # and MD5SUMS.
        # A move cut short by a kill leaves a hidden .incoming folder beside its series:
        # never a series, and removed when that series is moved in again. Not swept here:
        # another shard may be moving one in right now.
        super().__init__(name, output, temp_dir, file_suffix)
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
        if not self.complete:       # (a tree of a run before the marker existed gets one)
            for collection in self.journal.collections():
                self._mark_unfinished(collection)
        return gone

    def _mark_unfinished(self, collection: str) -> None:
        """The collection folder says it is not finished, durably, before anything of this
        part is moved in or taken out (one stat when it says so already)."""
        marker = self.output / collection / unfinished_marker_name(self.file_suffix)
        if not marker.is_file():
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(marker, unfinished_marker_text(self.journal.path.name))

    def series_folder(self, series: PlannedSeries) -> Path:
        return self.output / series.folder

    def _shares_folder(self, uid: str, folder: str, locations: dict[str, str]) -> bool:
        """Whether another committed series has files in this series' folder or below it:
        an Aspera package's parts share folders (a large folder comes in several parts, a
        folder's own files apart from its sub-folders'), where NBIA's series never do."""
        if "/" not in folder:           # a collection's own folder is never replaced whole
            return True
        return any(where == folder or where.startswith(folder + "/")
                   for other, where in locations.items() if other != uid)

    def replace_damaged(self, uids: list[str]) -> None:
        """Each damaged series folder is hidden at once (renamed), then removed and
        forgotten; the collection files are written anew when the run finishes."""
        locations = self.journal.locations()
        gone = [uid for uid in uids if uid in locations]
        shared = {uid for uid in gone if self._shares_folder(uid, locations[uid], locations)}
        for collection in {locations[uid].split("/", 1)[0] for uid in gone}:
            self._mark_unfinished(collection)
        for uid in gone:
            folder = self.output / locations[uid]
            if uid in shared:               # its own files go; the others' stay
                for name in self.journal.member_names(uid):
                    (self.output / name).unlink(missing_ok=True)
                continue
            stale = folder.parent / f".{folder.name}.stale"
            if folder.exists():
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(folder, stale)
        self.journal.forget(gone)
        self.journal.put("finished", "no")
        for uid in set(gone) - shared:
            folder = self.output / locations[uid]
            shutil.rmtree(folder.parent / f".{folder.name}.stale", ignore_errors=True)
        log.info("repairing %s: %d damaged series folders removed, to fetch again",
                 self.output, len(gone))

    def packer(self, series: PlannedSeries, zip_path: Path,
               cores: Optional[PackingCores] = None) -> FolderPacker:
        return FolderPacker(self.scratch_path(".d"), self.scratch)

    def commit(self, series: PlannedSeries, verified: VerifiedSeries, prepared: Prepared) -> None:
        destination = self.series_folder(series)
        with self.commit_lock:
            self.check_open()
            try:
                self._mark_unfinished(series.folder.split("/", 1)[0])
                if self._shares_folder(series.uid, series.folder, self.journal.locations()):
                    merge_folder(prepared.path, destination)
                else:
                    move_folder(prepared.path, destination)
            except OSError as exc:
                raise_if_disk_full(exc, destination)
                raise
            self.journal.record(series, verified, 0, 0)

    def finalize(self) -> None:
        """The collection files of every collection, then the markers go (a kill between
        leaves a whole tree that its journal does not call finished yet: the rerun writes
        the same files again), then the journal says finished."""
        collections = self.journal.collections()
        for collection in collections:
            root = self.output / collection
            root.mkdir(parents=True, exist_ok=True)
            for name, data in collection_files(self.journal, collection, self.file_suffix):
                write_file_atomically(root / name, data)
        for collection in collections:
            marker = self.output / collection / unfinished_marker_name(self.file_suffix)
            # (a package's own file of that name, however unlikely, is data: it stays)
            if marker.exists() and marker.name not in dict(self.journal.files(collection)):
                marker.unlink()
                fsync_directory(marker.parent)
        self.journal.put("finished", "yes")

    def describe(self) -> str:
        """The collection folder (the report's "output:" once named --output, its parent);
        the output folder while this part has none, or has several."""
        collections = self.journal.collections()
        return str(self.output / collections[0]) if len(collections) == 1 else str(self.output)


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
    fsync_files(incoming)
    os.rename(incoming, destination)
    fsync_directory(destination.parent)


def fsync_files(folder: Path) -> None:
    """Every file under folder (a series' files, or a package part's, in sub-folders too)."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def merge_folder(folder: Path, destination: Path) -> None:
    """A finished part's files into a folder that other committed series share: each file
    renamed into place whole (a file of this part that a run killed before its journal row
    left there is replaced), the folders made as needed; then the emptied folder goes."""
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            source = Path(root, name)
            target = destination / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as handle:
                os.fsync(handle.fileno())
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Across filesystems (node-local scratch): a hidden copy beside it, renamed.
                incoming = target.with_name(f".{target.name}.incoming")
                shutil.copyfile(source, incoming)
                with open(incoming, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(incoming, target)
                source.unlink()
            fsync_directory(target.parent)
    shutil.rmtree(folder, ignore_errors=True)
