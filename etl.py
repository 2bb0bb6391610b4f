#!/usr/bin/env python3
"""Sparkify data lake ETL: song and event JSON in, a star schema as parquet out.

    python etl.py [--config dl.cfg] [--input ROOT] [--output ROOT]
    spark-submit etl.py [--config dl.cfg] [--input ROOT] [--output ROOT]

The tables and the rules between them are described in README.md.
"""
from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import reduce
from typing import Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pyspark
import pyspark.sql.functions as F
import pyspark.sql.types as T
from pyspark.sql import Column, DataFrame, Row, SparkSession

JOB_VERSION = "1.0.0"
APP_NAME = "sparkify-etl"
LOG = logging.getLogger("sparkify_etl")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "dl.cfg")
DEFAULT_INPUT = os.path.join(HERE, "data")
DEFAULT_OUTPUT = "output"

SONG_DATA = "song_data"
LOG_DATA = "log_data"
REPORT_NAME = "_run_report.json"  # the latest run's report, "running" while it runs
RUNS_DIR = "_runs"  # every run's final report, <run id>.json: the last completed run is the newest
# A run writes everything under <root>/_staging/<run id>/ first; names starting with "_" are skipped by
# Spark, Athena, pyarrow and DuckDB readers. The journal, once written, means "publish this".
STAGING_DIR = "_staging"
OLD_VERSIONS_DIR = "_old"
PUBLISH_JOURNAL = "_PUBLISH.json"
LOCK_NAME = "_lock"  # local output: held with flock, which the kernel releases when the process dies
LEASE_NAME = "_lease.json"  # S3 output: created with a conditional PUT, renewed while the run lives
LEASE_TTL_S = 300
LEASE_RENEW_S = 60
PAUSE_ENV = "SPARKIFY_PAUSE_AT"
# Publishing on S3: requests in flight, retries per request, keys per DeleteObjects (S3's maximum).
S3_REQUESTS_IN_FLIGHT = 64
# Five attempts with the SDK's standard backoff (at most 2+4+8+16 s) survive resets and 503 SlowDown,
# and let a run whose endpoint is gone fail within a few minutes (README, "Faults").
S3_ATTEMPTS = 5
S3_DELETE_BATCH = 1000
# Reading S3 off EMR (issue 9): the driver lists each tree flat (one LIST per 1,000 keys, sizes
# included) and Spark tasks GET the files, each task keeping many requests in flight, since every
# request is a round trip. A user's --conf wins over these defaults.
S3_READ_IN_FLIGHT_CONF = "spark.sparkify.s3.readRequestsPerTask"
S3_READ_IN_FLIGHT = 32
# Files per fetch task, S3 or local: the listing travels inside the tasks, so a slice is kept small.
FILES_PER_TASK_CONF = "spark.sparkify.filesPerTask"
FILES_PER_TASK = 2000
FETCH_WINDOW_BYTES = 32 * 1024 * 1024  # fetched content held at once per task: bounded memory
FETCH_WINDOW_FILES = 1000
URI_PATH_SAFE = "/!$&'()*+,;=:@~-._"  # what java.net.URI leaves as it is in a path
# The run report's names for each tree's file and record counts.
REPORT_INPUT_KEYS = {SONG_DATA: ("song_files", "song_records"), LOG_DATA: ("log_files", "log_events")}
REJECTED_DIR = "_rejected"

SONGPLAYS = "songplays"
USERS = "users"
SONGS = "songs"
ARTISTS = "artists"
TIME = "time"
# Dimensions first: a reader who sees a new songplays table can join it.
TABLES = (SONGS, ARTISTS, USERS, TIME, SONGPLAYS)
PARTITION_BY: Dict[str, Tuple[str, ...]] = {
    SONGPLAYS: ("year", "month"),
    USERS: (),
    SONGS: ("year", "artist_id"),
    ARTISTS: (),
    TIME: ("year", "month"),
}
TABLE_COLUMNS = {
    SONGPLAYS: ("songplay_id", "start_time", "user_id", "level", "song_id", "artist_id", "session_id", "location",
                "user_agent", "year", "month"),
    USERS: ("user_id", "first_name", "last_name", "gender", "level"),
    SONGS: ("song_id", "title", "artist_id", "year", "duration"),
    ARTISTS: ("artist_id", "name", "location", "latitude", "longitude"),
    TIME: ("start_time", "hour", "day", "week", "month", "year", "weekday"),
}
PRIMARY_KEY = {
    SONGPLAYS: "songplay_id",
    USERS: "user_id",
    SONGS: "song_id",
    ARTISTS: "artist_id",
    TIME: "start_time",
}

NEXT_SONG = "NextSong"
DURATION_TOLERANCE_S = 0.001
# Doubles such as 337.68544 - 337.68444 come out a hair above 0.001.
FLOAT_SLACK = 1e-9
# An event's identity: a redelivered event repeats all four.
EVENT_KEY = ("user_id", "sessionId", "itemInSession", "ts")
SONGPLAY_ID_HEX_CHARS = 32  # 128 bits of SHA-256: collisions are not a concern
USER_ID_PATTERN = r"^[0-9]{1,18}$"  # 18 digits always fit in a long

CORRUPT_RECORD = "_corrupt_record"
SOURCE_FILE = "source_file"
REASON = "reason"
REASON_MALFORMED = "malformed JSON"
REASON_BAD_TS = "ts missing or not an integer"
REASON_NO_SONG_ID = "song_id missing"
REASON_BAD_TYPE = "a field has the wrong type"
# JSON is UTF-8 text: a line that is not is rejected, and kept as base64, so its bytes survive as they were.
REASON_NOT_UTF8 = "not valid UTF-8 (line holds its bytes in base64)"

SONG_SCHEMA = T.StructType([
    T.StructField("num_songs", T.IntegerType()),
    T.StructField("artist_id", T.StringType()),
    T.StructField("artist_latitude", T.DoubleType()),
    T.StructField("artist_longitude", T.DoubleType()),
    T.StructField("artist_location", T.StringType()),
    T.StructField("artist_name", T.StringType()),
    T.StructField("song_id", T.StringType()),
    T.StructField("title", T.StringType()),
    T.StructField("duration", T.DoubleType()),
    T.StructField("year", T.IntegerType()),
])

LOG_SCHEMA = T.StructType([
    T.StructField("artist", T.StringType()),
    T.StructField("auth", T.StringType()),
    T.StructField("firstName", T.StringType()),
    T.StructField("gender", T.StringType()),
    T.StructField("itemInSession", T.IntegerType()),
    T.StructField("lastName", T.StringType()),
    T.StructField("length", T.DoubleType()),
    T.StructField("level", T.StringType()),
    T.StructField("location", T.StringType()),
    T.StructField("method", T.StringType()),
    T.StructField("page", T.StringType()),
    T.StructField("registration", T.DoubleType()),
    T.StructField("sessionId", T.LongType()),
    T.StructField("song", T.StringType()),
    T.StructField("status", T.IntegerType()),
    T.StructField("ts", T.LongType()),
    T.StructField("userAgent", T.StringType()),
    T.StructField("userId", T.StringType()),
])

S3_SCHEMES = ("s3://", "s3a://", "s3n://")
# Files every EMR node carries; EMR's own tooling reads them too.
EMR_MARKERS = ("/mnt/var/lib/info/job-flow.json", "/emr/instance-controller/lib/info/instance.json")
# `make setup` resolves hadoop-aws and spark-hadoop-cloud from Maven Central into .jars/ and lists
# them in the manifest (tools/get_jars.py); it also builds our java.nio local file system there.
JARS_DIR = os.path.join(HERE, ".jars")
NIO_JAR = os.path.join(JARS_DIR, "sparkify-hadoop.jar")
NIO_FILE_SYSTEM = "sparkify.NioLocalFileSystem"
LOG4J_CONF = os.path.join(HERE, "conf", "log4j2.properties")
S3A_FILE_SYSTEM = "org.apache.hadoop.fs.s3a.S3AFileSystem"
CLOUD_COMMIT_PROTOCOL = "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"
# S3A's committers, bound to Spark as Spark's cloud-integration guide says.
S3A_COMMITTER_BINDING = {
    "spark.sql.sources.commitProtocolClass": CLOUD_COMMIT_PROTOCOL,
    "spark.sql.parquet.output.committer.class": "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter",
    # s3:// and s3n:// are S3A too off EMR (s3a_options), so they get its committer as well.
    **{f"spark.hadoop.mapreduce.outputcommitter.factory.scheme.{scheme.split(':')[0]}":
       "org.apache.hadoop.fs.s3a.commit.S3ACommitterFactory" for scheme in S3_SCHEMES},
}
# spark-submit writes S3 output through S3A's magic committer (issue 9): the master may be a cluster, whose
# tasks share no disk with the driver, and the magic committer keeps its bookkeeping in S3 itself. It costs
# ~10 requests per file (.pending files, listings and probes of __magic paths), against 2 for python
# etl.py's spool (plan_spark). The run writes into a fresh _staging/<run id>/ prefix.
S3A_COMMIT_THREADS = 64
MAGIC_COMMITTER = {
    # Hadoop 3.3.4 commits one task's uploads one after another, tasks in parallel: many write tasks
    # (write_table makes one per shuffle partition) give the job commit S3A_COMMIT_THREADS requests in flight.
    "spark.sql.shuffle.partitions": str(S3A_COMMIT_THREADS),
    **S3A_COMMITTER_BINDING,
    "spark.hadoop.fs.s3a.committer.threads": str(S3A_COMMIT_THREADS),
    # The job's own uploads are aborted by abortJob; listing the bucket's uploads on top costs a request
    # per write (a lifecycle rule for stale uploads is advised anyway, README).
    "spark.hadoop.fs.s3a.committer.abort.pending.uploads": "false",
    # No _SUCCESS file per table: the run report says what succeeded, and each marker costs a PUT, its
    # existence probes and a COPY at publish.
    "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    "spark.hadoop.fs.s3a.committer.name": "magic",
    "spark.hadoop.fs.s3a.committer.magic.enabled": "true",
}
SESSION_CONF = {
    # Every time function then works in UTC, whatever the machine's zone.
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.debug.maxToStringFields": "100",  # our 19-column schema is not worth a warning
}
S3A_PROVIDERS = {
    "static": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
    "session": "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
    # Environment, profile, container and instance role, in the AWS SDK's own order.
    "chain": "com.amazonaws.auth.DefaultAWSCredentialsProviderChain",
}
PREFLIGHT_PROBE = "_preflight-probe"
# Retries: a reset or a 503 SlowDown is retried with backoff, but an endpoint that is gone fails the run
# within a few minutes (Hadoop 3.3.4's defaults retry for many minutes: 20 SDK attempts inside 7 S3A ones).
S3A_RETRIES = {
    "fs.s3a.attempts.maximum": "5",  # the AWS SDK's own retries of one request
    "fs.s3a.retry.limit": "3",  # S3A's retries around them
    "fs.s3a.retry.interval": "500ms",
    "fs.s3a.retry.throttle.limit": "10",
    "fs.s3a.retry.throttle.interval": "200ms",
    "fs.s3a.connection.establish.timeout": "5000",
    "fs.s3a.connection.timeout": "30000",
}

