"""Nothing lost, nothing wrong: the run report, kept rejects, the quality gate."""
import hashlib
import json
import shutil
from pathlib import Path

from pyspark.testing import assertDataFrameEqual

import etl
from conftest import SAMPLE, read_tables
from lake.report import REPORT_NAME

CHECK_NAMES = {
    "songs is not empty", "artists is not empty", "users is not empty", "time is not empty",
    "songplays is not empty", "songs.song_id is unique and not null", "artists.artist_id is unique and not null",
    "users.user_id is unique and not null", "time.start_time is unique and not null",
    "songplays.songplay_id is unique and not null", "songplays.user_id is in users",
    "songplays.song_id is in songs", "songplays.artist_id is in artists", "songplays.start_time is in time",
    "songplays reconcile with NextSong events",
}


def report_of(output):
    return json.loads((Path(output) / REPORT_NAME).read_text())


def test_report_of_a_good_run(sample_output):
    report = report_of(sample_output)
    assert report["status"] == "succeeded" and report["catalog"] == {"status": "off"}
    assert report["input"] == {"song_files": 71, "song_records": 71, "log_files": 30, "log_events": 8056}
    assert report["rejected"] == {"song_data": 0, "log_data": 0, "path": str(sample_output / etl.REJECTED_DIR)}
    assert report["tables"] == {"songs": {"rows": 71}, "artists": {"rows": 69}, "users": {"rows": 97},
                                "songplays": {"rows": 6820}, "time": {"rows": 6813}}
    assert {check["name"] for check in report["checks"]} == CHECK_NAMES
    assert all(check["passed"] and check["detail"] for check in report["checks"])
    assert report["spark_version"].startswith("3.5.") and report["job_version"] == etl.JOB_VERSION
    assert report["started_at"].endswith("+00:00") and report["duration_s"] > 0


# (line as planted, reason, line as kept: verbatim unless it parsed, when its parsed form is kept)
PLANTED_EVENTS = [
    ("{not json", etl.REASON_MALFORMED, None),
    ('{"ts": 1541105830796, "userId": "39", "page": "NextSong"', etl.REASON_MALFORMED, None),
    ('{"userId": "39", "page": "NextSong", "sessionId": 1, "itemInSession": 0}', etl.REASON_BAD_TS,
     '{"itemInSession":0,"page":"NextSong","sessionId":1,"userId":"39"}'),
    ('{"ts": "1541105830796", "userId": "39", "page": "NextSong"}', etl.REASON_BAD_TS, None),
    ('{"ts": 1541105830796.5, "userId": "39", "page": "NextSong"}', etl.REASON_BAD_TS, None),
]
PLANTED_SONG = '{"num_songs": 1, "artist_id": "ARX", "title": "No id", "duration": 1.0, "year": 0}'


def test_planted_bad_lines_are_counted_and_kept_exactly(spark, run_etl, sample_output, tmp_path):
    root = tmp_path / "input"
    shutil.copytree(SAMPLE, root)
    day = root / "log_data" / "2018" / "11" / "2018-11-05-events.json"
    planted = "\n".join(line for line, _, _ in PLANTED_EVENTS)
    day.write_text(day.read_text().rstrip("\n") + "\n\n   \n" + planted + "\n")
    bad_song = root / "song_data" / "A" / "A" / "A" / "TRBADSONG.json"
    bad_song.write_text(PLANTED_SONG + "\n")
    out = tmp_path / "output"
    result = run_etl("--input", root, "--output", out)
    assert result.returncode == 0, result.stderr

    report = report_of(out)
    assert (report["rejected"]["song_data"], report["rejected"]["log_data"]) == (1, len(PLANTED_EVENTS))
    assert report["input"]["log_events"] == 8056 + len(PLANTED_EVENTS)  # blank lines are not records
    kept = spark.read.json(report["rejected"]["path"] + "/log_data").select("line", "reason", "source_file")
    expected = spark.createDataFrame([(kept_as or line, reason, f"file:{day}")
                                      for line, reason, kept_as in PLANTED_EVENTS],
                                     "line string, reason string, source_file string")
    assertDataFrameEqual(kept, expected)
    kept_songs = spark.read.json(report["rejected"]["path"] + "/song_data").select("reason", "source_file")
    assertDataFrameEqual(kept_songs, spark.createDataFrame([(etl.REASON_NO_SONG_ID, f"file:{bad_song}")],
                                                           "reason string, source_file string"))
    # Rejects never reach a table: the tables are those of the clean sample.
    for name, table in read_tables(spark, out).items():
        assertDataFrameEqual(table, read_tables(spark, sample_output)[name])


def _fingerprint(root):
    """Every file of every table folder, by content."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for name in etl.TABLES for path in sorted((Path(root) / name).rglob("*")) if path.is_file()}


def test_poisoned_delivery_fails_the_gate_and_keeps_yesterdays_tables(run_etl, sample_output, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(sample_output, out)
    before = _fingerprint(out)
    poisoned = tmp_path / "input"
    shutil.copytree(SAMPLE, poisoned)
    for day in (poisoned / "log_data").rglob("*.json"):
        day.write_text("".join(line[:-20] + "\n" for line in day.read_text().splitlines()))

    result = run_etl("--input", poisoned, "--output", out)
    assert result.returncode == 1
    assert _fingerprint(out) == before
    report = report_of(out)
    assert report["status"] == "failed" and report["catalog"] == {}  # nothing published, nothing registered
    assert report["rejected"]["log_data"] == 8056
    failed = {check["name"] for check in report["checks"] if not check["passed"]}
    assert {"users is not empty", "songplays is not empty", "time is not empty"} <= failed
    error_lines = [line for line in result.stderr.splitlines() if "check failed:" in line]
    assert len(error_lines) == len(failed)
