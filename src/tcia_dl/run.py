"""A run: source and output opened, the plan, workers, one series from first attempt to
commit, stops, the report."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TYPE_CHECKING

from . import __version__
from .collection_files import DoiResolver, datasets, utc_day
from .errors import (EXIT_CHECKPOINT, EXIT_INCOMPLETE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM,
                     EXIT_USAGE, FatalRunError, Interrupted, SeriesUnavailable, TransientError)
from .formats import target_format
from .formats.base import PackingCores
from .formats.tree import unfinished_markers
from .journal import read_journal, roll_back_hot_journal
from .logs import ALWAYS, Progress, human_bytes, human_seconds, log, printable
from .memory import collector_ignoring_what_exists, lasting_objects
from .net import RetryPolicy, TransferWatchdog, retry_policy
from .pipeline import ConnectionSlots, ScratchBudget
from .plan import (RECORDED_FLAGS, describe_plan, dry_run_rows, make_plan, recorded_source,
                   space_needs, space_shortfalls, temp_limit, write_failed_manifest)
from .settings import FILTER_FLAGS, usable_cores
from .sources.base import AttemptBytes
from .sources.registry import source_named
from .storage import acquire_lock, release_lock, sweep_abandoned_scratch

if TYPE_CHECKING:
    from .formats.base import Prepared, Target
    from .journal import Journal
    from .logs import Secrets
    from .plan import Plan, PlannedSeries
    from .settings import NetworkSettings, Options, Selection
    from .sources.base import MemberSink, Source, VerifiedSeries


# -- one series, from first attempt to commit or failure -----------------------------------


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
    # What that source counted of it (VerifiedSeries.counters), for its report lines.
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class RunContext:
    source: Source
    target: Target
    progress: Progress
    retry: RetryPolicy
    stopping: "StopControl"
    breaker: "OutageBreaker"
    packing_cores: PackingCores
    connections: ConnectionSlots
    scratch: Optional[ScratchBudget]     # None: the source bounds its own (Aspera)
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
                           counters=verified.counters)
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


def attempt_series(ctx: RunContext, series: PlannedSeries,
                   count: Callable[[int], None]) -> VerifiedSeries:
    """Fetch from the source, verifying, cleaning and packing in one pass; commit. The
    series holds a connection while it downloads and hands it on when it packs."""
    scratch = ctx.target.scratch_path(ctx.source.scratch_suffix)
    ctx.connections.take()
    try:
        verified, prepared = ctx.source.fetch(series, scratch, count,
                                              SeriesPacking(ctx, series, scratch),
                                              ctx.stopping.abort)
        try:
            log_dropped(series, verified)
            ctx.target.commit(series, verified, prepared)
        finally:
            prepared.discard()            # after a commit, only what is left in scratch
        return verified
    finally:
        ctx.connections.hand_on()         # a retry waits without holding one
        scratch.unlink(missing_ok=True)


class SeriesPacking:
    """What a source gets to pack one attempt of a series (sources/base.py, Packing)."""

    def __init__(self, ctx: RunContext, series: PlannedSeries, scratch: Path):
        self._ctx = ctx
        self._series = series
        self._scratch = scratch

    def __call__(self, verify: Callable[[MemberSink], VerifiedSeries]) -> tuple[VerifiedSeries,
                                                                                Prepared]:
        # The download is over (sources call this once it is all in scratch): the next
        # series may use the connection while this one waits for a core and packs.
        ctx = self._ctx
        ctx.connections.hand_on()
        try:
            with ctx.packing_cores.own():
                return pack_into_target(ctx, self._series, self._scratch, verify)
        except Exception:
            if not ctx.stopping.drain.is_set():
                ctx.connections.take()     # the source may download it again
            raise

    def while_arriving(self, verify: Callable[[MemberSink], VerifiedSeries]
                       ) -> Optional[tuple[VerifiedSeries, Prepared]]:
        """Pack while the download goes on, on a core that is idle now (and no series in
        scratch waits for); the units go to a scratch file of their own, the download
        being still written. None: no core is idle; nothing was done."""
        ctx = self._ctx
        with ctx.packing_cores.own_if_idle() as idle:
            if not idle:
                return None
            units = ctx.target.scratch_path(".units")
            units.touch()
            try:
                packed = pack_into_target(ctx, self._series, units, verify)
            except BaseException:
                units.unlink(missing_ok=True)
                raise
        ctx.connections.hand_on()          # verify read the download to its end
        return packed


def pack_into_target(ctx: RunContext, series: PlannedSeries, scratch: Path,
                     verify: Callable[[MemberSink], VerifiedSeries]) -> tuple[VerifiedSeries,
                                                                             Prepared]:
    """verify(sink) into the target's packer, on a core the caller holds. One series is
    packed per core: more would share the cores and thrash their caches; meanwhile the
    connections keep downloading, so the next series is ready. A big series (several
    units) also borrows the cores no other series waits for."""
    if ctx.stopping.abort.is_set():
        raise Interrupted()           # a stop while it waited: leave it for the next run
    packer = ctx.target.packer(series, scratch, ctx.packing_cores)
    try:
        verified = verify(packer)
        return verified, packer.finish()
    except BaseException:
        packer.discard()
        raise


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


# -- workers, failures and signals ---------------------------------------------------------


class WorkerPool:
    """Daemon worker threads over a queue of series, one series each at a time. Daemon
    threads, because on a signal the process must be able to leave while a worker sits in a
    read: the journal is consistent at every instant, so abandoning in-flight work loses
    nothing committed.

    More threads than connections (ahead: workers + cores): `workers` series download while
    as many again wait in scratch for a core and one packs on each core, so that no
    connection waits for a core (ctx.connections bounds the downloads, ctx.scratch the bytes
    waiting)."""

    def __init__(self, ctx: RunContext, todo: list[PlannedSeries], workers: int,
                 first_position: int, total: int, ahead: int):
        self.ctx = ctx
        self._todo = deque(todo)
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._finished = threading.Event()
        self._position = first_position
        self._total = total
        self._threads = [threading.Thread(target=self._work, name=f"worker-{n + 1}", daemon=True)
                         for n in range(min(workers + ahead, len(todo)))]
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
                    with self._scratch_for(series):
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

    def _scratch_for(self, series: PlannedSeries) -> contextlib.AbstractContextManager:
        if self.ctx.scratch is None:
            return contextlib.nullcontext()
        return self.ctx.scratch.reserved(self.ctx.target.scratch_need(series.file_size))

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


# -- the run -------------------------------------------------------------------------------


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
    return target_format(options.format).still_on_disk(options.output, plan.name, committed,
                                                       finished, plan.file_suffix)


def tidy_after_a_late_kill(options: Options, plan: Plan) -> None:
    """A run killed after its output was finished leaves its lock file and its scratch (a
    repair killed early, a .part); the run that finds the output finished removes them,
    unless a run still uses them."""
    target = target_format(options.format)
    path = target.lock_path(options.output, plan.name)
    part = target.late_leftover(options.output, plan.name)
    # sqlite's rollback journal of a transaction killed right after it was created: not hot
    # (nothing to roll back: empty, or its header not yet written), so no read removes it.
    stale = Path(f"{plan.journal(options)}-journal")
    if path.exists() or (part is not None and part.exists()) or stale.exists():
        with contextlib.suppress(FatalRunError):
            lock = acquire_lock(path, plan.name)
            # Beside a finished archive, a .part is a repair killed before its journal
            # moved onto it (it would have said "replacing"): nothing describes it.
            if part is not None and part.exists():
                log.info("removing %s: a repair of the finished archive that did not get "
                         "far; --retry-failed of the .damaged.tcia starts it again", part.name)
                part.unlink()
            if stale.exists():
                roll_back_hot_journal(plan.journal(options))   # a hot one is rolled back
                stale.unlink(missing_ok=True)   # no writer can be in it: the lock is ours
            release_lock(path, lock)
    sweep_abandoned_scratch(options.temp_dir, plan.name)


def open_target(options: Options, plan: Plan) -> Target:
    return target_format(options.format).open(plan.name, options.output, options.temp_dir,
                                              options.compression_level, plan.file_suffix)


def run(options: Options, stopping: StopControl, secrets: Secrets) -> int:
    """Plan, check, resume, download in parallel, finalize, report. Returns the exit code."""
    started = time.monotonic()
    writes = not (options.list_collections or options.dry_run)
    if writes:
        check_folders(options)
    source = open_source(options, stopping)
    secrets.add(source.secrets)
    try:
        if options.list_collections:
            for name in source.collections():
                print(name)
            return EXIT_OK
        log.info("tcia_downloader %s from %s", __version__, source.describe())
        with lasting_objects():
            plan = make_plan(source, options)
        return _run_plan(source, plan, options, stopping, started)
    finally:
        source.close()


def open_source(options: Options, stopping: StopControl) -> Source:
    """The source --mode names, with the run's network settings."""
    return source_named(options.mode).open(options.source, options.network, stopping.abort)


