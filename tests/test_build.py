"""Each build_* function on small hand-written rows, one contract rule per test."""
from datetime import datetime, timezone

import pytest
from pyspark.testing import assertDataFrameEqual

import etl

pytestmark = pytest.mark.check  # `make check`: the builders' rules

USERS_SCHEMA = "user_id long, first_name string, last_name string, gender string, level string"
SONGS_SCHEMA = "song_id string, title string, artist_id string, year int, duration double"
ARTISTS_SCHEMA = "artist_id string, name string, location string, latitude double, longitude double"
SONGPLAYS_SCHEMA = (
    "songplay_id string, start_time timestamp, user_id long, level string, song_id string, artist_id string, "
    "session_id long, location string, user_agent string, year int, month int"
)
TIME_SCHEMA = "start_time timestamp, hour int, day int, week int, month int, year int, weekday int"
REJECTS_SCHEMA = "source_file string, reason string, line string"


def ms(*parts):
    """Epoch milliseconds of a UTC wall-clock time."""
    return int(datetime(*parts, tzinfo=timezone.utc).timestamp() * 1000)


def utc(*parts):
    # Collected timestamps come back as naive wall-clock values in the (UTC) test zone.
    return datetime(*parts)


SONG = {"song_id": "S1", "title": "Ten Tonne", "artist_id": "A1", "artist_name": "Chase & Status",
        "duration": 337.68444, "year": 2005, "artist_location": "London", "artist_latitude": 51.5,
        "artist_longitude": -0.1}
PLAY = {"page": "NextSong", "userId": "10", "firstName": "Ann", "lastName": "Lee", "gender": "F", "level": "free",
        "sessionId": 7, "itemInSession": 0, "ts": ms(2018, 11, 1, 10, 0, 0), "song": "Ten Tonne",
        "artist": "Chase & Status", "length": 337.68444, "location": "Here", "userAgent": "Agent"}


def play(**changes):
    return {**PLAY, **changes}


def song(**changes):
    return {**SONG, **changes}


def songplays_of(events, songs):
    song_table = etl.build_songs(songs)
    return etl.build_songplays(events, song_table, etl.build_artists(songs))


# --------------------------------------------------------------------------- users

def test_users_take_level_and_names_from_latest_event(spark, event_records):
    events = event_records(
        play(level="free", ts=ms(2018, 11, 1), itemInSession=0, lastName="Old"),
        play(level="paid", ts=ms(2018, 11, 2), itemInSession=0, lastName="New", page="Home"),
        play(level="free", ts=ms(2018, 11, 1, 12), itemInSession=5),
    )
    expected = spark.createDataFrame([(10, "Ann", "New", "F", "paid")], USERS_SCHEMA)
    assertDataFrameEqual(etl.build_users(events), expected)


def test_users_break_same_ts_by_latest_item_in_session(spark, event_records):
    events = event_records(
        play(level="paid", itemInSession=3),
        play(level="free", itemInSession=2),
    )
    expected = spark.createDataFrame([(10, "Ann", "Lee", "F", "paid")], USERS_SCHEMA)
    assertDataFrameEqual(etl.build_users(events), expected)


@pytest.mark.parametrize("user_id", ["", None, "abc", "  "])
def test_events_without_a_known_user_feed_no_users(spark, event_records, user_id):
    events = event_records(play(userId="10"), play(userId=user_id, firstName="Ghost", itemInSession=1))
    expected = spark.createDataFrame([(10, "Ann", "Lee", "F", "free")], USERS_SCHEMA)
    assertDataFrameEqual(etl.build_users(events), expected)


# --------------------------------------------------------------------------- songplays

def test_songplays_skip_events_without_a_known_user(spark, event_records, song_records):
    events = event_records(play(userId="10"), play(userId="", itemInSession=1), play(userId=None, itemInSession=2))
    plays = songplays_of(events, song_records(song()))
    assertDataFrameEqual(plays.select("user_id"), spark.createDataFrame([(10,)], "user_id long"))


