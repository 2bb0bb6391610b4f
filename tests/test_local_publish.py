"""The local publish of a folder of which a run changed only some parts (a daily run's partitions).

The version such a publish swaps out is kept as the folder's spare (lake.stores.SPARES_DIR), and the next
partial publish brings that spare up to date instead of hard-linking the whole folder afresh: it costs
what the last two runs changed, not what the folder holds. The published folder must be exactly what
fresh links would have made, a stale spare must never be used, and a kill at any rename must leave the
published folder one version or the other, with the next run ending at the new one.

No Spark here: the store's publish on a few hand-made files, as etl.py's publish calls it.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lake.lock import LOCK_NAME
from lake.publish import PUBLISH_JOURNAL, clear_staging, publish, recover
from lake.stores import SPARES_DIR, LocalStore, Unit

TABLE = "t"
V1 = {"p=1/a": "v1", "p=2/a": "v1", "p=3/a": "v1", "p=4/a": "v1"}
V2_CHANGES = ({"p=1/b": "v2"}, [])  # files staged, parts dropped
V2 = {"p=1/b": "v2", "p=2/a": "v1", "p=3/a": "v1", "p=4/a": "v1"}
V3_CHANGES = ({"p=2/c": "v3"}, ["p=3"])
V3 = {"p=1/b": "v2", "p=2/c": "v3", "p=4/a": "v1"}


def stage_and_publish(root, run_id, files, drops=(), whole=False):
    """Stages the files (paths below the table) and publishes them, as a whole table or as the partition
    units they fall in, with the dropped partitions; then clears the run's staging, as the run's end does."""
    root = str(root)
    parts = sorted({name.rsplit("/", 1)[0] for name in files})
    units = [Unit(root, TABLE)] if whole else [Unit(root, f"{TABLE}/{part}") for part in parts]
    units += [Unit(root, f"{TABLE}/{part}", drop=True) for part in drops]
    for name, content in files.items():
        path = Path(Unit(root, TABLE).staged(run_id), name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    store = LocalStore()
    publish(store, units, run_id, root)
    clear_staging(store, [root], root, run_id)


def tree(folder):
    """Every file readers see below folder with its content, and every folder, empty ones included."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith("_")]
        below = os.path.relpath(parent, folder)
        found.update({os.path.join(below, name): "folder" for name in dirs})
        found.update({os.path.join(below, name): Path(parent, name).read_text()
                      for name in files if not name.startswith("_")})
    return {name[2:] if name.startswith("./") else name: content for name, content in found.items()}


def versions_1_and_2(root):
    stage_and_publish(root, "run1", V1, whole=True)
    stage_and_publish(root, "run2", *V2_CHANGES)
    return root / TABLE, root / SPARES_DIR / TABLE


def expected(files):
    folders = {name.rsplit("/", 1)[0]: "folder" for name in files}
    return {**folders, **files}


def test_a_partial_publish_keeps_what_it_swaps_out_as_the_spare_and_the_next_one_brings_it_up_to_date(tmp_path):
    published, spare = versions_1_and_2(tmp_path)
    assert tree(published) == expected(V2) and tree(spare) == expected(V1)
    # The spare's folders become the new version's: held open, the folder of a part neither run changed
    # cannot be removed and made afresh under the same inode.
    untouched = os.open(spare / "p=4", os.O_RDONLY)
    try:
        stage_and_publish(tmp_path, "run3", *V3_CHANGES)
        assert os.stat(published / "p=4").st_ino == os.fstat(untouched).st_ino
    finally:
        os.close(untouched)
    assert tree(published) == expected(V3) and tree(spare) == expected(V2)
    assert not (tmp_path / "_staging").exists()


