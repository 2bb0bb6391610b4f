"""A daily run equals a full build where the lake's bookkeeping could mislead it: partition values that
differ but name one folder, state the lake lost, a bucket-root output.

Each test makes a tiny lake with etl.py (a full build), changes its input or its state, runs etl.py again,
and compares the published tables, whole, with a full build of the input as it then stands.
"""
import boto3
from pyspark.testing import assertDataFrameEqual

import etl
from lake.intake import compare, state_fault, state_rows
from lake.tables import SPECS
from test_incremental import BLUE, DAY_1, YELLOW, event, published, report_of, run_daily, song, write_log, write_song
from test_s3 import CREDENTIALS, download


def full_build_as_published(spark, root, folder):
    """A full build of the input as it stands, written and read back as the job writes a table: a partition
    value null or "" reads back as null, as from the lake."""
    plan = etl._reading_plan(str(root))
    songs, _ = etl.split_songs(etl.read_input(spark, plan, str(root), etl.SONG_DATA)[0])
    events, _ = etl.split_events(etl.read_input(spark, plan, str(root), etl.LOG_DATA)[0])
    for name, table in etl.build_tables(songs, events).items():
        etl.write_table(table, str(folder / name), SPECS[name].partition_by)
    return folder


def assert_tables_equal(spark, lake, expected):
    for name in etl.TABLES:
        assertDataFrameEqual(published(spark, lake, name), published(spark, expected, name))


def day_one(root):
    """Two songs and a day of plays: the smallest input that makes all five tables."""
    for record in (YELLOW, BLUE):
        write_song(root, record)
    write_log(root, 1, DAY_1)


def a_later_day(root):
    write_log(root, 2, [event(12, 2, 0, "Blue", "Other", 180.0), event(13, 2, 0, "Yellow", "Band", 200.0)])


def s3_client(endpoint, *buckets):
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                          aws_secret_access_key="setup")
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return client


# --------------------------------------------------------------------------- null and "" name one folder

NO_ARTIST = song("SONULL00000000000", "Nobody's", None, "Anon", 100.0, year=1990)
EMPTY_ARTIST = song("SOEMPTY0000000000", "Empty's", "", "Anon", 110.0, year=1990)
LATER_EMPTY_ARTIST = song("SOEMPTY0000000001", "Later", "", "Anon", 120.0, year=1990)


def test_a_daily_run_touching_the_default_partition_through_one_value_keeps_the_other(
        spark, run_etl, tmp_path):
    root, lake = tmp_path / "input", tmp_path / "lake"
    for record in (NO_ARTIST, EMPTY_ARTIST):
        write_song(root, record)
    write_log(root, 1, [event(10, 1, 0, "Nobody's", "Anon", 100.0)])
    assert run_daily(run_etl, root, lake)["intake"]["mode"] == "full"
    write_song(root, LATER_EMPTY_ARTIST)  # year=1990/artist_id="": the folder NO_ARTIST's row is in too
    report = run_daily(run_etl, root, lake)
    assert report["intake"]["mode"] == "incremental"
    assertDataFrameEqual(published(spark, lake, "songs"),
                         published(spark, full_build_as_published(spark, root, tmp_path / "full"), "songs"))


# --------------------------------------------------------------------------- a lake at a bucket's root

