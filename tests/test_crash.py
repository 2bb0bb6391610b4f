"""A killed run never empties a table: SIGKILL at each step, then every table is yesterday's or today's.

A run stops at pause points (SPARKIFY_PAUSE_AT, lake.publish.pause_point) and is killed with SIGKILL to its whole
process group, Python and JVM alike. SIGKILL lets no code run, so a kill at a pause point leaves the lake
exactly as it is while the run waits there: one run pauses at every point in turn, the lake is copied at
each (the run goes on at a line on its stdin), and the run is killed at the last. Tables are read back the
way an analyst's tool would: pyarrow, with names starting with "_" or "." ignored.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import boto3
import pyarrow.dataset as ds
import pytest

import etl
from conftest import ETL, SAMPLE
from lake.lock import LEASE_NAME
from lake.paths import is_visible_file
from lake.publish import PAUSE_ENV, PUBLISH_JOURNAL
from lake.report import REPORT_NAME, RUNS_DIR
from lake.stores import STAGING_DIR

PAUSE_TIMEOUT_S = 300
LOCAL_KILLS = ["read", "gate", *[f"write {name}" for name in etl.TABLES], "publish", f"published {etl.SONGS}"]
# On S3 under python etl.py (a full build, so that every table changes whole): before the journal (the
# keys published now listed, nothing put); as Spark writes the last table (the state put, no table yet: a
# reader's window opens only once Spark is done); mid-upload (the state and songs put in place under
# the run's names, the other tables not); between the upload and the deletes (the commit mark written);
# mid-delete (the rejects', the state's and songs' old keys deleted, the other tables' not).
S3_KILLS = ["journal", f"write {etl.SONGPLAYS}", f"uploaded {etl.SONGS}", "committed", f"published {etl.SONGS}"]
ROLLED_BACK = S3_KILLS[:3]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIACRASHTEST", "AWS_SECRET_ACCESS_KEY": "crash-secret", "AWS_REGION": "us-east-1"}


def make_input(root, days, drop_songs=0):
    """The sample with only some days of events and without a few songs: small, and different per version."""
    songs = sorted(SAMPLE.glob("song_data/**/*.json"))[drop_songs:]
    for path in songs + sorted(SAMPLE.glob("log_data/**/*.json")):
        if "log_data" not in path.parts or path.name[8:10] in days:
            target = root / path.relative_to(SAMPLE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def start(config, *args, pause=(), env=None, prefix=()):
    """The job in its own process group, pausing at each of the points named in pause; prefix runs it under
    another command (strace)."""
    environment = {**os.environ, **(env or {}), **({PAUSE_ENV: ",".join(pause)} if pause else {})}
    return subprocess.Popen([*prefix, sys.executable, ETL, "--config", config, *map(str, args)], env=environment,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def run(config, *args, env=None, prefix=()):
    """A whole run; returns (exit status, stderr). Whatever it leaves running in its group (a JVM whose
    Python was killed) is killed."""
    process = start(config, *args, env=env, prefix=prefix)
    try:
        _, stderr = process.communicate(timeout=PAUSE_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, stderr


def wait_for_pause(process, name):
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    for line in process.stderr:
        if line.strip() == f"paused at {name}":
            return
        assert time.monotonic() < deadline, f"no pause at {name}"
    raise AssertionError(f"the run ended (status {process.wait()}) before pausing at {name}")


def resume(process):
    process.stdin.write("\n")
    process.stdin.flush()


def visit_pauses(process, moments, look):
    """Calls look(moment) while the run waits at each moment in turn; kills the run at the last (or on failure)."""
    try:
        for moment in moments:
            wait_for_pause(process, moment)
            look(moment)
            if moment != moments[-1]:
                resume(process)
    finally:
        kill(process)


def kill(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)  # Python and the JVM it started share the group
    except ProcessLookupError:  # the whole group has ended already
        pass
    process.wait()
    process.stdin.close()
    process.stderr.close()


def snapshot(root):
    """Every table as sorted rows, read with pyarrow as an analyst would (_ and . names ignored)."""
    tables = {}
    for name in etl.TABLES:
        path = os.path.join(root, name)
        assert os.path.isdir(path), f"{name} is missing"
        rows = ds.dataset(path, format="parquet", partitioning="hive",
                          ignore_prefixes=["_", "."]).to_table().to_pylist()
        assert rows, f"{name} is empty"
        tables[name] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
    return tables


def assert_each_table_is_one_version(root, old, new):
    current = snapshot(root)
    for name in etl.TABLES:
        assert current[name] in (old[name], new[name]), f"{name} is neither the previous nor the new version"
    return current


def staged_leftovers(root):
    return [os.path.join(folder, name) for folder, dirs, files in os.walk(root)
            for name in dirs + files if name == STAGING_DIR]


@pytest.fixture(scope="module")
def versions(tmp_path_factory, empty_config):
    """Yesterday's published lake (input A) and, in a separate folder, today's complete tables (input B)."""
    base = tmp_path_factory.mktemp("crash")
    inputs = {"old": make_input(base / "in-old", {"01", "02"}), "new": make_input(base / "in-new", {"02", "03"}, 3)}
    outputs = {}
    for name, folder in inputs.items():
        outputs[name] = base / f"out-{name}"
        assert run(empty_config, "--input", folder, "--output", outputs[name])[0] == 0
    old, new = snapshot(outputs["old"]), snapshot(outputs["new"])
    assert all(old[name] != new[name] for name in etl.TABLES)
    return inputs, outputs, old, new


@pytest.fixture(scope="module")
def killed_lakes(versions, empty_config, tmp_path_factory):
    """Today's run into a copy of yesterday's lake, paused at each of LOCAL_KILLS in turn and killed at the last.

    Returns the lake the run wrote to, killed; the lake at each moment (a copy taken while the run waited
    there; at the last moment, after the kill), never changed afterwards; and the (exit status, stderr) of a
    second run started while the first one held the lake at the gate.
    """
    inputs, outputs, _, _ = versions
    base = tmp_path_factory.mktemp("killed")
    live = base / "lake"
    shutil.copytree(outputs["old"], live)
    process = start(empty_config, "--input", inputs["new"], "--output", live, pause=LOCAL_KILLS)
    lakes, second_run = {}, {}

    def look(moment):
        if moment == "gate":
            second_run["gate"] = run(empty_config, "--input", inputs["new"], "--output", live)
        if moment != LOCAL_KILLS[-1]:
            lakes[moment] = shutil.copytree(live, base / moment.replace(" ", "-"))

    visit_pauses(process, LOCAL_KILLS, look)
    lakes[LOCAL_KILLS[-1]] = shutil.copytree(live, base / LOCAL_KILLS[-1].replace(" ", "-"))
    return live, lakes, second_run["gate"]


@pytest.mark.parametrize("moment", LOCAL_KILLS)
def test_a_kill_leaves_every_table_whole(versions, killed_lakes, moment):
    _, _, old, new = versions
    live, lakes, second_run = killed_lakes
    lake = lakes[moment]
    if moment == "gate":  # while a run holds the lake, a second one is refused in one line
        status, stderr = second_run
        assert status == 2 and stderr.strip().startswith(f"error: another run is writing to {live}"), stderr

    current = assert_each_table_is_one_version(lake, old, new)
    report = json.loads((lake / REPORT_NAME).read_text())
    assert report["status"] == "running" and report["published"] == []
    if moment.startswith("published"):
        assert current[etl.SONGS] == new[etl.SONGS] and current[etl.SONGPLAYS] == old[etl.SONGPLAYS]
    else:
        assert current == old


@pytest.mark.parametrize("moment", ["write time", f"published {etl.SONGS}"])
def test_the_next_run_finishes_or_clears_a_killed_one(versions, killed_lakes, empty_config, tmp_path, moment):
    inputs, _, _, new = versions
    live, lakes, _ = killed_lakes
    # A publish journal names the lake's own folder: after the last moment, the next run goes where the run was.
    lake = live if moment == LOCAL_KILLS[-1] else shutil.copytree(lakes[moment], tmp_path / "lake")
    killed_id = json.loads((lake / REPORT_NAME).read_text())["run_id"]

    assert run(empty_config, "--input", inputs["new"], "--output", lake)[0] == 0
    assert snapshot(lake) == new and staged_leftovers(lake) == []
    latest = json.loads((lake / REPORT_NAME).read_text())
    assert latest["status"] == "succeeded"
    interrupted = json.loads((lake / RUNS_DIR / f"{killed_id}.json").read_text())
    assert interrupted["status"] == "interrupted"
    if moment.startswith("published"):  # the killed run had started its publish: the next run finished it,
        assert interrupted["published"] and interrupted["published_by"] == latest["run_id"]
        assert latest["published"] == [] and latest["intake"]["mode"] == "incremental"  # then found nothing new
    else:
        assert interrupted["published"] == [] and "published_by" not in interrupted


# --------------------------------------------------------------------------- every rename of a local publish

RENAMES = "rename,renameat,renameat2"
RENAME_LINE = re.compile(r'^(rename|renameat|renameat2)\((?:AT_FDCWD, )?"([^"]*)", (?:AT_FDCWD, )?"([^"]*)"')


def under_strace(kill_before=None, trace=os.devnull):
    """strace in front of the job, following only its Python driver's main thread (no -f: neither its other
    threads nor the JVM it starts, whose renames are Spark's own). kill_before=(call, n) sends SIGKILL as the
    job enters its n-th call of that system call, which therefore never happens; trace gets every rename
    it made."""
    strace = shutil.which("strace")
    assert strace, "strace is needed by the crash tests: `make setup` installs it (apt-get install strace)"
    command = [strace, "-qq", "-o", str(trace), "-e", f"trace={RENAMES}"]
    if kill_before:
        call, n = kill_before
        command += ["-e", f"inject={call}:signal=KILL:when={n}"]
    return command


def kill_point(calls, position):
    """What under_strace needs to stop a run before the rename at position (1-based) among calls, the
    system calls of its renames in order: strace counts each system call apart."""
    call = calls[position - 1]
    return call, calls[:position].count(call)


def renames(trace):
    """(syscall, source, target) of each rename in a trace, in order."""
    return [match.groups() for match in map(RENAME_LINE.match, trace.read_text().splitlines()) if match]


def failing_input(inputs, base):
    """New input whose quality gate fails: every song lacks its song_id, so songs is empty."""
    root = shutil.copytree(inputs["new"], base / "in-failing")
    shutil.rmtree(root / "song_data")
    (root / "song_data" / "A").mkdir(parents=True)
    (root / "song_data" / "A" / "no-id.json").write_text('{"artist_id": "AR1", "title": "x", "duration": 1.0}\n')
    return root


@pytest.fixture(scope="module")
def publish_steps(versions, empty_config, tmp_path_factory):
    """Today's run over a copy of yesterday's lake under strace, copied while it waits with its journal
    written and nothing swapped; then let finish. Returns the lake, that copy, the number (1-based, among
    the run's renames) of the journal's rename, each rename from it up to the run's own report, and the
    system call of each of the run's renames."""
    inputs, outputs, _, new = versions
    base = tmp_path_factory.mktemp("renames")
    lake, trace = shutil.copytree(outputs["old"], base / "lake"), base / "trace"
    process = start(empty_config, "--input", inputs["new"], "--output", lake, pause=["publish"],
                    prefix=under_strace(trace=trace))
    try:
        wait_for_pause(process, "publish")
        journaled = shutil.copytree(lake, base / "journaled")
        resume(process)
        assert process.wait(timeout=PAUSE_TIMEOUT_S) == 0
    finally:
        kill(process)
    assert snapshot(lake) == new
    steps = renames(trace)
    journal = next(n for n, (_, _, target) in enumerate(steps, 1) if target.endswith(PUBLISH_JOURNAL))
    report = next(n for n, (_, _, target) in enumerate(steps, 1) if f"/{RUNS_DIR}/" in target)
    return lake, journaled, journal, steps[journal - 1:report - 1], [call for call, _, _ in steps]


def restore(publish_steps):
    """The lake as today's run left it with its journal written, where the run left it (the journal names
    its folders)."""
    lake, journaled, _, _, _ = publish_steps
    shutil.rmtree(lake)
    return shutil.copytree(journaled, lake)


# What today's run publishes, each folder whole in one exchange: the tables, both trees' rejects, the state.
PUBLISHED_FOLDERS = len(etl.TABLES) + 2 + 1


def test_the_local_publish_is_one_exchange_and_one_move_per_folder(publish_steps):
    _, _, _, steps, _ = publish_steps
    swaps = steps[1:]
    assert len(swaps) == 2 * PUBLISHED_FOLDERS, swaps
    assert [call for call, _, _ in swaps] == ["renameat2", "rename"] * (len(swaps) // 2), swaps


@pytest.mark.parametrize("step", range(1, 2 * PUBLISHED_FOLDERS + 2))
def test_a_kill_at_any_rename_of_a_publish_leaves_each_table_whole_and_recovery_ends_it(
        versions, publish_steps, empty_config, tmp_path, step):
    """The publish of the journal left by today's run, as the next run's recovery does it first thing, killed
    as it enters its step-th rename (the last step: just after it ends); then the run after that."""
    inputs, _, old, new = versions
    _, _, _, steps, _ = publish_steps
    lake = restore(publish_steps)
    # The recovery's renames are the publish's after its journal; then the run's own first write (a rename).
    calls = [call for call, _, _ in steps[1:]] + ["rename"]
    status, stderr = run(empty_config, "--input", inputs["new"], "--output", lake,
                         prefix=under_strace(kill_before=kill_point(calls, step)))
    assert status == -signal.SIGKILL, stderr[-3000:]
    # A table is new once its exchange (the recovery's rename number n, counted as the publish's were) is done.
    exchanged = {target.rsplit("/", 1)[-1] for n, (call, _, target) in enumerate(steps[1:], 1)
                 if call == "renameat2" and n < step}
    assert snapshot(lake) == {name: (new if name in exchanged else old)[name] for name in etl.TABLES}

    process = start(empty_config, "--input", inputs["new"], "--output", lake, pause=["recovered"])
    visit_pauses(process, ["recovered"], lambda moment: None)
    assert snapshot(lake) == new and staged_leftovers(lake) == []


@pytest.fixture(scope="module")
def run_killed_at(versions, publish_steps, empty_config, tmp_path_factory):
    """Today's run over a copy of yesterday's lake, killed as it enters its N-th rename: returns the lake."""
    inputs, outputs, _, _ = versions

    _, _, _, _, calls = publish_steps

    def kill_at(step, name):
        lake = shutil.copytree(outputs["old"], tmp_path_factory.mktemp(name) / "lake")
        status, stderr = run(empty_config, "--input", inputs["new"], "--output", lake,
                             prefix=under_strace(kill_before=kill_point(calls, step)))
        assert status == -signal.SIGKILL, stderr[-3000:]
        return lake
    return kill_at


def test_a_run_killed_before_its_journal_leaves_yesterday_and_a_failing_run_keeps_it(
        versions, publish_steps, run_killed_at, empty_config, tmp_path):
    inputs, _, old, _ = versions
    _, _, journal, _, _ = publish_steps
    lake = run_killed_at(journal, "before-journal")
    assert snapshot(lake) == old
    status, stderr = run(empty_config, "--input", failing_input(inputs, tmp_path), "--output", lake)
    assert status == 1 and "check failed: songs is not empty" in stderr, stderr[-3000:]
    assert snapshot(lake) == old and staged_leftovers(lake) == []


def test_a_run_killed_between_the_exchange_and_the_move_of_songs_ends_new_whatever_the_next_run_does(
        versions, publish_steps, run_killed_at, empty_config, tmp_path):
    """The issue's case: songs exchanged, its previous version still at the staged name. Recovery must not
    exchange it back in, even in a run whose own gate then fails; a run after that succeeds."""
    inputs, _, old, new = versions
    _, _, journal, steps, _ = publish_steps
    exchange = next(n for n, (call, source, target) in enumerate(steps) if call == "renameat2"
                    and target.endswith(f"/{etl.SONGS}"))
    lake = run_killed_at(journal + exchange + 1, "songs-exchanged")
    current = assert_each_table_is_one_version(lake, old, new)
    assert current[etl.SONGS] == new[etl.SONGS] and current[etl.ARTISTS] == old[etl.ARTISTS]

    status, stderr = run(empty_config, "--input", failing_input(inputs, tmp_path), "--output", lake)
    assert status == 1 and "check failed: songs is not empty" in stderr, stderr[-3000:]
    assert snapshot(lake) == new and staged_leftovers(lake) == []
    assert run(empty_config, "--input", inputs["new"], "--output", lake)[0] == 0
    assert snapshot(lake) == new and staged_leftovers(lake) == []


# --------------------------------------------------------------------------- S3

@pytest.fixture(scope="module")
def s3_versions(versions, s3_endpoint):
    """The two versions' inputs in a bucket, and yesterday's lake as a prefix to copy per test."""
    inputs, outputs, old, new = versions
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="setup", aws_secret_access_key="setup")
    client.create_bucket(Bucket="crash-bucket")
    for name, root in [*inputs.items(), ("lake-old", outputs["old"])]:
        for path in root.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and RUNS_DIR not in path.parts:
                client.upload_file(str(path), "crash-bucket", f"{name}/{path.relative_to(root).as_posix()}")
    return client, old, new


def copy_prefix(client, source, target):
    """Every object under source/, directory markers included, copied server-side under target/."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="crash-bucket", Prefix=f"{source}/"):
        for item in page.get("Contents", []):
            client.copy_object(Bucket="crash-bucket", Key=f"{target}/{item['Key'][len(source) + 1:]}",
                               CopySource={"Bucket": "crash-bucket", "Key": item["Key"]})
    return target


def s3_lake(client, name):
    """A copy of yesterday's lake under its own prefix."""
    return f"s3://crash-bucket/{copy_prefix(client, 'lake-old', name)}"


def download(client, prefix, target):
    for item in client.list_objects_v2(Bucket="crash-bucket", Prefix=f"{prefix}/").get("Contents", []):
        if item["Key"].endswith("/"):  # a directory marker (S3A keeps them), not a file
            continue
        path = target / item["Key"][len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("crash-bucket", item["Key"], str(path))
    return target


@pytest.fixture(scope="module")
def s3_killed_lakes(s3_versions, s3_endpoint, empty_config):
    """As killed_lakes, on S3: a prefix holding a copy of the lake at each of S3_KILLS (copied server-side
    while the run waited there; at the last moment, after the kill), and the killed run's id."""
    client, _, _ = s3_versions
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    process = start(empty_config, "--input", "s3://crash-bucket/new", "--output", s3_lake(client, "killed"), "--full",
                    pause=S3_KILLS, env=env)
    prefixes = {}

    def look(moment):
        if moment != S3_KILLS[-1]:
            prefixes[moment] = copy_prefix(client, "killed", moment.replace(" ", "-"))

    visit_pauses(process, S3_KILLS, look)
    prefixes[S3_KILLS[-1]] = copy_prefix(client, "killed", S3_KILLS[-1].replace(" ", "-"))
    report = client.get_object(Bucket="crash-bucket", Key=f"killed/{REPORT_NAME}")["Body"].read()
    return prefixes, json.loads(report)["run_id"]


def clear_prefix(client, prefix):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="crash-bucket", Prefix=f"{prefix}/"):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket="crash-bucket", Delete={"Objects": keys})