CONFIG_KEYS = {
    "AWS": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "REGION", "S3_ENDPOINT"),
    "PATHS": ("INPUT_DATA", "OUTPUT_DATA", "REJECTED_DATA"),
    "LAYOUT": tuple(f"{table.upper()}_PARTITION_BY" for table in TABLES),
    "CATALOG": ("DATABASE",),
    "QUALITY": ("MAX_MISSING_SHARE", "MAX_ROWS_FALL", "MAX_MATCH_RATE_FALL", "MAX_REJECTED_SHARE_RISE"),
    # Read by tools/emr.py, the launcher; the job itself ignores this section.
    "EMR": ("RELEASE_LABEL", "INSTANCE_TYPE", "INSTANCE_COUNT", "SERVICE_ROLE", "INSTANCE_PROFILE", "LOG_URI",
            "REGION", "CODE"),
}
# Never leave this machine: tools/emr.py blanks them in the dl.cfg it uploads.
SECRET_CONFIG_KEYS = {"AWS": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
NO_PARTITIONS = "none"

# The Glue Data Catalog (for Athena): each table as an external parquet table, with the contract's types.
CATALOG_TYPES = {
    "songplay_id": "string", "start_time": "timestamp", "user_id": "bigint", "level": "string",
    "song_id": "string", "artist_id": "string", "session_id": "bigint", "location": "string",
    "user_agent": "string", "year": "int", "month": "int", "first_name": "string", "last_name": "string",
    "gender": "string", "title": "string", "duration": "double", "name": "string", "latitude": "double",
    "longitude": "double", "hour": "int", "day": "int", "week": "int", "weekday": "int",
}
# Athena's rule for database names: lower case letters, digits and underscores.
CATALOG_DATABASE_PATTERN = r"^[a-z0-9_]{1,255}$"
PARQUET_STORAGE = {
    "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
    "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
    "SerdeInfo": {"SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
                  "Parameters": {"serialization.format": "1"}},
}
# Glue's limits per request: BatchCreatePartition takes 100 partitions, BatchDeletePartition 25.
GLUE_CREATE_BATCH = 100
GLUE_DELETE_BATCH = 25
# Throttling and brief outages are retried with backoff; an endpoint that is down fails in about 10 s.
GLUE_ATTEMPTS = 4


class EtlError(Exception):
    """A problem the user can fix: reported as one line, never as a traceback."""


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class AwsSettings:
    # Secrets: repr=False keeps them out of any log line or traceback.
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    region: Optional[str] = None
    endpoint: Optional[str] = None
    source: str = "default chain"  # where the keys came from, safe to log


@dataclass(frozen=True)
class QualitySettings:
    """The quality gate's thresholds ([QUALITY] in dl.cfg), each a share between 0 and 1 (README, "Quality gate")."""
    # A required field may be missing or empty in at most this share of the lines that should carry it: 0 in
    # the sample and in generated data, over a third when a field is renamed or emptied in a third of the days.
    max_missing_share: float = 0.01
    # Since the last successful run, a table may lose at most this share of its rows (a full rebuild of a
    # growing input only grows; a 30-day window sliding by a day loses ~3%), the share of songplays matched
    # to a song may fall by at most this share of itself, and a tree's share of rejected lines may rise by at
    # most this many points.
    max_rows_fall: float = 0.10
    max_match_rate_fall: float = 0.25
    max_rejected_share_rise: float = 0.01


@dataclass(frozen=True)
class Settings:
    input_root: str
    output_root: str
    rejected_root: str
    aws: AwsSettings = field(default_factory=AwsSettings)
    partition_by: Mapping[str, Tuple[str, ...]] = field(default_factory=lambda: dict(PARTITION_BY))
    catalog_database: Optional[str] = None  # [CATALOG] DATABASE; None: the tables are not registered
    quality: QualitySettings = field(default_factory=QualitySettings)

    @property
    def uses_s3(self) -> bool:
        return any(is_s3(path) for path in (self.input_root, self.output_root, self.rejected_root))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own error prints a usage block
        raise EtlError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _ArgumentParser(prog="etl.py", description="Build the Sparkify star schema from song and event JSON.")
    parser.add_argument("--config", help=f"settings file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--input", help="input root holding song_data/ and log_data/ (local folder or s3:// prefix)")
    parser.add_argument("--output", help="output root for the five tables (local folder or s3:// prefix)")
    return parser.parse_args(argv)


def read_config(path: str) -> Dict[str, Dict[str, str]]:
    """Reads dl.cfg; every error names the file and never echoes a line that might hold a secret."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str.upper  # keys are case-insensitive, shown as documented
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise EtlError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except configparser.MissingSectionHeaderError as exc:
        raise EtlError(f"malformed config {path}: line {exc.lineno} is not under a [section]") from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        raise EtlError(f"malformed config {path}: cannot parse line {lines}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise EtlError(f"malformed config {path}: {type(exc).__name__}") from None
    for section in parser.sections():
        if section not in CONFIG_KEYS:
            raise EtlError(f"unknown section [{section}] in {path}; known: {', '.join(CONFIG_KEYS)}")
        for key in parser[section]:
            if key not in CONFIG_KEYS[section]:
                raise EtlError(f"unknown key {key} in [{section}] of {path}")
    return {section: {k: v.strip() for k, v in parser[section].items()} for section in parser.sections()}


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Paths: flag, then environment, then dl.cfg, then defaults. AWS keys: dl.cfg, then environment."""
    config_path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    config = read_config(config_path) if config_path else {}
    paths = config.get("PATHS", {})

    def pick(flag: Optional[str], key: str, default: str) -> str:
        return flag or environ.get(key) or paths.get(key) or default

    input_root = normalize_root(pick(args.input, "INPUT_DATA", DEFAULT_INPUT))
    output_root = normalize_root(pick(args.output, "OUTPUT_DATA", DEFAULT_OUTPUT))
    rejected_root = normalize_root(pick(None, "REJECTED_DATA", join(output_root, REJECTED_DIR)))
    return Settings(input_root, output_root, rejected_root, resolve_aws(config.get("AWS", {}), environ),
                    resolve_layout(config.get("LAYOUT", {}), config_path),
                    resolve_catalog(config.get("CATALOG", {}), output_root, config_path),
                    resolve_quality(config.get("QUALITY", {}), config_path))


def resolve_quality(config: Mapping[str, str], config_path: Optional[str]) -> QualitySettings:
    """The gate's thresholds: [QUALITY]'s where given, else the defaults."""
    chosen = {}
    for key in CONFIG_KEYS["QUALITY"]:
        value = config.get(key, "")
        if not value:
            continue
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise EtlError(f"{key} in [QUALITY] of {config_path} must be a share between 0 and 1, such as 0.05")
        chosen[key.lower()] = share
    return QualitySettings(**chosen)


def resolve_catalog(config: Mapping[str, str], output_root: str, config_path: Optional[str]) -> Optional[str]:
    """The Glue database to register the tables in, or None. Athena reads only S3, so a local output is refused."""
    database = config.get("DATABASE", "")
    if not database:
        return None
    if not re.match(CATALOG_DATABASE_PATTERN, database):
        raise EtlError(f"DATABASE in [CATALOG] of {config_path} must be lower case letters, digits and underscores")
    if not is_s3(output_root):
        raise EtlError(f"[CATALOG] DATABASE = {database} needs an S3 output root (Athena reads only S3); "
                       f"output is {output_root}")
    return database


def resolve_layout(config: Mapping[str, str], config_path: Optional[str]) -> Dict[str, Tuple[str, ...]]:
    """Partition columns per table: the contract's unless [LAYOUT] says otherwise ("none": unpartitioned)."""
    layout = dict(PARTITION_BY)
    for table in TABLES:
        value = config.get(f"{table.upper()}_PARTITION_BY", "")
        if not value:
            continue
        columns = () if value.lower() == NO_PARTITIONS else tuple(c.strip() for c in value.split(",") if c.strip())
        unknown = [c for c in columns if c not in TABLE_COLUMNS[table]]
        if unknown:
            raise EtlError(f"{table.upper()}_PARTITION_BY in {config_path} names {unknown[0]}, "
                           f"which is not a column of {table}")
        layout[table] = columns
    return layout


def resolve_aws(config: Mapping[str, str], environ: Mapping[str, str]) -> AwsSettings:
    """Keys from dl.cfg, else the standard environment variables, else the default AWS chain."""
    region = config.get("REGION") or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    endpoint = config.get("S3_ENDPOINT") or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    for source, keys in (("dl.cfg", config), ("environment", environ)):
        if keys.get("AWS_ACCESS_KEY_ID") or keys.get("AWS_SECRET_ACCESS_KEY"):
            if not (keys.get("AWS_ACCESS_KEY_ID") and keys.get("AWS_SECRET_ACCESS_KEY")):
                raise EtlError(f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together ({source} has only one)")
            return AwsSettings(keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"],
                               keys.get("AWS_SESSION_TOKEN") or None, region or None, endpoint or None, source)
    return AwsSettings(region=region or None, endpoint=endpoint or None)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEMES)


def split_s3(path: str) -> Tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return bucket, key.strip("/")


def normalize_root(path: str) -> str:
    """Local roots become absolute, so the job means the same folder wherever Spark runs it."""
    if is_remote(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


# --------------------------------------------------------------------------- preflight

def _is_visible(name: str) -> bool:
    """Spark skips names starting with '.' or '_' (.DS_Store, __MACOSX); so do our checks."""
    return not name.startswith((".", "_"))


def _is_visible_file(relative_path: str) -> bool:
    """A file readers see: no part of its path below a folder starts with '.' or '_' (not a folder marker)."""
    parts = relative_path.split("/")
    return parts[-1] != "" and all(_is_visible(part) for part in parts)


def _is_input_file(relative_path: str) -> bool:
    """The contract's input rule for a path below a tree: a visible *.json file."""
    return relative_path.endswith(".json") and _is_visible_file(relative_path)


def visible_files(folder: str) -> Iterator[str]:
    """Paths, relative to a local folder and "/"-separated, of the files below it that readers see."""
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if _is_visible(d))
        below = os.path.relpath(parent, folder)
        for name in sorted(filter(_is_visible, files)):
            yield name if below == "." else f"{below.replace(os.sep, '/')}/{name}"


def _has_json(folder: str) -> bool:
    return any(name.endswith(".json") for name in visible_files(folder))


def preflight_local(settings: Settings) -> None:
    """Fails in milliseconds, before any Spark start, on the mistakes a user is likely to make."""
    root = settings.input_root
    if not is_remote(root):
        if not os.path.isdir(root):
            raise EtlError(f"input root not found: {root}")
        for tree in (SONG_DATA, LOG_DATA):
            folder = join(root, tree)
            if not os.path.isdir(folder):
                raise EtlError(f"no {tree}/ folder under input root {root}")
            if not _has_json(folder):
                raise EtlError(f"no .json files under {folder}")
    for out in (settings.output_root, settings.rejected_root):
        if not is_remote(out):
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as exc:
                raise EtlError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
            if not os.access(out, os.W_OK):
                raise EtlError(f"output folder is not writable: {out}")


def _s3_client(aws: AwsSettings, attempts: int = 2, pool: int = 10):
    """The preflight's default is few, short retries: a wrong bucket or endpoint fails in seconds."""
    import boto3  # optional: only S3 runs need it, and EMR nodes have it
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": attempts, "mode": "standard"},
                    max_pool_connections=pool, s3={"addressing_style": "path"} if aws.endpoint else None)
    return boto3.client("s3", region_name=aws.region, endpoint_url=aws.endpoint, config=config,
                        aws_access_key_id=aws.access_key, aws_secret_access_key=aws.secret_key,
                        aws_session_token=aws.session_token)


