"""Staged output made visible: the publish journal, the publish itself, and recovery after a crash.

A run writes every unit under <root>/_staging/<run id>/. Once every write and the quality gate are done,
the journal is written; from then on the publish is decided, and the next run finishes one that a crash
cut short.
"""
import fnmatch
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, cast

from lake.errors import EtlError
from lake.lock import LEASE_TTL_S, LeaseLost, Lock
from lake.paths import join
from lake.stores import STAGING_DIR, InPlaceStore, Store, Unit

LOG = logging.getLogger(__name__)
PUBLISH_JOURNAL = "_PUBLISH.json"
RUN_MARKER = "_RUN.json"
PAUSE_ENV = "SPARKIFY_PAUSE_AT"
# How long the journal of a run retired by recovery (its tombstone) is kept, with the run's keys withdrawn
# again by each recovery meanwhile: a run sends no request once its lease has lapsed by its own clock
# (Lock.still_held, before each PUT), and one in flight then lands within its attempts (lake.aws: 5 attempts,
# 25 s timeouts, at most 30 s of backoff).
RETIRED_KEPT_S = LEASE_TTL_S


class PublishCutShort(Exception):
    """A publish stopped after its journal was written, which stays with the run's staging: the next run
    finishes the publish. cause is what stopped it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def journal_path(output_root: str, run_id: str) -> str:
    return join(output_root, STAGING_DIR, run_id, PUBLISH_JOURNAL)


def create_journal(store: Store, path: str, journal: dict) -> str:
    """The journal, created only where there is none (If-None-Match: * on S3): a run whose journal the
    next holder of the lake has retired (recover) cannot write one after all. Returns its version."""
    version = store.write_json_if(path, journal, None)
    if version is None:
        raise retired(journal["run_id"], path)
    return version


def retired(run_id: str, path: str) -> LeaseLost:
    return LeaseLost(f"this run ({run_id}) lost the lake: the run that holds it now has retired its publish "
                     f"journal {path}")


def publish(store: Store, units: Sequence[Unit], run_id: str, output_root: str, lock: Optional[Lock] = None) -> None:
    """Makes the staged units the published ones. The journal, written first, lets the next run finish a
    publish that was killed half-way; the store adds what it needs to finish (on S3, the keys). A run that
    no longer holds the lake (lock.check) stops before the journal, or before the next unit. Raises
    PublishCutShort if it stops once the journal is written."""
    units = store.gather(units, run_id)
    journal = {"run_id": run_id, "units": [{**vars(unit), **store.plan_publish(unit, run_id)} for unit in units]}
    store.sync_staged(units)  # the journal must never name staged data a power cut could lose
    if lock:
        lock.check()
    create_journal(store, journal_path(output_root, run_id), journal)
    try:
        pause_point("publish")
        finish_publish(store, journal, lock)
    except Exception as exc:
        raise PublishCutShort(exc) from exc


def finish_publish(store: Store, journal: dict, lock: Optional[Lock] = None) -> None:
    """Idempotent: run again on the same journal, it does only what is left."""
    entries = journal["units"]
    for index, entry in enumerate(entries):
        unit = journal_unit(entry)
        if lock:
            lock.check()
        store.publish_unit(unit, journal["run_id"], entry)
        LOG.debug("published %s", unit.final())
        # Units come grouped by folder (a table's partitions, the lake's state): one pause point per group.
        if index + 1 == len(entries) or journal_unit(entries[index + 1]).folder() != unit.folder():
            pause_point(f"published {unit.folder()}")


class DirectPublish:
    """S3 output spooled on local disk (python etl.py): each object written once, straight into place.

    Spark writes each unit's files to a local folder; upload() hands a folder over as soon as Spark has
    written it, and one background worker PUTs its files into the unit's published folder under names of
    this run (lake.stores.spooled_key), many at once, removing each local file once it is up. The quality
    gate has passed by then: every write is one the run means to publish.
    - The lake's own folders (its state, which no reader sees) go up while Spark writes the tables. A folder
      readers see is held until release(), once Spark has written everything (and before Spark stops): a
      reader's two-version window opens at the first PUT into such a folder, so it then holds only PUTs and
      deletes, never Spark's work.
    - The worker's first job, started at once, lists the keys published now (one listing per top folder):
      while Spark works.
    - Before the first PUT it writes the journal: the units, each with its old keys, and the rule that
      names the new ones (this run's id in front of each file name).
    - finish() waits for the last PUT, then writes the commit mark (the journal again, committed, with the
      staged keys to copy: the manifest) and deletes the old keys, batched per top folder.
    A crash before the commit mark is rolled back by the next run's recover (the new keys deleted), one
    after it rolled forward (the old keys deleted). A run that fails before it, or loses its lease, rolls
    itself back (abort)."""

    def __init__(self, store: InPlaceStore, units: Sequence[Unit], run_id: str, output_root: str,
                 lock: Optional[Lock] = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.units, self.run_id, self.lock = store, list(units), run_id, lock
        self.path = journal_path(output_root, run_id)
        self.journal: Optional[dict] = None
        self._version: Optional[str] = None  # of the journal as this run wrote it
        self.put = self.deleted = 0
        self.committed = self._journal_sent = False
        self._failed: Optional[BaseException] = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._listing = self._worker.submit(store.published_keys, self.units)
        self._jobs = [self._listing]
        self._held: List[tuple] = []

    def upload(self, unit: Unit, folder: str) -> None:
        """Queues the PUTs of a folder Spark has written, for unit's published folder (a table's, whose
        partition units it may hold); held until release() if readers see that folder."""
        if readers_see(unit):
            self._held.append((unit, folder))
        else:
            self._jobs.append(self._worker.submit(self._upload, unit, folder))

    def _step(self) -> None:
        if self._failed:
            raise RuntimeError("an earlier step of the publish failed")
        _check(self.lock)

    def _begin(self) -> None:
        """The journal, once, before the first PUT."""
        if self.journal is not None:
            return
        old = self._listing.result()
        self._step()
        pause_point("journal")
        self.journal = {"run_id": self.run_id, "direct": True, "committed": False,
                        "units": [{**vars(unit), "new": [], "old": keys} for unit, keys in zip(self.units, old)]}
        self._journal_sent = True
        self._version = create_journal(self.store, self.path, self.journal)

    def _upload(self, unit: Unit, folder: str) -> None:
        try:
            self._begin()
            self._step()
            self.put += self.store.move_files(folder, unit.final(), self.run_id,
                                              self.lock.still_held if self.lock else None)
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        LOG.debug("put %s in place", unit.final())
        pause_point(f"uploaded {unit.name}")

    def wait(self) -> None:
        """Waits for the uploads queued so far (and the journal); raises the first failure."""
        self._jobs.append(self._worker.submit(self._begin))
        for job in list(self._jobs):
            job.result()

    def release(self) -> None:
        """Spark has written every folder: the held PUTs (the folders readers see) start now."""
        for unit, folder in self._held:
            self._jobs.append(self._worker.submit(self._upload, unit, folder))
        self._held = []

    def finish(self) -> None:
        """Releases what is held, waits for the uploads, writes the commit mark, deletes the old keys.
        Raises PublishCutShort if it stops once the commit mark may have been written."""
        self.release()
        self.wait()
        self._worker.shutdown()
        journal = dict(self.journal or {})
        _check(self.lock)
        # What the run staged beside the spool (the manifest, written by write_json): copied in forward. One
        # listing of the run's staging per root.
        staged = {root: self.store.keys(join(root, STAGING_DIR, self.run_id))
                  for root in dict.fromkeys(unit.root for unit in self.units)}
        for entry in journal["units"]:
            if not entry.get("drop"):
                below = f"{entry['name']}/"
                entry["new"] = [key[len(below):] for key in staged[entry["root"]]
                                if key.startswith(below) and not key.endswith("/")]
                entry["old"] = sorted(set(entry["old"]) - set(entry["new"]))
        journal["committed"] = True
        pause_point("commit")
        # From the commit mark's request on, only forward: a request that fails may still have landed, so
        # the run never rolls back after it (abort), and the next run finds out which way to go.
        self.committed, self.journal = True, journal
        try:
            # A compare-and-swap on the journal this run wrote: if the next holder of the lake has retired
            # it (recover), the mark is refused, and the publish is that holder's to undo.
            version = self.store.write_json_if(self.path, journal, self._version)
        except Exception as exc:
            raise PublishCutShort(exc) from exc
        if version is None:
            self.committed = False  # refused: it never landed
            raise retired(self.run_id, self.path)
        try:
            pause_point("committed")
            self.deleted = roll_forward(self.store, journal, self.lock)
        except Exception as exc:
            raise PublishCutShort(exc) from exc

    def abort(self) -> None:
        """The run failed (or lost its lease) before its commit mark: whatever it put in place is deleted,
        and its journal with it; raises PublishCutShort if that fails (the next run undoes it). Nothing to do
        once the commit mark was sent: the next run finishes that publish (or, if it never landed, undoes
        it)."""
        if self.committed:
            return
        self._failed = self._failed or RuntimeError("aborted")
        self._worker.shutdown(wait=True, cancel_futures=True)
        if not self._journal_sent:
            return  # nothing was put in place
        try:
            withdrawn = roll_back(self.store, {"run_id": self.run_id, "units": [vars(unit) for unit in self.units]})
            # Only the journal this run wrote: a tombstone the next holder wrote over it stays (recover).
            if self._version is not None and not self.store.delete_json_if(self.path, self._version):
                LOG.warning("the journal of this run was retired by the run that holds the lake now")
            LOG.warning("the publish was undone: %d files this run had put in place deleted", withdrawn)
        except Exception as exc:
            raise PublishCutShort(exc) from exc


def roll_forward(store: InPlaceStore, journal: dict, lock: Optional[Lock] = None) -> int:
    """A committed in-place publish finished: the staged keys copied in (the manifest), then the old keys
    deleted, batched per top folder (one DeleteObjects per 1,000 keys), with a pause point after each.
    Idempotent. Returns how many keys it deleted."""
    deleted = 0
    groups: Dict[str, List[dict]] = {}
    for entry in journal["units"]:
        groups.setdefault(f"{entry['root']}|{journal_unit(entry).folder()}", []).append(entry)
    for entries in groups.values():
        _check(lock)
        for entry in entries:
            if entry.get("new"):
                unit = journal_unit(entry)
                store.copy(unit.staged(journal["run_id"]), unit.final(), entry["new"])
        deleted += store.remove_units([(journal_unit(entry), entry["old"]) for entry in entries])
        pause_point(f"published {journal_unit(entries[0]).folder()}")
    return deleted


def roll_back(store: InPlaceStore, journal: dict) -> int:
    """An in-place publish stopped before its commit mark, undone: every key the run put below its units'
    top folders (named by the run id) deleted. Idempotent. Returns how many."""
    folders = dict.fromkeys(join(entry["root"], journal_unit(entry).folder()) for entry in journal["units"])
    return store.withdraw(list(folders), journal["run_id"])


def _check(lock: Optional[Lock]) -> None:
    if lock:
        lock.check()


def journal_unit(entry: dict) -> Unit:
    return Unit(entry["root"], entry["name"], entry.get("drop", False))


def published_folders(units: Sequence[Unit]) -> List[str]:
    """The folders readers see that units change: each table or rejects tree once, however many of its
    partitions were published (not the lake's own "_" folders, such as its state)."""
    return list(dict.fromkeys(join(unit.root, unit.folder()) for unit in units if readers_see(unit)))


def readers_see(unit: Unit) -> bool:
    """A table or a rejects tree; not the lake's own folders ("_state"), which readers skip, as Spark and
    Athena skip every name that starts with "_" or "."."""
    return not unit.folder().startswith(("_", "."))


def open_staging(store: Store, output_root: str, run_id: str) -> None:
    """The run's first write: <output>/_staging/<run id>/, which says that this run's staging, under every
    root it writes to, is this output's to clear (another output may share the rejects root)."""
    store.write_json(join(output_root, STAGING_DIR, run_id, RUN_MARKER), {"run_id": run_id})


def recover(store: Store, roots: Sequence[str], output_root: str, lock: Optional[Lock] = None) -> Dict[str, List[str]]:
    """Before anything else: finish a publish a killed run left half-done, or undo one it had not committed
    (retiring it first where it may still be writing: settle), then clear dead runs' staging: only runs of
    this output (found under its own _staging/), never another output's sharing a root.
    Returns, per run whose publish it finished, the folders that run published."""
    staging = join(output_root, STAGING_DIR)
    finished = {}
    dead_runs = store.children(staging)
    journals = {run_id: read_journal(store, join(staging, run_id)) for run_id in dead_runs}  # all, before any step
    kept = set()
    for run_id in dead_runs:
        journal = settle(store, join(staging, run_id), journals[run_id], run_id, lock)
        in_place = cast(InPlaceStore, store)  # only DirectPublish writes a "direct" journal, on S3
        if journal and journal.get("retired"):
            # Again at each recovery while it is kept: a PUT the run had in flight may have landed since.
            withdrawn = roll_back(in_place, journal)
            LOG.warning("run %s, stopped before its commit mark and maybe still alive, is retired: %d keys it "
                        "put in place withdrawn", run_id, withdrawn)
            if time.time() < journal["retired_at"] + RETIRED_KEPT_S:
                kept.add(run_id)
        elif journal and journal.get("direct") and not journal.get("committed"):
            LOG.warning("undoing the publish of run %s, which was stopped before its commit mark", run_id)
            roll_back(in_place, journal)
        elif journal:
            LOG.warning("finishing the publish of run %s, which was stopped half-way", run_id)
            if journal.get("direct"):
                roll_forward(in_place, journal, lock)
            else:
                finish_publish(store, journal, lock)
            finished[run_id] = published_folders([journal_unit(entry) for entry in journal["units"]])
    for run_id in dead_runs:
        clear_staging(store, roots, output_root, run_id, keep_journal=run_id in kept)
    pause_point("recovered")
    return finished


def read_journal(store: Store, folder: str) -> Tuple[Optional[dict], Optional[str]]:
    """The journal in a dead run's staging folder and its version, or (None, None) if it has none. One that
    is there but cannot be read (empty or cut short: a power cut before it was durable, a disk fault) fails
    closed: without it no one can tell which tables the run swapped, and clearing its staging would lose the
    versions it holds."""
    path = join(folder, PUBLISH_JOURNAL)
    try:
        journal, version = store.read_json_tagged(path)
    except ValueError:
        journal, version = None, None
    if isinstance(journal, dict) and isinstance(journal.get("units"), list):
        return journal, version
    if journal is None and PUBLISH_JOURNAL not in store.keys(folder):
        return None, None
    raise EtlError(f"the publish journal {path} cannot be read, so the run that wrote it cannot be finished; "
                   f"nothing was changed. Restore the output from a backup, or remove {folder} and run again "
                   f"with --full")


def settle(store: Store, folder: str, found: Tuple[Optional[dict], Optional[str]], run_id: str,
           lock: Optional[Lock]) -> Optional[dict]:
    """A dead run's journal as recovery acts on it. A run that may still be writing (it lost the lake while it
    lived: Lock.may_still_write) and had not decided its publish (no journal, or a direct one before its
    commit mark) is first retired: its journal replaced by a tombstone, compare-and-swap on the version read,
    so that the run's own create of its journal, or its commit mark, is refused from then on, whenever it
    comes. Returns the tombstone then; if the run wrote first, what it wrote is looked at again. found: the
    journal and its version, as read_journal read them."""
    journal, version = found
    while lock is not None and lock.may_still_write(run_id) and not decided(journal):
        tombstone = {**(journal or {"run_id": run_id, "units": []}), "retired": True,
                     "retired_at": time.time()}
        if store.write_json_if(join(folder, PUBLISH_JOURNAL), tombstone, version) is not None:
            return tombstone
        journal, version = read_journal(store, folder)
    return journal


def decided(journal: Optional[dict]) -> bool:
    """A journal that recovery finishes (or a tombstone): a staged publish's, or a direct one's commit mark."""
    return journal is not None and bool(journal.get("retired") or journal.get("committed")
                                        or not journal.get("direct"))


def clear_staging(store: Store, roots: Sequence[str], output_root: str, run_id: str,
                  keep_journal: bool = False) -> None:
    """A run's staging goes, journal first (a journal without its staged files would mean nothing), and its
    folder under the output last: until then, recovery knows the run's staging under the other roots. A
    retired run's journal may be kept (recover): its tombstone, then, is all that is left of it."""
    if not keep_journal:
        store.remove(join(output_root, STAGING_DIR, run_id), [PUBLISH_JOURNAL])
    for root in sorted(roots, key=lambda root: root == output_root):
        folder = join(root, STAGING_DIR, run_id)
        store.remove(folder, [key for key in store.keys(folder) if key != PUBLISH_JOURNAL]
                     if keep_journal and root == output_root else None)
        store.prune(join(root, STAGING_DIR))


def pause_point(name: str) -> None:
    """Fault injection for the crash tests: SPARKIFY_PAUSE_AT=<name>[,<name>...] stops the run at each point
    named until a line arrives on its standard input (so one run can be looked at in several states), or
    until it is killed. A name may be a shell pattern: `*` is every point, `uploaded _state/plays*` a step
    whose name holds the run's id."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in os.environ.get(PAUSE_ENV, "").split(",") if pattern):
        print(f"paused at {name}", file=sys.stderr, flush=True)
        if not sys.stdin.readline():  # no input to resume it (closed, or /dev/null): wait to be killed
            while True:
                time.sleep(60)