def test_songplays_keep_only_next_song_pages(spark, event_records, song_records):
    events = event_records(play(), play(page="Home", itemInSession=1), play(page="Logout", itemInSession=2))
    plays = songplays_of(events, song_records(song()))
    assertDataFrameEqual(plays.select("session_id"), spark.createDataFrame([(7,)], "session_id long"))


def test_songplays_row_for_a_matched_play(spark, event_records, song_records):
    plays = songplays_of(event_records(play()), song_records(song()))
    expected = spark.createDataFrame(
        [(utc(2018, 11, 1, 10), 10, "free", "S1", "A1", 7, "Here", "Agent", 2018, 11)],
        "start_time timestamp, user_id long, level string, song_id string, artist_id string, session_id long, "
        "location string, user_agent string, year int, month int",
    )
    assertDataFrameEqual(plays.drop("songplay_id"), expected)
    assert plays.schema.simpleString() == spark.createDataFrame([], SONGPLAYS_SCHEMA).schema.simpleString()


def test_event_delivered_twice_is_one_songplay(spark, event_records, song_records):
    plays = songplays_of(event_records(play(), play(), play(itemInSession=1)), song_records(song()))
    expected = spark.createDataFrame([(7, "S1"), (7, "S1")], "session_id long, song_id string")
    assertDataFrameEqual(plays.select("session_id", "song_id"), expected)
    assert plays.select("songplay_id").distinct().count() == 2


@pytest.mark.parametrize("changes", [
    {"artist": "Chase and Status"},        # right title, wrong artist
    {"length": 337.68444 + 0.002},         # right title and artist, duration too far off
    {"song": "ten tonne"},                 # titles are compared exactly
], ids=["wrong-artist", "wrong-duration", "wrong-case"])
def test_title_match_with_wrong_artist_or_duration_stays_unmatched(spark, event_records, song_records, changes):
    plays = songplays_of(event_records(play(**changes)), song_records(song()))
    expected = spark.createDataFrame([(10, None, None)], "user_id long, song_id string, artist_id string")
    assertDataFrameEqual(plays.select("user_id", "song_id", "artist_id"), expected)


@pytest.mark.parametrize("offset", [0.001, -0.001, 0.0004])
def test_duration_within_a_millisecond_matches(spark, event_records, song_records, offset):
    plays = songplays_of(event_records(play(length=337.68444 + offset)), song_records(song()))
    expected = spark.createDataFrame([("S1", "A1")], "song_id string, artist_id string")
    assertDataFrameEqual(plays.select("song_id", "artist_id"), expected)


def test_several_fitting_songs_go_to_the_smallest_song_id(spark, event_records, song_records):
    songs = song_records(song(song_id="S9", artist_id="A9"), song(song_id="S2"), song(song_id="S5"))
    plays = songplays_of(event_records(play()), songs)
    expected = spark.createDataFrame([("S2", "A1")], "song_id string, artist_id string")
    assertDataFrameEqual(plays.select("song_id", "artist_id"), expected)


def test_songplay_id_is_stable_and_unique(spark, event_records, song_records):
    rows = [play(itemInSession=i, ts=ms(2018, 11, 1, 10, i)) for i in range(20)]
    first = songplays_of(event_records(*rows), song_records(song()))
    again = songplays_of(event_records(*reversed(rows)).repartition(3), song_records(song()))
    assertDataFrameEqual(first.select("songplay_id", "start_time"), again.select("songplay_id", "start_time"))
    assert first.select("songplay_id").distinct().count() == 20
    # The id depends on the event alone, not on what else is in the run.
    alone = songplays_of(event_records(rows[7]), song_records(song()))
    assertDataFrameEqual(alone.select("songplay_id"), first.filter("start_time = '2018-11-01 10:07:00'")
                         .select("songplay_id"))


def test_start_time_keeps_milliseconds(spark, event_records, song_records):
    plays = songplays_of(event_records(play(ts=ms(2018, 11, 1, 10) + 796)), song_records(song()))
    expected = spark.createDataFrame([(datetime(2018, 11, 1, 10, 0, 0, 796000),)], "start_time timestamp")
    assertDataFrameEqual(plays.select("start_time"), expected)