def _run_plan(source: Source, plan: Plan, options: Options, stopping: StopControl,
              started: float) -> int:
    committed, finished = still_on_disk(options, plan, *read_journal(plan.journal(options)))
    if not finished:
        plan.name_series()        # planned unnamed for an output that is no longer finished
    repairing = options.repair and not options.dry_run
    if repairing:                   # the damaged series count as not there
        committed = {uid: where for uid, where in committed.items() if uid not in
                     {s.uid for s in plan.series} | set(plan.unknown)}
    todo = [s for s in plan.series if s.uid not in committed]
    for line in describe_plan(plan, todo, options):
        log.info("%s", line)
    if finished and not repairing:
        target = target_format(options.format)
        final = target.final_path(options.output, plan.name).resolve()
        damage = target.finished_damage(options.output, plan.name)
        if damage:
            log.error("%s; --verify %s says what is damaged", damage, final)
            return EXIT_INCOMPLETE
        log.info("%s is finished; nothing to do%s", plan.name,
                 f" (its size and last {target.codec.unit} match the journal; --verify "
                 f"{final} reads all of it)" if target.codec else "")
        if not options.dry_run:
            tidy_after_a_late_kill(options, plan)
        if todo:
            log.warning("%d series were published after it was finished; --update fetches "
                        "them into an update archive", len(todo))
        return EXIT_OK if not plan.incomplete else EXIT_INCOMPLETE
    shortfalls = space_shortfalls(space_needs(todo, options))
    short = any(missing for _, missing in shortfalls)
    for line, _ in shortfalls:
        (log.warning if short else log.info)("%s", line)
    limit = scratch_limit(todo, options)
    if limit is not None:
        too_big = too_big_for_scratch(todo, options, limit)
        if too_big:
            log.error("%s", too_big)
            return EXIT_USAGE
    if options.dry_run:
        reach_endpoints(source, todo)
        for row in dry_run_rows(plan, todo, options.mode):
            print(row)
        log.info("dry run: nothing was written; the series are listed on stdout, "
                 "tab-separated (--dry-run > plan.tsv)")
        return EXIT_OK
    if short and not options.force:
        log.error("not enough space for this run: free space or choose other folders "
                  "(--force starts anyway)")
        return EXIT_USAGE
    if options.update and not plan.series:
        log.info("nothing new since the last archive")
        return EXIT_OK if not plan.incomplete else EXIT_INCOMPLETE
    target = open_target(options, plan)
    try:
        if repairing:
            target.replace_damaged([s.uid for s in plan.series] + plan.unknown)
        if target.complete:     # a run killed after its last rename, now recognised
            log.info("%s is finished; nothing to do", target.describe())
            forget_repair_list(options, plan.name)
            return EXIT_OK if not plan.incomplete else EXIT_INCOMPLETE
        target.journal.request([s.uid for s in plan.series],
                               replace=options.selection.retry_failed is None)
        record_provenance(target.journal, options, source)
        with collector_ignoring_what_exists():
            return _download_into(target, plan, source, options, stopping, started, limit)
    finally:
        target.close()


