#!/usr/bin/env python3
"""The reference for `make bench`: the five Sparkify tables built with DuckDB, as a DuckDB user would.

    python tools/duckdb_etl.py INPUT_ROOT OUTPUT_ROOT [--threads 2]

The contract's rules (DATA_CONTRACT.md), its columns and its partition folders, in plain SQL: JSON read
with explicit columns, Parquet written with COPY ... PARTITION_BY. Lines that are not one JSON object are
skipped, not counted and kept as etl.py does: the benchmark's data has none. There is no quality
gate, staging or publish step either; those are etl.py's promises, and part of what it is timed on.
"""
import argparse
import json
import os
import shutil
import time

import duckdb

SONG_COLUMNS = {
    "num_songs": "INTEGER", "artist_id": "VARCHAR", "artist_latitude": "DOUBLE", "artist_longitude": "DOUBLE",
    "artist_location": "VARCHAR", "artist_name": "VARCHAR", "song_id": "VARCHAR", "title": "VARCHAR",
    "duration": "DOUBLE", "year": "INTEGER",
}
LOG_COLUMNS = {
    "artist": "VARCHAR", "auth": "VARCHAR", "firstName": "VARCHAR", "gender": "VARCHAR", "itemInSession": "INTEGER",
    "lastName": "VARCHAR", "length": "DOUBLE", "level": "VARCHAR", "location": "VARCHAR", "method": "VARCHAR",
    "page": "VARCHAR", "registration": "DOUBLE", "sessionId": "BIGINT", "song": "VARCHAR", "status": "INTEGER",
    "ts": "BIGINT", "userAgent": "VARCHAR", "userId": "VARCHAR",
}
PARTITION_BY = {"songplays": "year, month", "songs": "year, artist_id", "time": "year, month",
                "users": None, "artists": None}

VIEWS = """
CREATE TEMP TABLE song_records AS
SELECT * FROM ({song_records})
WHERE trim(song_id) <> '';

CREATE TEMP TABLE events AS
SELECT *, CASE WHEN regexp_full_match(trim(userId), '[0-9]{{1,18}}') THEN trim(userId)::BIGINT END AS user_id
FROM ({log_records})
WHERE ts IS NOT NULL;

-- A song_id seen twice keeps its fullest record, then the smallest values.
CREATE TEMP TABLE songs AS
SELECT song_id, title, artist_id, year, duration FROM song_records
QUALIFY row_number() OVER (
    PARTITION BY song_id
    ORDER BY (title IS NULL)::INT + (artist_id IS NULL)::INT + (year IS NULL)::INT + (duration IS NULL)::INT,
             title NULLS FIRST, artist_id NULLS FIRST, year NULLS FIRST, duration NULLS FIRST) = 1;

-- The record with the most known attributes wins, then the smallest song_id.
CREATE TEMP TABLE artists AS
SELECT artist_id, artist_name AS name, CASE WHEN trim(artist_location) <> '' THEN artist_location END AS location,
       artist_latitude AS latitude, artist_longitude AS longitude
FROM song_records WHERE artist_id IS NOT NULL
QUALIFY row_number() OVER (
    PARTITION BY artist_id
    ORDER BY (name IS NULL)::INT + (location IS NULL)::INT + (latitude IS NULL)::INT + (longitude IS NULL)::INT,
             song_id, name NULLS FIRST, location NULLS FIRST, latitude NULLS FIRST, longitude NULLS FIRST) = 1;

-- Attributes from the latest event: largest ts, then largest itemInSession.
CREATE TEMP TABLE users AS
SELECT user_id, firstName AS first_name, lastName AS last_name, gender, level FROM events
WHERE user_id IS NOT NULL
QUALIFY row_number() OVER (
    PARTITION BY user_id
    ORDER BY ts DESC NULLS LAST, itemInSession DESC NULLS LAST, level DESC NULLS LAST,
             firstName DESC NULLS LAST, lastName DESC NULLS LAST, gender DESC NULLS LAST) = 1;

-- One row per distinct event; the id is etl.py's: SHA-256 of the event key as JSON, 32 hex characters.
CREATE TEMP TABLE plays AS
SELECT user_id, sessionId, itemInSession, ts,
       sha256(to_json({{'user_id': user_id, 'sessionId': sessionId, 'itemInSession': itemInSession, 'ts': ts}}))[1:32]
           AS songplay_id,
       level, song, artist, length, location, userAgent
FROM events WHERE user_id IS NOT NULL AND page = 'NextSong'
QUALIFY row_number() OVER (
    PARTITION BY user_id, sessionId, itemInSession, ts
    ORDER BY level DESC NULLS LAST, song DESC NULLS LAST, artist DESC NULLS LAST, length DESC NULLS LAST,
             location DESC NULLS LAST, userAgent DESC NULLS LAST) = 1;

-- Title, artist name and duration within 0.001 s (plus float slack); several fits: smallest song_id.
CREATE TEMP TABLE matches AS
SELECT p.songplay_id, min(s.song_id) AS song_id, arg_min(s.artist_id, s.song_id) AS artist_id
FROM plays p
JOIN songs s ON p.song = s.title AND abs(p.length - s.duration) <= 0.001 + 1e-9
JOIN artists a ON a.artist_id = s.artist_id AND a.name = p.artist
GROUP BY p.songplay_id;

CREATE TEMP TABLE songplays AS
SELECT p.songplay_id, epoch_ms(p.ts)::TIMESTAMPTZ AS start_time, p.user_id, p.level, m.song_id, m.artist_id,
       p.sessionId AS session_id, p.location, p.userAgent AS user_agent,
       year(start_time)::INT AS year, month(start_time)::INT AS month
FROM plays p LEFT JOIN matches m USING (songplay_id);

CREATE TEMP TABLE time AS
SELECT start_time, hour(start_time)::INT AS hour, day(start_time)::INT AS day, weekofyear(start_time)::INT AS week,
       month(start_time)::INT AS month, year(start_time)::INT AS year, isodow(start_time)::INT AS weekday
FROM (SELECT DISTINCT start_time FROM songplays);
"""


