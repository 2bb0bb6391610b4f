"""Daily runs: a run reads only what is new, and its tables are exactly a full build of the input as it stands.

One small hand-written lake goes through the day-to-day cases in turn (each test one run of etl.py on the
lake the previous test left, so the tests run in file order and share the runs): an event delivered again,
a level change, late song files, an artist's better record, a log file replaced in place, one corrected in
place with its size and mtime as they were, files removed.
After each run the published tables are compared, whole, with a full build of the same input made in this
process (etl.build_tables on the input as it now stands). A generated set then gets five daily runs in a
row, and a run is killed between publishing the state and publishing the tables.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import etl
from conftest import ROOT, SAMPLE, py_files, s3_jars
from lake.intake import MANIFEST_FILE, MANIFEST_UNIT
from lake.report import REPORT_NAME
from lake.stores import STAGING_DIR
from lake.tables import SPECS
from test_crash import kill, start, wait_for_pause
from test_s3 import CREDENTIALS as S3_CREDENTIALS
from test_s3 import download, spark_submit

DAY_MS = 86_400_000
NOV_1 = 1_541_030_400_000  # 2018-11-01T00:00:00Z
GENERATOR = str(ROOT / "tools" / "generate_data.py")


def song(song_id, title, artist_id, artist_name, duration, year=2000, location="", latitude=None, longitude=None):
    return {"num_songs": 1, "artist_id": artist_id, "artist_latitude": latitude, "artist_longitude": longitude,
            "artist_location": location, "artist_name": artist_name, "song_id": song_id, "title": title,
            "duration": duration, "year": year}


def event(user, day, item, title=None, artist=None, length=None, level="free", session=None, page="NextSong"):
    return {"artist": artist, "auth": "Logged In", "firstName": f"First{user}", "gender": "F", "itemInSession": item,
            "lastName": f"Last{user}", "length": length, "level": level, "location": "Town, ST", "method": "PUT",
            "page": page, "registration": 1540000000000.0, "sessionId": session or user * 100 + day, "song": title,
            "status": 200, "ts": NOV_1 + (day - 1) * DAY_MS + user * 60_000 + item * 1000, "userAgent": "Agent",
            "userId": str(user)}


def write_song(root, record):
    path = root / "song_data" / "A" / "B" / "C" / f"{record['song_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def log_path(root, day):
    return root / "log_data" / "2018" / "11" / f"2018-11-{day:02d}-events.json"


def write_log(root, day, events):
    path = log_path(root, day)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(e, separators=(",", ":")) for e in events))
    return path


def full_build(spark, root):
    """The five tables a full build of the input as it stands gives, built here from the job's own functions."""
    plan = etl._reading_plan(str(root))
    songs, _ = etl.split_songs(etl.read_input(spark, plan, str(root), etl.SONG_DATA)[0])
    events, _ = etl.split_events(etl.read_input(spark, plan, str(root), etl.LOG_DATA)[0])
    return etl.build_tables(songs, events)


def published(spark, lake, name):
    return spark.read.parquet(str(lake / name)).select(*SPECS[name].column_names)


def assert_full_build(spark, lake, root):
    """Every published table equals a full build's, row for row (as multisets, columns by name)."""
    expected = full_build(spark, root)
    for name in etl.TABLES:
        actual, wanted = published(spark, lake, name), expected[name].select(*SPECS[name].column_names)
        only_published, only_full = actual.exceptAll(wanted).count(), wanted.exceptAll(actual).count()
        assert (only_published, only_full) == (0, 0), \
            f"{name}: {only_published} rows only in the lake, {only_full} only in a full build"


def report_of(lake):
    return json.loads((lake / REPORT_NAME).read_text())