def scratch_limit(todo: list[PlannedSeries], options: Options) -> Optional[int]:
    """The bytes of --temp_dir the series in flight may hold together (None: the source
    keeps within --temp-limit itself)."""
    if source_named(options.mode).bounds_own_scratch:
        return None
    limit, why = temp_limit(todo, options)
    log.info("scratch: at most %s in %s (%s)", human_bytes(limit), options.temp_dir, why)
    return limit


def too_big_for_scratch(todo: list[PlannedSeries], options: Options,
                        limit: int) -> Optional[str]:
    """A series that cannot fit --temp-limit on its own: said before anything is fetched."""
    target = target_format(options.format)
    biggest = max(todo, key=lambda s: s.file_size, default=None)
    if biggest is None or target.scratch_need(biggest.file_size) <= limit:
        return None
    return (f"{biggest.short_label} ({human_bytes(biggest.file_size)}) needs about "
            f"{human_bytes(target.scratch_need(biggest.file_size))} of scratch, more than "
            f"--temp-limit {human_bytes(limit)}: raise --temp-limit, or point --temp_dir at "
            "a larger disk")


def reach_endpoints(source: Source, todo: list[PlannedSeries]) -> None:
    """--dry-run asks every endpoint the run would use, once, with the first series to
    fetch: a host that does not exist or TLS that cannot pass is then exit 2 here, as in
    the run, instead of "enough" and a run that fails a second later. An outage is a
    warning: the run would retry it."""
    if not todo:
        return
    try:
        source.reach(todo[0])
    except TransientError as exc:
        log.warning("dry run: %s answered %s; a run would retry it", source.describe(), exc)
    else:
        log.info("dry run: %s answers", source.describe())


