"""What the lake has taken in: the state a run keeps beside the tables, and how a run decides what is new.

Everything lives under <output>/_state/ (a "_" name: no reader takes it for a table):

    _state/manifest/manifest.json   every input file taken in: its version (S3 ETag, or local size, mtime,
                                    inode and ctime), the segment holding its records, and its clean record count; the
                                    segments of each tree; the layout and the tables' row counts
    _state/song_data/<run id>/      clean song records (parquet, each with its source_file): one segment
                                    per run that read song files
    _state/log_data/<run id>/       clean events, likewise
    _state/plays/year=/month=/      songplays before the final select: each distinct NextSong event of a
                                    known user with its match, as the next run needs it to rematch plays
    _state/users/                   each user's latest event (ts, itemInSession and the attributes)

A run lists the input, compares the listing with the manifest (added, changed, removed files), reads only
added and changed files, and builds the tables from the state and those files. The state is published in
the same journal as the tables, so a crash leaves the two consistent: recovery finishes both or neither.
This module is the driver's bookkeeping; the Spark side is in etl.py.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from lake.paths import join
from lake.stores import Store
from lake.tables import SONGPLAYS, USERS

STATE_DIR = "_state"
MANIFEST_UNIT = f"{STATE_DIR}/manifest"
MANIFEST_FILE = "manifest.json"
PLAYS_STATE = f"{STATE_DIR}/plays"
USERS_STATE = f"{STATE_DIR}/users"
# The state's own layout; a job that keeps it differently must not read it (the run then builds in full).
STATE_VERSION = 1
# Segments per tree before a run folds them all into its own: each segment is a folder Spark lists and
# opens, and a daily run adds one.
MAX_SEGMENTS = 16
# Spark's name for a partition folder whose value is null or empty.
DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"
# What Spark escapes in a partition folder's name (ExternalCatalogUtils.escapePathName, off Windows).
_ESCAPED = set(map(chr, range(1, 32))) | set('"#%\'*/:=?\\\x7f{[]^')


@dataclass(frozen=True)
class InputFile:
    """One listed input file."""
    source_file: str  # as the records read from it carry it (etl.py's source_file column)
    path: str  # as Spark's own readers are given it
    location: object  # what a fetching task opens
    size: int
    version: str  # changes when the file is replaced: S3 ETag, or local size, mtime, inode and ctime


@dataclass(frozen=True)
class TakenIn:
    """One file the lake has taken in, as the manifest records it."""
    version: str
    segment: str
    records: int

    def encode(self) -> str:
        return f"{self.version} {self.segment} {self.records}"

    @staticmethod
    def decode(text: str) -> "TakenIn":
        version, segment, records = text.split(" ")
        return TakenIn(version, segment, int(records))


@dataclass
class TreeIntake:
    """One input tree's listing against what the lake has taken in."""
    tree: str
    listed: Dict[str, InputFile]
    previous: Dict[str, TakenIn]
    segments: List[str]  # the previous run's live segments
    segment: str  # this run's segment, if it writes one
    added: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    dirty: List[str] = field(default_factory=list)  # segments rewritten: they hold changed or removed files

    @property
    def fresh(self) -> List[InputFile]:
        """The files this run reads: added and changed."""
        return [self.listed[name] for name in self.added + self.changed]

    @property
    def dead(self) -> List[str]:
        """Files whose records, as taken in, stop counting: changed and removed."""
        return self.changed + self.removed

    @property
    def unchanged(self) -> Set[str]:
        return set(self.listed) - set(self.added) - set(self.changed)

    @property
    def kept(self) -> List[str]:
        """Segments this run reads as they are."""
        return [segment for segment in self.segments if segment not in self.dirty]

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    @property
    def writes_segment(self) -> bool:
        return bool(self.fresh or self.dirty)

    def counts(self) -> Dict[str, int]:
        return {"listed": len(self.listed), "added": len(self.added), "changed": len(self.changed),
                "removed": len(self.removed)}