def records(pattern, columns):
    """The JSON objects of the files matching pattern, one per line, with the given columns.

    Lines are read as text first (a CSV of one column whose separator, a control character, never appears
    in valid JSON): read_json, like Spark's from_json, would load the first object of a line holding two
    glued together and drop the second, where the contract rejects the line. A line that is not UTF-8 is
    skipped by the CSV reader, one that is not one JSON object by the filter."""
    structure = json.dumps(columns).replace("'", "''")
    # DuckDB may evaluate from_json on lines a WHERE would drop: it is given NULL for those instead.
    return f"""
    SELECT unnest(from_json(object, '{structure}')) FROM (
        SELECT CASE WHEN json_valid(line) THEN CASE WHEN json_type(line) = 'OBJECT' THEN line END END AS object
        FROM read_csv('{pattern}', columns = {{'line': 'VARCHAR'}}, delim = chr(31), quote = '', escape = '',
                      header = false, auto_detect = false, new_line = '\\n', ignore_errors = true))
    WHERE object IS NOT NULL"""


def run(input_root, output_root, threads):
    con = duckdb.connect()
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = false")  # no ORDER BY is asked for: let writes stream
    root = input_root.rstrip("/")
    con.execute(VIEWS.format(song_records=records(f"{root}/song_data/**/*.json", SONG_COLUMNS),
                             log_records=records(f"{root}/log_data/**/*.json", LOG_COLUMNS)))
    os.makedirs(output_root, exist_ok=True)
    for table, partition_by in PARTITION_BY.items():
        target = os.path.join(output_root, table)
        shutil.rmtree(target, ignore_errors=True)
        if partition_by:
            con.execute(f"COPY {table} TO '{target}' (FORMAT parquet, PARTITION_BY ({partition_by}))")
        else:
            os.makedirs(target)
            con.execute(f"COPY {table} TO '{target}/data_0.parquet' (FORMAT parquet)")
    con.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_root")
    parser.add_argument("output_root")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB worker threads (default %(default)s)")
    args = parser.parse_args()
    start = time.perf_counter()
    run(args.input_root, args.output_root, args.threads)
    print(f"duckdb_etl: five tables in {time.perf_counter() - start:.1f} s -> {args.output_root}")


if __name__ == "__main__":
    main()
