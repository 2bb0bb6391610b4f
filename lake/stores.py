"""Where the lake lives: local disk or S3, behind one Store protocol.

A store lists input, stages and publishes output folders, keeps small JSON documents (reports, journals)
and makes the one-writer lock. Nothing outside this module and lake.plan asks whether a path is on S3.
"""
import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from lake.aws import S3_ATTEMPTS, AwsSettings, s3_client, s3_client_settings, s3_error
from lake.errors import EtlError
from lake.lock import CONDITION_FAILED, FileLock, Lock, S3Lease
from lake.paths import is_input_file, is_visible, is_visible_file, join, split_s3, visible_files

LOG = logging.getLogger(__name__)
# A run writes everything under <root>/_staging/<run id>/ first; names starting with "_" are skipped by
# Spark, Athena, pyarrow and DuckDB readers.
STAGING_DIR = "_staging"
OLD_VERSIONS_DIR = "_old"
# Local disk: the version a partial publish swapped out, kept to become the next version (LocalStore.gather).
SPARES_DIR = "_spare"
# + run id: the file in each locally published folder that says which run wrote it, and, for a folder of
# which the run changed only some parts, which version it changed and which parts.
VERSION_MARKER = "_RUN_"
PREFLIGHT_PROBE = "_preflight-probe"
# renameat2's flags (linux/fs.h).
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
LOCAL_VERSION = "local"  # a local document's version: only the flock's holder writes it
# S3's answers to a create (If-None-Match: *) of a key that exists: 412, or 409 while another is in flight.
CREATE_REFUSED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
# S3: requests in flight, and keys per DeleteObjects (S3's maximum).
S3_REQUESTS_IN_FLIGHT = 64
S3_DELETE_BATCH = 1000


@dataclass(frozen=True)
class Unit:
    """One folder readers see (a table, a tree's rejects, one partition folder such as
    "songs/year=2005/artist_id=AR1", or a folder of the lake's state) and where this run stages it.
    A unit with drop=True has nothing staged: publishing it removes the published folder."""
    root: str
    name: str
    drop: bool = False
    # A whole folder that LocalStore.gather made from partition units: the parts (below the folder) this run
    # changed; every other part is the published version's.
    changed: Optional[Tuple[str, ...]] = None

    def final(self) -> str:
        return join(self.root, self.name)

    def staged(self, run_id: str) -> str:
        return join(self.root, STAGING_DIR, run_id, self.name)

    def old(self, run_id: str) -> str:
        return join(self.root, STAGING_DIR, run_id, OLD_VERSIONS_DIR, self.name)

    def spare(self) -> str:
        return join(self.root, SPARES_DIR, self.name)

    def folder(self) -> str:
        """The folder readers see that the unit belongs to: "songs" for "songs/year=2005/artist_id=AR1"."""
        return self.name.split("/", 1)[0]