def test_a_whole_publish_lets_the_spare_go_and_the_next_partial_one_links_afresh(tmp_path):
    published, spare = versions_1_and_2(tmp_path)
    v3 = {"p=1/x": "v3", "p=5/x": "v3"}  # a full build: every file new
    stage_and_publish(tmp_path, "run3", v3, whole=True)
    assert not spare.exists()
    stage_and_publish(tmp_path, "run4", {"p=5/y": "v4"})
    assert tree(published) == expected({"p=1/x": "v3", "p=5/y": "v4"}) and tree(spare) == expected(v3)


def test_a_spare_that_is_not_the_version_the_published_one_changed_is_never_used(tmp_path):
    published, spare = versions_1_and_2(tmp_path)
    version_1 = shutil.copytree(spare, tmp_path / "backup")
    stage_and_publish(tmp_path, "run3", *V3_CHANGES)
    shutil.rmtree(spare)
    shutil.copytree(version_1, spare)  # version 1 put back as the spare: version 2 is the one version 3 changed
    stage_and_publish(tmp_path, "run4", {"p=4/d": "v4"})
    assert tree(published) == expected({"p=1/b": "v2", "p=2/c": "v3", "p=4/d": "v4"})


PUBLISH_V3 = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
from test_local_publish import V3_CHANGES, stage_and_publish
stage_and_publish(sys.argv[1], "run3", *V3_CHANGES)
"""


def test_a_kill_at_any_rename_of_a_partial_publish_leaves_one_version_and_the_next_run_ends_new(tmp_path):
    from test_crash import kill_point, renames, under_strace

    def publish_v3(root, **strace):
        return subprocess.run([*under_strace(**strace), sys.executable, "-c", PUBLISH_V3, str(root)],
                              capture_output=True, text=True)

    traced = tmp_path / "traced"
    versions_1_and_2(traced)
    assert publish_v3(traced, trace=tmp_path / "trace").returncode == 0
    calls = [call for call, _, _ in renames(tmp_path / "trace")]
    assert tree(traced / TABLE) == expected(V3)
    # The spare into the run's staging, the one new file into it, it out as the staged folder; the journal
    # (created where there is none); the exchange, and the version swapped out made the spare.
    assert calls == ["rename"] * 3 + ["renameat2", "renameat2", "rename"], calls
    for step in range(1, len(calls) + 1):
        root = tmp_path / f"killed-{step}"
        published, spare = versions_1_and_2(root)
        killed = publish_v3(root, kill_before=kill_point(calls, step))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert tree(published) in (expected(V2), expected(V3)), step
        recover(LocalStore(), [str(root)], str(root))
        if tree(published) == expected(V2):
            assert publish_v3(root).returncode == 0
        assert tree(published) == expected(V3) and tree(spare) == expected(V2), step


# --------------------------------------------------------------------------- a power cut

SYNCED = "fsync,fdatasync,syncfs,sync,rename,renameat2,openat"
# With strace -y, each file descriptor is followed by <the path it names>.
SYNC_LINE = re.compile(r"^(?:\d+\s+)?(fsync|fdatasync|syncfs)\(\d+<([^>]*)>\)")
SYNC_ALL_LINE = re.compile(r"^(?:\d+\s+)?sync\(\)")
RENAME_LINE = re.compile(r'^(?:\d+\s+)?(rename|renameat2)\((?:AT_FDCWD<[^>]*>, )?"([^"]*)", '
                         r'(?:AT_FDCWD<[^>]*>, )?"([^"]*)"')
PUBLISH_TWO = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
from test_local_publish import publish_whole
publish_whole(sys.argv[1], "run1", "v1")
publish_whole(sys.argv[1], "run2", "v2")
"""
TABLES = (TABLE, "u")


def publish_whole(root, run_id, content):
    """Two tables of one file each, staged and published whole in one publish; its staging then cleared."""
    for table in TABLES:
        path = Path(Unit(root, table).staged(run_id), "p=1", "a")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    store = LocalStore()
    publish(store, [Unit(root, table) for table in TABLES], run_id, root)
    clear_staging(store, [root], root, run_id)


