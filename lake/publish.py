"""Staged output made visible: the publish journal, the publish itself, and recovery after a crash.

A run writes every unit under <root>/_staging/<run id>/. Once every write and the quality gate are done,
the journal is written; from then on the publish is decided, and the next run finishes one that a crash
cut short.
"""
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from lake.lock import Lock
from lake.paths import join
from lake.stores import STAGING_DIR, Store, Unit

LOG = logging.getLogger("sparkify_etl")
PUBLISH_JOURNAL = "_PUBLISH.json"
RUN_MARKER = "_RUN.json"
PAUSE_ENV = "SPARKIFY_PAUSE_AT"


class PublishCutShort(Exception):
    """A publish stopped after its journal was written, which stays with the run's staging: the next run
    finishes the publish. cause is what stopped it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def journal_path(output_root: str, run_id: str) -> str:
    return join(output_root, STAGING_DIR, run_id, PUBLISH_JOURNAL)


def publish(store: Store, units: Sequence[Unit], run_id: str, output_root: str, lock: Optional[Lock] = None) -> None:
    """Makes the staged units the published ones. The journal, written first, lets the next run finish a
    publish that was killed half-way; the store adds what it needs to finish (on S3, the keys). A run that
    no longer holds the lake (lock.check) stops before the journal, or before the next unit. Raises
    PublishCutShort if it stops once the journal is written."""
    units = store.gather(units, run_id)
    journal = {"run_id": run_id, "units": [{**vars(unit), **store.plan_publish(unit, run_id)} for unit in units]}
    if lock:
        lock.check()
    store.write_json(journal_path(output_root, run_id), journal)
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


def journal_unit(entry: dict) -> Unit:
    return Unit(entry["root"], entry["name"], entry.get("drop", False))


def published_folders(units: Sequence[Unit]) -> List[str]:
    """The folders readers see that units change: each table or rejects tree once, however many of its
    partitions were published (not the lake's own "_" folders, such as its state)."""
    return list(dict.fromkeys(join(unit.root, unit.folder()) for unit in units
                              if not unit.folder().startswith(("_", "."))))


def open_staging(store: Store, output_root: str, run_id: str) -> None:
    """The run's first write: <output>/_staging/<run id>/, which says that this run's staging, under every
    root it writes to, is this output's to clear (another output may share the rejects root)."""
    store.write_json(join(output_root, STAGING_DIR, run_id, RUN_MARKER), {"run_id": run_id})


def recover(store: Store, roots: Sequence[str], output_root: str, lock: Optional[Lock] = None) -> Dict[str, List[str]]:
    """Before anything else: finish a publish a killed run left half-done, then clear dead runs' staging:
    only runs of this output (found under its own _staging/), never another output's sharing a root.
    Returns, per run whose publish it finished, the folders that run published."""
    staging = join(output_root, STAGING_DIR)
    finished = {}
    dead_runs = store.children(staging)
    for run_id in dead_runs:
        journal = store.read_json(join(staging, run_id, PUBLISH_JOURNAL))
        if journal:
            LOG.warning("finishing the publish of run %s, which was stopped half-way", run_id)
            finish_publish(store, journal, lock)
            finished[run_id] = published_folders([journal_unit(entry) for entry in journal["units"]])
    for run_id in dead_runs:
        clear_staging(store, roots, output_root, run_id)
    pause_point("recovered")
    return finished


def clear_staging(store: Store, roots: Sequence[str], output_root: str, run_id: str) -> None:
    """A run's staging goes, journal first (a journal without its staged files would mean nothing), and its
    folder under the output last: until then, recovery knows the run's staging under the other roots."""
    store.remove(join(output_root, STAGING_DIR, run_id), [PUBLISH_JOURNAL])
    for root in sorted(roots, key=lambda root: root == output_root):
        store.remove(join(root, STAGING_DIR, run_id))
        store.prune(join(root, STAGING_DIR))


def pause_point(name: str) -> None:
    """Fault injection for the crash tests: SPARKIFY_PAUSE_AT=<name>[,<name>...] stops the run at each point
    named until a line arrives on its standard input (so one run can be looked at in several states), or
    until it is killed."""
    if name in os.environ.get(PAUSE_ENV, "").split(","):
        print(f"paused at {name}", file=sys.stderr, flush=True)
        if not sys.stdin.readline():  # no input to resume it (closed, or /dev/null): wait to be killed
            while True:
                time.sleep(60)