class Store(Protocol):
    """What the job needs of the place its input or output lives."""

    def require_input(self, root: str, tree: str) -> None:
        """Fails with one line unless root/tree holds at least one input file."""

    def list_input(self, folder: str) -> List[Tuple[str, object, int, str]]:
        """(name, location, size, version) of every input file below folder, from one listing: the name as
        Spark's binaryFile reader spells it, what a task opens (etl.py's fetch functions), and what changes
        when the file is replaced (an ETag on S3; on local disk size, mtime, inode and ctime; lake.intake
        compares it)."""

    def task_client(self, in_flight: int) -> Optional[Dict[str, object]]:
        """What a task that fetches listed files makes its S3 client from (lake.aws.s3_client_settings); None
        where the files are local."""

    def require_writable(self, root: str) -> None:
        """Fails with one line unless this run can write below root."""

    def require_fenced_writes(self, root: str) -> None:
        """As require_writable, for the output root: also fails with one line unless the storage enforces
        the conditional writes that fence a run that lost the lake (the lease, the publish journal)."""

    def read_json(self, path: str) -> Optional[dict]: ...

    def write_json(self, path: str, document: dict) -> None: ...

    def read_json_tagged(self, path: str) -> Tuple[Optional[dict], Optional[str]]:
        """The document and its version (an ETag on S3), or (None, None) if there is none."""

    def write_json_if(self, path: str, document: dict, version: Optional[str]) -> Optional[str]:
        """Writes the document only if path holds that version now (None: only if there is no document);
        returns the new version, or None if the condition failed. A create (version None) is atomic on
        every store; where only one run can write (a flock), a replace's condition always holds."""

    def delete_json_if(self, path: str, version: str) -> bool:
        """Deletes the document only if path holds that version; whether it did."""

    def children(self, path: str) -> List[str]: ...

    def keys(self, path: str) -> List[str]:
        """Every file below path, relative to it, whatever the depth."""

    def remove(self, path: str, keys: Optional[Sequence[str]] = None) -> None:
        """Removes path and all below it, or only the given keys below it."""

    def prune(self, path: str) -> None:
        """Removes the folder path if it is empty: never what another run has just put there."""

    def has_data(self, path: str) -> bool:
        """Whether a reader would see any file below path."""

    def gather(self, units: Sequence[Unit], run_id: str) -> List[Unit]:
        """The units as this store publishes them, once every one is staged."""

    def sync_staged(self, units: Sequence[Unit]) -> None:
        """Makes what is staged for units durable, before the journal that names it is written."""

    def plan_publish(self, unit: Unit, run_id: str) -> dict:
        """What the journal must hold to finish publishing unit after a crash."""

    def publish_unit(self, unit: Unit, run_id: str, entry: dict) -> None:
        """Makes unit's staged folder the published one; idempotent."""

    def lock(self, root: str) -> Lock: ...

    def unreachable(self, root: str) -> Optional[str]:
        """None if root's storage answers a quick request (a refusal is an answer), else what is gone."""


class InPlaceStore(Store, Protocol):
    """A store that publishes by putting new files in place beside the old ones (S3Store, for
    lake.publish.DirectPublish and its journal's recovery), not by swapping folders."""

    def published_keys(self, units: Sequence[Unit]) -> List[List[str]]:
        """For each unit, the keys published below its folder now."""

    def move_files(self, folder: str, target: str, run_id: str,
                   before_each: Optional[Callable[[], None]] = None) -> int:
        """PUTs a local folder's files into target under this run's names, removing each once it is up;
        before_each (raising to stop) is called before each PUT; returns how many."""

    def copy(self, source: str, target: str, keys: Sequence[str]) -> None:
        """Copies the keys below source to the same keys below target."""

    def withdraw(self, folders: Sequence[str], run_id: str) -> int:
        """Deletes what run_id put below the folders; returns how many keys."""

    def remove_units(self, entries: Sequence[Tuple[Unit, Sequence[str]]]) -> int:
        """Deletes the keys given below each unit's folder, batched; returns how many."""


