"""The whole job through its command line, on the bundled sample."""
import json
import re
import shutil
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual

import etl
from conftest import SAMPLE, read_tables
from lake.report import REPORT_NAME
from lake.stores import LocalStore, Unit

FIGURES = {"songs": 71, "artists": 69, "users": 97, "songplays": 6820, "time": 6813}


def assert_same_tables(spark, actual_root, expected_root):
    actual, expected = read_tables(spark, actual_root), read_tables(spark, expected_root)
    for name in etl.TABLES:
        assertDataFrameEqual(actual[name], expected[name])


def test_sample_gives_the_contract_figures(spark, sample_output):
    tables = read_tables(spark, sample_output)
    assert {name: frame.count() for name, frame in tables.items()} == FIGURES
    assert tables["songplays"].filter("song_id is not null and artist_id is not null").count() == 1


def test_tables_have_the_contract_columns(spark, sample_output):
    tables = read_tables(spark, sample_output)
    # Partition columns come back last, as Spark reads them from the folder names.
    expected = {
        "songplays": "songplay_id:string,start_time:timestamp,user_id:bigint,level:string,song_id:string,"
                     "artist_id:string,session_id:bigint,location:string,user_agent:string,year:int,month:int",
        "users": "user_id:bigint,first_name:string,last_name:string,gender:string,level:string",
        "songs": "song_id:string,title:string,duration:double,year:int,artist_id:string",
        "artists": "artist_id:string,name:string,location:string,latitude:double,longitude:double",
        "time": "start_time:timestamp,hour:int,day:int,week:int,weekday:int,year:int,month:int",
    }
    actual = {name: ",".join(f"{f.name}:{f.dataType.simpleString()}" for f in frame.schema)
              for name, frame in tables.items()}
    assert actual == expected


def _folders(path):
    return sorted(p.name for p in Path(path).iterdir() if p.is_dir())


def _data_files(path):
    return sorted(p.name for p in Path(path).iterdir() if p.is_file() and not p.name.startswith((".", "_")))


def test_partition_folders_are_as_specified(sample_output):
    for name in ("songplays", "time"):
        assert _folders(sample_output / name) == ["year=2018"]
        assert _folders(sample_output / name / "year=2018") == ["month=11"]
        assert _data_files(sample_output / name / "year=2018" / "month=11")[0].endswith(".parquet")
    years = _folders(sample_output / "songs")
    assert len(years) == 21 and all(folder.startswith("year=") for folder in years)
    artist_folders = [a for y in years for a in _folders(sample_output / "songs" / y)]
    assert len(artist_folders) == 69  # the sample's distinct (year, artist_id) pairs
    assert all(folder.startswith("artist_id=AR") for folder in artist_folders)
    # Written through our java.nio file system: the permissions Hadoop's chmod would have set.
    some_file = next((sample_output / "songs").rglob("*.parquet"))
    assert (some_file.stat().st_mode & 0o777, some_file.parent.stat().st_mode & 0o777) == (0o644, 0o755)
    for name in ("users", "artists"):
        assert _folders(sample_output / name) == []
        assert all(f.endswith(".parquet") for f in _data_files(sample_output / name))


def test_second_run_replaces_tables_with_identical_rows_and_ids(spark, run_etl, sample_output, tmp_path):
    rerun = tmp_path / "output"
    shutil.copytree(sample_output, rerun)
    result = run_etl("--input", SAMPLE, "--output", rerun)
    assert result.returncode == 0, result.stderr
    assert_same_tables(spark, rerun, sample_output)
    assert len(_data_files(rerun / "users")) == 1  # replaced, not appended to


def test_machine_time_zone_changes_nothing(spark, run_etl, sample_output, tmp_path):
    result = run_etl("--input", SAMPLE, "--output", tmp_path / "tokyo", env={"TZ": "Asia/Tokyo"})
    assert result.returncode == 0, result.stderr
    assert_same_tables(spark, tmp_path / "tokyo", sample_output)


def _write_junk(root):
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00"
    for folder in (root / "song_data", root / "song_data" / "A", root / "log_data"):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00")
    for tree in ("song_data/A/A", "log_data/2018/11"):
        junk = root / "__MACOSX" / tree
        junk.mkdir(parents=True)
        (junk / "._x.json").write_bytes(apple_double)
        inner = root / tree / "__MACOSX"
        inner.mkdir()
        (inner / "._x.json").write_bytes(apple_double)
        (root / tree / "._TRJUNK.json").write_bytes(apple_double)
    (root / "log_data" / "2018" / "11" / "_tmp.json").write_text("{broken")
    (root / "song_data" / "README.txt").write_text("not json, not read")


def test_junk_files_change_nothing(spark, run_etl, sample_output, tmp_path):
    junky = tmp_path / "input"
    shutil.copytree(SAMPLE, junky)
    _write_junk(junky)
    result = run_etl("--input", junky, "--output", tmp_path / "output")
    assert result.returncode == 0, result.stderr
    assert_same_tables(spark, tmp_path / "output", sample_output)
    report = json.loads((tmp_path / "output" / REPORT_NAME).read_text())
    assert report["rejected"]["song_data"] == report["rejected"]["log_data"] == 0
    assert report["input"]["song_files"] == 71 and report["input"]["log_files"] == 30


def test_log_has_one_line_per_phase_with_counts_and_seconds(sample_run):
    _, result = sample_run
    phase_line = re.compile(r" INFO (\S+(?: \S+)?)\s+(\d+\.\d)s  (.*)$")
    phases = {m.group(1): m.group(3) for m in map(phase_line.search, result.stderr.splitlines()) if m}
    expected = ["list input", "start spark", "read song_data", "read log_data", "build tables", "quality gate",
                "write state", "publish"]
    expected += [f"write {name}" for name in etl.TABLES]
    assert sorted(phases) == sorted(expected)
    assert phases["read song_data"] == "71 files, 71 records, 0 rejected"
    # The five tables are built and counted in one Spark job, so they share one line.
    assert phases["build tables"] == "71 songs, 69 artists, 97 users, 6813 time, 6820 songplays"
    assert phases["write songplays"] == "6820 rows"
    assert "INFO Spark set-up: local paths; local files through java.nio (no chmod process per file)" in result.stderr
    # Spark's own INFO chatter stays off the console.
    assert not [line for line in result.stderr.splitlines() if "INFO" in line and not line.startswith("20")]


@pytest.mark.parametrize("spooled", [False, True], ids=["staged", "spooled"])
def test_a_table_write_that_left_no_data_file_stops_the_run_before_its_publish(spark, tmp_path, spooled):
    """A committer can lose a table's files and still succeed: file:// output on a cluster whose machines
    share no disk leaves the driver's folder with _SUCCESS alone. The gate counted rows, so that folder
    must never replace the published table."""
    run_id = "20261129T000000Z-00000000"
    rows = spark.createDataFrame([("SOAAA", "A song")], "song_id string, title string")
    write = etl.Write(Unit(str(tmp_path / "lake"), etl.SONGS), rows)
    folder = Path(write.unit.staged(run_id)) if not spooled else tmp_path / "spool" / "0-songs"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_bytes(b"")

    def check():
        if spooled:
            etl.require_spooled_data(write, str(folder))
        else:
            etl.require_staged_data(LocalStore(), [write], run_id)

    with pytest.raises(etl.EtlError, match="^the write of songs left no data file in staging, though it has rows$"):
        check()
    (folder / "part-00000.parquet").write_bytes(b"PAR1")
    check()  # one data file: the write is whole
