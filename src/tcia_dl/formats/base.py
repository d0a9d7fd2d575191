"""The output contract: Target, Prepared."""

from __future__ import annotations

import itertools
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import Interrupted
from ..journal import Journal
from ..storage import acquire_lock, claim_scratch, release_lock, release_scratch


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

    def discard_if_unused(self) -> bool:
        """After a run that failed before anything was committed, for a reason a rerun of
        the same command cannot cure (a host that does not exist, TLS that cannot pass:
        exit 2): take back what opening the output made, so that nothing looks resumable.
        True when it did; False when the output holds work (an earlier run's), which stays."""
        if self.journal.committed() or self.journal.get("finished") == "yes":
            return False
        with self.commit_lock:
            self._closed = True
            self.journal.close()
        self.journal.path.unlink(missing_ok=True)
        self._discard_empty_output()
        return True

    def _discard_empty_output(self) -> None:
        """What the format made when the output was opened, if it is still empty."""

    def replace_damaged(self, uids: list[str]) -> None:
        """--retry-failed of a <name>.damaged.tcia (written by --verify): take these series
        out of the output, keeping every other one, so that this run fetches them again and
        finishes the output anew (collection files too)."""
        raise NotImplementedError