def test_a_lake_at_a_bucket_root_runs_daily_and_equals_a_full_build(spark, run_etl, s3_endpoint, tmp_path):
    client = s3_client(s3_endpoint, "root-lake")
    root, env = tmp_path / "input", {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    day_one(root)
    assert run_etl("--input", root, "--output", "s3://root-lake", env=env).returncode == 0
    a_later_day(root)
    result = run_etl("--input", root, "--output", "s3://root-lake/", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lake = download(client, "root-lake", "", tmp_path / "lake")
    assert report_of(lake)["intake"]["mode"] == "incremental", report_of(lake)["intake"]["why_full"]
    assert_tables_equal(spark, lake, full_build_as_published(spark, root, tmp_path / "full"))


# --------------------------------------------------------------------------- state the lake lost

def test_each_state_folder_holds_the_rows_its_manifest_says_and_one_that_does_not_is_named():
    manifest = {"trees": {etl.LOG_DATA: {"segments": ["r1", "r2"],
                                         "files": {"a": "etag r1 3", "b": "etag r2 2", "c": "etag r2 1"}}}}
    expected = state_rows({etl.LOG_DATA: compare(etl.LOG_DATA, [], manifest, "r3")}, {"songplays": 5, "users": 2})
    assert expected == {"_state/log_data/r1": 3, "_state/log_data/r2": 3, "_state/plays": 5, "_state/users": 2}
    assert state_fault(expected, dict(expected)) is None
    assert state_fault(expected, {**expected, "_state/log_data/r2": 0}).startswith(
        "the lake's state does not match its manifest: _state/log_data/r2 holds 0 rows, the manifest says 3;")


def assert_announced_full_build(spark, result, lake, root, tmp_path):
    """The run built in full, and said why in its log and its report; its tables are a full build's."""
    assert result.returncode == 0, result.stderr[-3000:]
    why = report_of(lake)["intake"]
    assert why["mode"] == "full" and why["why_full"].startswith("the lake's state does not match its manifest: ")
    assert f"full build instead: {why['why_full']}" in result.stderr
    assert_tables_equal(spark, lake, full_build_as_published(spark, root, tmp_path / "full"))


def test_a_state_segment_missing_on_s3_makes_the_next_run_an_announced_full_build(spark, run_etl, s3_endpoint,
                                                                                  tmp_path):
    client = s3_client(s3_endpoint, "state-lake")
    root, env = tmp_path / "input", {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    day_one(root)
    assert run_etl("--input", root, "--output", "s3://state-lake/lake", env=env).returncode == 0
    segment = "lake/_state/log_data/"  # day one's events, as a lifecycle rule would expire them
    lost = [item["Key"] for item in client.list_objects_v2(Bucket="state-lake", Prefix=segment)["Contents"]]
    client.delete_objects(Bucket="state-lake", Delete={"Objects": [{"Key": key} for key in lost]})
    a_later_day(root)
    result = run_etl("--input", root, "--output", "s3://state-lake/lake", env=env)
    assert_announced_full_build(spark, result, download(client, "state-lake", "lake/", tmp_path / "lake"), root,
                                tmp_path)


def test_a_state_file_missing_locally_makes_the_next_run_an_announced_full_build(spark, run_etl, tmp_path):
    root, lake = tmp_path / "input", tmp_path / "lake"
    day_one(root)
    assert run_daily(run_etl, root, lake)["intake"]["mode"] == "full"
    biggest = max((lake / "_state" / "plays").rglob("part-*"), key=lambda path: path.stat().st_size)
    biggest.unlink()  # a clean-up by hand
    a_later_day(root)
    result = run_etl("--input", root, "--output", lake)
    assert_announced_full_build(spark, result, lake, root, tmp_path)


# --------------------------------------------------------------------------- the rejects of a failed run

BAD_LINES = ['{"ts": "not a number", "page": "NextSong"', "not json at all"]


def rejects_in(spark, folder):
    return {(row["source_file"], row["line"]) for row in spark.read.json(str(folder)).collect()}


def test_a_run_whose_gate_failed_leaves_the_rejects_tree_as_the_lakes_intake(spark, run_etl, tmp_path):
    root, lake = tmp_path / "input", tmp_path / "lake"
    day_one(root)
    day_one_log = root / "log_data" / "2018" / "11" / "2018-11-01-events.json"
    day_one_log.write_text(day_one_log.read_text() + "\n" + BAD_LINES[1])
    assert run_daily(run_etl, root, lake)["intake"]["mode"] == "full"
    # Two of three lines rejected: the rejected share rises far past the gate's limit.
    day_two_log = write_log(root, 2, [event(12, 2, 0, "Blue", "Other", 180.0)])
    day_two_log.write_text(day_two_log.read_text() + "\n" + "\n".join(BAD_LINES))
    result = run_etl("--input", root, "--output", lake)
    assert result.returncode == 1 and "the quality gate failed" in result.stderr.splitlines()[-1]
    # The tree is what a full build of what the lake took in (day one) writes; day two's are kept aside.
    assert rejects_in(spark, lake / etl.REJECTED_DIR / etl.LOG_DATA) == {(f"file:{day_one_log}", BAD_LINES[1])}
    report = report_of(lake)
    assert report["published"] == []
    assert rejects_in(spark, report["rejected"]["path"] + "/" + etl.LOG_DATA) == \
        {(f"file:{day_two_log}", line) for line in BAD_LINES}