def synced_steps(trace):
    """(call, path or source, target) of each sync and rename in an strace -y trace, in order."""
    steps = []
    for line in trace.read_text().splitlines():
        for pattern in (SYNC_LINE, SYNC_ALL_LINE, RENAME_LINE):
            match = pattern.match(line)
            if match:
                found = match.groups() or ("sync",)
                steps.append((found + ("", ""))[:3])
    return steps


def test_the_local_publish_syncs_the_staged_data_then_the_journal_then_each_exchange_before_the_next(tmp_path):
    """After a power cut the journal must be whole wherever a later rename survived: the staged data is on
    disk before the journal's rename, the journal (file and name) before the first exchange, and each
    exchange (both its folders) before the next."""
    strace = shutil.which("strace")
    assert strace, "strace is needed: `make setup` installs it (apt-get install strace)"
    trace, lake = tmp_path / "trace", tmp_path / "lake"
    subprocess.run([strace, "-f", "-qq", "-y", "-o", str(trace), "-e", f"trace={SYNCED}", sys.executable, "-c",
                    PUBLISH_TWO, str(lake)], check=True)
    assert all(tree(lake / table) == expected({"p=1/a": "v2"}) for table in TABLES)
    steps = synced_steps(trace)
    run2 = str(lake / "_staging" / "run2")
    journal = next(n for n, (call, _, target) in enumerate(steps)
                   if call.startswith("rename") and target == os.path.join(run2, PUBLISH_JOURNAL))
    # renameat2 also creates each journal (RENAME_NOREPLACE): the exchanges are the others.
    exchanges = [n for n, (call, _, target) in enumerate(steps)
                 if call == "renameat2" and os.path.basename(target) != PUBLISH_JOURNAL]
    exchange = next(n for n in exchanges if n > journal)
    before_journal, journal_to_exchange = steps[:journal], steps[journal + 1:exchange]
    assert any(call == "sync" or (call == "syncfs" and path == str(lake)) for call, path, _ in before_journal), \
        before_journal
    assert ("fsync", f"{steps[journal][1]}", "") in before_journal, before_journal
    assert ("fsync", run2, "") in journal_to_exchange, journal_to_exchange
    # Each exchange: its two folders fsynced before the next rename of any kind.
    assert len(exchanges) == 2
    for n in exchanges:
        _, source, target = steps[n]
        following = next((m for m in range(n + 1, len(steps)) if steps[m][0].startswith("rename")), len(steps))
        synced = {path for call, path, _ in steps[n + 1:following] if call == "fsync"}
        assert {os.path.dirname(source), os.path.dirname(target)} <= synced, steps[n:following]


@pytest.mark.parametrize("journal", ["", '{"run_id": "run9", "units": [{"root": '])
def test_a_journal_that_cannot_be_read_fails_the_next_run_closed_and_touches_nothing(
        run_etl, tmp_path, journal):
    """An empty or cut-short journal (a power cut before it was durable): the run cannot tell which tables
    were swapped, so it stops with one line naming the file, and leaves every folder as it found it."""
    from conftest import SAMPLE

    lake = tmp_path / "lake"
    staging = lake / "_staging" / "run9"
    for name, content in {"songs/p=1/a": "published", "_staging/run9/songs/p=1/a": "staged",
                          f"_staging/run9/{PUBLISH_JOURNAL}": journal}.items():
        (lake / name).parent.mkdir(parents=True, exist_ok=True)
        (lake / name).write_text(content)
    before = everything(lake)
    result = run_etl("--input", SAMPLE, "--output", lake)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(staging / PUBLISH_JOURNAL) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert everything(lake) == before


def everything(folder):
    """Every file below folder with its content, the lake's own included (not the lock's holder line)."""
    return {path.relative_to(folder).as_posix(): path.read_text() for path in folder.rglob("*")
            if path.is_file() and path.name != LOCK_NAME}