def _download_into(target: Target, plan: Plan, source: Source, options: Options,
                   stopping: StopControl, started: float, limit: Optional[int]) -> int:
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
    # Every usable core, even with fewer workers: a big series packs on the idle ones. No
    # more: packing on 3 cores of 2 took 9.9 s against 9.3 s on 2, on 1 core 15.8 s (the
    # sweep, bench/run.py --only sweep, 40 series at 10 MB/s per connection).
    packing = usable_cores()
    own_slots = source_named(options.mode).bounds_own_scratch
    log.info("%d to download into %s with %d workers, packing on %d cores", len(todo),
             target.describe(), options.workers, packing)

    bars = options.progress and sys.stderr.isatty()
    progress = Progress(len(todo), sum(s.file_size for s in todo), bars, options.summary_interval)
    ctx = RunContext(source=source, target=target, progress=progress,
                     retry=retry_policy(options.network), stopping=stopping,
                     breaker=OutageBreaker(max(5, 2 * options.workers)),
                     packing_cores=PackingCores(packing),
                     connections=ConnectionSlots(None if own_slots else options.workers,
                                                 stopping.drain),
                     scratch=ScratchBudget(limit, stopping.drain) if limit else None)
    # Series run ahead of the connections only where the run bounds their scratch.
    ahead = 0 if own_slots else options.workers + packing
    outcomes: list[Outcome] = []
    try:
        for _ in range(AUDIT_ROUNDS):
            if todo:
                pool = WorkerPool(ctx, todo, options.workers, skipped + len(outcomes),
                                  len(plan.series), ahead)
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
        if ctx.fatal[0].exit_code == EXIT_USAGE and target.discard_if_unused():
            log.info("nothing was written: fix that, then run the same command again")
            return EXIT_USAGE
        report(options, source, target, plan, skipped, outcomes, started, interrupted=False)
        return ctx.fatal[0].exit_code
    unfinished = len(plan.series) - skipped - len(outcomes)
    if stopping.exit_code is not None and unfinished > 0:
        report(options, source, target, plan, skipped, outcomes, started, interrupted=True)
        return stopping.exit_code
    # A drain that came after the last series had started changes nothing: finish normally.
    failures = [o for o in outcomes if not o.ok]
    missing = target.journal.missing_requested() if not failures else []
    if not failures and not missing:
        add_bibtex(target.journal, options.network, stopping.abort)
        target.finalize()
        forget_repair_list(options, plan.name)
    report(options, source, target, plan, skipped, outcomes, started, interrupted=False)
    if missing:
        log.error("%d series that an earlier run asked for are not in %s yet; rerun that "
                  "run's command to fetch them", len(missing), target.describe())
    return EXIT_OK if not (failures or missing or plan.incomplete) else EXIT_INCOMPLETE