class LocalStore:
    """Local disk: files through os, a table swapped in by renaming its folder."""

    def require_input(self, root: str, tree: str) -> None:
        if not os.path.isdir(root):
            raise EtlError(f"input root not found: {root}")
        folder = join(root, tree)
        if not os.path.isdir(folder):
            raise EtlError(f"no {tree}/ folder under input root {root}")
        if not any(is_input_file(name) for name in visible_files(folder)):
            raise EtlError(f"no .json files under {folder}")

    def list_input(self, folder: str) -> List[Tuple[str, object, int, str]]:
        # Reading a local file needs no size; the version does. Size and mtime alone miss a file corrected in
        # place to the same size with its mtime put back (cp -p, touch -r, rsync -t): user tools can set
        # mtime, but not the inode (a file replaced by a rename gets a new one) nor ctime (any write sets it).
        listed = []
        for path in (os.path.join(folder, name) for name in visible_files(folder) if is_input_file(name)):
            stat = os.stat(path)
            version = f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ino}-{stat.st_ctime_ns}"
            listed.append((f"file:{path}", path, 0, version))
        return listed

    def task_client(self, in_flight: int) -> Optional[Dict[str, object]]:
        return None

    def require_writable(self, root: str) -> None:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise EtlError(f"cannot create output folder {root}: {exc.strerror or exc}") from None
        if not os.access(root, os.W_OK):
            raise EtlError(f"output folder is not writable: {root}")

    def require_fenced_writes(self, root: str) -> None:
        self.require_writable(root)  # a flock (lake.lock.FileLock) needs no more of the disk

    def read_json(self, path: str) -> Optional[dict]:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    # Conditional documents. A replace or a delete needs no condition here: one run at a time holds the
    # flock, and no run outlives it (lake.lock.FileLock). A create does: a rejects root's claim (lake.rejects)
    # is made by lakes that each hold a flock of their own.

    def read_json_tagged(self, path: str) -> Tuple[Optional[dict], Optional[str]]:
        document = self.read_json(path)
        return document, None if document is None else LOCAL_VERSION

    def write_json_if(self, path: str, document: dict, version: Optional[str]) -> Optional[str]:
        if version is not None:
            self.write_json(path, document)
            return LOCAL_VERSION
        # A file written aside, then given the name only if no other has it: created with its content in one
        # step (never an empty file, as O_EXCL would show), and never over another.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not _create(_write_aside(path, document), path):
            return None
        sync_folders(path)
        return LOCAL_VERSION

    def delete_json_if(self, path: str, version: str) -> bool:
        self.remove(os.path.dirname(path), [os.path.basename(path)])
        return True

    def write_json(self, path: str, document: dict) -> None:
        # Write aside, then rename: a reader or a crash never sees half a file.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Durable before anything depends on it: the file's data before its name, the name before the next
        # step (a power cut must not leave the journal's name with no content, and later renames done).
        partial = _write_aside(path, document)
        os.replace(partial, path)
        sync_folders(path)

    def children(self, path: str) -> List[str]:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def keys(self, path: str) -> List[str]:
        return [os.path.relpath(os.path.join(parent, name), path).replace(os.sep, "/")
                for parent, _, files in os.walk(path) for name in files]

    def remove(self, path: str, keys: Optional[Sequence[str]] = None) -> None:
        if keys is None:
            shutil.rmtree(path, ignore_errors=True)
            return
        for key in keys:
            try:
                os.remove(os.path.join(path, key))
            except FileNotFoundError:
                pass

    def prune(self, path: str) -> None:
        try:
            os.rmdir(path)  # fails on a folder that is not empty, atomically
        except OSError:
            pass

    def has_data(self, path: str) -> bool:
        return next(visible_files(path), None) is not None

    def gather(self, units: Sequence[Unit], run_id: str) -> List[Unit]:
        """Each folder's changed parts (a table's partitions, the state's segments) become the whole folder,
        so that one exchange publishes it, and no reader ever sees a table with some partitions new and
        others old. The rest of the folder is hard links to the published files (no data is copied): the
        spare (the version the last partial publish swapped out) brought up to date, which costs what the
        last two runs changed, or else links made afresh, which cost what the folder holds."""
        gathered: Dict[Tuple[str, str], List[Unit]] = {}
        for unit in units:
            gathered.setdefault((unit.root, unit.folder()), []).append(unit)
        whole = []
        for (root, folder), parts in gathered.items():
            unit = Unit(root, folder)
            if unit in parts:
                _retire_spare(unit, run_id)  # the whole version makes it useless
                whole.append(unit)
                continue
            changed = tuple(sorted(part.name[len(folder) + 1:] for part in parts))
            unit = Unit(root, folder, changed=changed)
            if not _bring_spare_up_to_date(unit, run_id):
                _link_unchanged(unit.final(), unit.staged(run_id), set(changed))
            whole.append(unit)
        return whole

    def sync_staged(self, units: Sequence[Unit]) -> None:
        """One syncfs per file system the units are staged on: Spark's files, the links, the spare's moves
        and the version markers, all at once (docs/performance.md: cheaper than a fsync per file)."""
        devices = {}
        for root in dict.fromkeys(unit.root for unit in units):
            devices.setdefault(os.stat(root).st_dev, root)
        for root in devices.values():
            sync_file_system(root)

    def plan_publish(self, unit: Unit, run_id: str) -> dict:
        if unit.drop:
            return {}  # nothing staged: publishing it moves the published folder aside
        # The new version names itself, inside its folder, before the journal is written: after a kill, the
        # published folder is this run's or it is not, whatever the step reached (or a copy of the lake).
        # It also says which version it changes, and where: what makes the one it swaps out a spare.
        marker = f"{VERSION_MARKER}{run_id}"
        changes = {"previous": _version(unit.final())[0], "changed": unit.changed}
        with open(os.path.join(unit.staged(run_id), marker), "w", encoding="utf-8") as handle:
            json.dump(changes, handle)
        return {"marker": marker}

    def publish_unit(self, unit: Unit, run_id: str, entry: dict) -> None:
        if unit.drop:
            if os.path.lexists(unit.final()):  # else moved aside already, by a publish cut short
                _move(unit.final(), unit.old(run_id))
            return
        # A partial publish keeps the version it swaps out as the folder's spare; a whole one lets it go.
        aside = unit.spare() if entry.get("changed") is not None else unit.old(run_id)
        swap_in(unit.staged(run_id), unit.final(), aside, entry.get("marker"))

    def lock(self, root: str) -> Lock:
        return FileLock(root)

    def unreachable(self, root: str) -> Optional[str]:
        return None