def _s3_error(exc: Exception, bucket: str, what: str, endpoint: Optional[str]) -> EtlError:
    """One line for a failed S3 call: what was asked, and S3's own error code."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return EtlError(f"no AWS credentials found for {what}: set them in dl.cfg [AWS] or the environment")
    if isinstance(exc, EndpointConnectionError):
        return EtlError(f"cannot reach S3 at {endpoint or 'the AWS endpoint'} for {what}")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("NoSuchBucket", "404"):
            return EtlError(f"bucket not found: {bucket} (for {what})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return EtlError(f"S3 rejected the credentials ({code}) for {what}")
        return EtlError(f"S3 refused {what}: {code}")
    return EtlError(f"S3 check of {what} failed: {type(exc).__name__}")


def _require_json_objects(client, root: str, tree: str) -> None:
    bucket, prefix = split_s3(root)
    folder = "/".join(p for p in (prefix, tree) if p) + "/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
    seen_any = False
    for page in pages:
        for item in page.get("Contents", []):
            seen_any = True
            if _is_input_file(item["Key"][len(folder):]):
                return
    where = f"s3://{bucket}/{folder}"
    raise EtlError(f"no .json files under {where}" if seen_any else f"no {tree}/ under input root {root}")


def _require_writable(client, root: str) -> None:
    bucket, prefix = split_s3(root)
    probe = "/".join(p for p in (prefix, f"{PREFLIGHT_PROBE}-{os.getpid()}") if p)
    client.put_object(Bucket=bucket, Key=probe, Body=b"")
    client.delete_object(Bucket=bucket, Key=probe)


def preflight_s3(settings: Settings) -> None:
    """Seconds, not minutes: input has JSON in both trees, output can be written, credentials work."""
    if not settings.uses_s3:
        return
    try:
        client = _s3_client(settings.aws)
    except ImportError:
        LOG.warning("boto3 is not installed: skipping the S3 preflight")
        return
    checks: List[Tuple[str, str, Callable[[], None]]] = []
    if is_s3(settings.input_root):
        checks += [(settings.input_root, f"input {settings.input_root}/{tree}/",
                    lambda tree=tree: _require_json_objects(client, settings.input_root, tree))
                   for tree in (SONG_DATA, LOG_DATA)]
    for out in dict.fromkeys(p for p in (settings.output_root, settings.rejected_root) if is_s3(p)):
        checks.append((out, f"writing to {out}/", lambda out=out: _require_writable(client, out)))
    for root, what, check in checks:
        try:
            check()
        except EtlError:
            raise
        except Exception as exc:  # botocore's errors, turned into one line
            raise _s3_error(exc, split_s3(root)[0], what, settings.aws.endpoint) from None


# --------------------------------------------------------------------------- extract

LINE = "line"
PIECE = "_piece"  # a line before parse_lines: its text, or its bytes as BYTES_AS_TEXT text (PIECE_IS_TEXT false)
PIECE_IS_TEXT = "_piece_is_text"
RAW = "_raw"  # bytes as read: a file's, or a line's
TEXT = "_text"
# A file or line that is not valid UTF-8 is split and kept as ISO-8859-1 text, one character per byte, so
# no byte is lost or changed.
BYTES_AS_TEXT = "ISO-8859-1"
NOT_UTF8 = "_not_utf8"
UNKNOWN_FIELDS = "_unknown_fields"  # the keys of a line's JSON object that its schema does not know
REPLACEMENT_CHARACTER = "\ufffd"  # what decoding puts for each invalid UTF-8 sequence


def _with_corrupt_record(schema: T.StructType) -> T.StructType:
    return T.StructType(schema.fields + [T.StructField(CORRUPT_RECORD, T.StringType())])


def read_json(spark: SparkSession, path: str, schema: T.StructType, small_files: bool = False) -> DataFrame:
    """Every *.json below path, one record per non-blank line, as parse_lines gives them.

    small_files reads each file whole: for thousands of one-line files this is 2-3x faster than the line
    reader, which sets up a record reader and codec lookup per file (README, "Speed"). Files must then fit
    in memory, which is why the day-sized event logs use the line reader.
    """
    reader = spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.json")
    if not small_files:
        # Lines as text rather than Spark's JSON reader, so that a rejected line can be kept as it arrived.
        # A string cast to binary gives the bytes as read, valid UTF-8 or not.
        lines = reader.option("lineSep", "\n").text(path).select(
            F.col("_metadata.file_path").alias(SOURCE_FILE), F.col("value").cast("binary").alias(RAW))
        piece = F.col(PIECE)
        without_cr = F.when(piece.endswith("\r"), piece.substr(F.lit(1), F.length(piece) - 1)).otherwise(piece)
        return parse_lines(_as_pieces(lines).select(SOURCE_FILE, without_cr.alias(PIECE), PIECE_IS_TEXT), schema)
    files = reader.format("binaryFile").load(path).select(F.col("path").alias(SOURCE_FILE), "content")
    return parse_whole_files(files, schema)


def _is_utf8(raw: Column, text: Column) -> Column:
    """Whether raw bytes are valid UTF-8, given text, what decoding them as UTF-8 gave."""
    # Decoding puts U+FFFD for each invalid sequence: only a text holding one may differ from its bytes.
    return ~(F.instr(text, REPLACEMENT_CHARACTER) > 0) | (F.encode(text, "UTF-8") == raw)


def _as_pieces(frame: DataFrame) -> DataFrame:
    """(source_file, raw bytes) -> (source_file, piece, piece_is_text): the text, if the bytes are valid
    UTF-8 (nearly always), else the bytes as BYTES_AS_TEXT text."""
    decoded = frame.select(F.col(SOURCE_FILE), F.col(RAW), F.decode(F.col(RAW), "UTF-8").alias(TEXT))
    is_text = _is_utf8(F.col(RAW), F.col(TEXT))
    return decoded.select(
        F.col(SOURCE_FILE),
        F.when(is_text, F.col(TEXT)).otherwise(F.decode(F.col(RAW), BYTES_AS_TEXT)).alias(PIECE),
        is_text.alias(PIECE_IS_TEXT),
    )


def parse_whole_files(files: DataFrame, schema: T.StructType) -> DataFrame:
    """(source_file, content) rows -> one parsed record per non-blank line, as read_json's readers give."""
    pieces = _as_pieces(files.select(F.col(SOURCE_FILE), F.col("content").alias(RAW)))
    lines = F.explode(F.split(F.col(PIECE), "\r?\n"))
    return parse_lines(pieces.select(SOURCE_FILE, lines.alias(PIECE), PIECE_IS_TEXT), schema)


def parse_lines(lines: DataFrame, schema: T.StructType) -> DataFrame:
    """(source_file, piece, piece_is_text) rows, one per line, -> the line parsed with schema, beside the
    line as it arrived.

    A line is the bytes between two line ends (a line end is "\\n" or "\\r\\n"); blank lines are not records.
    A piece is the line's text, or if its file is not valid UTF-8, its bytes as BYTES_AS_TEXT text. Besides
    schema's fields: _corrupt_record (the text of a line that does not fit schema), source_file, line (the
    line's text; for a line that is not valid UTF-8, its bytes in base64), _not_utf8, and _unknown_fields
    (the keys of the line's JSON object that schema does not know; null if none).
    """
    line_bytes = F.encode(F.col(PIECE), BYTES_AS_TEXT)
    text = F.when(F.col(PIECE_IS_TEXT), F.col(PIECE)).otherwise(F.decode(line_bytes, "UTF-8"))
    # A line of a file that is not UTF-8 may be: it is judged on its own.
    not_utf8 = ~F.col(PIECE_IS_TEXT) & ~_is_utf8(line_bytes, F.col(LINE))
    # JSON text is UTF-8: a line that is not is kept as base64, which its reason says (in one piece: Spark
    # 3.5's base64 breaks its output into lines MIME-style).
    base64 = F.translate(F.base64(line_bytes), "\r\n", "")
    unknown = F.array_except(F.json_object_keys(F.col(LINE)), F.array(*[F.lit(name) for name in schema.fieldNames()]))
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_RECORD}
    return (
        lines.select(F.col(SOURCE_FILE), F.col(PIECE), F.col(PIECE_IS_TEXT), text.alias(LINE))
        .filter(F.trim(F.col(LINE)) != "")  # blank lines are not records
        .select(SOURCE_FILE, PIECE, LINE, not_utf8.alias(NOT_UTF8))
        .select(
            F.from_json(F.col(LINE), _with_corrupt_record(schema), options).alias("record"),
            F.col(SOURCE_FILE),
            F.when(F.col(NOT_UTF8), base64).otherwise(F.col(LINE)).alias(LINE),
            F.col(NOT_UTF8),
            F.when(F.size(unknown) > 0, unknown).alias(UNKNOWN_FIELDS),
        )
        .select("record.*", SOURCE_FILE, LINE, NOT_UTF8, UNKNOWN_FIELDS)
    )


@dataclass(frozen=True)
class S3Listing:
    """Reads S3 by listing on the driver and fetching inside the plan (plan_spark decides when)."""
    aws: AwsSettings


def list_s3_json(aws: AwsSettings, path: str) -> List[Tuple[str, int]]:
    """(path, size) of every visible *.json below path, from one flat listing: one LIST per 1,000 keys,
    never one per folder. Paths keep path's scheme, as Spark's own readers name them."""
    scheme = path.split("://", 1)[0]
    bucket, prefix = split_s3(path)
    pages = _s3_client(aws, attempts=S3_ATTEMPTS).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    found = []
    for page in pages:
        for item in page.get("Contents", []):
            if _is_input_file(item["Key"][len(prefix) + 1 if prefix else 0:]):
                found.append((f"{scheme}://{bucket}/{item['Key']}", item["Size"]))
    return found


def as_uri(path: str) -> str:
    """A path as Hadoop's URI form spells it (a space is %20), as Spark's _metadata.file_path gives it."""
    from urllib.parse import quote

    scheme, rest = path.split("://", 1)
    return f"{scheme}://{quote(rest, safe=URI_PATH_SAFE)}"


def fetch_s3_files(aws: AwsSettings, in_flight: int, uri_names: bool) -> Callable:
    """For mapPartitions: (path, size) pairs in, (source_file, content) rows out, with in_flight GETs at
    once in each task. Plain Python and boto3 on the workers (no Arrow needed). The credentials travel
    inside this closure, as they do in Hadoop's configuration, never in a log."""
    def fetch(files: Iterator[Tuple[str, int]]) -> Iterator[Tuple[str, bytes]]:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        client = _s3_client(aws, attempts=S3_ATTEMPTS, pool=in_flight)

        def get(path: str) -> Tuple[str, bytes]:
            bucket, key = split_s3(path)
            content = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            return as_uri(path) if uri_names else path, content

        # A sliding window: requests keep being started as the oldest results are handed on, so the in_flight
        # requests never drain between batches. Sizes come from the listing (no HEAD); at most about
        # FETCH_WINDOW_BYTES are held at once, which bounds memory when the files are day-sized logs.
        pool = ThreadPoolExecutor(in_flight)
        window: Deque[Tuple[Future, int]] = deque()
        held = 0
        try:
            for path, size in files:
                window.append((pool.submit(get, path), size))
                held += size
                while held >= FETCH_WINDOW_BYTES or len(window) >= FETCH_WINDOW_FILES:
                    oldest, oldest_size = window.popleft()
                    held -= oldest_size
                    yield oldest.result()
            for future, _ in window:
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, the requests not yet started go
    return fetch


def list_local_json(path: str) -> List[Tuple[str, int]]:
    """(path, 0) of every visible *.json below a local folder: reading a local file needs no size."""
    return [(os.path.join(path, name), 0) for name in visible_files(path) if name.endswith(".json")]


def fetch_local_files(files: Iterator[Tuple[str, int]]) -> Iterator[Tuple[str, bytes]]:
    """For mapPartitions: local (path, size) pairs in, (source_file, content) rows out, the path spelt as
    Spark's binaryFile reader spells it."""
    for path, _ in files:
        with open(path, "rb") as handle:
            yield f"file:{path}", handle.read()