def restore_prefix(client, source, target):
    """target/ made a copy of source/ again: a journal names the lake's own prefix, so a killed run's lake
    is looked at, and run again, where the run left it."""
    clear_prefix(client, target)
    return copy_prefix(client, source, target)


def mixed(old, new, both=()):
    """Each table's rows as a reader sees them while the tables in both show both versions' files."""
    return {name: sorted(old[name] + new[name]) if name in both else old[name] for name in etl.TABLES}


def lake_keys(client, prefix):
    """The keys of the lake itself below prefix, relative to it: tables, rejects and state (not the
    lease, reports or staging)."""
    found = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="crash-bucket", Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) + 1:]
            if relative.split("/", 1)[0] in (*etl.TABLES, etl.REJECTED_DIR, etl.STATE_DIR) and "/" in relative:
                found.add(relative)
    return found


def foreign_keys(client, prefix, run_id):
    """Files below the tables, rejects and state that the given run did not write (its keys are named
    <run id>-...): what a publish left behind."""
    found = []
    for key in lake_keys(client, prefix):
        top, below = key.split("/", 1)
        if top == etl.REJECTED_DIR:
            top, below = key.split("/", 2)[1], key.split("/", 2)[2]
        manifest = key == f"{etl.MANIFEST_UNIT}/{etl.MANIFEST_FILE}"  # copied in: the one key not named by run
        if is_visible_file(below) and not manifest and not below.rsplit("/", 1)[-1].startswith(f"{run_id}-"):
            found.append(key)
    return found