def _write_aside(path: str, document: dict) -> str:
    """document as JSON in a file beside path, on disk (fsynced); returns the file's name."""
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return partial


def _link_unchanged(final: str, staged: str, changed: Set[str]) -> None:
    """Hard links, in staged, to every file readers see in final outside the changed subfolders (staged, or
    dropped): no data is copied, and the published files stay as they are."""
    os.makedirs(staged, exist_ok=True)
    _link_files(final, staged, "", changed)


def _link_files(final: str, staged: str, part: str, changed: Set[str]) -> None:
    """Hard links, in staged, to the files readers see below final's part ("" for all of it), except those in
    the changed subfolders."""
    for name in visible_files(os.path.join(final, part)):
        name = f"{part}/{name}" if part else name
        parents = name.split("/")[:-1]
        if any("/".join(parents[:depth]) in changed for depth in range(1, len(parents) + 1)):
            continue
        target = os.path.join(staged, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(os.path.join(final, name), target)


def _version(folder: str) -> Tuple[Optional[str], dict]:
    """The run that published folder, and what its marker says it changed (empty for a version published
    whole, or by a run from before markers said so); (None, {}) if no one marker names it."""
    markers = [name for name in os.listdir(folder) if name.startswith(VERSION_MARKER)] \
        if os.path.isdir(folder) else []
    if len(markers) != 1:
        return None, {}
    try:
        with open(os.path.join(folder, markers[0]), encoding="utf-8") as handle:
            changes = json.load(handle)
    except ValueError:
        changes = {}
    return markers[0][len(VERSION_MARKER):], changes if isinstance(changes, dict) else {}


def _bring_spare_up_to_date(unit: Unit, run_id: str) -> bool:
    """Makes unit's spare this run's staged folder, if the spare is the version the published one changed:
    the parts the published version and this run changed are removed from it, the first put back as
    published (hard links) and the second moved in from what this run staged. The spare is first moved
    into this run's staging, so that a kill at any step leaves it to be cleared with the staging, never
    half brought up to date where the next run would find it. False if there is no spare to use (one that
    is not that version goes with the staging)."""
    final, staged = unit.final(), unit.staged(run_id)
    if not os.path.isdir(unit.spare()):
        return False
    base = _retire_spare(unit, run_id)
    _, published = _version(final)
    # The published folder may not be the version that changed the spare: one put back from a backup, say.
    if _version(base)[0] != published.get("previous") or published.get("changed") is None:
        return False
    for name in os.listdir(base):  # its marker, and whatever else readers skip: staged afresh, or not at all
        if not is_visible(name):
            _remove(os.path.join(base, name))
    since, now = set(published["changed"]), set(unit.changed or ())
    for part in since | now:
        _remove(os.path.join(base, part))
        _prune_parents(base, part)
    for part in sorted(since - now):
        _link_files(final, base, part, now)
    for parent, _, files in os.walk(staged):
        for name in files:
            target = os.path.join(base, os.path.relpath(os.path.join(parent, name), staged))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(parent, name), target)
    shutil.rmtree(staged, ignore_errors=True)  # empty folders now, or none (a folder of dropped parts only)
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    os.rename(base, staged)
    return True