# --------------------------------------------------------------------------- time

def test_time_across_a_year_boundary_uses_iso_week_and_weekday(spark, event_records, song_records):
    events = event_records(
        play(ts=ms(2018, 12, 30, 23, 59, 59), itemInSession=1),  # Sunday of ISO week 52
        play(ts=ms(2018, 12, 31, 0, 0, 0), itemInSession=2),     # Monday, already ISO week 1 of 2019
        play(ts=ms(2019, 1, 1, 0, 0, 0), itemInSession=3),       # Tuesday
        play(ts=ms(2019, 1, 1, 0, 0, 0), itemInSession=4),       # a second play at the same instant
    )
    time_table = etl.build_time(songplays_of(events, song_records(song())))
    expected = spark.createDataFrame([
        (utc(2018, 12, 30, 23, 59, 59), 23, 30, 52, 12, 2018, 7),
        (utc(2018, 12, 31, 0, 0, 0), 0, 31, 1, 12, 2018, 1),
        (utc(2019, 1, 1, 0, 0, 0), 0, 1, 1, 1, 2019, 2),
    ], TIME_SCHEMA)
    assertDataFrameEqual(time_table, expected)


def test_songplays_partition_columns_follow_the_year_boundary(spark, event_records, song_records):
    events = event_records(play(ts=ms(2018, 12, 31, 23, 59, 59), itemInSession=1),
                           play(ts=ms(2019, 1, 1, 0, 0, 0), itemInSession=2))
    plays = songplays_of(events, song_records(song()))
    expected = spark.createDataFrame([(2018, 12), (2019, 1)], "year int, month int")
    assertDataFrameEqual(plays.select("year", "month"), expected)


# --------------------------------------------------------------------------- songs and artists

def test_songs_one_row_per_song_id(spark, song_records):
    songs = song_records(song(), song(), song(song_id="S2", title="Other", year=0, duration=10.0))
    expected = spark.createDataFrame([
        ("S1", "Ten Tonne", "A1", 2005, 337.68444),
        ("S2", "Other", "A1", 0, 10.0),
    ], SONGS_SCHEMA)
    assertDataFrameEqual(etl.build_songs(songs), expected)


def test_songs_keep_the_fullest_record_of_a_repeated_song_id(spark, song_records):
    songs = song_records(song(title=None), song(title="Ten Tonne"))
    expected = spark.createDataFrame([("S1", "Ten Tonne", "A1", 2005, 337.68444)], SONGS_SCHEMA)
    assertDataFrameEqual(etl.build_songs(songs), expected)


def test_artists_pick_the_record_with_most_known_fields(spark, song_records):
    songs = song_records(
        song(song_id="S1", artist_location="", artist_latitude=None, artist_longitude=None),
        song(song_id="S3", artist_name="Chase and Status", artist_location="London, UK"),
        song(song_id="S2", artist_location="London", artist_latitude=None),
    )
    expected = spark.createDataFrame([("A1", "Chase and Status", "London, UK", 51.5, -0.1)], ARTISTS_SCHEMA)
    assertDataFrameEqual(etl.build_artists(songs), expected)


def test_artists_ties_go_to_the_smallest_song_id(spark, song_records):
    songs = song_records(
        song(song_id="S7", artist_location="Leeds"),
        song(song_id="S4", artist_location="London"),
        song(song_id="S5", artist_location="Bath"),
    )
    expected = spark.createDataFrame([("A1", "Chase & Status", "London", 51.5, -0.1)], ARTISTS_SCHEMA)
    assertDataFrameEqual(etl.build_artists(songs), expected)


@pytest.mark.parametrize("location", ["", "   ", None])
def test_artists_empty_location_is_null(spark, song_records, location):
    songs = song_records(song(artist_location=location))
    expected = spark.createDataFrame([("A1", "Chase & Status", None, 51.5, -0.1)], ARTISTS_SCHEMA)
    assertDataFrameEqual(etl.build_artists(songs), expected)