def read_listed(spark: SparkSession, files: Sequence[Tuple[str, int]], schema: T.StructType,
                fetch: Callable) -> DataFrame:
    """Listed (path, size) pairs, fetched whole inside the plan and parsed as read_json parses lines.

    For many small files: Spark's own readers set up a reader per file and list folder by folder (one LIST
    per folder on S3); here one listing is shipped to tasks in slices, each task reading its slice."""
    conf = spark.sparkContext.getConf()
    per_task = int(conf.get(FILES_PER_TASK_CONF, str(FILES_PER_TASK)))
    tasks = max(1, spark.sparkContext.defaultParallelism, -(-len(files) // per_task))
    fetched = spark.createDataFrame(spark.sparkContext.parallelize(files, tasks).mapPartitions(fetch),
                                    f"{SOURCE_FILE} string, content binary")
    return parse_whole_files(fetched, schema)


def read_input(spark: SparkSession, input_root: str, tree: str,
               listing: Optional[S3Listing] = None) -> Tuple[DataFrame, int]:
    """One input tree and its file count. S3 off EMR is listed flat and fetched in the plan, as are local
    song files; on EMR, and for local event logs (few, day-sized), Spark's own readers."""
    folder, songs = join(input_root, tree), tree == SONG_DATA
    schema = SONG_SCHEMA if songs else LOG_SCHEMA
    if listing:
        files = list_s3_json(listing.aws, folder)
        in_flight = int(spark.sparkContext.getConf().get(S3_READ_IN_FLIGHT_CONF, str(S3_READ_IN_FLIGHT)))
        # The same source_file strings as Spark's readers: binaryFile (songs) gives the path as it is, the
        # line reader's _metadata.file_path (logs) its URI form.
        fetch = fetch_s3_files(listing.aws, in_flight, uri_names=not songs)
        return read_listed(spark, files, schema, fetch), len(files)
    if songs and not is_remote(folder):
        files = list_local_json(folder)
        return read_listed(spark, files, schema, fetch_local_files), len(files)
    raw = read_json(spark, folder, schema, small_files=songs)
    return raw, len(raw.inputFiles())


def read_song_data(spark: SparkSession, input_root: str) -> DataFrame:
    return read_input(spark, input_root, SONG_DATA)[0]


def read_log_data(spark: SparkSession, input_root: str) -> DataFrame:
    return read_input(spark, input_root, LOG_DATA)[0]


# What each tree rejects besides bad lines: (the field a record cannot do without, the reason given).
REJECT_RULES = {SONG_DATA: ("song_id", REASON_NO_SONG_ID), LOG_DATA: ("ts", REASON_BAD_TS)}
# The fields a delivery must carry, and where: (field, the page whose events carry it; None: every record).
# Visitors who are not logged in have userId "" on their pages, and only NextSong events name a song.
REQUIRED_FIELDS = {
    SONG_DATA: (("song_id", None),),
    LOG_DATA: (("ts", None), ("page", None), ("userId", NEXT_SONG), ("song", NEXT_SONG)),
}
UNKNOWN_PREFIX = "unknown:"


def _reject_reason(required: str, missing_reason: str) -> Column:
    corrupt = F.col(CORRUPT_RECORD)
    # A line that parses as a JSON object but not into the schema is a type error, not bad JSON.
    not_json = F.from_json(corrupt, "map<string,string>").isNull()
    return (
        F.when(F.col(NOT_UTF8), F.lit(REASON_NOT_UTF8))
        .when(corrupt.isNotNull() & not_json, F.lit(REASON_MALFORMED))
        .when(F.col(required).isNull() | (F.trim(F.col(required).cast("string")) == ""), F.lit(missing_reason))
        .when(corrupt.isNotNull(), F.lit(REASON_BAD_TYPE))
    )


def split_rejects(raw: DataFrame, schema: T.StructType, required: str,
                  missing_reason: str) -> Tuple[DataFrame, DataFrame]:
    """Splits parsed lines into clean records and rejects (source_file, reason, line as it arrived)."""
    judged = raw.withColumn(REASON, _reject_reason(required, missing_reason))
    clean = judged.filter(F.col(REASON).isNull()).select(*schema.fieldNames(), SOURCE_FILE)
    rejects = judged.filter(F.col(REASON).isNotNull()).select(SOURCE_FILE, REASON, LINE)
    return clean, rejects


def split_songs(raw: DataFrame) -> Tuple[DataFrame, DataFrame]:
    return split_rejects(raw, SONG_SCHEMA, *REJECT_RULES[SONG_DATA])


def split_events(raw: DataFrame) -> Tuple[DataFrame, DataFrame]:
    return split_rejects(raw, LOG_SCHEMA, *REJECT_RULES[LOG_DATA])


def lines_of_rejects_only(raw: DataFrame, tree: str) -> DataFrame:
    """Parsed lines with the text of those that will be accepted dropped: the parsed lines are cached, and
    an accepted line's text would double what that costs; a reject's text is what the rejects keep."""
    return raw.withColumn(LINE, F.when(_reject_reason(*REJECT_RULES[tree]).isNotNull(), F.col(LINE)))


def profile_read(raw: DataFrame, tree: str) -> Dict[str, object]:
    """What one tree's parsed lines hold, in one job: records, rejected ones, JSON objects; of the objects
    that should carry each of REQUIRED_FIELDS, how many do not (missing, null, empty or of the wrong type);
    and per field the schema does not know, how many lines carry it."""
    judged = raw.withColumn(REASON, _reject_reason(*REJECT_RULES[tree]))
    reason = F.col(REASON)
    is_object = reason.isNull() | ~reason.isin(REASON_MALFORMED, REASON_NOT_UTF8)
    conditions = {"records": F.lit(True), "rejected": reason.isNotNull(), "json_objects": is_object}
    for name, page in REQUIRED_FIELDS[tree]:
        expected = is_object if page is None else is_object & (F.col("page") == page)
        empty = F.col(name).isNull() | (F.trim(F.col(name).cast("string")) == "")
        conditions[f"{name}:expected"] = expected
        conditions[f"{name}:missing"] = expected & empty
    counted = judged.agg(*[F.count(F.when(condition, True)).alias(name) for name, condition in conditions.items()])
    by_name = F.create_map(*[part for name in conditions for part in (F.lit(name), F.col(name))])
    unknown = (
        raw.select(F.explode(F.col(UNKNOWN_FIELDS)).alias("field"))
        .groupBy("field").agg(F.count(F.lit(1)).alias("count"))
        .select(F.concat(F.lit(UNKNOWN_PREFIX), F.col("field")).alias("name"), F.col("count"))
    )
    # Both parts in one job: a job costs a few hundred ms of scheduling.
    found = {row["name"]: row["count"] for row in
             counted.select(F.explode(by_name).alias("name", "count")).unionByName(unknown).collect()}
    return {
        "records": found["records"],
        "rejected": found["rejected"],
        "json_objects": found["json_objects"],
        "required": {name: {"expected": found[f"{name}:expected"], "missing": found[f"{name}:missing"]}
                     for name, _ in REQUIRED_FIELDS[tree]},
        "unknown_fields": {name[len(UNKNOWN_PREFIX):]: count for name, count in sorted(found.items())
                           if name.startswith(UNKNOWN_PREFIX)},
    }


# --------------------------------------------------------------------------- transform

def known_user_events(events: DataFrame) -> DataFrame:
    """Events of logged-in users, with userId as a long user_id; "", null and non-numbers are nobody."""
    user_id = F.trim(F.col("userId"))
    return (
        events.withColumn("user_id", F.when(user_id.rlike(USER_ID_PATTERN), user_id.cast("long")))
        .filter(F.col("user_id").isNotNull())
    )


def _count_nulls(columns: Sequence[str]) -> Column:
    total = F.lit(0)
    for name in columns:
        total = total + F.col(name).isNull().cast("int")
    return total


def build_songs(songs: DataFrame) -> DataFrame:
    attributes = ["title", "artist_id", "year", "duration"]
    # A song_id seen twice keeps its fullest record; remaining ties fall to the smallest values.
    best = F.min(F.struct(_count_nulls(attributes).alias("nulls"), *attributes)).alias("best")
    return (
        songs.groupBy("song_id").agg(best)
        .select(
            F.col("song_id"),
            F.col("best.title").alias("title"),
            F.col("best.artist_id").alias("artist_id"),
            F.col("best.year").cast("int").alias("year"),
            F.col("best.duration").cast("double").alias("duration"),
        )
    )


def build_artists(songs: DataFrame) -> DataFrame:
    location = F.when(F.trim(F.col("artist_location")) != "", F.col("artist_location"))
    records = songs.filter(F.col("artist_id").isNotNull()).select(
        F.col("artist_id"),
        F.col("song_id"),
        F.col("artist_name").alias("name"),
        location.alias("location"),
        F.col("artist_latitude").cast("double").alias("latitude"),
        F.col("artist_longitude").cast("double").alias("longitude"),
    )
    attributes = ["name", "location", "latitude", "longitude"]
    # The record with most known attributes wins, then the smallest song_id (the contract's rule).
    best = F.min(F.struct(_count_nulls(attributes).alias("nulls"), "song_id", *attributes)).alias("best")
    return (
        records.groupBy("artist_id").agg(best)
        .select(
            F.col("artist_id"),
            F.col("best.name").alias("name"),
            F.col("best.location").alias("location"),
            F.col("best.latitude").alias("latitude"),
            F.col("best.longitude").alias("longitude"),
        )
    )


def build_users(events: DataFrame) -> DataFrame:
    # Struct order is the rule: latest ts, then latest itemInSession; the rest only breaks exact ties.
    latest = F.max(F.struct("ts", "itemInSession", "level", "firstName", "lastName", "gender")).alias("latest")
    return (
        known_user_events(events).groupBy("user_id").agg(latest)
        .select(
            F.col("user_id"),
            F.col("latest.firstName").alias("first_name"),
            F.col("latest.lastName").alias("last_name"),
            F.col("latest.gender").alias("gender"),
            F.col("latest.level").alias("level"),
        )
    )


def next_song_plays(events: DataFrame) -> DataFrame:
    """One row per distinct NextSong event of a known user, with its deterministic songplay_id."""
    attributes = ["level", "song", "artist", "length", "location", "userAgent"]
    # A redelivered event is one play; max() picks the same copy on every run if copies differ.
    one_copy = F.max(F.struct(*attributes)).alias("event")
    songplay_id = F.sha2(F.to_json(F.struct(*EVENT_KEY)), 256).substr(1, SONGPLAY_ID_HEX_CHARS)
    return (
        known_user_events(events).filter(F.col("page") == NEXT_SONG)
        .groupBy(*EVENT_KEY).agg(one_copy)
        .select(*EVENT_KEY, "event.*")
        .withColumn("songplay_id", songplay_id)
    )


def match_songs(plays: DataFrame, songs: DataFrame, artists: DataFrame) -> DataFrame:
    """Each play with the song_id and artist_id of the song its title, artist name and duration fit, or nulls."""
    catalogue = songs.join(artists, on="artist_id", how="inner").select(
        F.col("song_id"), F.col("artist_id"), F.col("title"), F.col("name").alias("artist_name"), F.col("duration"),
    )
    fits = (
        (F.col("p.song") == F.col("c.title"))
        & (F.col("p.artist") == F.col("c.artist_name"))
        & (F.abs(F.col("p.length") - F.col("c.duration")) <= DURATION_TOLERANCE_S + FLOAT_SLACK)
    )
    # Several fitting songs: the smallest song_id wins, so the match is the same on every run.
    best = F.min(F.struct(F.col("c.song_id").alias("song_id"), F.col("c.artist_id").alias("artist_id")))
    # Plays come grouped and sorted by their event key: grouping by it again after a broadcast join needs no
    # second shuffle or sort of the plays. A play's own columns are the same on each of its joined rows.
    play = F.struct(*[F.col(f"p.{name}").alias(name) for name in plays.columns if name not in EVENT_KEY])
    return (
        plays.alias("p").join(F.broadcast(catalogue.alias("c")), on=fits, how="left")
        .groupBy(*[F.col(f"p.{name}").alias(name) for name in EVENT_KEY])
        .agg(F.max(play).alias("play"), best.alias("match"))
        .select(*EVENT_KEY, "play.*", F.col("match.song_id").alias("song_id"),
                F.col("match.artist_id").alias("artist_id"))
    )


def build_songplays(events: DataFrame, songs: DataFrame, artists: DataFrame) -> DataFrame:
    start_time = F.timestamp_millis(F.col("ts"))
    return (
        match_songs(next_song_plays(events), songs, artists)
        .select(
            F.col("songplay_id"),
            start_time.alias("start_time"),
            F.col("user_id"),
            F.col("level"),
            F.col("song_id"),
            F.col("artist_id"),
            F.col("sessionId").alias("session_id"),
            F.col("location"),
            F.col("userAgent").alias("user_agent"),
            F.year(start_time).alias("year"),
            F.month(start_time).alias("month"),
        )
    )


def build_time(songplays: DataFrame) -> DataFrame:
    start = F.col("start_time")
    # dayofweek() counts Sunday = 1; ISO counts Monday = 1 ... Sunday = 7.
    iso_weekday = (F.dayofweek(start) + 5) % 7 + 1
    return (
        songplays.select(start).distinct()
        .select(
            start,
            F.hour(start).alias("hour"),
            F.dayofmonth(start).alias("day"),
            F.weekofyear(start).alias("week"),  # ISO-8601 week, as Spark documents
            F.month(start).alias("month"),
            F.year(start).alias("year"),
            iso_weekday.cast("int").alias("weekday"),
        )
    )


def build_tables(songs: DataFrame, events: DataFrame,
                 on_built: Callable[[str, DataFrame], DataFrame] = lambda name, df: df) -> Dict[str, DataFrame]:
    """All five tables from clean song records and clean events; on_built sees each as it is made."""
    tables = {SONGS: on_built(SONGS, build_songs(songs)), ARTISTS: on_built(ARTISTS, build_artists(songs))}
    tables[USERS] = on_built(USERS, build_users(events))
    tables[SONGPLAYS] = on_built(SONGPLAYS, build_songplays(events, tables[SONGS], tables[ARTISTS]))
    tables[TIME] = on_built(TIME, build_time(tables[SONGPLAYS]))
    return tables


# --------------------------------------------------------------------------- quality gate

@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    value: Optional[float] = None  # what this run measured
    threshold: Optional[float] = None  # the limit the value is held to; the detail says which way
    previous: Optional[float] = None  # for a drift check, the same measure at the last successful run


AGGREGATE_NAME = "_aggregate"
SUCCEEDED = "succeeded"
# What was read that calls for one row of each table: the contract's rules, counted on the parsed input.
READ_ROWS = {
    SONGS: "accepted song_id",
    ARTISTS: "artist_id of an accepted song",
    USERS: "known user in the events",
    TIME: "ts of a NextSong event of a known user",
    SONGPLAYS: "NextSong event of a known user",
}
RECORDS = {SONG_DATA: "song records", LOG_DATA: "events"}
NOTHING_EARLIER = "no earlier successful run to compare with"
# A match rate made of fewer matched plays than this is noise (the sample has one): it is not compared.
MIN_MATCHED_TO_COMPARE = 50
# Fewer lines than this lacking a required field are a few bad lines, which rejects are for (one of the
# sample's 71 song files is 1.4%), not a field gone upstream: they never fail the run.
MIN_MISSING_LINES = 10
SHARE_DIGITS = 6


def collect_aggregates(aggregates: Mapping[str, DataFrame]) -> Dict[str, Row]:
    """Several one-row aggregates, by name, collected together: one Spark job instead of one each, as a
    job costs a few hundred ms of scheduling."""
    named = [frame.select(F.lit(name).alias(AGGREGATE_NAME), "*") for name, frame in aggregates.items()]
    return {row[AGGREGATE_NAME]: row for row in reduce(DataFrame.unionByName, named).collect()}


def read_rows(songs: DataFrame, events: DataFrame) -> Dict[str, DataFrame]:
    """Per table, a one-row count of what was read that calls for one row each (READ_ROWS): computed from
    the accepted records, not from the tables."""
    known = known_user_events(events)
    plays = known.filter(F.col("page") == NEXT_SONG)
    # A struct is never null, and distinct counts a null field as a value: as a groupBy on the key would.
    return {
        SONGS: songs.agg(F.countDistinct(F.col("song_id")).alias("n")),
        ARTISTS: songs.agg(F.countDistinct(F.col("artist_id")).alias("n")),
        USERS: known.agg(F.countDistinct(F.col("user_id")).alias("n")),
        TIME: plays.agg(F.countDistinct(F.col("ts")).alias("n")),
        SONGPLAYS: plays.agg(F.countDistinct(F.struct(*EVENT_KEY)).alias("n")),
    }


def measure(tables: Mapping[str, DataFrame], songs: DataFrame, events: DataFrame) -> Dict[str, object]:
    """In one job: each table's rows, the songplays matched to a song, and the rows what was read calls for."""
    aggregates = {f"rows {name}": tables[name].agg(F.count(F.lit(1)).alias("n")) for name in TABLES}
    aggregates["matched"] = tables[SONGPLAYS].agg(F.count(F.col("song_id")).alias("n"))
    aggregates.update({f"read {name}": frame for name, frame in read_rows(songs, events).items()})
    found = collect_aggregates(aggregates)
    return {"rows": {name: found[f"rows {name}"]["n"] for name in TABLES},
            "read": {name: found[f"read {name}"]["n"] for name in TABLES},
            "matched": found["matched"]["n"]}


def _share(part: float, whole: Optional[float]) -> float:
    """part / whole, rounded as the report shows it: a check compares the value it reports."""
    return round(part / whole, SHARE_DIGITS) if whole else 0.0


def run_figures(measured: Mapping[str, object], read: Mapping[str, Mapping[str, object]]) -> Dict[str, object]:
    """The figures the next run measures drift against, kept in this run's report."""
    songplays = measured["rows"][SONGPLAYS]
    return {
        "rows": dict(measured["rows"]),
        "matched_songplays": measured["matched"],
        "match_rate": _share(measured["matched"], songplays) if songplays else None,
        "rejected_share": {tree: _share(profile["rejected"], profile["records"]) for tree, profile in read.items()},
    }


def figures_of(document: Mapping[str, object]) -> Dict[str, object]:
    """An earlier run's figures, from its report; one from before the gate kept them has no match rate."""
    kept = (document.get("quality") or {}).get("figures")
    if kept:
        return kept
    inputs, rejected = document.get("input") or {}, document.get("rejected") or {}
    return {
        "rows": {name: entry.get("rows") for name, entry in (document.get("tables") or {}).items()},
        "matched_songplays": None,
        "match_rate": None,
        "rejected_share": {tree: _share(rejected.get(tree, 0), inputs[records]) for tree, (_, records)
                           in REPORT_INPUT_KEYS.items() if inputs.get(records)},
    }


def last_successful_run(store, output_root: str) -> Optional[dict]:
    """The report of the newest run that succeeded, from <output>/_runs/ (run ids start with their UTC
    time, so names sort in time order), or None."""
    folder = join(output_root, RUNS_DIR)
    names = sorted((key for key in store.keys(folder) if "/" not in key and key.endswith(".json")), reverse=True)
    for name in names:
        document = store.read_json(join(folder, name))
        if document and document.get("status") == SUCCEEDED:
            return document
    return None


def required_field_checks(read: Mapping[str, Mapping[str, object]], quality: QualitySettings) -> List[Check]:
    """Schema drift: a field renamed, dropped or emptied upstream makes rows vanish or go unmatched silently."""
    checks, limit = [], quality.max_missing_share
    for tree, fields in REQUIRED_FIELDS.items():
        for name, page in fields if tree in read else ():
            counts, where = read[tree]["required"][name], f"{page} events" if page else RECORDS[tree]
            share = _share(counts["missing"], counts["expected"])
            detail = f"missing or empty in {counts['missing']:,} of {counts['expected']:,} {where} ({share:.2%}; " \
                     f"at most {limit:.2%}, or fewer than {MIN_MISSING_LINES} lines)"
            passed = share <= limit or counts["missing"] < MIN_MISSING_LINES
            checks.append(Check(f"{name} is present in {where}", passed, detail, value=share, threshold=limit))
    return checks


def table_checks(measured: Mapping[str, object]) -> List[Check]:
    """Every table has rows; and as many as what was read calls for. The second can only fail if the code
    between reading and writing (the builders) loses or repeats rows: it guards the write against that."""
    checks = []
    for name in TABLES:
        rows, read = measured["rows"][name], measured["read"][name]
        checks.append(Check(f"{name} is not empty", rows > 0, f"{rows:,} rows", value=rows, threshold=1))
        checks.append(Check(f"{name} has one row per {READ_ROWS[name]}", rows == read,
                            f"{rows:,} rows; what was read holds {read:,}", value=rows, threshold=read))
    return checks


def _fall(now: float, was: float) -> Tuple[float, str]:
    """How far now fell below was, as a share of was, and in words."""
    fall = _share(was - now, was)
    return fall, f"{'fell' if fall > 0 else 'rose'} {abs(fall):.1%}" if fall else "unchanged"


def drift_checks(figures: Mapping[str, object], previous: Optional[Mapping[str, object]],
                 quality: QualitySettings) -> List[Check]:
    """Against the last successful run: a table losing rows, plays no longer matching songs, more rejects.
    Without an earlier run (or an earlier figure), each passes and says so."""
    before = figures_of(previous) if previous else {"rows": {}, "rejected_share": {}}
    since = f"at the last successful run ({previous.get('run_id')})" if previous else ""
    checks = []
    for name in TABLES:
        now, was, limit = figures["rows"][name], before["rows"].get(name), quality.max_rows_fall
        fall, words = _fall(now, was) if was is not None else (0.0, NOTHING_EARLIER)
        detail = f"{now:,} rows, {was:,} {since}: {words} (at most a {limit:.0%} fall)" if was is not None \
            else f"{now:,} rows; {words}"
        checks.append(Check(f"{name} rows did not fall", fall <= limit, detail, value=now, threshold=limit,
                            previous=was))

    now, was, limit = figures["match_rate"], before.get("match_rate"), quality.max_match_rate_fall
    fall, matched = 0.0, f"{now:.2%} of songplays matched to a song" if now is not None else ""
    if now is None:
        detail = "no songplays"
    elif not previous:
        detail = f"{matched}; {NOTHING_EARLIER}"
    elif was is None or (before.get("matched_songplays") or 0) < MIN_MATCHED_TO_COMPARE:
        detail = f"{matched}; fewer than {MIN_MATCHED_TO_COMPARE} matched songplays {since}: too few to compare"
    else:
        fall, words = _fall(now, was)
        detail = f"{matched}, {was:.2%} {since}: {words} (at most a {limit:.0%} fall, relative to itself)"
    checks.append(Check("match rate did not fall", fall <= limit, detail, value=now, threshold=limit, previous=was))

    limit = quality.max_rejected_share_rise
    for tree, now in figures["rejected_share"].items():
        was = before["rejected_share"].get(tree)
        rise = round(now - was, SHARE_DIGITS) if was is not None else 0.0
        detail = f"{now:.2%} of lines rejected, {was:.2%} {since}: {rise * 100:+.2f} points " \
                 f"(at most +{limit * 100:.2f})" if was is not None \
            else f"{now:.2%} of lines rejected; {NOTHING_EARLIER}"
        checks.append(Check(f"{tree} rejected share did not rise", rise <= limit, detail, value=now, threshold=limit,
                            previous=was))
    return checks


def run_checks(measured: Mapping[str, object], read: Optional[Mapping[str, Mapping[str, object]]] = None,
               quality: QualitySettings = QualitySettings(), previous: Optional[Mapping[str, object]] = None,
               ) -> List[Check]:
    """The quality gate: nothing is published unless every check passes. Causes first (a required field
    gone), then what they do to the tables: the first failed check is the one the error line names."""
    read = read or {}
    return required_field_checks(read, quality) + table_checks(measured) + \
        drift_checks(run_figures(measured, read), previous, quality)


def quality_gate(tables: Mapping[str, DataFrame], songs: DataFrame, events: DataFrame, report: RunReport,
                 settings: Settings, store) -> List[Check]:
    """Measures the tables and what was read, against the last successful run; keeps the figures in the report."""
    previous = last_successful_run(store, settings.output_root)
    measured = measure(tables, songs, events)
    read = report.quality.get("read", {})
    report.quality.update(figures=run_figures(measured, read), previous_run=previous and previous.get("run_id"))
    return run_checks(measured, read, settings.quality, previous)


def gate_failure(failed: Sequence[Check]) -> str:
    """The one line a user sees when the gate fails: the first failed check, by name."""
    others = len(failed) - 1
    more = f" (and {others} more failed check{'s' if others > 1 else ''}: see the run report)" if others else ""
    return f'the quality gate failed: "{failed[0].name}": {failed[0].detail}{more}; no table was published, ' \
           f"the previous tables stay"


# --------------------------------------------------------------------------- load

def write_table(table: DataFrame, path: str, partition_by: Sequence[str]) -> None:
    # One file per partition folder: each folder's rows are brought to one task first. The task count is
    # given, as adaptive execution would otherwise coalesce a small table into one task, which then opens
    # every folder's file on one core (the songs table: thousands of files, a writer each).
    if partition_by:
        tasks = int(table.sparkSession.conf.get("spark.sql.shuffle.partitions"))
        table = table.repartition(tasks, *[F.col(c) for c in partition_by])
    else:
        table = table.coalesce(1)
    writer = table.write.mode("overwrite")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(path)


# --------------------------------------------------------------------------- staging, publish, lock

class LocalStore:
    """Output on local disk: files through os, a table swapped in by renaming its folder."""

    def __init__(self) -> None:
        self._locks: Dict[str, object] = {}

    def read_json(self, path: str) -> Optional[dict]:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def write_json(self, path: str, document: dict) -> None:
        # Write aside, then rename: a reader or a crash never sees half a file.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
        os.replace(partial, path)

    def children(self, path: str) -> List[str]:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def keys(self, path: str) -> List[str]:
        """Every file below path, relative to it, as S3Store.keys lists them."""
        return [os.path.relpath(os.path.join(parent, name), path).replace(os.sep, "/")
                for parent, _, files in os.walk(path) for name in files]

    def remove(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def swap_in(self, staged: str, final: str, old: str) -> None:
        """Puts staged where final is, atomically where the kernel allows; the previous final ends up at old."""
        if not os.path.exists(staged):
            return  # swapped in already, before a crash
        if os.path.exists(final):
            os.makedirs(os.path.dirname(old), exist_ok=True)
            if _exchange(staged, final):
                os.rename(staged, old)  # staged now names the previous version
                return
            os.rename(final, old)  # no atomic exchange: the table is missing for one rename
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(staged, final)

    def has_data(self, path: str) -> bool:
        return next(visible_files(path), None) is not None

    def plan_publish(self, unit: Unit, run_id: str) -> dict:
        return {}  # a folder swap needs nothing but the unit's names

    def publish_unit(self, unit: Unit, run_id: str, entry: dict) -> None:
        self.swap_in(unit.staged(run_id), unit.final(), unit.old(run_id))

    def take_lock(self, root: str, run_id: str) -> None:
        import fcntl  # POSIX only, like the atomic swap; the kernel drops the lock when the process dies

        handle = open(join(root, LOCK_NAME), "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise EtlError(f"another run is writing to {root} ({holder}); wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"run {run_id}, pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._locks[root] = handle

    def release_lock(self, root: str) -> None:
        handle = self._locks.pop(root, None)
        if handle is not None:
            handle.close()


def _exchange(first: str, second: str) -> bool:
    """Linux's renameat2(RENAME_EXCHANGE): swaps two folders in one step, so a reader sees one or the other."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        rename_exchange, at_cwd = 2, -100
        return libc.renameat2(at_cwd, first.encode(), at_cwd, second.encode(), rename_exchange) == 0
    except (AttributeError, OSError):  # not Linux, or a C library without renameat2
        return False


class S3Store:
    """Output on S3 through boto3: no rename, so a table is published by server-side copies, many at once."""

    def __init__(self, aws: AwsSettings) -> None:
        try:
            self._client = _s3_client(aws, attempts=S3_ATTEMPTS, pool=S3_REQUESTS_IN_FLIGHT)
        except ImportError:
            raise EtlError("boto3 is needed to publish to S3 (pip install boto3; EMR nodes have it)") from None
        self._renewer: Optional[threading.Timer] = None

    def read_json(self, path: str) -> Optional[dict]:
        bucket, key = split_s3(path)
        try:
            return json.loads(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except self._client.exceptions.NoSuchKey:
            return None

    def write_json(self, path: str, document: dict, **conditions: str) -> None:
        bucket, key = split_s3(path)
        self._client.put_object(Bucket=bucket, Key=key, Body=json.dumps(document, indent=2).encode() + b"\n",
                                ContentType="application/json", **conditions)

    def keys(self, path: str) -> List[str]:
        """Every key below path, relative to it: one LIST request per 1,000 keys, whatever the depth."""
        bucket, prefix = split_s3(path)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        return [item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", [])]

    def children(self, path: str) -> List[str]:
        bucket, prefix = split_s3(path)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/",
                                                                        Delimiter="/")
        return sorted(p["Prefix"][len(prefix) + 1:].rstrip("/") for page in pages
                      for p in page.get("CommonPrefixes", []))

    def remove(self, path: str, keys: Optional[Sequence[str]] = None) -> None:
        bucket, prefix = split_s3(path)
        keys = self.keys(path) if keys is None else keys
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{"Key": f"{prefix}/{key}"} for key in keys[start:start + S3_DELETE_BATCH]]
            self._client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    def copy(self, source: str, target: str, keys: Sequence[str]) -> None:
        (source_bucket, source_prefix), (bucket, prefix) = split_s3(source), split_s3(target)

        def copy_one(key: str) -> None:
            self._client.copy_object(Bucket=bucket, Key=f"{prefix}/{key}",
                                     CopySource={"Bucket": source_bucket, "Key": f"{source_prefix}/{key}"})
        _in_flight(copy_one, keys)

    def upload(self, folder: str, target: str) -> int:
        """PUTs every visible file below a local folder to the same relative key below target, one request
        each, many at once; returns how many."""
        bucket, prefix = split_s3(target)
        names = list(visible_files(folder))

        def put(name: str) -> None:
            with open(os.path.join(folder, name), "rb") as body:
                self._client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
        _in_flight(put, names)
        return len(names)

    def has_data(self, path: str) -> bool:
        return any(map(_is_visible_file, self.keys(path)))

    def plan_publish(self, unit: Unit, run_id: str) -> dict:
        """The keys to copy in and, of the published ones, those to delete afterwards."""
        # Directory markers (keys ending in "/", kept by S3A: fs.s3a.directory.marker.retention) are not data.
        new = [key for key in self.keys(unit.staged(run_id)) if key and not key.endswith("/")]
        return {"new": new, "old": sorted(set(self.keys(unit.final())) - set(new))}

    def publish_unit(self, unit: Unit, run_id: str, entry: dict) -> None:
        # New files first, then the old ones go: a reader sees the old version, then both, then the new.
        self.copy(unit.staged(run_id), unit.final(), entry["new"])
        self.remove(unit.final(), entry["old"])

    def take_lock(self, root: str, run_id: str) -> None:
        """A lease object, created only if absent (a conditional PUT); a lease not renewed in time is stale."""
        path = join(root, LEASE_NAME)
        lease = self.read_json(path)
        if lease and not _is_stale(lease):
            raise EtlError(f"another run is writing to {root} (run {lease.get('run_id')} on {lease.get('host')}, "
                           f"lease until {_utc(lease['expires_at'])}); wait, or see README to clear a stale lease")
        if lease:
            LOG.warning("taking over the stale lease of run %s (until %s, pid %s on %s)", lease.get("run_id"),
                        _utc(lease.get("expires_at", 0)), lease.get("pid"), lease.get("host"))
            self.remove(root, [LEASE_NAME])
        try:
            self._renew(path, run_id, IfNoneMatch="*")
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            raise EtlError(f"another run took the lease of {root} just now; wait for it to finish") from None

    def _renew(self, path: str, run_id: str, **conditions: str) -> None:
        document = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "expires_at": time.time() + LEASE_TTL_S}
        if conditions:  # taking the lease: a failure is the caller's to report
            self.write_json(path, document, **conditions)
        else:
            try:  # renewing, on a timer thread: a failure must not print a traceback; the run fails anyway
                self.write_json(path, document)
            except Exception as exc:
                LOG.warning("could not renew the lease %s: %s", path, _one_line(exc))
        self._renewer = threading.Timer(LEASE_RENEW_S, self._renew, args=(path, run_id))
        self._renewer.daemon = True  # a dead driver stops renewing, so its lease goes stale
        self._renewer.start()

    def release_lock(self, root: str) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        self.remove(root, [LEASE_NAME])


def _in_flight(request: Callable[[str], None], keys: Sequence[str]) -> None:
    """One request per key, S3_REQUESTS_IN_FLIGHT at once: each is a round trip, and S3 serves many."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(S3_REQUESTS_IN_FLIGHT)
    try:
        for _ in pool.map(request, keys):
            pass
    finally:
        # After a failure, the requests not yet started are dropped: S3 failing one is likely to fail them all.
        pool.shutdown(wait=True, cancel_futures=True)


def _is_stale(lease: dict) -> bool:
    """Not renewed in time, or its run was on this machine and its process is gone (killed, say)."""
    if lease.get("expires_at", 0) < time.time():
        return True
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", 0)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        pass
    return False


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds")


def open_store(root: str, aws: AwsSettings):
    return S3Store(aws) if is_s3(root) else LocalStore()


@dataclass(frozen=True)
class Unit:
    """One folder readers see (a table, or a tree's rejects) and where this run stages it."""
    root: str
    name: str

    def final(self) -> str:
        return join(self.root, self.name)

    def staged(self, run_id: str) -> str:
        return join(self.root, STAGING_DIR, run_id, self.name)

    def old(self, run_id: str) -> str:
        return join(self.root, STAGING_DIR, run_id, OLD_VERSIONS_DIR, self.name)


def publish(store, units: Sequence[Unit], run_id: str, journal_path: str) -> None:
    """Makes the staged units the published ones. The journal, written first, lets the next run finish a
    publish that was killed half-way; the store adds what it needs to finish (on S3, the keys)."""
    journal = {"run_id": run_id, "units": [{**vars(unit), **store.plan_publish(unit, run_id)} for unit in units]}
    store.write_json(journal_path, journal)
    pause_point("publish")
    finish_publish(store, journal)


def finish_publish(store, journal: dict) -> None:
    """Idempotent: run again on the same journal, it does only what is left."""
    for entry in journal["units"]:
        unit = Unit(entry["root"], entry["name"])
        store.publish_unit(unit, journal["run_id"], entry)
        LOG.debug("published %s", unit.final())
        pause_point(f"published {unit.name}")


def recover(store, roots: Sequence[str], output_root: str) -> Dict[str, List[str]]:
    """Before anything else: finish a publish a killed run left half-done, then clear dead runs' staging.
    Returns, per run whose publish it finished, the folders that run published."""
    staging = join(output_root, STAGING_DIR)
    finished = {}
    for run_id in store.children(staging):
        journal = store.read_json(join(staging, run_id, PUBLISH_JOURNAL))
        if journal:
            LOG.warning("finishing the publish of run %s, which was stopped half-way", run_id)
            finish_publish(store, journal)
            finished[run_id] = [Unit(entry["root"], entry["name"]).final() for entry in journal["units"]]
    for root in roots:
        store.remove(join(root, STAGING_DIR))
    return finished


def pause_point(name: str) -> None:
    """Fault injection for the crash tests: SPARKIFY_PAUSE_AT=<name>[,<name>...] stops the run at each point
    named until a line arrives on its standard input (so one run can be looked at in several states), or
    until it is killed."""
    if name in os.environ.get(PAUSE_ENV, "").split(","):
        print(f"paused at {name}", file=sys.stderr, flush=True)
        if not sys.stdin.readline():  # no input to resume it (closed, or /dev/null): wait to be killed
            while True:
                time.sleep(60)


# --------------------------------------------------------------------------- the Glue Data Catalog

def s3_uri(path: str) -> str:
    """Athena and Glue know s3:// only; s3a:// and s3n:// name the same objects."""
    return "s3://" + path.split("://", 1)[1]


def published_partitions(store, table_path: str, columns: Sequence[str]) -> Dict[Tuple[str, ...], str]:
    """{partition values: folder} for every folder holding a data file of the published table.

    Listed from storage rather than taken from the DataFrame: the catalog must point at the folders that
    exist, spelt as Spark escaped them (a "/" in a value is "%2F" in the folder name), and a listing is
    one request per 1,000 files.
    """
    partitions: Dict[Tuple[str, ...], str] = {}
    for key in store.keys(table_path):
        *folders, _ = key.split("/")
        if not _is_visible_file(key) or len(folders) != len(columns):
            continue  # a folder marker, _SUCCESS, or a file that is not a partition's data
        names_values = [folder.partition("=") for folder in folders]
        if [name for name, _, _ in names_values] != list(columns):
            continue
        values = tuple(urllib.parse.unquote(value) for _, _, value in names_values)
        partitions[values] = "/".join(folders)
    return partitions


def _glue_client(aws: AwsSettings):
    """The endpoint is found the standard way (AWS_ENDPOINT_URL_GLUE, AWS_ENDPOINT_URL), keys as for S3."""
    import boto3
    from botocore.config import Config

    return boto3.client("glue", region_name=aws.region, aws_access_key_id=aws.access_key,
                        aws_secret_access_key=aws.secret_key, aws_session_token=aws.session_token,
                        config=Config(connect_timeout=5, read_timeout=30,
                                      retries={"max_attempts": GLUE_ATTEMPTS, "mode": "standard"}))


def glue_table_input(name: str, location: str, partition_by: Sequence[str]) -> dict:
    def columns(names: Sequence[str]) -> List[Dict[str, str]]:
        return [{"Name": column, "Type": CATALOG_TYPES[column]} for column in names]

    return {
        "Name": name,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {"EXTERNAL": "TRUE", "classification": "parquet", "parquet.compression": "SNAPPY"},
        "PartitionKeys": columns(partition_by),
        "StorageDescriptor": {"Columns": columns([c for c in TABLE_COLUMNS[name] if c not in partition_by]),
                              "Location": location + "/", **PARQUET_STORAGE},
    }


def _glue_checked(response: dict, what: str) -> None:
    """Glue's batch calls answer 200 and list the entries they could not do."""
    errors = response.get("Errors") or []
    if errors:
        detail = errors[0].get("ErrorDetail", {})
        raise EtlError(f"Glue could not {what} ({len(errors)} failed; first: {detail.get('ErrorCode')}: "
                       f"{detail.get('ErrorMessage')})")


def _put_glue_table(glue, database: str, table_input: dict) -> None:
    """Creates the table or updates it in place; a table whose partition keys changed is made anew."""
    try:
        current = glue.get_table(DatabaseName=database, Name=table_input["Name"])["Table"]
    except glue.exceptions.EntityNotFoundException:
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return
    if current.get("PartitionKeys", []) != table_input["PartitionKeys"]:
        glue.delete_table(DatabaseName=database, Name=table_input["Name"])  # its partitions go with it
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return
    glue.update_table(DatabaseName=database, TableInput=table_input)


def _sync_glue_partitions(glue, database: str, table: str, location: str,
                          wanted: Mapping[Tuple[str, ...], str]) -> Dict[str, int]:
    """Makes the table's partitions in Glue exactly the published folders: adds, moves and removes."""
    pages = glue.get_paginator("get_partitions").paginate(DatabaseName=database, TableName=table)
    existing = {tuple(p["Values"]): p["StorageDescriptor"].get("Location") for page in pages
                for p in page["Partitions"]}
    locations = {values: f"{location}/{folder}/" for values, folder in wanted.items()}
    stale = [values for values in existing if existing[values] != locations.get(values)]
    new = [values for values in locations if existing.get(values) != locations[values]]
    for start in range(0, len(stale), GLUE_DELETE_BATCH):
        batch = [{"Values": list(values)} for values in stale[start:start + GLUE_DELETE_BATCH]]
        _glue_checked(glue.batch_delete_partition(DatabaseName=database, TableName=table,
                                                  PartitionsToDelete=batch), f"remove partitions of {table}")
    for start in range(0, len(new), GLUE_CREATE_BATCH):
        batch = [{"Values": list(values), "StorageDescriptor": {"Location": locations[values], **PARQUET_STORAGE}}
                 for values in new[start:start + GLUE_CREATE_BATCH]]
        _glue_checked(glue.batch_create_partition(DatabaseName=database, TableName=table,
                                                  PartitionInputList=batch), f"add partitions of {table}")
    return {"partitions": len(locations), "added": len(new), "removed": len(set(stale) - set(locations))}


def register_catalog(settings: Settings, store) -> Dict[str, Dict[str, int]]:
    """Registers the five published tables and all their partitions in Glue, so Athena can query them with
    no crawler and no MSCK REPAIR. Idempotent: a rerun updates in place and drops vanished partitions."""
    glue, database = _glue_client(settings.aws), settings.catalog_database
    try:
        glue.get_database(Name=database)
    except glue.exceptions.EntityNotFoundException:
        glue.create_database(DatabaseInput={"Name": database, "Description": "Sparkify star schema (etl.py)"})
    registered = {}
    for name in TABLES:
        path, columns = join(settings.output_root, name), settings.partition_by[name]
        location = s3_uri(path)
        _put_glue_table(glue, database, glue_table_input(name, location, columns))
        wanted = published_partitions(store, path, columns) if columns else {}
        registered[name] = _sync_glue_partitions(glue, database, name, location, wanted)
    return registered


def catalog_step(settings: Settings, store, report: RunReport) -> int:
    """After a successful publish: register, and say in the report how it went. The tables stay published."""
    database = settings.catalog_database
    if not database:
        report.catalog = {"status": "off"}
        return 0
    with phase(report, "catalog") as counts:
        try:
            tables = register_catalog(settings, store)
        except Exception as exc:  # botocore's errors, or ours: one line, the tables stay as published
            detail = str(exc) if isinstance(exc, EtlError) else _one_line(exc)
            report.catalog = {"status": "failed", "database": database, "error": detail}
            return 1
        report.catalog = {"status": "registered", "database": database, "tables": tables}
        counts["partitions"] = sum(entry["partitions"] for entry in tables.values())
    return 0


# --------------------------------------------------------------------------- the run

@dataclass
class RunReport:
    settings: Settings
    run_id: str = field(default_factory=lambda: new_run_id())
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    status: str = "running"
    error: Optional[str] = None
    input: Dict[str, int] = field(default_factory=dict)
    rejected: Dict[str, int] = field(default_factory=dict)
    tables: Dict[str, Dict[str, int]] = field(default_factory=dict)
    checks: List[Check] = field(default_factory=list)
    phases: Dict[str, float] = field(default_factory=dict)
    published: List[str] = field(default_factory=list)
    catalog: Dict[str, object] = field(default_factory=dict)  # the Glue Data Catalog step, once it has run
    quality: Dict[str, object] = field(default_factory=dict)  # what the quality gate measured (README)
    current_phase: Optional[str] = None  # the phase running now: where a failed run stopped
    error_line: Optional[str] = None  # what main tells the user, last, if the run failed

    def document(self) -> dict:
        return {
            "status": self.status,
            "error": self.error,
            "run_id": self.run_id,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round((datetime.now(timezone.utc) - self.started_at).total_seconds(), 3),
            "job_version": JOB_VERSION,
            "spark_version": pyspark.__version__,
            "input_root": self.settings.input_root,
            "output_root": self.settings.output_root,
            "input": self.input,
            "rejected": {**self.rejected, "path": self.settings.rejected_root},
            # Only what this run made visible: a run that stopped early claims nothing.
            "published": self.published,
            "catalog": self.catalog,
            "tables": self.tables,
            "checks": [vars(check) for check in self.checks],
            "quality": self.quality,
            "phases_s": self.phases,
        }


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@contextmanager
def phase(report: RunReport, name: str) -> Iterator[Dict[str, object]]:
    """Times a phase; the caller fills in counts to be logged on the same line."""
    counts: Dict[str, object] = {}
    start = time.perf_counter()
    report.current_phase = name
    yield counts
    report.current_phase = None
    seconds = time.perf_counter() - start
    report.phases[name] = round(seconds, 3)
    details = ", ".join(f"{value} {key}" for key, value in counts.items())
    LOG.info("%-16s %6.1fs  %s", name, seconds, details)


def count_rows(frames: Mapping[str, DataFrame]) -> Dict[str, int]:
    """Rows of each frame, in one job; the first count of a cached frame is what fills its cache."""
    rows = collect_aggregates({name: frame.agg(F.count(F.lit(1)).alias("rows")) for name, frame in frames.items()})
    return {name: row["rows"] for name, row in rows.items()}


def _read_tree(report: RunReport, tree: str, read: Callable[[], Tuple[DataFrame, int]],
               split: Callable[[DataFrame], Tuple[DataFrame, DataFrame]]) -> Tuple[DataFrame, DataFrame]:
    """Reads one input tree, counting its files, records and rejects into the report; returns (clean, rejects)."""
    with phase(report, f"read {tree}") as counts:
        files_key, records_key = REPORT_INPUT_KEYS[tree]
        raw, report.input[files_key] = read()  # lists the tree's files: part of reading it
        counts["files"] = report.input[files_key]
        raw = lines_of_rejects_only(raw, tree).cache()
        clean, rejects = split(raw)
        profile = profile_read(raw, tree)
        report.input[records_key] = counts["records"] = profile["records"]
        report.rejected[tree] = counts["rejected"] = profile["rejected"]
        report.quality.setdefault("read", {})[tree] = profile
    if profile["unknown_fields"]:
        LOG.warning("%s: fields the schema does not know, with the lines carrying each: %s", tree,
                    ", ".join(f"{name} {count}" for name, count in profile["unknown_fields"].items()))
    return clean, rejects


def extract(spark: SparkSession, settings: Settings, report: RunReport,
            listing: Optional[S3Listing] = None) -> Tuple[DataFrame, DataFrame, DataFrame, DataFrame]:
    def reader(tree: str) -> Callable[[], Tuple[DataFrame, int]]:
        return lambda: read_input(spark, settings.input_root, tree, listing)

    songs, song_rejects = _read_tree(report, SONG_DATA, reader(SONG_DATA), split_songs)
    pause_point("read")
    events, event_rejects = _read_tree(report, LOG_DATA, reader(LOG_DATA), split_events)
    return songs, song_rejects, events, event_rejects


def transform(songs: DataFrame, events: DataFrame, report: RunReport) -> Dict[str, DataFrame]:
    """The five tables, cached (the gate and the writes read them again) and counted, in one job."""
    with phase(report, "build tables") as counts:
        tables = build_tables(songs, events, on_built=lambda name, table: table.cache())
        rows = count_rows(tables)
        for name in TABLES:
            report.tables[name] = {"rows": rows[name]}
            counts[name] = rows[name]
    return tables


def units(settings: Settings, tables: Sequence[str]) -> List[Unit]:
    return [Unit(settings.rejected_root, tree) for tree in (SONG_DATA, LOG_DATA)] + \
           [Unit(settings.output_root, name) for name in tables]


def stage(tables: Mapping[str, DataFrame], rejects: Mapping[str, DataFrame], settings: Settings,
          report: RunReport, store, spool: Optional[str] = None) -> None:
    """Writes everything this run will publish where no reader looks: <root>/_staging/<run id>/. With a
    spool folder, Spark writes there (local disk) and the files are then uploaded to the staging prefix."""
    written: List[Tuple[Unit, str]] = []

    def target(unit: Unit) -> str:
        path = os.path.join(spool, f"{len(written)}-{unit.name}") if spool else unit.staged(report.run_id)
        written.append((unit, path))
        return path

    for tree, frame in rejects.items():
        # Rejects are few; one file per tree is easiest to inspect.
        frame.coalesce(1).write.mode("overwrite").json(target(Unit(settings.rejected_root, tree)))
    for name in tables:
        pause_point(f"write {name}")
        with phase(report, f"write {name}") as counts:
            write_table(tables[name], target(Unit(settings.output_root, name)), settings.partition_by[name])
            counts["rows"] = report.tables[name]["rows"]
    if spool:
        with phase(report, "upload") as counts:
            counts["files"] = sum(store.upload(path, unit.staged(report.run_id)) for unit, path in written)


@contextmanager
def spool_folder(plan: SparkPlan, run_id: str) -> Iterator[Optional[str]]:
    """A local folder for S3 output on its way up, if the plan spools; removed afterwards (TMPDIR says where)."""
    if not plan.spool:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"sparkify-{run_id}-") as folder:
        yield folder


def require_staged_data(store, settings: Settings, tables: Sequence[str], run_id: str) -> None:
    """The gate saw rows in every table; a staged table without a data file means a committer lost them
    (say, a staging committer on a cluster without a shared file system). Never publish that."""
    for name in tables:
        if not store.has_data(Unit(settings.output_root, name).staged(run_id)):
            raise EtlError(f"the write of {name} left no data file in staging, though it has rows")


def run_job(spark: SparkSession, settings: Settings, store, report: RunReport, plan: SparkPlan) -> bool:
    """Extract, transform, check, stage, publish. If the gate fails only the rejects are published."""
    songs, song_rejects, events, event_rejects = extract(spark, settings, report, plan.listing)
    tables = transform(songs, events, report)
    with phase(report, "quality gate") as counts:
        pause_point("gate")
        report.checks = quality_gate(tables, songs, events, report, settings, store)
        failed = [check for check in report.checks if not check.passed]
        counts["checks"], counts["failed"] = len(report.checks), len(failed)
    for check in failed:
        LOG.error("check failed: %s (%s)", check.name, check.detail)
    if failed:
        report.error = report.error_line = gate_failure(failed)
    to_publish = [] if failed else list(TABLES)
    with spool_folder(plan, report.run_id) as spool:
        stage({name: tables[name] for name in to_publish}, {SONG_DATA: song_rejects, LOG_DATA: event_rejects},
              settings, report, store, spool)
    require_staged_data(store, settings, to_publish, report.run_id)
    with phase(report, "publish") as counts:
        publish(store, units(settings, to_publish), report.run_id,
                join(settings.output_root, STAGING_DIR, report.run_id, PUBLISH_JOURNAL))
        report.published = [unit.final() for unit in units(settings, to_publish)]
        counts["folders"] = len(report.published)
    report.status = "failed" if failed else "succeeded"
    return not failed


def emr_marker() -> Optional[str]:
    return next((path for path in EMR_MARKERS if os.path.exists(path)), None)


def s3a_options(aws: AwsSettings) -> Dict[str, str]:
    """Hadoop settings for S3A, secrets excepted: those never go on a command line."""
    if aws.access_key:
        provider = S3A_PROVIDERS["session" if aws.session_token else "static"]
    else:
        provider = S3A_PROVIDERS["chain"]
    options = {
        "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3n.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3a.aws.credentials.provider": provider,
        # Reading means thousands of small GETs: allow many open connections and upload threads.
        "fs.s3a.connection.maximum": "200",
        "fs.s3a.threads.max": "64",
        "fs.s3a.bucket.probe": "0",  # the preflight has seen the buckets
        # No DELETE of parent "directory" markers after every file written (Hadoop 3.3.4 deletes them).
        "fs.s3a.directory.marker.retention": "keep",
        **S3A_RETRIES,
    }
    if aws.region:
        options["fs.s3a.endpoint.region"] = aws.region
    if aws.endpoint:
        # MinIO, LocalStack and moto serve buckets as paths, often over plain http.
        options["fs.s3a.endpoint"] = aws.endpoint
        options["fs.s3a.path.style.access"] = "true"
        options["fs.s3a.connection.ssl.enabled"] = str(aws.endpoint.startswith("https://")).lower()
    elif aws.region:
        options["fs.s3a.endpoint"] = f"s3.{aws.region}.amazonaws.com"
    return options


def s3a_secrets(aws: AwsSettings) -> Dict[str, str]:
    keys = {"fs.s3a.access.key": aws.access_key, "fs.s3a.secret.key": aws.secret_key,
            "fs.s3a.session.token": aws.session_token}
    return {key: value for key, value in keys.items() if value}


@dataclass(frozen=True)
class SparkPlan:
    """How this run sets Spark up; made by plan_spark, the one place that decides it."""
    conf: Mapping[str, str] = field(default_factory=dict)  # for the session builder: never a secret
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # set on the live Hadoop configuration
    # Classes the run needs that spark-submit's own classpath must provide: checked once the JVM is up.
    needed_classes: Mapping[str, str] = field(default_factory=dict)
    summary: str = "local paths"
    # S3 input off EMR: listed by the driver, fetched inside the plan (read_s3_listed); else Spark's readers.
    listing: Optional[S3Listing] = field(default=None, repr=False)
    # S3 output under python etl.py: Spark writes to a local folder, whose files are then uploaded (stage).
    spool: bool = False


def plan_spark(settings: Optional[Settings], environ: Mapping[str, str], marker: Optional[str],
               nio_jar: str = NIO_JAR) -> SparkPlan:
    """Turns how the job was started (python or spark-submit), where (EMR or not) and what it touches
    (local paths or S3) into the session's settings and jars, with a summary of why."""
    # spark-submit starts the JVM before Python runs, so jars and the driver's classpath are already fixed.
    submitted = "PYSPARK_GATEWAY_PORT" in environ
    uses_s3 = settings is not None and settings.uses_s3
    conf: Dict[str, str] = {}
    if marker:
        return SparkPlan(summary=f"EMR ({marker}): S3, committers and local files are left to EMR's own set-up")
    if submitted:
        nio = "local files through Hadoop's default (spark-submit fixes the driver's classpath before the job runs)"
    elif os.path.isfile(nio_jar):
        # On the JVM's classpath from launch: Spark reads local files through fs.file.impl before spark.jars.
        conf.update({"spark.driver.extraClassPath": nio_jar, "spark.hadoop.fs.file.impl": NIO_FILE_SYSTEM})
        nio = "local files through java.nio (no chmod process per file)"
    else:
        nio = f"local files through Hadoop's default ({nio_jar} not built: run `make setup`)"
    if not submitted and "PYSPARK_PYTHON" not in environ:
        # Song files are fetched in Python workers (read_listed), which need what this interpreter has
        # (boto3 for S3), whereas Spark's default worker is whatever `python3` is first on the PATH.
        conf["spark.pyspark.python"] = sys.executable
    if not uses_s3:
        return SparkPlan(conf=conf, summary=f"local paths; {nio}")
    listing = S3Listing(settings.aws) if is_s3(settings.input_root) else None
    reads = "S3 input listed flat and fetched in the plan" if listing else "local input"
    if not submitted:
        # python etl.py runs Spark in this process (local mode): its tasks write to this machine's disk, so
        # S3 output is spooled there and uploaded by boto3, one PUT per file, many at once. No S3A at all.
        conf.update(_quiet_failures())
        spool = is_s3(settings.output_root)
        writes = f"S3 output written to local disk, then PUT by boto3 ({S3_REQUESTS_IN_FLIGHT} in flight)" \
            if spool else "local output"
        return SparkPlan(conf=conf, listing=listing, spool=spool,
                         summary=f"{reads}; {writes}; credentials from the {settings.aws.source}; {nio}")
    conf.update({f"spark.hadoop.{key}": value for key, value in s3a_options(settings.aws).items()})
    conf.update(MAGIC_COMMITTER)
    needed = {S3A_FILE_SYSTEM: "the S3A connector", CLOUD_COMMIT_PROTOCOL: "spark-hadoop-cloud"}
    return SparkPlan(conf=conf, secrets=s3a_secrets(settings.aws), needed_classes=needed, listing=listing,
                     summary=f"{reads}; S3 through S3A and its magic committer, jars from spark-submit's --jars "
                             f"or --packages, credentials from the {settings.aws.source}; {nio}")


def _quiet_failures() -> Dict[str, str]:
    """A lost endpoint fails tasks; Spark logs each failure with its stack trace. conf/log4j2.properties keeps
    traces off the console: the job's own `error:` line says what failed (spark-submit: README)."""
    return {"spark.driver.extraJavaOptions": f"-Dlog4j.configurationFile={LOG4J_CONF}"} \
        if os.path.isfile(LOG4J_CONF) else {}


def create_spark_session(plan: Optional[SparkPlan] = None) -> SparkSession:
    plan = plan or plan_spark(None, os.environ, emr_marker())
    builder = SparkSession.builder.appName(APP_NAME)
    for key, value in {**SESSION_CONF, **plan.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _require_classes(spark, plan.needed_classes)
    if plan.spool and not spark.sparkContext.master.startswith("local"):
        # A cluster's tasks would write to their own machines' disks, which this driver cannot upload from.
        master = spark.sparkContext.master
        spark.stop()
        raise EtlError(f"python etl.py writes S3 output through local disk, which needs a local master, not "
                       f"{master}: use spark-submit for a cluster (README, \"spark-submit\")")
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in plan.secrets.items():
        hadoop_conf.set(key, value)
    chosen_by_user = dict(spark.sparkContext.getConf().getAll())
    for key, value in tuning(spark.sparkContext.defaultParallelism).items():
        if key not in chosen_by_user:
            spark.conf.set(key, value)
    no_local_checksum_files(spark)
    return spark


def no_local_checksum_files(spark: SparkSession) -> None:
    """Local disk without Hadoop's .crc side files.

    Hadoop's local file system writes a .crc file beside every file (twice the files, the folders' renames
    twice over) and looks for one before reading each input file. Parquet checks its pages itself. No
    setting turns this off: it is a switch on the file system object, which Hadoop caches per JVM, and in
    local mode Spark's tasks run in this JVM and get this same object.
    """
    jvm = spark.sparkContext._jvm
    local = jvm.org.apache.hadoop.fs.FileSystem.getLocal(spark.sparkContext._jsc.hadoopConfiguration())
    local.setWriteChecksum(False)
    local.setVerifyChecksum(False)


def _require_classes(spark: SparkSession, classes: Mapping[str, str]) -> None:
    loader = spark.sparkContext._jvm.Thread.currentThread().getContextClassLoader()
    for name, provider in classes.items():
        try:
            spark.sparkContext._jvm.java.lang.Class.forName(name, False, loader)
        except Exception:
            spark.stop()
            raise EtlError(f"{provider} is not on spark-submit's classpath ({name}): pass the jars with "
                           f"--jars or --packages (README, \"spark-submit\")") from None


def tuning(cores: int) -> Dict[str, str]:
    """Settings measured on this job's data (README, "Speed"); a user's own --conf still wins."""
    return {
        # The default of 200 is sized for large clusters; our shuffles are a few MB.
        "spark.sql.shuffle.partitions": str(max(4, 2 * cores)),
        # Song files are ~250 bytes each. At the default open cost (4 MB) Spark plans one task per 32 files,
        # ~470 tasks for 15,000 files; at 8 KB it packs them into one task per core.
        "spark.sql.files.openCostInBytes": str(8 * 1024),
        # Block locations mean nothing for local disks or S3, and asking costs a call per file.
        "spark.sql.sources.ignoreDataLocality": "true",
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines say where it found endpoints
    try:
        settings = resolve_settings(parse_args(sys.argv[1:] if argv is None else argv), os.environ)
        preflight_local(settings)
        plan = plan_spark(settings, os.environ, emr_marker())
        preflight_s3(settings)
    except EtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_id = new_run_id()
    try:
        store = open_store(settings.output_root, settings.aws)
        store.take_lock(settings.output_root, run_id)
    except EtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # S3 itself failing, having passed the preflight seconds ago
        print(f"error: cannot lock {settings.output_root}: {_one_line(exc)}", file=sys.stderr)
        return 1
    report = RunReport(settings, run_id=run_id)
    try:
        code = locked_run(settings, plan, store, report)
    finally:
        try:
            store.release_lock(settings.output_root)
        except Exception as exc:  # S3 gone: the lease goes stale by itself (LEASE_TTL_S)
            LOG.warning("could not release the lease on %s: %s", settings.output_root, _one_line(exc))
    if report.error_line:
        print(f"error: {report.error_line}", file=sys.stderr)  # last, so it is the line a user sees
    return code


def locked_run(settings: Settings, plan: SparkPlan, store, report: RunReport) -> int:
    """Everything after the lock: recovery, the run, and a report that says at every moment what is true."""
    LOG.info("input %s -> output %s, run %s", settings.input_root, settings.output_root, report.run_id)
    LOG.info("Spark set-up: %s", plan.summary)
    try:
        finished = recover(store, staging_roots(settings), settings.output_root)
        begin_report(store, settings, report, finished)
    except Exception as exc:
        print(f"error: cannot prepare {settings.output_root}: {_one_line(exc)}", file=sys.stderr)
        return 1
    try:
        with phase(report, "start spark"):
            spark = create_spark_session(plan)
    except Exception as exc:  # no Java, say, or jars missing; nothing has been read or written yet
        report.error = str(exc) if isinstance(exc, EtlError) else f"cannot start Spark: {_one_line(exc)}"
        code = end_report(store, settings, report, 2 if isinstance(exc, EtlError) else 1)
        print(f"error: {report.error}", file=sys.stderr)  # last, so it is the line a user sees
        return code
    try:
        code = 0 if run_job(spark, settings, store, report, plan) else 1
    except Exception as exc:  # the report must still say the run failed
        report.error = _one_line(exc)
        LOG.error("run failed: %s", report.error)
        code = 1
    finally:
        spark.stop()
    if report.error and not report.error_line:  # the gate writes its own
        report.error_line = failure_line(report, settings)
    if code == 0:
        code = catalog_step(settings, store, report)
    if report.catalog.get("status") == "failed":
        report.error_line = (f"the tables are published, but registering them in the Glue Data Catalog "
                             f"(database {settings.catalog_database}) failed: {report.catalog['error']}")
    return end_report(store, settings, report, code)


def failure_line(report: RunReport, settings: Settings) -> str:
    """What stopped the run, in one line: where it was, and whether anything was published."""
    where = f"the run stopped in '{report.current_phase}'" if report.current_phase else "the run stopped"
    published = "publishing was cut short (the next run completes it)" if report.current_phase == "publish" \
        else "nothing was published"
    if settings.uses_s3 and not s3_reachable(settings):
        return f"cannot reach S3 at {settings.aws.endpoint or 'the AWS endpoint'}: {where}; {published}"
    return f"{where}: {report.error}; {published}"


def s3_reachable(settings: Settings) -> bool:
    """One quick request: is the endpoint still there (a failed run may be a lost endpoint)?"""
    try:
        bucket, _ = split_s3(next(root for root in (settings.output_root, settings.input_root) if is_s3(root)))
        _s3_client(settings.aws, attempts=1).head_bucket(Bucket=bucket)
        return True
    except Exception as exc:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError)  # S3 answered, if only with a refusal


def staging_roots(settings: Settings) -> List[str]:
    return list(dict.fromkeys((settings.output_root, settings.rejected_root)))


def begin_report(store, settings: Settings, report: RunReport, finished: Mapping[str, List[str]]) -> None:
    """A run in progress says so; a previous run that never finished is filed as interrupted, with the
    folders recovery published for it, if it had got as far as its publish."""
    latest = join(settings.output_root, REPORT_NAME)
    previous = store.read_json(latest)
    if previous and previous.get("status") == "running":
        previous.update(status="interrupted", error="the run stopped before it finished (killed?)")
        if previous.get("run_id") in finished:
            previous.update(published=finished[previous["run_id"]], published_by=report.run_id)
        store.write_json(join(settings.output_root, RUNS_DIR, f"{previous.get('run_id')}.json"), previous)
    store.write_json(latest, report.document())


def end_report(store, settings: Settings, report: RunReport, code: int) -> int:
    """Clears this run's staging (journal first), then files the final report; returns the exit code."""
    if report.status == "running":
        report.status = "failed"
    document = report.document()
    try:
        store.remove(join(settings.output_root, STAGING_DIR, report.run_id, PUBLISH_JOURNAL))
        for root in staging_roots(settings):
            store.remove(join(root, STAGING_DIR, report.run_id))
            if not store.children(join(root, STAGING_DIR)):
                store.remove(join(root, STAGING_DIR))
        store.write_json(join(settings.output_root, RUNS_DIR, f"{report.run_id}.json"), document)
        store.write_json(join(settings.output_root, REPORT_NAME), document)
    except Exception as exc:
        LOG.error("could not finish the run report in %s: %s", settings.output_root, _one_line(exc))
        return code or 1
    LOG.info("run %s; report at %s", report.status, join(settings.output_root, REPORT_NAME))
    return code


if __name__ == "__main__":
    sys.exit(main())