def run_daily(run_etl, root, lake, *args, **kwargs):
    result = run_etl("--input", root, "--output", lake, *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return report_of(lake)


# --------------------------------------------------------------------------- one lake, day by day

# Day 1: user 10 plays a catalogue song and a song not in the catalogue yet; user 11 plays "Blue".
YELLOW = song("SOYEL00000000000A", "Yellow", "AR1", "Band", 200.0)
BLUE = song("SOBLUE0000000000A", "Blue", "AR2", "Other", 180.0)
DAY_1 = [event(10, 1, 0, "Yellow", "Band", 200.0), event(10, 1, 1, "Late Song", "Latecomer", 150.0),
         event(11, 1, 0, "Blue", "Other", 180.0), event(11, 1, 1, page="Home"),
         event(12, 1, 0, "Yellow", "Band", 200.0)]


@pytest.fixture(scope="module")
def lake(tmp_path_factory, run_etl):
    """Day 1's input and the lake its first run (a full build) made; the tests below change both in turn."""
    base = tmp_path_factory.mktemp("daily")
    root, out = base / "input", base / "lake"
    for record in (YELLOW, BLUE):
        write_song(root, record)
    write_log(root, 1, DAY_1)
    report = run_daily(run_etl, root, out)
    assert report["intake"]["mode"] == "full" and report["status"] == "succeeded"
    return root, out


def test_a_first_run_is_a_full_build_and_keeps_the_state(spark, lake):
    root, out = lake
    assert_full_build(spark, out, root)
    manifest = json.loads((out / MANIFEST_UNIT / MANIFEST_FILE).read_text())
    assert len(manifest["trees"]["song_data"]["files"]) == 2 and len(manifest["trees"]["log_data"]["files"]) == 1
    assert manifest["tables"]["songplays"] == 4


def test_an_event_delivered_again_on_a_later_day_is_one_row(spark, run_etl, lake):
    root, out = lake
    write_log(root, 2, [DAY_1[0], event(12, 2, 0, "Blue", "Other", 180.0)])  # day 1's first play, again
    report = run_daily(run_etl, root, out)
    assert report["intake"]["mode"] == "incremental"
    assert report["intake"]["files"]["log_data"] == {"listed": 2, "added": 1, "changed": 0, "removed": 0}
    assert report["input"]["log_files"] == 1 and report["input"]["song_files"] == 0  # read only what is new
    assert report["intake"]["rows_added"]["songplays"] == 1
    assert_full_build(spark, out, root)


def test_a_users_level_comes_from_the_latest_event_across_days(spark, run_etl, lake):
    root, out = lake
    write_log(root, 3, [event(10, 3, 0, page="Submit Upgrade"), event(10, 3, 1, "Blue", "Other", 180.0, "paid")])
    report = run_daily(run_etl, root, out)
    assert report["intake"]["partitions_rewritten"]["users"] == 1
    assert published(spark, out, "users").filter("user_id = 10").first()["level"] == "paid"
    assert_full_build(spark, out, root)


def test_a_late_song_matches_earlier_plays_and_the_smallest_song_id_wins(spark, run_etl, lake):
    root, out = lake
    write_song(root, song("SOLATE000000000AA", "Late Song", "AR9", "Latecomer", 150.0, year=1999))
    # Same title, artist name and duration as Yellow, and a smaller song_id: day 1's plays now match it.
    write_song(root, song("SOYEL00000000000", "Yellow", "AR1", "Band", 200.0005))
    report = run_daily(run_etl, root, out)
    assert report["intake"]["files"]["song_data"]["added"] == 2 and report["input"]["song_files"] == 2
    plays = {(row["user_id"], row["song_id"]) for row in published(spark, out, "songplays").collect()}
    assert {(10, "SOLATE000000000AA"), (10, "SOYEL00000000000"), (12, "SOYEL00000000000")} <= plays
    assert report["intake"]["partitions_rewritten"]["songplays"] == 1
    assert_full_build(spark, out, root)


def test_an_artists_row_is_the_best_across_old_and_new_song_records(spark, run_etl, lake):
    root, out = lake
    # More fields known than Blue's record: the artist's whole row now comes from this one, name included,
    # so the plays of "Blue" by "Other" no longer match.
    write_song(root, song("SOTEAL00000000000", "Teal", "AR2", "The Other", 210.0, 2001, "Oslo", 59.9, 10.7))
    report = run_daily(run_etl, root, out)
    artist = published(spark, out, "artists").filter("artist_id = 'AR2'").first()
    assert (artist["name"], artist["location"]) == ("The Other", "Oslo")
    assert published(spark, out, "songplays").filter("song_id = 'SOBLUE0000000000A'").count() == 0
    assert report["intake"]["partitions_rewritten"]["artists"] == 1
    assert_full_build(spark, out, root)


def test_a_log_file_replaced_in_place_counts_only_as_it_is_now(spark, run_etl, lake):
    root, out = lake
    path = write_log(root, 2, [event(13, 2, 0, "Teal", "The Other", 210.0), event(13, 2, 1, "Yellow", "Band", 200.0)])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even within the clock's resolution
    report = run_daily(run_etl, root, out)
    assert report["intake"]["files"]["log_data"] == {"listed": 3, "added": 0, "changed": 1, "removed": 0}
    assert published(spark, out, "users").filter("user_id = 13").count() == 1
    assert_full_build(spark, out, root)  # user 12's day-2 play of Blue is gone; day 1's first play stays


def test_a_log_file_corrected_in_place_with_its_size_and_mtime_put_back_is_read_again(spark, run_etl, lake):
    root, out = lake
    path = log_path(root, 1)
    before = path.stat()
    corrected = path.read_text().replace('"level":"free"', '"level":"paid"')  # as long as it was
    path.write_text(corrected)  # in place: the same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p, touch -r or rsync -t put it back
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    report = run_daily(run_etl, root, out)
    assert_full_build(spark, out, root)
    assert report["intake"]["files"]["log_data"]["changed"] == 1


def test_a_removed_file_no_longer_counts(spark, run_etl, lake, tmp_path):
    root, out = lake
    log_path(root, 1).unlink()
    (root / "song_data" / "A" / "B" / "C" / f"{BLUE['song_id']}.json").unlink()
    # Most of this tiny lake's rows go with day 1: more than the gate lets tables fall by default.
    config = tmp_path / "dl.cfg"
    config.write_text("[QUALITY]\nMAX_ROWS_FALL = 1\n")
    report = run_daily(run_etl, root, out, config=config)
    assert report["intake"]["files"]["log_data"]["removed"] == 1
    assert report["intake"]["files"]["song_data"]["removed"] == 1
    assert report["intake"]["partitions_removed"]["songs"] == 1  # Blue's year=2000/artist_id=AR2 folder
    assert not (out / "songs" / "year=2000" / "artist_id=AR2").exists()
    assert published(spark, out, "users").filter("user_id = 11").count() == 0  # seen only on day 1
    assert_full_build(spark, out, root)


def test_a_run_with_nothing_new_changes_nothing_and_starts_no_spark(run_etl, lake):
    root, out = lake
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*.parquet")}
    report = run_daily(run_etl, root, out)
    assert report["phases_s"].keys() == {"list input"} and report["published"] == []
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.parquet")} == before


def test_full_rebuilds_from_nothing(spark, run_etl, lake):
    root, out = lake
    report = run_daily(run_etl, root, out, "--full")
    assert report["intake"]["mode"] == "full" and report["intake"]["why_full"] == "--full"
    assert report["input"]["song_files"] == 4
    assert_full_build(spark, out, root)


# --------------------------------------------------------------------------- a killed run

def test_a_run_killed_between_publishing_the_state_and_the_tables_is_finished_by_the_next(
        spark, run_etl, empty_config, lake, tmp_path):
    root, out = lake
    killed_lake = shutil.copytree(out, tmp_path / "lake")
    before = {name: sorted(map(tuple, published(spark, killed_lake, name).collect())) for name in etl.TABLES}
    write_log(root, 4, [event(14, 4, 0, "Yellow", "Band", 200.0), event(10, 4, 0, "Teal", "The Other", 210.0)])
    process = start(empty_config, "--input", root, "--output", killed_lake, pause=["published _state"])
    try:
        wait_for_pause(process, "published _state")
    finally:
        kill(process)
    # The state says day 4 is taken in, the tables do not show it yet: only the journal makes them agree.
    manifest = json.loads((killed_lake / MANIFEST_UNIT / MANIFEST_FILE).read_text())
    assert any(name.endswith("2018-11-04-events.json") for name in manifest["trees"]["log_data"]["files"])
    assert {name: sorted(map(tuple, published(spark, killed_lake, name).collect())) for name in etl.TABLES} == before
    assert (killed_lake / STAGING_DIR).exists()

    report = run_daily(run_etl, root, killed_lake)  # recovery finishes the publish; then nothing is new
    assert report["phases_s"].keys() == {"list input"}
    assert not (killed_lake / STAGING_DIR).exists()
    assert_full_build(spark, killed_lake, root)


# --------------------------------------------------------------------------- five days in a row

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Seven days of generated input: songs are taken in over the days, as the catalogue grows."""
    source = tmp_path_factory.mktemp("generated") / "all"
    subprocess.run([sys.executable, GENERATOR, str(source), "--songs", "400", "--events", "4000", "--days", "7",
                    "--seed", "19"], check=True, capture_output=True)
    return source


def test_five_daily_runs_in_a_row_equal_full_builds(spark, run_etl, generated, tmp_path):
    root, out = tmp_path / "input", tmp_path / "lake"
    songs = sorted(generated.glob("song_data/**/*.json"))
    days = sorted(generated.glob("log_data/**/*.json"))
    shares = [len(songs) * (70 + 6 * day) // 100 for day in range(6)]

    def arrive(day):
        """Days up to day (2 for the first run) and a growing share of the song files."""
        for path in songs[:shares[day - 2]] + days[:day]:
            target = root / path.relative_to(generated)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    arrive(2)
    assert run_daily(run_etl, root, out)["intake"]["mode"] == "full"
    for day in range(3, 8):
        arrive(day)
        report = run_daily(run_etl, root, out)
        assert report["intake"]["mode"] == "incremental"
        assert report["input"]["log_files"] == 1
        assert report["input"]["song_files"] == shares[day - 2] - shares[day - 3]
        assert_full_build(spark, out, root)


# --------------------------------------------------------------------------- S3, under python etl.py and spark-submit

HELD_BACK_SONGS = 5  # of the sample's song files, delivered with its last day


@pytest.fixture(scope="module")
def s3_daily(s3_endpoint):
    """The sample in a bucket without its last day and a few song files; put(bucket) delivers them."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="setup", aws_secret_access_key="setup")
    songs = sorted(SAMPLE.glob("song_data/**/*.json"))
    days = sorted(SAMPLE.glob("log_data/**/*.json"))
    later = set(songs[-HELD_BACK_SONGS:] + days[-1:])

    def put(bucket, paths):
        for path in paths:
            client.upload_file(str(path), bucket, path.relative_to(SAMPLE).as_posix())

    for bucket in ("daily-python", "daily-submit", "daily-lake"):
        client.create_bucket(Bucket=bucket)
        if bucket != "daily-lake":
            put(bucket, [path for path in songs + days if path not in later])
    return client, lambda bucket: put(bucket, sorted(later))


def assert_s3_daily_run(spark, client, deliver, bucket, run, tmp_path):
    """A full build on S3, the last day and a few songs delivered, a daily run: the tables equal a full build
    of the whole sample."""
    lake = f"s3://daily-lake/{bucket}"
    first = run("--input", f"s3://{bucket}", "--output", lake)
    assert first.returncode == 0, first.stderr[-3000:]
    deliver(bucket)
    daily = run("--input", f"s3://{bucket}", "--output", lake)
    assert daily.returncode == 0, daily.stderr[-3000:]
    local = download(client, "daily-lake", f"{bucket}/", tmp_path / "lake")
    report = report_of(local)
    assert report["intake"]["mode"] == "incremental"
    assert report["intake"]["files"]["log_data"]["added"] == 1
    assert report["input"] == {"song_files": HELD_BACK_SONGS, "song_records": HELD_BACK_SONGS, "log_files": 1,
                               "log_events": report["input"]["log_events"]}
    assert_full_build(spark, local, SAMPLE)
    return report


def test_a_daily_run_on_s3_under_python_etl_py(spark, run_etl, s3_endpoint, s3_daily, tmp_path):
    client, deliver = s3_daily
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    report = assert_s3_daily_run(spark, client, deliver, "daily-python",
                                 lambda *args: run_etl(*args, env=env), tmp_path)
    assert report["intake"]["state_files_fetched"] > 0  # Spark here reads the state from a local copy


def test_a_daily_run_on_s3_under_spark_submit(spark, empty_config, s3_endpoint, s3_daily, tmp_path):
    client, deliver = s3_daily
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}

    def run(*args):
        result = spark_submit("--jars", ",".join(s3_jars()), *py_files(), etl.__file__, "--config", empty_config,
                              *args, env=env)
        result.stderr = result.output
        return result

    report = assert_s3_daily_run(spark, client, deliver, "daily-submit", run, tmp_path)
    assert "state_files_fetched" not in report["intake"]  # Spark reads the state through S3A