def test_play_matches_on_the_artist_name_of_the_chosen_artist_row(spark, event_records, song_records):
    # A1's chosen row (most fields known) is named "Chase & Status"; the play names the artist that way.
    songs = song_records(song(song_id="S1", artist_name="Chase and Status", artist_latitude=None),
                         song(song_id="S2", title="Other"))
    plays = songplays_of(event_records(play()), songs)
    expected = spark.createDataFrame([("S1", "A1")], "song_id string, artist_id string")
    assertDataFrameEqual(plays.select("song_id", "artist_id"), expected)


# --------------------------------------------------------------------------- rejects

def test_split_events_rejects_bad_lines_and_keeps_good_ones(spark, tmp_path):
    source = tmp_path / "log_data" / "day.json"
    source.parent.mkdir()
    good = '{"ts": 1541105830796, "userId": "39", "page": "NextSong"}'
    source.write_text("\n".join([
        good,
        "not json",
        '{"ts": "1541105830796", "userId": "39"}',
        '{"ts": 1541105830796.5, "userId": "39"}',
        '{"userId": "39"}',
        "",
        '{"ts": 1541105830796, "sessionId": "x"}',
    ]) + "\n")
    raw = etl.read_json(spark, str(tmp_path / "log_data"), etl.LOG_SCHEMA).cache()
    clean, rejects = etl.split_events(raw)
    path = f"file:{source}"
    expected = spark.createDataFrame([
        (path, etl.REASON_MALFORMED, "not json"),
        (path, etl.REASON_BAD_TS, '{"ts": "1541105830796", "userId": "39"}'),
        (path, etl.REASON_BAD_TS, '{"ts": 1541105830796.5, "userId": "39"}'),
        (path, etl.REASON_BAD_TS, '{"userId": "39"}'),
        (path, etl.REASON_BAD_TYPE, '{"ts": 1541105830796, "sessionId": "x"}'),
    ], REJECTS_SCHEMA)
    assertDataFrameEqual(rejects, expected)
    assertDataFrameEqual(clean.select("ts", "userId", "page"),
                         spark.createDataFrame([(1541105830796, "39", "NextSong")],
                                               "ts long, userId string, page string"))


# Two events on one line, each way a lost newline or a stray character can glue them.
GLUED_LINES = [
    '{"ts": 1, "page": "Home"}{"ts": 2, "page": "Home"}',
    '{"ts": 1, "page": "Home"} {"ts": 2, "page": "Home"}',
    '{"ts": 1, "page": "Home"},{"ts": 2, "page": "Home"}',
    '{"ts": 1, "page": "Home"}]',
    '{"ts": 1, "page": "Home"} 5',
    '{"ts": 1, "page": "Home"} "x"',
]
# Braces, brackets and escaped quotes inside strings are text, not structure; trailing blanks are allowed.
TRICKY_LINE = '{"ts": 3, "page": "H{o}m]e", "song": "say \\"}{\\" [", "artist": "\\\\"}\t '


@pytest.mark.parametrize("small_files", [False, True])  # the line reader, the whole-file reader
def test_a_line_holding_more_than_one_json_value_is_malformed(spark, tmp_path, small_files):
    source = tmp_path / "log_data" / "day.json"
    source.parent.mkdir()
    source.write_text("\n".join([*GLUED_LINES, TRICKY_LINE]) + "\n")
    clean, rejects = etl.split_events(etl.read_json(spark, str(tmp_path / "log_data"), etl.LOG_SCHEMA,
                                                    small_files=small_files))
    expected = spark.createDataFrame([(f"file:{source}", etl.REASON_MALFORMED, line) for line in GLUED_LINES],
                                     REJECTS_SCHEMA)
    assertDataFrameEqual(rejects, expected)
    assertDataFrameEqual(clean.select("ts", "page", "song", "artist"),
                         spark.createDataFrame([(3, "H{o}m]e", 'say "}{" [', "\\")],
                                               "ts long, page string, song string, artist string"))