AUDIT_ROUNDS = 3       # downloads, each followed by a check of everything committed


def forget_repair_list(options: Options, name: str) -> None:
    """After a repair that finished the output: the list of damage --verify wrote is
    history, and a second --retry-failed of it would fetch intact series again."""
    if options.repair:
        (options.output / f"{name}.damaged.tcia").unlink(missing_ok=True)


def record_provenance(journal: Journal, options: Options, source: Source) -> None:
    """What CITATION.md says of how the copy was made: the source (without credentials),
    when the first run started, and its selection (a --retry-failed run only completes it);
    and the flags of that source (its provenance: never a password or a token), which a
    manifest of its series carries, with the list of them (a source of an earlier run may
    have recorded others)."""
    journal.put("made source", source.describe())
    flags = {"mode": options.mode, **source_named(options.mode).provenance(options.source)}
    for flag, value in flags.items():
        journal.put(f"made {flag}", value)
    journal.put(RECORDED_FLAGS, " ".join(flags))
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


def add_bibtex(journal: Journal, network: NetworkSettings, stop: threading.Event) -> None:
    """BibTeX of the output's DOIs into the journal, once: CITATION.md is made from it."""
    dois = sorted({dataset.doi for collection in journal.collections()
                   for dataset in datasets(journal, collection)
                   if dataset.doi and journal.get(f"bibtex {dataset.doi}") is None})
    if not dois or not network.doi_resolver:
        return
    watchdog = TransferWatchdog(network.stall_timeout, stop)
    try:
        resolver = DoiResolver(network.doi_resolver, watchdog, network.transport(),
                               network.timeout, network.doi_timeout)
        found = resolver.bibtex(dois)
    finally:
        watchdog.close()
    for doi, entry in found.items():
        journal.put(f"bibtex {doi}", entry)


def report(options: Options, source: Source, target: Target, plan: Plan, skipped: int,
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
        *source.report_lines(done),
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
        write_failed_manifest(manifest, [o.series.uid for o in failures], options.format,
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
    if plan.left_out:
        log.error("%d file(s) of the selection are not in the output (the source will not "
                  "deliver them), e.g. %s", len(plan.left_out), printable(plan.left_out[0]))
    if interrupted or failures or missing:
        log.info("the output is resumable: rerun the same command to continue", extra=ALWAYS)


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
    if path.is_dir():
        markers = [marker.name for marker in unfinished_markers(path)]
        return f"{path} (not finished: {', '.join(markers)} in it)" if markers else str(path)
    if not path.is_file():
        return str(path)
    size = path.stat().st_size
    dicom = target.journal.total_bytes()
    ratio = f", {dicom / size:.2f}x smaller than its DICOM" if dicom and size else ""
    return f"{path} ({human_bytes(size)}{ratio})"


def log_files() -> list[str]:
    return [handler.baseFilename for handler in log.handlers
            if isinstance(handler, logging.FileHandler)]