@pytest.mark.parametrize("moment", S3_KILLS)
def test_a_kill_on_s3_leaves_old_or_old_and_new_files_and_the_next_run_rolls_back_or_forward(
        s3_versions, s3_killed_lakes, s3_endpoint, empty_config, tmp_path, moment):
    client, old, new = s3_versions
    prefixes, killed_run = s3_killed_lakes
    lake, env = f"s3://crash-bucket/{restore_prefix(client, prefixes[moment], 'killed')}", \
        {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    # Until the commit mark, new files are put beside the old ones (state, songs first, rejects last); after it,
    # the old ones go (songs' before the other tables'). A reader may see both versions' files in between,
    # never part of the old version without the whole new one.
    expected = {
        "journal": old,
        f"write {etl.SONGPLAYS}": old,
        f"uploaded {etl.SONGS}": mixed(old, new, both=[etl.SONGS]),
        "committed": mixed(old, new, both=etl.TABLES),
        f"published {etl.SONGS}": {**mixed(old, new, both=etl.TABLES), etl.SONGS: new[etl.SONGS]},
    }[moment]
    assert snapshot(download(client, "killed", tmp_path / "killed")) == expected
    if moment == f"write {etl.SONGPLAYS}":
        # The state goes up while Spark writes the tables, on a thread of its own: how much of it has gone up
        # at this pause depends on the machine's pace, so only its bound is asserted. Nothing but state yet.
        assert {key.split("/")[0] for key in lake_keys(client, "killed") - lake_keys(client, "lake-old")} \
            <= {etl.STATE_DIR}

    # The next run's recovery alone: before the commit mark, exactly the old lake's keys again; after it,
    # only the killed run's (and the manifest it copied in).
    process = start(empty_config, "--input", "s3://crash-bucket/new", "--output", lake, pause=["recovered"], env=env)
    try:
        wait_for_pause(process, "recovered")
        if moment in ROLLED_BACK:
            assert lake_keys(client, "killed") == lake_keys(client, "lake-old")
        else:
            assert foreign_keys(client, "killed", killed_run) == []
            assert snapshot(download(client, "killed", tmp_path / "recovered")) == new
        resume(process)
        _, stderr = process.communicate(timeout=PAUSE_TIMEOUT_S)
    finally:
        kill(process)
    assert process.returncode == 0, stderr[-3000:]
    after = download(client, "killed", tmp_path / "after")
    assert snapshot(after) == new and staged_leftovers(after) == []
    assert not (after / LEASE_NAME).exists()


THIEF = {"run_id": "20261129T000000Z-0123abcd", "host": "elsewhere", "pid": 1, "token": "thief"}


def run_robbed_at(config, s3_endpoint, client, name, moment, *args, look=None):
    """A run over a copy of yesterday's lake under name/ whose lease another run (THIEF) takes over while it
    waits at moment (as one would that found it stale: the paused run's clock, say, or a stalled machine),
    after look(); resumed, it goes on to its end. Returns (exit status, stderr)."""
    lake, env = s3_lake(client, name), {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    process = start(config, "--input", "s3://crash-bucket/new", "--output", lake, *args, pause=[moment], env=env)
    try:
        wait_for_pause(process, moment)
        if look:
            look()
        client.put_object(Bucket="crash-bucket", Key=f"{name}/{LEASE_NAME}",
                          Body=json.dumps({**THIEF, "expires_at": time.time() + 600}))
        resume(process)
        stderr = process.stderr.read()
        return process.wait(timeout=PAUSE_TIMEOUT_S), stderr
    finally:
        kill(process)


def test_a_run_that_loses_its_lease_after_some_puts_undoes_them_and_leaves_the_old_lake_exactly(
        s3_versions, s3_endpoint, empty_config, tmp_path):
    """Paused once songs are put in place, the run's lease is taken over; resumed, it stops before its
    next PUT, deletes what it put and its journal: the lake's keys are the old lake's, exactly."""
    client, old, _ = s3_versions

    def some_puts_made():
        assert lake_keys(client, "undone") > lake_keys(client, "lake-old")

    status, stderr = run_robbed_at(empty_config, s3_endpoint, client, "undone", f"uploaded {etl.SONGS}", "--full",
                                   look=some_puts_made)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and "lost its lease" in errors[-1] and errors[-1].endswith("; nothing was published"), \
        stderr[-3000:]
    assert "the publish was undone" in stderr
    assert lake_keys(client, "undone") == lake_keys(client, "lake-old")
    assert snapshot(download(client, "undone", tmp_path / "after")) == old
    journals = [item["Key"] for item in client.list_objects_v2(Bucket="crash-bucket", Prefix="undone/").get(
        "Contents", []) if item["Key"].endswith(PUBLISH_JOURNAL)]
    assert journals == []


def test_a_live_lease_refuses_a_second_run_and_a_stale_one_is_taken_over(s3_versions, s3_endpoint, empty_config):
    client, old, new = s3_versions
    lake, env = s3_lake(client, "leased"), {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    lease = {"run_id": "20261124T000000Z-deadbeef", "host": "elsewhere", "pid": 1}
    client.put_object(Bucket="crash-bucket", Key=f"leased/{LEASE_NAME}",
                      Body=json.dumps({**lease, "expires_at": time.time() + 600}))
    status, stderr = run(empty_config, "--input", "s3://crash-bucket/new", "--output", lake, env=env)
    assert status == 2 and stderr.strip().startswith(
        f"error: another run is writing to {lake} (run 20261124T000000Z-deadbeef on elsewhere"), stderr

    client.put_object(Bucket="crash-bucket", Key=f"leased/{LEASE_NAME}",
                      Body=json.dumps({**lease, "expires_at": time.time() - 1}))
    status, stderr = run(empty_config, "--input", "s3://crash-bucket/new", "--output", lake, env=env)
    assert status == 0 and "taking over the stale lease of run 20261124T000000Z-deadbeef" in stderr


def test_a_run_that_lost_its_lease_publishes_nothing(s3_versions, s3_endpoint, empty_config, tmp_path):
    """The run is paused at the gate while another run takes its lease over (as one would that found it
    stale: the paused run's clock, say, or a stalled machine); resumed, it stops at its publish."""
    client, old, _ = s3_versions
    status, stderr = run_robbed_at(empty_config, s3_endpoint, client, "lost-lease", "gate")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and errors == [stderr.strip().splitlines()[-1]], stderr[-3000:]
    assert "lost its lease" in errors[0] and "run 20261129T000000Z-0123abcd on elsewhere" in errors[0], errors
    assert errors[0].endswith("; nothing was published"), errors

    after = download(client, "lost-lease", tmp_path / "after")
    assert snapshot(after) == old and staged_leftovers(after) == []
    assert json.loads((after / LEASE_NAME).read_text())["run_id"] == THIEF["run_id"]
    assert json.loads((after / REPORT_NAME).read_text())["status"] == "running"  # the latest is not the loser's to end
