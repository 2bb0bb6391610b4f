"""Nothing lost, nothing wrong: the run report, kept rejects, the quality gate."""
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual

import etl
from conftest import ROOT, SAMPLE, glue_two_new_plays, read_tables
from lake.report import REPORT_NAME, RUNS_DIR
from lake.stores import LocalStore

CHECK_NAMES = {
    "song_id is present in song records", "ts is present in events", "page is present in events",
    "userId is present in NextSong events", "song is present in NextSong events",
    *[f"{name} is not empty" for name in etl.TABLES],
    "songs has one row per accepted song_id", "artists has one row per artist_id of an accepted song",
    "users has one row per known user in the events", "time has one row per ts of a NextSong event of a known user",
    "songplays has one row per NextSong event of a known user",
    *[f"{name} rows did not fall" for name in etl.TABLES], "match rate did not fall",
    "song_data rejected share did not rise", "log_data rejected share did not rise",
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


# (line as planted, reason, line as kept: verbatim, whatever the reason)
PLANTED_EVENTS = [
    ("{not json", etl.REASON_MALFORMED, None),
    ('{"ts": 1541105830796, "userId": "39", "page": "NextSong"', etl.REASON_MALFORMED, None),
    ('{"userId": "39", "page": "NextSong", "sessionId": 1, "itemInSession": 0}', etl.REASON_BAD_TS, None),
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


# --------------------------------------------------------------------------- rejects, byte for byte

REJECTS = "source_file string, reason string, line string"
PLANTED_LINES = [  # (bytes as they arrive, reason), one of each kind, unknown fields and odd spacing included
    (b'{"ts":1541105830796,"userId":"39","page":"NextSong"', etl.REASON_MALFORMED),
    (b'{ "userId" : "39",  "page":"NextSong", "appVersion": "2.1" }', etl.REASON_BAD_TS),
    (b'{"ts": 1541105830796, "sessionId": "abc", "page": "Home", "experiment": {"arm": 2}}', etl.REASON_BAD_TYPE),
    ('{"artist": "Beyoncé", "page": "NextSong"}  '.encode(), etl.REASON_BAD_TS),
    (b'{"ts": 1541105830796, "artist": "Beyonc\xe9", "userId": "39"}', etl.REASON_NOT_UTF8),
]


def kept_as(line):
    """What the rejects hold for a line: its text, or the base64 of its bytes if it is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(line).decode("ascii")


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_both_readers_keep_a_rejected_line_as_it_arrived(spark, tmp_path):
    day = tmp_path / "log_data" / "day.json"
    day.parent.mkdir()
    good = b'{"ts": 1541105830796, "userId": "39", "page": "NextSong"}'
    # CRLF and LF line ends, a blank line, no newline at the end.
    day.write_bytes(good + b"\r\n" + b"\r\n".join(line for line, _ in PLANTED_LINES[:2]) + b"\n\n"
                    + b"\n".join(line for line, _ in PLANTED_LINES[2:]))
    expected = spark.createDataFrame([(f"file:{day}", reason, kept_as(line)) for line, reason in PLANTED_LINES],
                                     REJECTS)
    for small_files in (False, True):  # the line reader (local event logs, EMR), the whole-file reader (the rest)
        raw = etl.read_json(spark, str(tmp_path / "log_data"), etl.LOG_SCHEMA, small_files=small_files)
        assertDataFrameEqual(etl.split_events(raw)[1], expected)


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_unknown_fields_are_counted_per_field(spark, tmp_path):
    day = tmp_path / "log_data" / "day.json"
    day.parent.mkdir()
    day.write_text("\n".join([
        '{"ts": 1, "page": "Home", "user_id": "39", "appVersion": "2"}',
        '{"ts": 2, "page": "Home", "user_id": "40"}',
        '{"page": "Home", "user_id": "41"}',  # rejected (no ts), still counted: it is what arrived
        '{"ts": 3, "user_id": ',  # not JSON: its fields are unknown
    ]))
    raw = etl.read_json(spark, str(tmp_path / "log_data"), etl.LOG_SCHEMA)
    assert etl.profile_read(raw, etl.LOG_DATA)["unknown_fields"] == {"appVersion": 1, "user_id": 3}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_required_fields_are_counted_where_they_are_expected(spark, tmp_path):
    day = tmp_path / "log_data" / "day.json"
    day.parent.mkdir()
    day.write_text("\n".join([
        '{"ts": 1, "page": "Home", "userId": ""}',  # a visitor: no userId, no song, as on every non-NextSong page
        '{"ts": 2, "page": "NextSong", "userId": "39", "song": "A"}',
        '{"ts": 3, "page": "NextSong", "userId": " ", "song": ""}',
        '{"ts": 4, "page": "NextSong", "song": "B"}',
        '{"page": "NextSong", "userId": "39", "song": "C"}',
        '{"ts": ',  # not a JSON object: expected to carry nothing
    ]))
    raw = etl.read_json(spark, str(tmp_path / "log_data"), etl.LOG_SCHEMA)
    assert etl.profile_read(raw, etl.LOG_DATA)["required"] == {
        "ts": {"expected": 5, "missing": 1}, "page": {"expected": 5, "missing": 0},
        "userId": {"expected": 4, "missing": 2}, "song": {"expected": 4, "missing": 1}}


# --------------------------------------------------------------------------- the checks, one rule each

def profile(required, records=100, rejected=0):
    fields = {field for fields in etl.REQUIRED_FIELDS.values() for field, _ in fields}
    counts = {field: {"expected": records, "missing": 0} for field in fields}
    counts.update(required)
    return {tree: {"records": records, "rejected": rejected, "json_objects": records, "unknown_fields": {},
                   "required": {field: counts[field] for field, _ in fields}}
            for tree, fields in etl.REQUIRED_FIELDS.items()}


def failed_names(checks):
    return {check.name for check in checks if not check.passed}


@pytest.mark.parametrize("field, where", [("song_id", "song records"), ("ts", "events"), ("page", "events"),
                                          ("userId", "NextSong events"), ("song", "NextSong events")])
@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_required_field_missing_in_an_unusual_share_fails(field, where):
    quality = etl.QualitySettings(max_missing_share=0.1)
    usual = etl.required_field_checks(profile({field: {"expected": 1000, "missing": 100}}), quality)
    assert failed_names(usual) == set()
    unusual = etl.required_field_checks(profile({field: {"expected": 1000, "missing": 101}}), quality)
    assert failed_names(unusual) == {f"{field} is present in {where}"}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_handful_of_lines_without_a_required_field_never_fails():
    few = profile({"song_id": {"expected": 72, "missing": etl.MIN_MISSING_LINES - 1}})
    assert failed_names(etl.required_field_checks(few, etl.QualitySettings())) == set()


# One row of each table broken after it was built, as a defect between reading and writing would: the
# read says how many rows each table must have.
BREAKS = {
    "songs": lambda table: table.filter("song_id != 'S2'"),
    "artists": lambda table: table.unionByName(table),
    "users": lambda table: table.filter("user_id != 11"),
    "time": lambda table: table.limit(1),
    "songplays": lambda table: table.unionByName(table.limit(1)),
}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
@pytest.mark.parametrize("name", etl.TABLES)
def test_a_table_that_does_not_reconcile_with_what_was_read_fails(song_records, event_records, name):
    from test_build import ms, play, song

    songs = song_records(song(), song(song_id="S2", artist_id="A2", title="Two"))
    events = event_records(play(), play(userId="11", itemInSession=1, ts=ms(2018, 11, 1, 11)))
    tables = etl.build_tables(songs, events)
    assert failed_names(etl.table_checks(etl.measure(tables, songs, events))) == set()
    broken = {**tables, name: BREAKS[name](tables[name])}
    assert failed_names(etl.table_checks(etl.measure(broken, songs, events))) == \
        {f"{name} has one row per {etl.READ_ROWS[name]}"}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_an_empty_table_fails(song_records, event_records):
    from test_build import play, song

    songs, events = song_records(song()), event_records(play(page="Home"))  # no plays: no songplays, no time
    checks = etl.table_checks(etl.measure(etl.build_tables(songs, events), songs, events))
    assert failed_names(checks) == {"songplays is not empty", "time is not empty"}


def figures(rows=1000, matched=200, rejected_share=0.0):
    return {"rows": {name: rows for name in etl.TABLES}, "matched_songplays": matched,
            "match_rate": matched / rows if rows else None,
            "rejected_share": {etl.SONG_DATA: 0.0, etl.LOG_DATA: rejected_share}}


def previous_run(**changes):
    return {"run_id": "20181101T000000Z-0000aaaa", "status": "succeeded", "quality": {"figures": figures(**changes)}}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_table_losing_more_rows_than_allowed_fails():
    quality = etl.QualitySettings(max_rows_fall=0.1)
    assert failed_names(etl.drift_checks(figures(rows=900), previous_run(rows=1000), quality)) == set()
    lost = etl.drift_checks(figures(rows=899, matched=180), previous_run(rows=1000, matched=200), quality)
    assert failed_names(lost) == {f"{name} rows did not fall" for name in etl.TABLES}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_match_rate_falling_more_than_allowed_fails():
    quality = etl.QualitySettings(max_match_rate_fall=0.25)
    assert failed_names(etl.drift_checks(figures(matched=150), previous_run(matched=200), quality)) == set()
    assert failed_names(etl.drift_checks(figures(matched=149), previous_run(matched=200), quality)) == \
        {"match rate did not fall"}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_match_rate_of_a_few_plays_is_not_compared():
    few = etl.MIN_MATCHED_TO_COMPARE - 1
    assert failed_names(etl.drift_checks(figures(matched=0), previous_run(matched=few), etl.QualitySettings())) == set()


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_rejected_share_rising_more_than_allowed_fails():
    quality = etl.QualitySettings(max_rejected_share_rise=0.01)
    assert failed_names(etl.drift_checks(figures(rejected_share=0.015), previous_run(rejected_share=0.005),
                                         quality)) == set()
    assert failed_names(etl.drift_checks(figures(rejected_share=0.0151), previous_run(rejected_share=0.005),
                                         quality)) == {"log_data rejected share did not rise"}


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_without_an_earlier_run_drift_passes_and_says_so():
    checks = etl.drift_checks(figures(rows=0, matched=0), None, etl.QualitySettings())
    assert failed_names(checks) == set() and all(check.previous is None for check in checks)


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_an_earlier_report_without_the_gates_figures_still_gives_rows_and_rejected_shares():
    old = {"run_id": "r", "status": "succeeded", "tables": {name: {"rows": 1000} for name in etl.TABLES},
           "input": {"song_records": 100, "log_events": 1000}, "rejected": {"song_data": 0, "log_data": 10}}
    checks = {check.name: check for check in etl.drift_checks(figures(rows=10), old, etl.QualitySettings())}
    assert checks["songs rows did not fall"].previous == 1000 and not checks["songs rows did not fall"].passed
    assert checks["log_data rejected share did not rise"].previous == 0.01
    assert checks["match rate did not fall"].passed and checks["match rate did not fall"].previous is None


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_the_baseline_is_the_newest_run_that_succeeded(tmp_path):
    store = LocalStore()
    for run_id, status in [("20181101T000000Z-a", "succeeded"), ("20181102T000000Z-b", "succeeded"),
                           ("20181103T000000Z-c", "failed"), ("20181104T000000Z-d", "interrupted")]:
        store.write_json(str(tmp_path / RUNS_DIR / f"{run_id}.json"), {"run_id": run_id, "status": status})
    assert etl.last_successful_run(store, str(tmp_path))["run_id"] == "20181102T000000Z-b"
    assert etl.last_successful_run(store, str(tmp_path / "elsewhere")) is None


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_thresholds_come_from_the_quality_section(tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[QUALITY]\nMAX_ROWS_FALL = 0.2\nMAX_MISSING_SHARE =\n")
    settings = etl.resolve_settings(etl.parse_args(["--config", str(config)]), {})
    assert settings.quality == etl.QualitySettings(max_rows_fall=0.2)


@pytest.mark.check  # `make check`: a rule of the gate or of the rejects
def test_a_threshold_that_is_not_a_share_is_one_line(run_etl, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[QUALITY]\nMAX_ROWS_FALL = 10%\n")
    result = run_etl("--output", tmp_path / "out", config=config)
    assert result.returncode == 2 and result.stderr.strip() == \
        f"error: MAX_ROWS_FALL in [QUALITY] of {config} must be a share between 0 and 1, such as 0.05"


# --------------------------------------------------------------------------- bad deliveries, on generated data

GENERATOR = ROOT / "tools" / "generate_data.py"
# Yesterday's lake holds the first eight of twelve generated days; today's delivery has all twelve, its
# newest third being the four days yesterday did not have.
DAYS, YESTERDAYS_DAYS = 12, 8
GENERATED = ["--songs", "300", "--events", "4000", "--days", str(DAYS), "--seed", "18"]


def day_files(root):
    return sorted((Path(root) / etl.LOG_DATA).rglob("*.json"))


@pytest.fixture(scope="module")
def delivery(tmp_path_factory):
    """Twelve days of generated events and 300 song files."""
    root = tmp_path_factory.mktemp("delivery") / "input"
    subprocess.run([sys.executable, str(GENERATOR), str(root), *GENERATED], check=True, capture_output=True)
    assert len(day_files(root)) == DAYS
    return root


@pytest.fixture(scope="module")
def yesterday(delivery, run_etl, tmp_path_factory):
    """The lake a successful run left from the first eight days: copied by each test, never changed."""
    base = tmp_path_factory.mktemp("yesterday")
    shutil.copytree(delivery, base / "input")
    for day in day_files(base / "input")[YESTERDAYS_DAYS:]:
        day.unlink()
    result = run_etl("--input", base / "input", "--output", base / "lake")
    assert result.returncode == 0, result.stderr
    return base / "lake"


def todays_run(run_etl, delivery, yesterday, tmp_path, change=lambda root: None):
    """Today's delivery, changed by change(input root), run into a copy of yesterday's lake."""
    lake, root = tmp_path / "lake", tmp_path / "input"
    shutil.copytree(yesterday, lake)
    shutil.copytree(delivery, root)
    change(root)
    return lake, run_etl("--input", root, "--output", lake)


def newest_third(root):
    return day_files(root)[DAYS - DAYS // 3:]


def assert_refused_keeping_yesterdays_tables(lake, result, yesterday, check):
    assert result.returncode == 1, result.stderr
    assert _fingerprint(lake) == _fingerprint(yesterday)
    report = report_of(lake)
    assert report["status"] == "failed" and report["quality"]["previous_run"] == report_of(yesterday)["run_id"]
    assert report["published"] == []  # the rejects too are kept aside (held_rejects)
    assert result.stderr.strip().splitlines()[-1].startswith(f'error: the quality gate failed: "{check}": ')
    return report


def test_userId_renamed_in_the_newest_third_fails_and_keeps_yesterdays_tables(run_etl, delivery, yesterday,
                                                                                tmp_path):
    def rename(root):
        for day in newest_third(root):
            day.write_text(day.read_text().replace('"userId":', '"user_id":'))

    lake, result = todays_run(run_etl, delivery, yesterday, tmp_path, rename)
    report = assert_refused_keeping_yesterdays_tables(lake, result, yesterday, "userId is present in NextSong events")
    renamed = sum(len(day.read_text().splitlines()) for day in newest_third(delivery))
    assert report["quality"]["read"][etl.LOG_DATA]["unknown_fields"] == {"user_id": renamed}


def test_song_emptied_in_the_newest_third_fails_and_keeps_yesterdays_tables(run_etl, delivery, yesterday, tmp_path):
    def empty(root):
        for day in newest_third(root):
            day.write_text(re.sub(r'"song":"(?:[^"\\]|\\.)*"', '"song":""', day.read_text()))

    lake, result = todays_run(run_etl, delivery, yesterday, tmp_path, empty)
    report = assert_refused_keeping_yesterdays_tables(lake, result, yesterday, "song is present in NextSong events")
    assert "match rate did not fall" in {check["name"] for check in report["checks"] if not check["passed"]}


def test_half_the_song_files_missing_fails_and_keeps_yesterdays_tables(run_etl, delivery, yesterday, tmp_path):
    def lose_half(root):
        for path in sorted((root / etl.SONG_DATA).rglob("*.json"))[::2]:
            path.unlink()

    lake, result = todays_run(run_etl, delivery, yesterday, tmp_path, lose_half)
    report = assert_refused_keeping_yesterdays_tables(lake, result, yesterday, "songs rows did not fall")
    assert {"artists rows did not fall", "match rate did not fall"} <= \
        {check["name"] for check in report["checks"] if not check["passed"]}


def test_a_healthy_delivery_of_a_few_more_days_passes(run_etl, delivery, yesterday, tmp_path):
    lake, result = todays_run(run_etl, delivery, yesterday, tmp_path)
    assert result.returncode == 0, result.stderr
    report, before = report_of(lake), report_of(yesterday)
    assert report["status"] == "succeeded" and report["quality"]["previous_run"] == before["run_id"]
    drift = [check for check in report["checks"] if "did not" in check["name"]]
    assert len(drift) == len(etl.TABLES) + 3 and all(check["previous"] is not None for check in drift)
    assert report["tables"]["songplays"]["rows"] > before["tables"]["songplays"]["rows"]


PLANTED_SONG_LINE = (b'{"num_songs": 1, "artist_id": "ARX", "title": "No id", "duration": 1.0, "label": "Indie"}',
                etl.REASON_NO_SONG_ID)


def test_a_rejected_line_of_each_kind_is_kept_byte_for_byte(run_etl, delivery, tmp_path):
    root = tmp_path / "input"
    shutil.copytree(delivery, root)
    day = day_files(root)[-1]
    # Generated files end without a newline; one planted line ends with CRLF, as files from Windows do.
    day.write_bytes(day.read_bytes() + b"\n" + b"\n".join(line for line, _ in PLANTED_LINES[:2]) + b"\r\n"
                    + b"\n".join(line for line, _ in PLANTED_LINES[2:]) + b"\n")
    song = next((root / etl.SONG_DATA).rglob("*.json")).parent / "TRPLANTED.json"
    song.write_bytes(PLANTED_SONG_LINE[0])
    out = tmp_path / "output"
    result = run_etl("--input", root, "--output", out)
    assert result.returncode == 0, result.stderr

    kept = {}
    for part in (out / etl.REJECTED_DIR).rglob("part-*"):
        for text in part.read_text(encoding="utf-8").splitlines():
            reject = json.loads(text)
            line = reject["line"]
            kept[base64.b64decode(line) if reject["reason"] == etl.REASON_NOT_UTF8 else line.encode("utf-8")] = \
                (reject["reason"], reject["source_file"])
    assert kept == {**{line: (reason, f"file:{day}") for line, reason in PLANTED_LINES},
                    PLANTED_SONG_LINE[0]: (PLANTED_SONG_LINE[1], f"file:{song}")}


def test_two_events_glued_on_one_line_are_one_reject_and_neither_loads(spark, run_etl, sample_output, tmp_path):
    root = tmp_path / "input"
    shutil.copytree(SAMPLE, root)
    day = glue_two_new_plays(root)
    out = tmp_path / "output"
    result = run_etl("--input", root, "--output", out)
    assert result.returncode == 0, result.stderr

    for name, table in read_tables(spark, out).items():
        assertDataFrameEqual(table, read_tables(spark, sample_output)[name])
    assert report_of(out)["rejected"]["log_data"] == 1
    kept = [json.loads(text) for part in (out / etl.REJECTED_DIR / etl.LOG_DATA).rglob("part-*")
            for text in part.read_text(encoding="utf-8").splitlines()]
    assert kept == [{"source_file": f"file:{day}", "reason": etl.REASON_MALFORMED,
                     "line": day.read_bytes().rstrip(b"\n").decode("utf-8")}]