def compare(tree: str, listed: Sequence[InputFile], manifest: Optional[dict], segment: str) -> TreeIntake:
    """The listing against the manifest: a file is added if the lake has not taken it in, changed if its
    version differs, removed if it is no longer listed. Without a manifest every file is added."""
    entry = (manifest or {}).get("trees", {}).get(tree, {"segments": [], "files": {}})
    previous = {name: TakenIn.decode(text) for name, text in entry["files"].items()}
    intake = TreeIntake(tree, {f.source_file: f for f in listed}, previous, list(entry["segments"]), segment)
    for name, file in intake.listed.items():
        if name not in previous:
            intake.added.append(name)
        elif previous[name].version != file.version:
            intake.changed.append(name)
    intake.removed = sorted(set(previous) - set(intake.listed))
    intake.added.sort()
    intake.changed.sort()
    dirty = {previous[name].segment for name in intake.dead}
    if len(intake.segments) - len(dirty) + 1 > MAX_SEGMENTS and intake.fresh:
        dirty = set(intake.segments)  # fold every segment into this run's
    intake.dirty = [s for s in intake.segments if s in dirty]
    return intake


def from_nothing(intake: TreeIntake) -> TreeIntake:
    """The same listing, as a full build takes it in: every file added, no segment of the lake's read."""
    return compare(intake.tree, list(intake.listed.values()), None, intake.segment)


def manifest_path(output_root: str) -> str:
    return join(output_root, MANIFEST_UNIT, MANIFEST_FILE)


def load_manifest(store: Store, output_root: str) -> Optional[dict]:
    return store.read_json(manifest_path(output_root))


def rejects_location(output_root: str, rejected_root: str) -> str:
    """Where the rejects are, as the manifest records it: below the output root, relative to it (a lake
    copied elsewhere keeps its rejects beside it)."""
    below = output_root.rstrip("/") + "/"
    return rejected_root[len(below):] if rejected_root.startswith(below) else rejected_root


def why_full(manifest: Optional[dict], full_flag: bool, layout: Mapping[str, Sequence[str]], rejects: str,
             present: Sequence[str], tables: Sequence[str]) -> Optional[str]:
    """Why this run must build from nothing, or None: the output holds a lake this job built, in this layout."""
    if full_flag:
        return "--full"
    if manifest is None:
        return "no state under the output root (a first run, or a lake built before runs were incremental)"
    if manifest.get("state_version") != STATE_VERSION:
        return f"the state is of version {manifest.get('state_version')}, this job keeps version {STATE_VERSION}"
    if manifest.get("layout") != {name: list(columns) for name, columns in layout.items()}:
        return "the partition layout ([LAYOUT]) changed since the state was written"
    if manifest.get("rejects") != rejects:
        return "the rejects root changed since the state was written"
    missing = [name for name in tables if name not in present]
    if missing:
        return f"the table {missing[0]} is missing from the output"
    return None


def new_manifest(run_id: str, job_version: str, layout: Mapping[str, Sequence[str]], rejects: str,
                 intakes: Sequence[TreeIntake], fresh_records: Mapping[str, int],
                 table_rows: Mapping[str, int]) -> dict:
    """The manifest after this run: unchanged files where they were (or in this run's segment, if theirs was
    rewritten), fresh files in this run's segment."""
    trees = {}
    for intake in intakes:
        files: Dict[str, str] = {}
        for name in sorted(intake.unchanged):
            taken = intake.previous[name]
            segment = intake.segment if taken.segment in intake.dirty else taken.segment
            files[name] = TakenIn(taken.version, segment, taken.records).encode()
        for file in intake.fresh:
            files[file.source_file] = TakenIn(file.version, intake.segment,
                                              fresh_records.get(file.source_file, 0)).encode()
        segments = intake.kept + ([intake.segment] if intake.writes_segment else [])
        trees[intake.tree] = {"segments": segments, "files": dict(sorted(files.items()))}
    return {"state_version": STATE_VERSION, "run_id": run_id, "job_version": job_version,
            "layout": {name: list(columns) for name, columns in layout.items()}, "rejects": rejects,
            "tables": dict(table_rows), "trees": trees}



def escape_path_name(value: str) -> str:
    """A partition value as Spark spells it in a folder name (ExternalCatalogUtils.escapePathName)."""
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in value)