def _retire_spare(unit: Unit, run_id: str) -> str:
    """unit's spare, if any, moved into this run's staging (where it is cleared with the rest, or brought up
    to date); returns where it went."""
    base = join(unit.root, STAGING_DIR, run_id, SPARES_DIR, unit.name)
    if os.path.isdir(unit.spare()):
        os.makedirs(os.path.dirname(base), exist_ok=True)
        os.rename(unit.spare(), base)
    return base


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _prune_parents(folder: str, part: str) -> None:
    """The folders above part, up to folder, that part's removal left empty (as a fresh link would not
    have made them)."""
    parents = part.split("/")[:-1]
    for depth in range(len(parents), 0, -1):
        try:
            os.rmdir(os.path.join(folder, *parents[:depth]))
        except OSError:  # not empty, or not there
            return


def swap_in(staged: str, final: str, old: str, marker: Optional[str] = None) -> None:
    """Puts staged where final is, atomically where the kernel allows; the previous final ends up at old.

    Idempotent whatever step a kill stopped it at, given marker (a file the staged folder holds, created
    before the journal was written): if final holds it the swap is done, and whatever is left at staged is
    the previous version, to be moved to old; otherwise nothing has been swapped yet."""
    if marker and os.path.exists(os.path.join(final, marker)):
        if os.path.lexists(staged):
            _move(staged, old)
        return
    if not os.path.exists(staged):
        if marker:
            LOG.warning("%s is missing, and %s is not the version staged for it: left as it is", staged, final)
        return  # journals without a marker: swapped in already, before a crash
    if os.path.exists(final):
        if _exchange(staged, final):
            sync_folders(staged, final)  # the exchange is durable before the next step counts on it
            _move(staged, old)  # staged now names the previous version
            return
        _move(final, old)  # no atomic exchange: the table is missing for one rename
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(staged, final)
    sync_folders(staged, final)


def _move(path: str, old: str) -> None:
    """A previous version out of the way, into the run's staging (cleared with it)."""
    os.makedirs(os.path.dirname(old), exist_ok=True)
    if os.path.lexists(old):  # a version moved there before, by a swap cut short and redone: not needed
        shutil.rmtree(old)
    os.rename(path, old)
    sync_folders(path, old)


def sync_folders(*paths: str) -> None:
    """fsyncs the folder holding each path (each once): what makes a rename or a new name survive a power
    cut."""
    for folder in dict.fromkeys(os.path.dirname(path) for path in paths):
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def sync_file_system(path: str) -> None:
    """Linux's syncfs: every write to the file system holding path, data and names, on disk; elsewhere
    sync, every file system's."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        handle = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(handle) == 0:
                return
        finally:
            os.close(handle)
    except (AttributeError, OSError):  # not Linux, or a C library without syncfs
        pass
    os.sync()


def _exchange(first: str, second: str) -> bool:
    """Linux's renameat2(RENAME_EXCHANGE): swaps two folders in one step, so a reader sees one or the other."""
    return _renameat2(first, second, RENAME_EXCHANGE) == 0