def test_split_songs_rejects_songs_without_song_id(spark, song_records):
    raw = song_records(song(), song(song_id=None, title="Nameless"), song(song_id=" ", title="Blank")) \
        .withColumn(etl.CORRUPT_RECORD, etl.F.lit(None).cast("string")) \
        .withColumn(etl.SOURCE_FILE, etl.F.lit("f.json")) \
        .withColumn(etl.LINE, etl.F.lit("{}")).withColumn(etl.NOT_UTF8, etl.F.lit(False))
    clean, rejects = etl.split_songs(raw)
    assert [row.song_id for row in clean.collect()] == ["S1"]
    assertDataFrameEqual(rejects.select("reason").distinct(),
                         spark.createDataFrame([(etl.REASON_NO_SONG_ID,)], "reason string"))
    assert rejects.count() == 2


# The contract's tables (shared/DATA_CONTRACT.md), written out here rather than read from the spec they check.
CONTRACT_COLUMNS = {
    "songplays": "songplay_id string, start_time timestamp, user_id bigint, level string, song_id string, "
                 "artist_id string, session_id bigint, location string, user_agent string, year int, month int",
    "users": "user_id bigint, first_name string, last_name string, gender string, level string",
    "songs": "song_id string, title string, artist_id string, year int, duration double",
    "artists": "artist_id string, name string, location string, latitude double, longitude double",
    "time": "start_time timestamp, hour int, day int, week int, month int, year int, weekday int",
}


def test_builders_give_exactly_the_contract_columns_and_types(event_records, song_records):
    songs, events = song_records(song()), event_records(play())
    tables = etl.build_tables(songs, events)
    assert {name: ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in table.schema.fields)
            for name, table in tables.items()} == CONTRACT_COLUMNS


def test_write_table_makes_one_folder_per_partition_value(spark, song_records, tmp_path):
    songs = etl.build_songs(song_records(song(), song(song_id="S2", year=0), song(song_id="S3", artist_id="A2")))
    etl.write_table(songs, str(tmp_path / "songs"), ("year",))
    folders = sorted(p.name for p in (tmp_path / "songs").iterdir() if p.is_dir())
    assert folders == ["year=0", "year=2005"]
    assert len(list((tmp_path / "songs" / "year=2005").glob("*.parquet"))) == 1  # one file per folder
    assertDataFrameEqual(spark.read.parquet(str(tmp_path / "songs")).select(*etl.SPECS["songs"].column_names), songs)


def test_song_files_are_read_whole_with_the_same_reject_rules(spark, tmp_path):
    folder = tmp_path / "song_data" / "A" / "B"
    folder.mkdir(parents=True)
    good = '{"song_id": "S1", "title": "T", "artist_id": "A1", "year": 2000, "duration": 1.5}'
    (folder / "TR1.json").write_text(good)  # real song files end without a newline
    (folder / "TR2.json").write_bytes(b'{"song_id": "S2", "title": "Two"}\r\n\r\n')
    (folder / "TR3.json").write_text('{"song_id": "S3", "title": \n{"title": "no id"}\n')
    (folder / "TR4.json").write_text('{"song_id": "S4", "year": "1999"}')
    raw = etl.read_song_data(spark, str(tmp_path)).cache()
    clean, rejects = etl.split_songs(raw)
    assertDataFrameEqual(clean.select("song_id", "title", "year"), spark.createDataFrame(
        [("S1", "T", 2000), ("S2", "Two", None)], "song_id string, title string, year int"))
    source = f"file:{folder}"
    assertDataFrameEqual(rejects, spark.createDataFrame([
        (f"{source}/TR3.json", etl.REASON_MALFORMED, '{"song_id": "S3", "title": '),
        (f"{source}/TR3.json", etl.REASON_NO_SONG_ID, '{"title": "no id"}'),
        (f"{source}/TR4.json", etl.REASON_BAD_TYPE, '{"song_id": "S4", "year": "1999"}'),
    ], REJECTS_SCHEMA))