def partition_folder(columns: Sequence[str], values: Sequence[Optional[str]]) -> str:
    """The folder Spark's partitioned writer makes for values (each already cast to a string by Spark)."""
    return "/".join(f"{escape_path_name(column)}={escape_path_name(value) if value else DEFAULT_PARTITION}"
                    for column, value in zip(columns, values))


def partition_units(columns: Sequence[str], touched: Sequence[Tuple[Optional[str], ...]],
                    written: Sequence[Tuple[Optional[str], ...]]) -> Tuple[List[str], List[str]]:
    """(folders to publish, folders to drop) of a table's touched partitions: those with rows in the new table
    are published from staging, the others are removed. Values that Spark writes to one folder (null and
    the empty string) count as one partition."""
    present = {partition_folder(columns, values) for values in written}
    folders = {partition_folder(columns, values) for values in touched}
    return sorted(folders & present), sorted(folders - present)


class LakeCopy:
    """Where Spark reads what the lake keeps (its state, the rejects): in place, or, for S3 output under
    python etl.py, whose Spark has no S3 reader (it writes through local disk: lake.plan), from a local copy
    of just the folders a run reads, fetched by boto3: one listing per root, one GET per file."""

    def __init__(self, store: Store, folder: Optional[str]) -> None:
        self.store, self.folder, self.files = store, folder, 0

    def paths(self, root: str, names: Sequence[str]) -> Dict[str, str]:
        """{name: where Spark reads root/name}, fetched first if this is a copy."""
        if self.folder is None or not names:
            return {name: join(root, name) for name in names}
        local = os.path.join(self.folder, str(len(os.listdir(self.folder))))
        self.files += self.store.download(root, local, names)
        found = {name: os.path.join(local, *name.split("/")) for name in names}
        for path in found.values():
            os.makedirs(path, exist_ok=True)  # a folder with nothing to read is read as empty
        return found


def state_paths(copy: LakeCopy, output_root: str, intakes: Mapping[str, TreeIntake]) -> Dict[str, str]:
    """Where Spark reads the state folders a daily run needs: the segments, the plays, the users."""
    names = [segment_name(intake.tree, segment) for intake in intakes.values() for segment in intake.segments]
    below = len(STATE_DIR) + 1  # listed below _state/, never the tables beside it
    found = copy.paths(join(output_root, STATE_DIR), [name[below:] for name in names + [PLAYS_STATE, USERS_STATE]])
    return {f"{STATE_DIR}/{name}": path for name, path in found.items()}


def state_rows(intakes: Mapping[str, TreeIntake], tables: Mapping[str, int]) -> Dict[str, int]:
    """The rows each state folder a daily run reads holds, as the manifest says: a segment the clean records
    of the files in it, the plays state one row per songplay, the users state one per user."""
    expected = {segment_name(intake.tree, segment): 0 for intake in intakes.values() for segment in intake.segments}
    for intake in intakes.values():
        for taken in intake.previous.values():
            name = segment_name(intake.tree, taken.segment)
            expected[name] = expected.get(name, 0) + taken.records
    expected.update({PLAYS_STATE: tables.get(SONGPLAYS, 0), USERS_STATE: tables.get(USERS, 0)})
    return expected


def state_fault(expected: Mapping[str, int], found: Mapping[str, int]) -> Optional[str]:
    """Why the state found cannot be trusted (a folder holding other than the manifest's rows: files lost to a
    lifecycle rule or a clean-up, or added by hand), or None."""
    wrong = [name for name in sorted(expected) if found.get(name, 0) != expected[name]]
    if not wrong:
        return None
    name = wrong[0]
    others = f" (and {len(wrong) - 1} more folders)" if len(wrong) > 1 else ""
    return (f"the lake's state does not match its manifest: {name} holds {found.get(name, 0)} rows, the manifest "
            f"says {expected[name]}{others}; files lost (a lifecycle rule, a clean-up?)")


def segment_name(tree: str, segment: str) -> str:
    return f"{STATE_DIR}/{tree}/{segment}"
