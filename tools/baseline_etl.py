#!/usr/bin/env python3
"""A deliberately NAIVE Sparkify ETL, written the way most public versions of
the Udacity "Data Lake" project are, to benchmark our etl.py against.

    python tools/baseline_etl.py INPUT_ROOT OUTPUT_ROOT [--driver-memory 4g]

Do not "fix" this file: its flaws are the point. It infers the schema (one
extra pass over every small JSON file), reads song_data twice, uses a Python
UDF for timestamps, dropDuplicates on whole rows (a user who upgrades gets two
rows), joins songplays on title and artist only (no duration, so plays can
fan out), numbers them with monotonically_increasing_id (not deterministic),
uses the machine's time zone, and writes with partitionBy and no repartition,
the default committer and the default 200 shuffle partitions.
"""
import argparse
import time
from datetime import datetime

from pyspark.sql import SparkSession
from pyspark.sql.functions import (
    col,
    date_format,
    dayofmonth,
    hour,
    monotonically_increasing_id,
    month,
    udf,
    weekofyear,
    year,
)
from pyspark.sql.types import TimestampType


def create_spark_session(driver_memory=None):
    builder = SparkSession.builder.master("local[*]").appName("sparkify-baseline")
    if driver_memory:
        builder = builder.config("spark.driver.memory", driver_memory)
    return builder.getOrCreate()


def process_song_data(spark, input_data, output_data):
    # get filepath to song data file
    song_data = input_data + "song_data/*/*/*/*.json"

    # read song data file
    df = spark.read.json(song_data)

    # extract columns to create songs table
    songs_table = df.select("song_id", "title", "artist_id", "year", "duration").dropDuplicates()

    # write songs table to parquet files partitioned by year and artist
    songs_table.write.mode("overwrite").partitionBy("year", "artist_id").parquet(output_data + "songs/")

    # extract columns to create artists table
    artists_table = df.select(
        "artist_id",
        col("artist_name").alias("name"),
        col("artist_location").alias("location"),
        col("artist_latitude").alias("latitude"),
        col("artist_longitude").alias("longitude"),
    ).dropDuplicates()

    # write artists table to parquet files
    artists_table.write.mode("overwrite").parquet(output_data + "artists/")


def process_log_data(spark, input_data, output_data):
    # get filepath to log data file
    log_data = input_data + "log_data/*/*/*.json"

    # read log data file
    df = spark.read.json(log_data)

    # filter by actions for song plays
    df = df.filter(df.page == "NextSong")

    # extract columns for users table
    users_table = df.select(
        col("userId").alias("user_id"),
        col("firstName").alias("first_name"),
        col("lastName").alias("last_name"),
        "gender",
        "level",
    ).dropDuplicates()

    # write users table to parquet files
    users_table.write.mode("overwrite").parquet(output_data + "users/")

    # create timestamp column from original timestamp column
    get_timestamp = udf(lambda x: datetime.fromtimestamp(x / 1000.0), TimestampType())
    df = df.withColumn("start_time", get_timestamp(df.ts))

    # extract columns to create time table
    time_table = df.select("start_time").dropDuplicates().select(
        "start_time",
        hour("start_time").alias("hour"),
        dayofmonth("start_time").alias("day"),
        weekofyear("start_time").alias("week"),
        month("start_time").alias("month"),
        year("start_time").alias("year"),
        date_format("start_time", "E").alias("weekday"),
    )

    # write time table to parquet files partitioned by year and month
    time_table.write.mode("overwrite").partitionBy("year", "month").parquet(output_data + "time/")

    # read in song data to use for songplays table
    song_df = spark.read.json(input_data + "song_data/*/*/*/*.json")

    # extract columns from joined song and log datasets to create songplays table
    songplays_table = df.join(
        song_df, (df.song == song_df.title) & (df.artist == song_df.artist_name), "left"
    ).select(
        monotonically_increasing_id().alias("songplay_id"),
        "start_time",
        col("userId").alias("user_id"),
        "level",
        "song_id",
        "artist_id",
        col("sessionId").alias("session_id"),
        "location",
        col("userAgent").alias("user_agent"),
        year("start_time").alias("year"),
        month("start_time").alias("month"),
    )

    # write songplays table to parquet files partitioned by year and month
    songplays_table.write.mode("overwrite").partitionBy("year", "month").parquet(output_data + "songplays/")


def main():
    parser = argparse.ArgumentParser(description="naive baseline Sparkify ETL")
    parser.add_argument("input_root")
    parser.add_argument("output_root")
    parser.add_argument("--driver-memory", help="e.g. 4g; default: Spark's own")
    args = parser.parse_args()
    input_data = args.input_root.rstrip("/") + "/"
    output_data = args.output_root.rstrip("/") + "/"

    began = time.perf_counter()
    spark = create_spark_session(args.driver_memory)
    process_song_data(spark, input_data, output_data)
    songs_done = time.perf_counter()
    process_log_data(spark, input_data, output_data)
    spark.stop()
    done = time.perf_counter()
    print(f"baseline wall time: {done - began:.1f} s "
          f"(session + song_data {songs_done - began:.1f} s, log_data + songplays {done - songs_done:.1f} s)")


if __name__ == "__main__":
    main()