def _create(partial: str, path: str) -> bool:
    """partial takes the name path unless path exists, in one step; whether it did. partial is gone after."""
    # renameat2(RENAME_NOREPLACE) where there is one: a rename, like every other step of the publish (the
    # crash tests kill at each); else a hard link, which also fails where the name exists.
    outcome = _renameat2(partial, path, RENAME_NOREPLACE)
    if outcome == 0:
        return True
    try:
        if outcome == errno.EEXIST:
            return False
        if outcome not in (None, errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(outcome, os.strerror(outcome), path)
        try:
            os.link(partial, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _renameat2(source: str, target: str, flags: int) -> Optional[int]:
    """Linux's renameat2: 0, or the errno it failed with; None if the C library has no renameat2."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_cwd = -100
        done = libc.renameat2(at_cwd, source.encode(), at_cwd, target.encode(), flags) == 0
    except (AttributeError, OSError):  # not Linux, or a C library without renameat2
        return None
    return 0 if done else ctypes.get_errno()


class S3Store:
    """S3 through boto3: no rename, so a table is published by server-side copies, many at once."""

    def __init__(self, aws: AwsSettings) -> None:
        self._aws = aws
        self._client = s3_client(aws, attempts=S3_ATTEMPTS, pool=S3_REQUESTS_IN_FLIGHT)

    def _checked(self, root: str, what: str, check: Callable[[], None]) -> None:
        """A preflight check: few, short retries, and botocore's errors as one line."""
        try:
            check()
        except EtlError:
            raise
        except Exception as exc:
            raise s3_error(exc, split_s3(root)[0], what, self._aws.endpoint) from None

    def require_input(self, root: str, tree: str) -> None:
        bucket, prefix = split_s3(root)
        folder = "/".join(p for p in (prefix, tree) if p) + "/"

        def check() -> None:
            pages = s3_client(self._aws).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
            seen_any = False
            for page in pages:
                for item in page.get("Contents", []):
                    seen_any = True
                    if is_input_file(item["Key"][len(folder):]):
                        return
            raise EtlError(f"no .json files under s3://{bucket}/{folder}" if seen_any
                           else f"no {tree}/ under input root {root}")
        self._checked(root, f"input {root}/{tree}/", check)

    def list_input(self, folder: str) -> List[Tuple[str, object, int, str]]:
        """One flat listing: one LIST per 1,000 keys, never one per folder, sizes and ETags included. Names
        keep folder's scheme, as Spark's own readers name them; a task opens (bucket, key)."""
        scheme = folder.split("://", 1)[0]
        bucket, prefix = split_s3(folder)
        below = folder_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=below)
        return [(f"{scheme}://{bucket}/{item['Key']}", (bucket, item["Key"]), item["Size"], item["ETag"].strip('"'))
                for page in pages
                for item in page.get("Contents", []) if is_input_file(item["Key"][len(below):])]

    def task_client(self, in_flight: int) -> Optional[Dict[str, object]]:
        return s3_client_settings(self._aws, attempts=S3_ATTEMPTS, pool=in_flight)

    def require_writable(self, root: str) -> None:
        bucket, prefix = split_s3(root)
        probe = "/".join(p for p in (prefix, f"{PREFLIGHT_PROBE}-{os.getpid()}") if p)

        def check() -> None:
            client = s3_client(self._aws)
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
        self._checked(root, f"writing to {root}/", check)

    def require_fenced_writes(self, root: str) -> None:
        """Creates a probe key under the root's "_" area with If-None-Match: * twice: the second must be
        refused, or the endpoint ignores conditional writes (older MinIO, some gateways), and the lease and
        the journal, compare-and-swap both, would be last-writer-wins. Three requests: two PUTs, a DELETE."""
        bucket, prefix = split_s3(root)
        probe = "/".join(p for p in (prefix, f"{PREFLIGHT_PROBE}-{uuid.uuid4().hex}") if p)

        def check() -> None:
            client = s3_client(self._aws)
            etag = client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")["ETag"]
            try:
                client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
                enforced = False
            except client.exceptions.ClientError as exc:
                if _code(exc) not in CREATE_REFUSED:
                    raise
                enforced = True
            client.delete_object(Bucket=bucket, Key=probe, **({"IfMatch": etag} if enforced else {}))
            if not enforced:
                raise EtlError(f"S3 at {self._aws.endpoint or 'the AWS endpoint'} ignores conditional writes "
                               f"(If-None-Match/If-Match: a second create of one key succeeded), which the lease "
                               f"that keeps two runs from writing {root} at once needs")
        self._checked(root, f"writing to {root}/", check)

    def read_json(self, path: str) -> Optional[dict]:
        bucket, key = split_s3(path)
        try:
            return json.loads(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except self._client.exceptions.NoSuchKey:
            return None

    def write_json(self, path: str, document: dict) -> None:
        self._put_json(path, document, {})

    def _put_json(self, path: str, document: dict, condition: dict) -> str:
        bucket, key = split_s3(path)
        return self._client.put_object(Bucket=bucket, Key=key, Body=json.dumps(document, indent=2).encode() + b"\n",
                                       ContentType="application/json", **condition)["ETag"]

    def read_json_tagged(self, path: str) -> Tuple[Optional[dict], Optional[str]]:
        bucket, key = split_s3(path)
        try:
            answer = self._client.get_object(Bucket=bucket, Key=key)
        except self._client.exceptions.NoSuchKey:
            return None, None
        return json.loads(answer["Body"].read()), answer["ETag"]

    def write_json_if(self, path: str, document: dict, version: Optional[str]) -> Optional[str]:
        try:
            return self._put_json(path, document, {"IfMatch": version} if version else {"IfNoneMatch": "*"})
        except self._client.exceptions.ClientError as exc:
            if _code(exc) not in CONDITION_FAILED:
                raise
        # Refused: another writer's document now, unless this very write landed and only its answer was
        # lost (the retry then met it).
        now, etag = self.read_json_tagged(path)
        return etag if now == document else None

    def delete_json_if(self, path: str, version: str) -> bool:
        bucket, key = split_s3(path)
        try:
            self._client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except self._client.exceptions.ClientError as exc:
            if _code(exc) not in CONDITION_FAILED:
                raise
            return False
        return True

    def keys(self, path: str) -> List[str]:
        """Every key below path, relative to it: one LIST request per 1,000 keys, whatever the depth."""
        bucket, prefix = split_s3(path)
        below = folder_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=below)
        return [item["Key"][len(below):] for page in pages for item in page.get("Contents", [])]

    def children(self, path: str) -> List[str]:
        bucket, prefix = split_s3(path)
        below = folder_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=below, Delimiter="/")
        return sorted(p["Prefix"][len(below):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))

    def remove(self, path: str, keys: Optional[Sequence[str]] = None) -> None:
        bucket, prefix = split_s3(path)
        keys = self.keys(path) if keys is None else keys
        self._delete(bucket, [f"{prefix}/{key}" for key in keys])

    def _delete(self, bucket: str, keys: Sequence[str]) -> None:
        """One DeleteObjects per S3_DELETE_BATCH keys (full keys, in one bucket)."""
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + S3_DELETE_BATCH]]
            self._client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    def copy(self, source: str, target: str, keys: Sequence[str]) -> None:
        (source_bucket, source_prefix), (bucket, prefix) = split_s3(source), split_s3(target)

        def copy_one(key: str) -> None:
            self._client.copy_object(Bucket=bucket, Key=f"{prefix}/{key}",
                                     CopySource={"Bucket": source_bucket, "Key": f"{source_prefix}/{key}"})
        in_flight(copy_one, keys)

    def download(self, path: str, folder: str, below: Sequence[str]) -> int:
        """GETs the visible files below path whose relative key starts with one of the below folders, to
        the same relative path below a local folder: one listing of path, one request per file, many at
        once; returns how many."""
        bucket, prefix = split_s3(path)
        wanted = tuple(f"{name.strip('/')}/" for name in below)
        keys = [key for key in self.keys(path) if key.startswith(wanted) and is_visible_file(key)]

        def get(key: str) -> None:
            target = os.path.join(folder, *key.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            body = self._client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()  # no HEAD first
            with open(target, "wb") as handle:
                handle.write(body)
        in_flight(get, keys)
        return len(keys)

    def prune(self, path: str) -> None:
        pass  # a folder on S3 is its keys: gone with the last of them

    def has_data(self, path: str) -> bool:
        return any(map(is_visible_file, self.keys(path)))

    def gather(self, units: Sequence[Unit], run_id: str) -> List[Unit]:
        return list(units)  # no folder swap: each partition is published key by key anyway

    def sync_staged(self, units: Sequence[Unit]) -> None:
        pass  # S3 acknowledges a PUT once the object is durable

    def plan_publish(self, unit: Unit, run_id: str) -> dict:
        """The keys to copy in and, of the published ones, those to delete afterwards."""
        # Directory markers (keys ending in "/", kept by S3A: fs.s3a.directory.marker.retention) are not data.
        new = [] if unit.drop else [key for key in self.keys(unit.staged(run_id)) if key and not key.endswith("/")]
        return {"new": new, "old": sorted(set(self.keys(unit.final())) - set(new))}

    def publish_unit(self, unit: Unit, run_id: str, entry: dict) -> None:
        # New files first, then the old ones go: a reader sees the old version, then both, then the new.
        self.copy(unit.staged(run_id), unit.final(), entry["new"])
        self.remove(unit.final(), entry["old"])

    # Publishing in place (S3 output spooled on local disk, python etl.py: lake.publish.DirectPublish). Each
    # spooled file is PUT once, straight into its unit's folder, under a name of this run (spooled_key).

    def published_keys(self, units: Sequence[Unit]) -> List[List[str]]:
        """Per unit, the keys below its folder now (relative to it): one listing of each top folder (a
        table, a rejects tree, the state), never one per partition unit."""
        listed: Dict[str, List[str]] = {}
        for unit in units:
            top = join(unit.root, unit.folder())
            if top not in listed:
                listed[top] = self.keys(top)
        found = []
        for unit in units:
            below = unit.name[len(unit.folder()) + 1:]
            keys = listed[join(unit.root, unit.folder())]
            found.append(sorted(keys) if not below else
                         [key[len(below) + 1:] for key in sorted(keys) if key.startswith(f"{below}/")])
        return found

    def move_files(self, folder: str, target: str, run_id: str,
                   before_each: Optional[Callable[[], None]] = None) -> int:
        """PUTs every visible file below a local folder (a spool) into target, under its spooled_key, one
        request each, many at once, and removes each local file once it is up; returns how many. Each object
        is written once: nothing is copied afterwards. Removing the files as they go spreads the spool's
        removal over the PUTs, which wait on the network (measured at tier 1: 2.5 s after the publish, for
        12,600 files, when the whole spool went at the end)."""
        bucket, prefix = split_s3(target)
        names = list(visible_files(folder))

        def put(name: str) -> None:
            if before_each:
                before_each()
            path = os.path.join(folder, name)
            with open(path, "rb") as body:
                self._client.put_object(Bucket=bucket, Key=f"{prefix}/{spooled_key(name, run_id)}", Body=body)
            os.unlink(path)
        in_flight(put, names)
        return len(names)

    def withdraw(self, folders: Sequence[str], run_id: str) -> int:
        """Deletes every key below the folders that run_id put there (its spooled_keys): one listing per
        folder, one DeleteObjects per 1,000 keys. Returns how many."""
        total = 0
        for folder in folders:
            mine = [key for key in self.keys(folder) if is_spooled_by(key, run_id)]
            self.remove(folder, mine)
            total += len(mine)
        return total

    def remove_units(self, entries: Sequence[Tuple[Unit, Sequence[str]]]) -> int:
        """Deletes, below each unit's folder, the keys given: all of them batched together, one
        DeleteObjects per 1,000 keys (per bucket), however many units they come from. Returns how many."""
        by_bucket: Dict[str, List[str]] = {}
        for unit, keys in entries:
            bucket, prefix = split_s3(unit.final())
            by_bucket.setdefault(bucket, []).extend(f"{prefix}/{key}" for key in keys)
        for bucket, keys in by_bucket.items():
            self._delete(bucket, keys)
        return sum(len(keys) for keys in by_bucket.values())

    def lock(self, root: str) -> Lock:
        return S3Lease(self._client, root)

    def unreachable(self, root: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            s3_client(self._aws, attempts=1).head_bucket(Bucket=split_s3(root)[0])
        except ClientError:
            return None  # S3 answered, if only with a refusal
        except Exception:
            return f"cannot reach S3 at {self._aws.endpoint or 'the AWS endpoint'}"
        return None


def folder_prefix(prefix: str) -> str:
    """The listing prefix of what is below a folder: "" at a bucket's root (s3://bucket), where "/" would
    list nothing (and a lake there would look empty to every run)."""
    return f"{prefix}/" if prefix else ""


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def spooled_key(name: str, run_id: str) -> str:
    """The key, below its unit's folder, of a file spooled as name: the run id in front of its file name
    ("year=2005/<run id>-part-00000.parquet"). No run's file ever replaces another's, so a publish undone
    deletes only what it added, and the name never starts with "_" or "." (run ids start with a digit)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{run_id}-{base}" if folder else f"{run_id}-{base}"


def is_spooled_by(key: str, run_id: str) -> bool:
    return key.rpartition("/")[2].startswith(f"{run_id}-")


def in_flight(request: Callable[[str], None], keys: Sequence[str]) -> None:
    """One request per key, S3_REQUESTS_IN_FLIGHT at once: each is a round trip, and S3 serves many."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(S3_REQUESTS_IN_FLIGHT)
    try:
        for _ in pool.map(request, keys):
            pass
    finally:
        # After a failure, the requests not yet started are dropped: S3 failing one is likely to fail them all.
        pool.shutdown(wait=True, cancel_futures=True)
