#!/usr/bin/env python3
"""Sparkify data lake ETL: song and event JSON in, a star schema as parquet out.

    python etl.py [--config dl.cfg] [--input ROOT] [--output ROOT]
    spark-submit --py-files dist/lake.zip etl.py [--config dl.cfg] [--input ROOT] [--output ROOT]

This file is the job, top-down: settings, extract, transform, the quality gate, load, and main. The lake's
machinery around it (stores, publish, lock, catalog, run report, Spark's set-up) is the `lake` package
beside it, used by the driver only: everything that runs inside Spark tasks is here. The tables and their
rules: docs/rules.md.
"""
from __future__ import annotations

import argparse
import configparser
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce
from typing import Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast

import pyspark
import pyspark.sql.functions as F
import pyspark.sql.types as T
from pyspark.sql import Column, DataFrame, Row, SparkSession

from lake.aws import AwsSettings
from lake.catalog import DATABASE_PATTERN, register_catalog
from lake.errors import EtlError, one_line
from lake.intake import (
    MANIFEST_FILE,
    MANIFEST_UNIT,
    PLAYS_STATE,
    STATE_DIR,
    STATE_VERSION,
    USERS_STATE,
    InputFile,
    LakeCopy,
    TreeIntake,
    compare,
    from_nothing,
    load_manifest,
    new_manifest,
    partition_units,
    rejects_location,
    segment_name,
    state_fault,
    state_paths,
    state_rows,
    why_full,
)
from lake.lock import Lock
from lake.paths import join, normalize_root, visible_files
from lake.plan import (
    HERE,
    LOG_DATA,
    SONG_DATA,
    RunPlan,
    create_spark_session,
    emr_marker,
    plan_run,
    start_spark_session,
    stop_unused,
)
from lake.publish import DirectPublish, PublishCutShort, open_staging, pause_point, publish, published_folders, recover
from lake.rejects import claim_rejects_root
from lake.report import RUNS_DIR, Check, RunReport, begin_report, end_report, phase
from lake.stores import InPlaceStore, Store, Unit
from lake.tables import ARTISTS, PARTITION_BY, SONGPLAYS, SONGS, SPECS, TABLES, TIME, USERS

JOB_VERSION = "1.0.0"
LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- settings

DEFAULT_CONFIG = os.path.join(HERE, "dl.cfg")
DEFAULT_INPUT = os.path.join(HERE, "data")
DEFAULT_OUTPUT = "output"
REJECTED_DIR = "_rejected"
NO_PARTITIONS = "none"
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
    full: bool = False  # --full: build from nothing, even where the output holds a lake this job built


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own error prints a usage block
        raise EtlError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _ArgumentParser(prog="etl.py", description="Build the Sparkify star schema from song and event JSON.")
    parser.add_argument("--config", help=f"settings file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--input", help="input root holding song_data/ and log_data/ (local folder or s3:// prefix)")
    parser.add_argument("--output", help="output root for the five tables (local folder or s3:// prefix)")
    parser.add_argument("--full", action="store_true",
                        help="rebuild every table from all input, not only from what is new since the last run")
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
                    resolve_catalog(config.get("CATALOG", {}), config_path),
                    resolve_quality(config.get("QUALITY", {}), config_path), bool(getattr(args, "full", False)))


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


def resolve_catalog(config: Mapping[str, str], config_path: Optional[str]) -> Optional[str]:
    """The Glue database to register the tables in, or None (plan_run checks the output is on S3)."""
    database = config.get("DATABASE", "")
    if database and not re.match(DATABASE_PATTERN, database):
        raise EtlError(f"DATABASE in [CATALOG] of {config_path} must be lower case letters, digits and underscores")
    return database or None


def resolve_layout(config: Mapping[str, str], config_path: Optional[str]) -> Dict[str, Tuple[str, ...]]:
    """Partition columns per table: the contract's unless [LAYOUT] says otherwise ("none": unpartitioned)."""
    layout = dict(PARTITION_BY)
    for table in TABLES:
        value = config.get(f"{table.upper()}_PARTITION_BY", "")
        if not value:
            continue
        columns = () if value.lower() == NO_PARTITIONS else tuple(c.strip() for c in value.split(",") if c.strip())
        unknown = [c for c in columns if c not in SPECS[table].column_names]
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


# --------------------------------------------------------------------------- extract

# Files per fetch task: the listing travels inside the tasks, so a slice is kept small.
FILES_PER_TASK_CONF = "spark.sparkify.filesPerTask"
FILES_PER_TASK = 2000
# Reading S3 off EMR: the driver lists each tree flat (one LIST per 1,000 keys, sizes included) and Spark
# tasks GET the files, each task keeping many requests in flight, since every request is a round trip.
# A user's --conf wins over these defaults.
S3_READ_IN_FLIGHT_CONF = "spark.sparkify.s3.readRequestsPerTask"
S3_READ_IN_FLIGHT = 32
FETCH_WINDOW_BYTES = 32 * 1024 * 1024  # fetched content held at once per task: bounded memory
FETCH_WINDOW_FILES = 1000
URI_PATH_SAFE = "/!$&'()*+,;=:@~-._"  # what java.net.URI leaves as it is in a path
# Files of a tree that Spark's own readers are given one by one; more are read as the folder.
EXPLICIT_PATHS = 1000
# The run report's names for each tree's file and record counts.
REPORT_INPUT_KEYS = {SONG_DATA: ("song_files", "song_records"), LOG_DATA: ("log_files", "log_events")}

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


def preflight(settings: Settings, plan: RunPlan) -> None:
    """Fails in seconds, before any Spark start, on the mistakes a user is likely to make: input with JSON in
    both trees, output roots that can be written (the output's storage enforcing conditional writes),
    credentials that work. First, before any input is looked at: a rejects root another lake has claimed."""
    claim_rejects_root(plan.output_store, settings.output_root, settings.rejected_root)
    for tree in (SONG_DATA, LOG_DATA):
        plan.input_store.require_input(settings.input_root, tree)
    # The output root holds the lease and the publish journals, which fence a run that lost the lake.
    plan.output_store.require_fenced_writes(settings.output_root)
    if settings.rejected_root != settings.output_root:
        plan.output_store.require_writable(settings.rejected_root)


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


def read_json(spark: SparkSession, path: Union[str, List[str]], schema: T.StructType,
              small_files: bool = False) -> DataFrame:
    """Every *.json below path, one record per non-blank line, as parse_lines gives them.

    small_files reads each file whole: for thousands of one-line files this is 2-3x faster than the line
    reader, which sets up a record reader and codec lookup per file (docs/performance.md). Files must then fit
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


# A JSON string literal, escapes honoured; possessive, so that a long string costs no stack.
JSON_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'


def one_json_value(text: Column) -> Column:
    """Whether a line holds one JSON value and nothing after it but whitespace (DATA_CONTRACT.md): false for
    `{..}{..}`, `{..} {..}`, `{..},{..}`, `{..}]` or `{..} 5`. Spark SQL alone, as it runs on every line.

    Nearly every line is an object whose first "}" ends it: it holds one value, as its closing brace
    is its only one. The others are walked: with string literals blanked out, the brackets left must close
    the first one only at the last, and the text must end there (measured in docs/performance.md: the walk
    on every line would double the cost of reading). A line with no bracket at all is left to from_json,
    which finds it is no object.
    """
    simple = text.startswith("{") & (F.instr(text, "}") == F.length(text))
    blanked = F.regexp_replace(text, JSON_STRING, '""')
    brackets = F.regexp_replace(blanked, r"[^\[\]{}]", "")
    # Walk the brackets: the depth, and how often it fell to 0 (or below, for a stray closing bracket).
    start = F.struct(F.lit(0).alias("depth"), F.lit(0).alias("closed"))

    def step(walked: Column, bracket: Column) -> Column:
        depth = walked["depth"] + F.when(bracket.isin("{", "["), 1).otherwise(-1)
        return F.struct(depth.alias("depth"), (walked["closed"] + F.when(depth <= 0, 1).otherwise(0)).alias("closed"))

    walked = F.aggregate(F.split(brackets, ""), start, step)
    return F.when(simple, True).when(brackets == "", True).otherwise(
        (walked["closed"] == 1) & (walked["depth"] == 0) & blanked.rlike(r"[\]}][ \t\r\n]*$"))


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
    # from_json reads the line's first value and ignores what follows it: a line holding more (two events
    # glued together by a lost newline) is made a corrupt record here, so that no event of it loads. Its
    # corrupt text is "", which no JSON parser takes: _reject_reason calls it malformed without checking
    # the line again (the line itself is kept in LINE).
    corrupt = F.struct(*[F.lit(None).cast(f.dataType).alias(f.name) for f in schema.fields],
                       F.lit("").alias(CORRUPT_RECORD))
    record = F.when(one_json_value(F.col(LINE)), F.from_json(F.col(LINE), _with_corrupt_record(schema), options)) \
        .otherwise(corrupt)
    return (
        lines.select(F.col(SOURCE_FILE), F.col(PIECE), F.col(PIECE_IS_TEXT), text.alias(LINE))
        .filter(F.trim(F.col(LINE)) != "")  # blank lines are not records
        .select(SOURCE_FILE, PIECE, LINE, not_utf8.alias(NOT_UTF8))
        .select(
            record.alias("record"),
            F.col(SOURCE_FILE),
            F.when(F.col(NOT_UTF8), base64).otherwise(F.col(LINE)).alias(LINE),
            F.col(NOT_UTF8),
            F.when(F.size(unknown) > 0, unknown).alias(UNKNOWN_FIELDS),
        )
        .select("record.*", SOURCE_FILE, LINE, NOT_UTF8, UNKNOWN_FIELDS)
    )


def as_uri(path: str) -> str:
    """A path as Hadoop's URI form spells it (a space is %20), as Spark's _metadata.file_path gives it:
    ASCII that java.net.URI does not allow in a path is escaped; other characters are kept, but for spaces
    and control characters."""
    import unicodedata
    from urllib.parse import quote

    def spelt(char: str) -> str:
        if char.isascii():
            return char if char.isalnum() or char in URI_PATH_SAFE else quote(char, safe="")
        return quote(char, safe="") if unicodedata.category(char) in ("Zs", "Zl", "Zp", "Cc") else char

    scheme, separator, rest = path.partition("://") if "://" in path else path.partition(":")
    return f"{scheme}{separator}{''.join(map(spelt, rest))}"


def fetch_s3_files(client: Mapping[str, object], in_flight: int) -> Callable:
    """For mapPartitions: (source_file, (bucket, key), size) in, (source_file, content) rows out, with in_flight GETs
    at once in each task. Plain Python and boto3 on the workers (no Arrow needed). The credentials travel
    inside this closure, as they do in Hadoop's configuration, never in a log."""
    def fetch(files: Iterator[Tuple[str, Tuple[str, str], int]]) -> Iterator[Tuple[str, bytes]]:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", **{**client, "config": Config(**client["config"])})  # as lake.aws.s3_client

        def get(name: str, location: Tuple[str, str]) -> Tuple[str, bytes]:
            bucket, key = location
            return name, s3.get_object(Bucket=bucket, Key=key)["Body"].read()

        # A sliding window: requests keep being started as the oldest results are handed on, so the in_flight
        # requests never drain between batches. Sizes come from the listing (no HEAD); at most about
        # FETCH_WINDOW_BYTES are held at once, which bounds memory when the files are day-sized logs.
        pool = ThreadPoolExecutor(in_flight)
        window: Deque[Tuple[Future, int]] = deque()
        held = 0
        try:
            for name, location, size in files:
                window.append((pool.submit(get, name, location), size))
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


def fetch_local_files(files: Iterator[Tuple[str, str, int]]) -> Iterator[Tuple[str, bytes]]:
    """For mapPartitions: (source_file, local path, size) in, (source_file, content) rows out."""
    for name, path, _ in files:
        with open(path, "rb") as handle:
            yield name, handle.read()


def read_listed(spark: SparkSession, files: Sequence[Tuple[str, str, int]], schema: T.StructType,
                fetch: Callable) -> DataFrame:
    """Listed files, fetched whole inside the plan and parsed as read_json parses lines.

    For many small files: Spark's own readers set up a reader per file and list folder by folder (one LIST
    per folder on S3); here one listing is shipped to tasks in slices, each task reading its slice."""
    conf = spark.sparkContext.getConf()
    per_task = int(conf.get(FILES_PER_TASK_CONF, str(FILES_PER_TASK)))
    tasks = max(1, spark.sparkContext.defaultParallelism, -(-len(files) // per_task))
    fetched = spark.createDataFrame(spark.sparkContext.parallelize(files, tasks).mapPartitions(fetch),
                                    f"{SOURCE_FILE} string, content binary")
    return parse_whole_files(fetched, schema)


def read_input(spark: SparkSession, plan: RunPlan, input_root: str, tree: str) -> Tuple[DataFrame, int]:
    """One input tree and its file count: listed by the driver and fetched in the plan where the plan says
    so, else by Spark's own readers."""
    if tree not in plan.listed_trees:
        raw = read_json(spark, join(input_root, tree), SONG_SCHEMA if tree == SONG_DATA else LOG_SCHEMA,
                        small_files=tree == SONG_DATA)
        return raw, len(raw.inputFiles())
    files = list_tree(plan, input_root, tree)
    return read_files(spark, plan, input_root, tree, files, whole=True), len(files)


def list_tree(plan: RunPlan, input_root: str, tree: str) -> List[InputFile]:
    """One flat listing of a tree, with each file's version. Each file is named as the records read from it
    will carry it, whichever reader reads it: binaryFile (songs) gives the path as it is, the line reader's
    _metadata.file_path (logs) its URI form."""
    songs = tree == SONG_DATA
    return [InputFile(name if songs else as_uri(name), name, location, size, version)
            for name, location, size, version in plan.input_store.list_input(join(input_root, tree))]


def read_files(spark: SparkSession, plan: RunPlan, input_root: str, tree: str, files: Sequence[InputFile],
               whole: bool) -> DataFrame:
    """The listed files of one tree, parsed (read_json's columns): fetched in the plan where the plan lists
    the tree, else by Spark's readers. whole: the files are the whole tree, which Spark's readers then read
    as a folder (on EMR, 100,000 song paths would each be checked), keeping only the listed files, so that
    a file arriving during the run is left for the next run, as the state says."""
    songs = tree == SONG_DATA
    schema = SONG_SCHEMA if songs else LOG_SCHEMA
    if not files:  # parsed lines of no line: the columns read_json gives
        return parse_lines(spark.createDataFrame([], f"{SOURCE_FILE} string, {PIECE} string, {PIECE_IS_TEXT} boolean"),
                           schema)
    if tree in plan.listed_trees:
        in_flight = int(spark.sparkContext.getConf().get(S3_READ_IN_FLIGHT_CONF, str(S3_READ_IN_FLIGHT)))
        client = plan.input_store.task_client(in_flight)
        fetch = fetch_s3_files(client, in_flight) if client else fetch_local_files
        return read_listed(spark, [(f.source_file, f.location, f.size) for f in files], schema, fetch)
    if whole and len(files) > EXPLICIT_PATHS:
        listed = spark.createDataFrame([(f.source_file,) for f in files], f"{SOURCE_FILE} string")
        raw = read_json(spark, join(input_root, tree), schema, small_files=songs)
        return raw.join(F.broadcast(listed), on=SOURCE_FILE, how="left_semi")
    return read_json(spark, [f.path for f in files], schema, small_files=songs)


def read_song_data(spark: SparkSession, input_root: str) -> DataFrame:
    """The song tree, read as a run of this job would read it (the notebook's way in)."""
    return read_input(spark, _reading_plan(input_root), input_root, SONG_DATA)[0]


def read_log_data(spark: SparkSession, input_root: str) -> DataFrame:
    return read_input(spark, _reading_plan(input_root), input_root, LOG_DATA)[0]


def _reading_plan(input_root: str) -> RunPlan:
    output_root = normalize_root(DEFAULT_OUTPUT)
    return plan_run(Settings(input_root, output_root, join(output_root, REJECTED_DIR)), os.environ, emr_marker())


# What each tree rejects besides bad lines: (the field a record cannot do without, the reason given).
REJECT_RULES = {SONG_DATA: ("song_id", REASON_NO_SONG_ID), LOG_DATA: ("ts", REASON_BAD_TS)}
# The fields a delivery must carry, and where: (field, the page whose events carry it; None: every record).
# Visitors who are not logged in have userId "" on their pages, and only NextSong events (plays) name a song.
REQUIRED_FIELDS = {
    SONG_DATA: (("song_id", None),),
    LOG_DATA: (("ts", None), ("page", None), ("userId", "NextSong"), ("song", "NextSong")),
}
UNKNOWN_PREFIX = "unknown:"


def _reject_reason(required: str, missing_reason: str) -> Column:
    corrupt = F.col(CORRUPT_RECORD)
    # A line that parses as a JSON object but not into the schema is a type error, not bad JSON. (One
    # holding more than one value has "" as its corrupt text: parse_lines.)
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

NEXT_SONG = "NextSong"
DURATION_TOLERANCE_S = 0.001
# Doubles such as 337.68544 - 337.68444 come out a hair above 0.001.
FLOAT_SLACK = 1e-9
# An event's identity: a redelivered event repeats all four.
EVENT_KEY = ("user_id", "sessionId", "itemInSession", "ts")
SONGPLAY_ID_HEX_CHARS = 32  # 128 bits of SHA-256: collisions are not a concern
# What a play keeps of its event; a redelivered event's copies may differ in these.
PLAY_ATTRIBUTES = ("level", "song", "artist", "length", "location", "userAgent")
# What a user's row comes from, in the order that picks the latest event.
USER_LATEST = ("ts", "itemInSession", "level", "firstName", "lastName", "gender")
# The plays state (lake.intake): songplays before their final select, partitioned by year and month.
PLAYS_COLUMNS = (("songplay_id", "string"), ("user_id", "bigint"), ("sessionId", "bigint"),
                 ("itemInSession", "int"), ("ts", "bigint"), ("level", "string"), ("song", "string"),
                 ("artist", "string"), ("length", "double"), ("location", "string"), ("userAgent", "string"),
                 ("song_id", "string"), ("artist_id", "string"), ("year", "int"), ("month", "int"))
PLAYS_PARTITION_BY = ("year", "month")
USER_ID_PATTERN = r"^[0-9]{1,18}$"  # 18 digits always fit in a long


def conform(frame: DataFrame, table: str, **columns: Column) -> DataFrame:
    """The builders' final select: the table's columns in the spec's order and types, each from the
    expression given for it, or else from the frame's column of that name."""
    return frame.select(*[columns.get(name, F.col(name)).cast(kind).alias(name)
                          for name, kind in SPECS[table].columns])


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
    return conform(
        songs.groupBy("song_id").agg(best), SONGS,
        title=F.col("best.title"),
        artist_id=F.col("best.artist_id"),
        year=F.col("best.year"),
        duration=F.col("best.duration"),
    )


def build_artists(songs: DataFrame) -> DataFrame:
    location = F.when(F.trim(F.col("artist_location")) != "", F.col("artist_location"))
    records = songs.filter(F.col("artist_id").isNotNull()).select(
        F.col("artist_id"),
        F.col("song_id"),
        F.col("artist_name").alias("name"),
        location.alias("location"),
        F.col("artist_latitude").alias("latitude"),
        F.col("artist_longitude").alias("longitude"),
    )
    attributes = ["name", "location", "latitude", "longitude"]
    # The record with most known attributes wins, then the smallest song_id (the contract's rule).
    best = F.min(F.struct(_count_nulls(attributes).alias("nulls"), "song_id", *attributes)).alias("best")
    return conform(
        records.groupBy("artist_id").agg(best), ARTISTS,
        name=F.col("best.name"),
        location=F.col("best.location"),
        latitude=F.col("best.latitude"),
        longitude=F.col("best.longitude"),
    )


def user_versions(events: DataFrame) -> DataFrame:
    """What each event of a known user says of the user: (user_id, *USER_LATEST)."""
    return known_user_events(events).select("user_id", *USER_LATEST)


def latest_per_user(versions: DataFrame) -> DataFrame:
    """Each user's latest version: the users table's pre-image, which the lake's state keeps. max() is
    associative, so yesterday's latest and today's versions give the latest of all days."""
    # Struct order is the rule: latest ts, then latest itemInSession; the rest only breaks exact ties.
    latest = F.max(F.struct(*USER_LATEST)).alias("latest")
    return versions.groupBy("user_id").agg(latest).select("user_id", "latest.*")


def users_from_latest(latest: DataFrame) -> DataFrame:
    return conform(latest, USERS, first_name=F.col("firstName"), last_name=F.col("lastName"))


def build_users(events: DataFrame) -> DataFrame:
    return users_from_latest(latest_per_user(user_versions(events)))


def play_copies(events: DataFrame) -> DataFrame:
    """Every copy of a NextSong event of a known user: (*EVENT_KEY, *PLAY_ATTRIBUTES)."""
    return known_user_events(events).filter(F.col("page") == NEXT_SONG).select(*EVENT_KEY, *PLAY_ATTRIBUTES)


def dedupe_plays(copies: DataFrame) -> DataFrame:
    """One row per event key, with its deterministic songplay_id."""
    # A redelivered event is one play; max() picks the same copy on every run if copies differ, and, being
    # associative, the same copy whether the copies arrive on one day or on several.
    one_copy = F.max(F.struct(*PLAY_ATTRIBUTES)).alias("event")
    songplay_id = F.sha2(F.to_json(F.struct(*EVENT_KEY)), 256).substr(1, SONGPLAY_ID_HEX_CHARS)
    return (
        copies.groupBy(*EVENT_KEY).agg(one_copy)
        .select(*EVENT_KEY, "event.*")
        .withColumn("songplay_id", songplay_id)
    )


def next_song_plays(events: DataFrame) -> DataFrame:
    """One row per distinct NextSong event of a known user, with its deterministic songplay_id."""
    return dedupe_plays(play_copies(events))


def catalogue(songs: DataFrame, artists: DataFrame) -> DataFrame:
    """What a play is matched against: one row per song that has an artist, keyed by song_id."""
    return songs.join(artists, on="artist_id", how="inner").select(
        F.col("song_id"), F.col("artist_id"), F.col("title"), F.col("name").alias("artist_name"), F.col("duration"),
    )


def fits_song(play: str, song: str) -> Column:
    """The contract's match, between a play aliased play and a catalogue row aliased song."""
    return (
        (F.col(f"{play}.song") == F.col(f"{song}.title"))
        & (F.col(f"{play}.artist") == F.col(f"{song}.artist_name"))
        & (F.abs(F.col(f"{play}.length") - F.col(f"{song}.duration")) <= DURATION_TOLERANCE_S + FLOAT_SLACK)
    )


def match_songs(plays: DataFrame, songs: DataFrame, artists: DataFrame) -> DataFrame:
    """Each play with the song_id and artist_id of the song its title, artist name and duration fit, or nulls."""
    # Several fitting songs: the smallest song_id wins, so the match is the same on every run.
    best = F.min(F.struct(F.col("c.song_id").alias("song_id"), F.col("c.artist_id").alias("artist_id")))
    # Plays come grouped and sorted by their event key: grouping by it again after a broadcast join needs no
    # second shuffle or sort of the plays. A play's own columns are the same on each of its joined rows.
    play = F.struct(*[F.col(f"p.{name}").alias(name) for name in plays.columns if name not in EVENT_KEY])
    return (
        plays.alias("p").join(F.broadcast(catalogue(songs, artists).alias("c")), on=fits_song("p", "c"), how="left")
        .groupBy(*[F.col(f"p.{name}").alias(name) for name in EVENT_KEY])
        .agg(F.max(play).alias("play"), best.alias("match"))
        .select(*EVENT_KEY, "play.*", F.col("match.song_id").alias("song_id"),
                F.col("match.artist_id").alias("artist_id"))
    )


def conform_plays(matched: DataFrame) -> DataFrame:
    """Matched plays in the plays state's columns and types, with the year and month of their start."""
    start_time = F.timestamp_millis(F.col("ts"))
    columns = {"year": F.year(start_time), "month": F.month(start_time)}
    return matched.select(*[columns.get(name, F.col(name)).cast(kind).alias(name) for name, kind in PLAYS_COLUMNS])


def build_plays(events: DataFrame, songs: DataFrame, artists: DataFrame) -> DataFrame:
    """The songplays table's pre-image: each play with what a later song file needs to rematch it."""
    return conform_plays(match_songs(next_song_plays(events), songs, artists))


def songplays_from_plays(plays: DataFrame) -> DataFrame:
    # year and month are the plays' own: the same values, and a filter on them prunes the state's folders.
    return conform(
        plays, SONGPLAYS,
        start_time=F.timestamp_millis(F.col("ts")),
        session_id=F.col("sessionId"),
        user_agent=F.col("userAgent"),
    )


def build_songplays(events: DataFrame, songs: DataFrame, artists: DataFrame) -> DataFrame:
    return songplays_from_plays(build_plays(events, songs, artists))


def build_time(songplays: DataFrame) -> DataFrame:
    start = F.col("start_time")
    # dayofweek() counts Sunday = 1; ISO counts Monday = 1 ... Sunday = 7.
    iso_weekday = (F.dayofweek(start) + 5) % 7 + 1
    return conform(
        songplays.select(start).distinct(), TIME,
        hour=F.hour(start),
        day=F.dayofmonth(start),
        week=F.weekofyear(start),  # ISO-8601 week, as Spark documents
        month=F.month(start),
        year=F.year(start),
        weekday=iso_weekday,
    )


def build_tables(songs: DataFrame, events: DataFrame,
                 on_built: Callable[[str, DataFrame], DataFrame] = lambda name, df: df) -> Dict[str, DataFrame]:
    """All five tables from clean song records and clean events; on_built sees each as it is made."""
    return build_lake(songs, events, on_built)[0]


def build_lake(songs: DataFrame, events: DataFrame, on_built: Callable[[str, DataFrame], DataFrame]
               = lambda name, df: df) -> Tuple[Dict[str, DataFrame], DataFrame, DataFrame]:
    """The five tables, the plays and the users' latest versions (the state a later run builds on).
    on_built sees each frame that is not a mere projection of another: songplays is the plays' final
    select, users the latest versions'."""
    tables = {SONGS: on_built(SONGS, build_songs(songs)), ARTISTS: on_built(ARTISTS, build_artists(songs))}
    latest = on_built(USERS_STATE, latest_per_user(user_versions(events)))
    plays = on_built(PLAYS_STATE, build_plays(events, tables[SONGS], tables[ARTISTS]))
    tables[USERS] = users_from_latest(latest)
    tables[SONGPLAYS] = songplays_from_plays(plays)
    tables[TIME] = on_built(TIME, build_time(tables[SONGPLAYS]))
    return tables, plays, latest


# --------------------------------------------------------------------------- transform: what changed

# A daily run builds the new tables from the lake's state (lake.intake) and the files it read, but only the
# rows that new, changed or removed files can change are computed afresh: each table's rows for those keys,
# old and new, are compared (changed_rows), and the partitions holding a row that differs are rewritten.
# Every other row is yesterday's, which was a full build's, so the result is a full build's.
SIDE = "_side"
OLD, NEW = "old", "new"
FILE_LITERALS = 1000  # files named in a filter; more are joined
PARTITION_LITERALS = 64  # partitions named in a filter (which prunes the state's folders); more are joined
SONG_RECORD_SCHEMA = T.StructType(SONG_SCHEMA.fields + [T.StructField(SOURCE_FILE, T.StringType())])
EVENT_RECORD_SCHEMA = T.StructType(LOG_SCHEMA.fields + [T.StructField(SOURCE_FILE, T.StringType())])
RECORD_SCHEMAS = {SONG_DATA: SONG_RECORD_SCHEMA, LOG_DATA: EVENT_RECORD_SCHEMA}
PLAYS_SCHEMA = ", ".join(f"{name} {kind}" for name, kind in PLAYS_COLUMNS)
LATEST_SCHEMA = "user_id bigint, ts bigint, itemInSession int, level string, firstName string, lastName string, " \
                "gender string"


@dataclass
class Change:
    """The rows of one table (or state folder) that differ from the last run's, and its whole new version."""
    name: str  # the folder below the output root
    table: DataFrame
    changed: DataFrame  # changed_rows(): old and new versions of the rows that differ
    partition_by: Tuple[str, ...]
    touched: List[Tuple[Optional[str], ...]] = field(default_factory=list)  # partition values, as strings


@dataclass
class Increment:
    """What a daily run publishes: whole tables for the gate, changes to write, the trees' new segments."""
    tables: Dict[str, DataFrame]
    songs: DataFrame  # every clean song record that counts now, for the gate
    events: DataFrame  # every clean event that counts now, for the gate
    changes: List[Change]
    segments: Dict[str, DataFrame]


def settle(frame: DataFrame) -> DataFrame:
    """frame computed now, once, and kept by the executors (a local checkpoint), with a plan that starts
    there. A daily run derives a chain of small frames (keys, changed rows), each used several times: a plan
    that uses a frame twice holds its whole plan twice, and Spark plans and runs each copy (136 jobs for
    the changed plays of 900 new events, before frames were settled)."""
    return frame.localCheckpoint(eager=True)


def changed_rows(old: DataFrame, new: DataFrame, key: str) -> DataFrame:
    """The rows of two versions of a keyed table, or of its rows for some keys, that differ: each with SIDE
    old or new. A key only in new is an added row, a key only in old a removed one."""
    columns = old.columns
    versions = (
        old.select(F.col(key), F.struct(*columns).alias(OLD))
        .join(new.select(F.col(key), F.struct(*columns).alias(NEW)), on=key, how="full")
    )

    def tagged(which: str) -> Column:
        return F.when(F.col(which).isNotNull(), F.struct(F.lit(which).alias(SIDE), *[
            F.col(f"{which}.{name}").alias(name) for name in columns]))

    changed = (
        versions.filter(~F.col(OLD).eqNullSafe(F.col(NEW)))
        .select(F.explode(F.array(tagged(OLD), tagged(NEW))).alias("row"))
        .filter(F.col("row").isNotNull())
        .select("row.*")
    )
    return changed


def side(changed: DataFrame, which: str) -> DataFrame:
    return changed.filter(F.col(SIDE) == which).drop(SIDE)


def replace_rows(table: DataFrame, changed: DataFrame, key: str, small: bool) -> DataFrame:
    """table with the changed rows in their new version (or gone)."""
    keys = changed.select(F.col(key)).distinct()
    return (
        table.join(F.broadcast(keys) if small else keys, on=key, how="left_anti")
        .unionByName(side(changed, NEW))
    )


def rows_of(frame: DataFrame, keys: DataFrame, small: bool) -> DataFrame:
    """frame's rows whose key columns are among keys'. small: broadcast the keys (few new files), so that the
    state is scanned, never shuffled."""
    return frame.join(F.broadcast(keys) if small else keys, on=keys.columns, how="left_semi")


def of_files(records: DataFrame, names: Sequence[str], keep: bool = True) -> DataFrame:
    """The records read from the named files (keep), or from the others."""
    if len(names) <= FILE_LITERALS:
        named = F.col(SOURCE_FILE).isin(list(names)) if names else F.lit(False)
        return records.filter(named if keep else ~named)
    listed = records.sparkSession.createDataFrame([(name,) for name in names], f"{SOURCE_FILE} string")
    return records.join(F.broadcast(listed), on=SOURCE_FILE, how="left_semi" if keep else "left_anti")


def partition_value(column: str) -> Column:
    """A partition column's value as its folder names it: the folder, not the raw value, is the unit. Spark
    writes null and "" to one folder (Hive's default partition), so both are null here; every comparison of
    partitions (find_touched, written_partitions, in_partitions) goes through this."""
    value = F.col(column).cast("string")
    return F.when(value != "", value)


def in_partitions(frame: DataFrame, columns: Sequence[str], touched: Sequence[Tuple[Optional[str], ...]]) -> DataFrame:
    """frame's rows in the touched partitions (values as partition_value gives them)."""
    if not columns:
        return frame
    if len(touched) <= PARTITION_LITERALS:
        # A filter on partition columns alone prunes the folders a state table is read from.
        matches = [reduce(Column.__and__, [partition_value(c).eqNullSafe(F.lit(v).cast("string"))
                                           for c, v in zip(columns, values)]) for values in touched]
        return frame.filter(reduce(Column.__or__, matches, F.lit(False)))
    wanted = frame.sparkSession.createDataFrame(touched, ", ".join(f"_{c} string" for c in columns))
    same = reduce(Column.__and__, [partition_value(c).eqNullSafe(F.col(f"_{c}")) for c in columns])
    return frame.join(F.broadcast(wanted), on=same, how="left_semi")


def read_records(spark: SparkSession, paths: Mapping[str, str], tree: str, segments: Sequence[str]) -> DataFrame:
    """Clean records of one tree as the lake took them in, from the given segments."""
    schema = RECORD_SCHEMAS[tree]
    if not segments:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*[paths[segment_name(tree, name)] for name in segments])


def record_versions(spark: SparkSession, paths: Mapping[str, str], intake: TreeIntake,
                    fresh: DataFrame) -> Tuple[DataFrame, DataFrame, DataFrame, Optional[DataFrame]]:
    """A tree's clean records as they counted (old) and count now (new), the records that stop counting
    (dead: those of changed and removed files), and this run's segment: the fresh records and what the
    rewritten segments keep."""
    kept = read_records(spark, paths, intake.tree, intake.kept)
    dirty = read_records(spark, paths, intake.tree, intake.dirty)
    dead = of_files(dirty, intake.dead)
    segment = of_files(dirty, intake.dead, keep=False).unionByName(fresh) if intake.writes_segment else None
    new = kept.unionByName(segment) if segment is not None else kept
    return kept.unionByName(dirty), new, dead, segment.coalesce(1) if segment is not None else None


def song_changes(old: DataFrame, new: DataFrame, touched: DataFrame,
                 small: bool) -> Tuple[DataFrame, DataFrame, DataFrame, DataFrame, DataFrame]:
    """songs and artists from the new song records; their rows that differ from the old records' (only the
    songs and artists of touched records can); and the titles a play must have for its match to change:
    those of the songs that changed, and of every song record of an artist that changed."""
    songs_new, artists_new = build_songs(new).cache(), build_artists(new).cache()
    song_keys = settle(touched.select("song_id").distinct())
    artist_keys = settle(touched.filter(F.col("artist_id").isNotNull()).select("artist_id").distinct())
    # A song's (an artist's) row depends on all its records, and only on them: the old row of a touched key
    # is built from that key's old records alone.
    songs_changed = settle(changed_rows(build_songs(rows_of(old, song_keys, small)),
                                        rows_of(songs_new, song_keys, small), "song_id"))
    artists_changed = settle(changed_rows(build_artists(rows_of(old, artist_keys, small)),
                                          rows_of(artists_new, artist_keys, small), "artist_id"))
    # A song's title and artist_id come from one record, so a song of a changed artist has the title of one
    # of that artist's records, old or new.
    moved = artists_changed.select("artist_id").distinct()
    titles = settle(
        songs_changed.select("title")
        .unionByName(rows_of(old.unionByName(new), moved, small).select("title"))
        .filter(F.col("title").isNotNull())
        .distinct()
    )
    return songs_new, artists_new, songs_changed, artists_changed, titles


def plays_changes(plays_old: DataFrame, fresh: DataFrame, dead: DataFrame, events_new: DataFrame, dead_files: bool,
                  titles: Optional[DataFrame], songs: DataFrame, artists: DataFrame, small: bool) -> DataFrame:
    """The plays that differ from the state's: those of fresh and dead events, merged with the state's
    (max() is associative), or, when files died, recomputed from every copy that still counts; and the
    earlier plays with the title of a changed catalogue row, rematched."""
    keys = settle(play_copies(fresh).unionByName(play_copies(dead)).select(*EVENT_KEY).distinct())
    if dead_files:
        candidates = dedupe_plays(rows_of(play_copies(events_new), keys, small))
    else:
        earlier = rows_of(plays_old, keys, small).select(*EVENT_KEY, *PLAY_ATTRIBUTES)
        candidates = dedupe_plays(play_copies(fresh).unionByName(earlier))
    if titles is not None:
        refit = settle(
            rows_of(plays_old, titles.withColumnRenamed("title", "song"), small)
            .join(keys, on=list(EVENT_KEY), how="left_anti")
            .select(*EVENT_KEY, *PLAY_ATTRIBUTES, "songplay_id")
        )
        candidates = candidates.unionByName(refit)
        keys = keys.unionByName(refit.select(*EVENT_KEY))
    return settle(changed_rows(rows_of(plays_old, keys, small),
                               conform_plays(match_songs(candidates, songs, artists)), "songplay_id"))


def build_increment(spark: SparkSession, settings: Settings, intakes: Mapping[str, TreeIntake],
                    fresh: Mapping[str, DataFrame], small: bool, paths: Mapping[str, str]) -> Increment:
    """The new tables and state from the state (read where paths say) and the fresh clean records, with
    what changed."""
    layout = settings.partition_by
    songs_in, logs_in = intakes[SONG_DATA], intakes[LOG_DATA]
    song_records = record_versions(spark, paths, songs_in, fresh[SONG_DATA])
    event_records = record_versions(spark, paths, logs_in, fresh[LOG_DATA])
    changes: List[Change] = []

    # Songs and artists: rebuilt from all song records (small), compared where records came or went.
    songs_old_records, songs_new_records, songs_dead, _ = song_records
    titles = None
    if songs_in.touched:
        touched = songs_dead.unionByName(fresh[SONG_DATA])
        songs_new, artists_new, songs_changed, artists_changed, titles = song_changes(
            songs_old_records, songs_new_records, touched, small)
        changes += [Change(SONGS, songs_new, songs_changed, tuple(layout[SONGS])),
                    Change(ARTISTS, artists_new, artists_changed, tuple(layout[ARTISTS]))]
    else:
        songs_new, artists_new = build_songs(songs_new_records).cache(), build_artists(songs_new_records).cache()

    # Plays and the tables made of them: songplays (their final select) and time (a start_time's row comes
    # or goes with the last play at that moment).
    _, events_new, events_dead, _ = event_records
    plays_old = spark.read.schema(PLAYS_SCHEMA).parquet(paths[PLAYS_STATE])
    plays_changed = plays_changes(plays_old, fresh[LOG_DATA], events_dead, events_new, bool(logs_in.dead), titles,
                                  songs_new, artists_new, small)
    plays_new = replace_rows(plays_old, plays_changed, "songplay_id", small).cache()
    songplays_new = songplays_from_plays(plays_new)
    songplays_changed = settle(changed_rows(songplays_from_plays(side(plays_changed, OLD)),
                                            songplays_from_plays(side(plays_changed, NEW)), "songplay_id"))
    moments = songplays_changed.select("start_time").distinct()
    time_new = build_time(songplays_new).cache()
    time_changed = changed_rows(
        build_time(rows_of(songplays_from_plays(plays_old).select("start_time"), moments, small)),
        build_time(rows_of(songplays_new.select("start_time"), moments, small)), "start_time")
    changes.insert(0, Change(PLAYS_STATE, plays_new, plays_changed, PLAYS_PARTITION_BY))

    # Users: each touched user's latest version, merged with the state's, or recomputed when files died.
    latest_old = spark.read.schema(LATEST_SCHEMA).parquet(paths[USERS_STATE])
    latest_new = latest_old
    if logs_in.touched:
        fresh_events = fresh[LOG_DATA]
        user_keys = settle(user_versions(fresh_events).unionByName(user_versions(events_dead))
                           .select("user_id").distinct())
        if logs_in.dead:
            latest = latest_per_user(rows_of(user_versions(events_new), user_keys, small))
        else:
            latest = latest_per_user(user_versions(fresh_events).unionByName(rows_of(latest_old, user_keys, small)))
        latest_changed = settle(changed_rows(rows_of(latest_old, user_keys, small), latest, "user_id"))
        latest_new = replace_rows(latest_old, latest_changed, "user_id", small).cache()
        users_changed = changed_rows(users_from_latest(side(latest_changed, OLD)),
                                     users_from_latest(side(latest_changed, NEW)), "user_id")
        changes.insert(1, Change(USERS_STATE, latest_new, latest_changed, ()))
        changes.append(Change(USERS, users_from_latest(latest_new), users_changed, tuple(layout[USERS])))
    changes += [Change(TIME, time_new, time_changed, tuple(layout[TIME])),
                Change(SONGPLAYS, songplays_new, songplays_changed, tuple(layout[SONGPLAYS]))]

    tables = {SONGS: songs_new, ARTISTS: artists_new, USERS: users_from_latest(latest_new), TIME: time_new,
              SONGPLAYS: songplays_new}
    segments = {tree: records[3] for tree, records in ((SONG_DATA, song_records), (LOG_DATA, event_records))
                if records[3] is not None}
    return Increment(tables, songs_new_records, events_new, changes, segments)


def partitions_of(frames: Sequence[Tuple[DataFrame, Sequence[str]]]) -> List[List[Tuple[Optional[str], ...]]]:
    """The distinct partitions (partition_value of each column) of each (frame, partition columns), in one
    Spark job; () for a frame with rows and no partition columns."""
    parts = [frame.select(F.lit(index).alias("change"),
                          F.array(*[partition_value(c) for c in columns]).cast("array<string>").alias("values"))
             .distinct() for index, (frame, columns) in enumerate(frames)]
    found: List[List[Tuple[Optional[str], ...]]] = [[] for _ in frames]
    if parts:
        for row in reduce(DataFrame.unionByName, parts).collect():
            found[row["change"]].append(tuple(row["values"]))
    return found


def find_touched(changes: Sequence[Change]) -> None:
    """Fills in each change's touched partitions (those of its changed rows, old and new)."""
    for change, touched in zip(changes, partitions_of([(change.changed, change.partition_by) for change in changes])):
        change.touched = sorted(set(touched), key=lambda values: tuple(v or "" for v in values))


def written_partitions(contents: Sequence[Tuple[Change, DataFrame]]) -> List[List[Tuple[Optional[str], ...]]]:
    """For each partitioned change, the touched partitions that hold rows in its new version (the others are
    removed)."""
    return partitions_of([(content, change.partition_by) for change, content in contents])


# --------------------------------------------------------------------------- quality gate

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


def last_successful_run(store: Store, output_root: str) -> Optional[dict]:
    """The report of the newest run that succeeded, from <output>/_runs/ (run ids start with their UTC
    time, so names sort in time order), or None. A run that found nothing new built nothing and measured
    nothing: it is passed over."""
    folder = join(output_root, RUNS_DIR)
    names = sorted((key for key in store.keys(folder) if "/" not in key and key.endswith(".json")), reverse=True)
    for name in names:
        document = store.read_json(join(folder, name))
        if document and document.get("status") == SUCCEEDED and not (document.get("intake") or {}).get(NOTHING_NEW):
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
                 settings: Settings, store: Store) -> List[Check]:
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


AS_TABLE, AS_RECORDS, AS_JSON = "table", "records", "rejects"
GATE_FAILED_DIR = "_gate_failed"  # below the rejects root: the rejects of runs whose gate failed
WRITE_STATE = "write state"
REJECTS_SCHEMA = f"{SOURCE_FILE} string, {REASON} string, line string"


@dataclass
class Write:
    """One frame Spark writes to a unit's staging folder."""
    unit: Unit
    frame: Optional[DataFrame]  # None: nothing to write (a table a daily run leaves as it is)
    partition_by: Tuple[str, ...] = ()
    kind: str = AS_TABLE  # AS_TABLE: write_table; AS_RECORDS: a state segment as Spark holds it; AS_JSON: rejects
    label: Optional[str] = None  # the phase (and pause point) it is written in, if any


def stage(writes: Sequence[Write], report: RunReport, spool: Optional[str] = None,
          sink: Optional[Callable[[Write, str], None]] = None) -> None:
    """Writes everything this run will publish where no reader looks: <root>/_staging/<run id>/, or with a
    spool folder (S3 output under python etl.py) a local folder per write, handed to sink as soon as Spark
    has written it (lake.publish's DirectPublish: the state goes up at once, the tables once all are
    written). Writes with the same label share a phase, with a pause point at its start."""
    written: List[Tuple[Unit, str]] = []

    def target(unit: Unit) -> str:
        path = os.path.join(spool, f"{len(written)}-{unit.name.replace('/', '-')}") if spool \
            else unit.staged(report.run_id)
        written.append((unit, path))
        return path

    def write(item: Write) -> None:
        if item.frame is None:
            return
        if item.kind == AS_JSON:  # rejects are few; one file per tree is easiest to inspect
            item.frame.coalesce(1).write.mode("overwrite").json(target(item.unit))
        elif item.kind == AS_RECORDS:
            item.frame.write.mode("overwrite").parquet(target(item.unit))
        else:
            write_table(item.frame, target(item.unit), item.partition_by)
        if sink:
            sink(item, written[-1][1])

    index = 0
    while index < len(writes):
        label = writes[index].label
        group = [writes[index]]
        while index + len(group) < len(writes) and label and writes[index + len(group)].label == label:
            group.append(writes[index + len(group)])
        index += len(group)
        if not label:
            for item in group:
                write(item)
            continue
        pause_point(label)
        with phase(report, label) as counts:
            for item in group:
                write(item)
            table = label[len("write "):]
            if table in report.tables:
                counts["rows"] = report.tables[table]["rows"]


def reject_writes(spark: SparkSession, copy: LakeCopy, settings: Settings, intakes: Mapping[str, TreeIntake],
                  fresh: Mapping[str, DataFrame], whole: bool) -> List[Write]:
    """Each rejects tree as a full build of the input as it stands would write it: a daily run keeps the
    rejects of files the lake took in and still counts, drops those of changed and removed files (they
    describe content that no longer exists), and adds the fresh files'."""
    writes = []
    for tree in (SONG_DATA, LOG_DATA):
        frame = fresh[tree]
        if not whole:
            if not intakes[tree].touched:
                continue
            frame = frame.unionByName(kept_rejects(spark, copy, settings, intakes[tree]))
        writes.append(Write(Unit(settings.rejected_root, tree), frame, kind=AS_JSON))
    return writes


def held_rejects(settings: Settings, report: RunReport, intakes: Mapping[str, TreeIntake],
                 fresh: Mapping[str, DataFrame], whole: bool) -> List[Write]:
    """A run whose gate failed takes nothing in, so its rejects stay out of the rejects tree (which holds
    what a full build of the lake's intake writes: the next run that takes these files in writes their
    rejects there). They are kept for inspection at <rejected root>/_gate_failed/<run id>/<tree>/ (a "_"
    name: no reader of a tree looks there), where the report's rejected.path points."""
    held = join(settings.rejected_root, GATE_FAILED_DIR, report.run_id)
    LOG.warning("the gate failed: this run's rejects are kept at %s, the rejects tree stays as it was", held)
    report.rejected_root = held
    return [Write(Unit(settings.rejected_root, f"{GATE_FAILED_DIR}/{report.run_id}/{tree}"), fresh[tree],
                  kind=AS_JSON) for tree in (SONG_DATA, LOG_DATA) if whole or intakes[tree].fresh]


def kept_rejects(spark: SparkSession, copy: LakeCopy, settings: Settings, intake: TreeIntake) -> DataFrame:
    """The published rejects of files the lake took in and still counts as they were."""
    if not copy.store.has_data(join(settings.rejected_root, intake.tree)):
        return spark.createDataFrame([], REJECTS_SCHEMA)
    published = spark.read.schema(REJECTS_SCHEMA).json(copy.paths(settings.rejected_root, [intake.tree])[intake.tree])
    # The tree may hold rejects of files the lake did not take in (a failed run published them, before failed
    # runs held theirs back): only the state says which count.
    named = [row[SOURCE_FILE] for row in published.select(SOURCE_FILE).distinct().collect()]
    unchanged = intake.unchanged
    return of_files(published, [name for name in named if name in unchanged and name in intake.previous])


def state_unit(settings: Settings, name: str, drop: bool = False) -> Unit:
    return Unit(settings.output_root, f"{STATE_DIR}/{name}" if not name.startswith(STATE_DIR) else name, drop)


def full_output(settings: Settings, run_id: str, tables: Mapping[str, DataFrame], clean: Mapping[str, DataFrame],
                plays: DataFrame, latest: DataFrame) -> Tuple[List[Write], List[Unit]]:
    """A full build: every table whole, and the state whole (one unit: _state)."""
    writes = [Write(state_unit(settings, f"{tree}/{run_id}"), clean[tree], kind=AS_RECORDS, label=WRITE_STATE)
              for tree in (SONG_DATA, LOG_DATA)]
    writes += [Write(state_unit(settings, PLAYS_STATE), plays, PLAYS_PARTITION_BY, label=WRITE_STATE),
               Write(state_unit(settings, USERS_STATE), latest, label=WRITE_STATE)]
    writes += [Write(Unit(settings.output_root, name), tables[name], tuple(settings.partition_by[name]),
                     label=f"write {name}") for name in TABLES]
    return writes, [state_unit(settings, STATE_DIR)] + [Unit(settings.output_root, name) for name in TABLES]


def increment_output(settings: Settings, run_id: str, increment: Increment, intakes: Mapping[str, TreeIntake],
                     report: RunReport) -> Tuple[List[Write], List[Unit]]:
    """A daily run: this run's segments (and the segments they replace, dropped), then each touched partition
    of the plays and users state and of the tables, published from staging, or dropped if now empty."""
    writes: List[Write] = []
    state: List[Unit] = []
    for tree, segment in increment.segments.items():
        unit = state_unit(settings, f"{tree}/{run_id}")
        writes.append(Write(unit, segment, kind=AS_RECORDS, label=WRITE_STATE))
        state += [unit] + [state_unit(settings, f"{tree}/{name}", drop=True) for name in intakes[tree].dirty]
    contents = [(change, in_partitions(change.table, change.partition_by, change.touched))
                for change in increment.changes if change.touched]
    present = iter(written_partitions([(change, content) for change, content in contents if change.partition_by]))
    tables: Dict[str, List[Unit]] = {}
    rewritten, removed = report.intake.setdefault("partitions_rewritten", {}), \
        report.intake.setdefault("partitions_removed", {})
    for change, content in contents:
        is_state = change.name.startswith(STATE_DIR)
        label = WRITE_STATE if is_state else f"write {change.name}"
        if change.partition_by:
            kept, gone = partition_units(change.partition_by, change.touched, next(present))
        else:
            kept, gone = [""], []
        if kept:
            writes.append(Write(Unit(settings.output_root, change.name), content, change.partition_by, label=label))
        changed = [Unit(settings.output_root, join(change.name, folder) if folder else change.name)
                   for folder in kept]
        changed += [Unit(settings.output_root, join(change.name, folder), drop=True) for folder in gone]
        if is_state:
            state += changed
        else:
            tables.setdefault(change.name, []).extend(changed)
        rewritten[change.name], removed[change.name] = len(kept), len(gone)
    # Every table has its phase and pause point, written or not, as in a full build.
    writes += [Write(Unit(settings.output_root, name), None, label=f"write {name}") for name in TABLES
               if name not in tables]
    # State first, its manifest last; then the tables, dimensions first (as a full build publishes them).
    # Writes in the same order, so that each phase is one label.
    writes.sort(key=lambda item: 0 if item.label == WRITE_STATE else 1 + TABLES.index(item.unit.name))
    units = state + [state_unit(settings, MANIFEST_UNIT)] + [unit for name in TABLES for unit in tables.get(name, [])]
    return writes, units


@contextmanager
def spool_folder(plan: RunPlan, run_id: str) -> Iterator[Optional[str]]:
    """A local folder for S3 output on its way up, if the plan spools; removed afterwards (TMPDIR says where)."""
    if not plan.spool:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"sparkify-{run_id}-") as folder:
        yield folder


def spooled_sink(direct: DirectPublish) -> Callable[[Write, str], None]:
    """stage()'s sink for S3 output spooled on local disk: each folder Spark has written, checked, then
    handed to the publish."""
    def hand_over(item: Write, folder: str) -> None:
        require_spooled_data(item, folder)
        direct.upload(item.unit, folder)
    return hand_over


def require_spooled_data(item: Write, folder: str) -> None:
    """require_staged_data for one write Spark has just made to a local spool folder."""
    _require_data(item, lambda: next(visible_files(folder), None) is not None)


def require_staged_data(store: Store, writes: Sequence[Write], run_id: str) -> None:
    """The gate saw rows in every table; a staged table without a data file means a committer lost them
    (say, a staging committer on a cluster without a shared file system). Never publish that."""
    for item in writes:
        if item.frame is not None:
            _require_data(item, lambda item=item: store.has_data(item.unit.staged(run_id)))


def _require_data(item: Write, has_data: Callable[[], bool]) -> None:
    """Only a table's write is looked at (a LIST on S3): the state and the rejects may hold no row."""
    if item.kind == AS_TABLE and item.unit.name in TABLES and not has_data():
        raise EtlError(f"the write of {item.unit.name} left no data file in staging, though it has rows")


# --------------------------------------------------------------------------- the run

FULL, INCREMENTAL = "full", "incremental"
NOTHING_NEW = "nothing_new"  # in the report's intake: the run ended after listing
# A daily run broadcasts the keys its fresh and dead records touch, up to this many records; beyond, Spark
# plans the joins itself.
BROADCAST_RECORDS = 2_000_000
ADAPTIVE = "spark.sql.adaptive.enabled"


def count_rows(frames: Mapping[str, DataFrame]) -> Dict[str, int]:
    """Rows of each frame, in one job; the first count of a cached frame is what fills its cache."""
    rows = collect_aggregates({name: frame.agg(F.count(F.lit(1)).alias("rows")) for name, frame in frames.items()})
    return {name: row["rows"] for name, row in rows.items()}


def build_mode(settings: Settings, plan: RunPlan) -> Tuple[Optional[dict], Optional[str]]:
    """The lake's manifest, if this job's state can be compared with (None otherwise), and why this run
    builds from nothing (None: from what is new). Known before the input is listed."""
    store = plan.output_store
    manifest = load_manifest(store, settings.output_root)
    reason = why_full(manifest, settings.full, settings.partition_by,
                      rejects_location(settings.output_root, settings.rejected_root),
                      store.children(settings.output_root), TABLES)
    return (manifest if manifest and manifest.get("state_version") == STATE_VERSION else None), reason


def take_stock(settings: Settings, plan: RunPlan, report: RunReport, comparable: Optional[dict],
               reason: Optional[str]) -> Dict[str, TreeIntake]:
    """Lists the input and compares it with what the lake has taken in (build_mode's manifest). Needs no
    Spark: a daily run with nothing new never starts it."""
    intakes, files = {}, {}
    for tree in (SONG_DATA, LOG_DATA):
        listed = list_tree(plan, settings.input_root, tree)
        since_last = compare(tree, listed, comparable, report.run_id)  # what the report calls new
        intakes[tree] = since_last if reason is None else from_nothing(since_last)
        files[tree] = since_last.counts()
    report.intake = {"mode": FULL if reason else INCREMENTAL, "why_full": reason,
                     "previous_run": (comparable or {}).get("run_id"), "files": files,
                     "previous_rows": (comparable or {}).get("tables", {})}
    return intakes


def _read_tree(report: RunReport, tree: str, read: Callable[[], Tuple[DataFrame, int]],
               split: Callable[[DataFrame], Tuple[DataFrame, DataFrame]]
               ) -> Tuple[DataFrame, DataFrame, Dict[str, int]]:
    """Reads one input tree (or its fresh files), counting its files, records and rejects into the report;
    returns (clean, rejects, clean records per file)."""
    with phase(report, f"read {tree}") as counts:
        files_key, records_key = REPORT_INPUT_KEYS[tree]
        raw, report.input[files_key] = read()
        counts["files"] = report.input[files_key]
        raw = lines_of_rejects_only(raw, tree).cache()
        clean, rejects = split(raw)
        profile = profile_read(raw, tree)
        report.input[records_key] = counts["records"] = profile["records"]
        report.rejected[tree] = counts["rejected"] = profile["rejected"]
        report.quality.setdefault("read", {})[tree] = profile
        per_file = {row[SOURCE_FILE]: row["count"] for row in clean.groupBy(SOURCE_FILE).count().collect()}
    if profile["unknown_fields"]:
        LOG.warning("%s: fields the schema does not know, with the lines carrying each: %s", tree,
                    ", ".join(f"{name} {count}" for name, count in profile["unknown_fields"].items()))
    return clean, rejects, per_file


def extract(spark: SparkSession, settings: Settings, report: RunReport, plan: RunPlan,
            intakes: Mapping[str, TreeIntake], whole: bool
            ) -> Tuple[Dict[str, DataFrame], Dict[str, DataFrame], Dict[str, int]]:
    """Reads every listed file (whole) or the fresh ones: clean records and rejects per tree, and the clean
    records of each file read."""
    clean, rejects, per_file = {}, {}, {}
    for tree, split in ((SONG_DATA, split_songs), (LOG_DATA, split_events)):
        files = list(intakes[tree].listed.values()) if whole else intakes[tree].fresh

        def read(tree: str = tree, files: Sequence[InputFile] = files) -> Tuple[DataFrame, int]:
            return read_files(spark, plan, settings.input_root, tree, files, whole), len(files)

        if files:
            clean[tree], rejects[tree], counts = _read_tree(report, tree, read, split)
            per_file.update(counts)
        else:  # a daily run with nothing new in this tree: no phase, no job
            clean[tree], rejects[tree] = split(read()[0])
            report.input.update(dict.fromkeys(REPORT_INPUT_KEYS[tree], 0))
        if tree == SONG_DATA:
            pause_point("read")
    return clean, rejects, per_file


def transform(songs: DataFrame, events: DataFrame, report: RunReport) -> Tuple[Dict[str, DataFrame], DataFrame,
                                                                               DataFrame]:
    """The five tables and the state behind them, cached (the gate and the writes read them again) and
    counted, in one job."""
    with phase(report, "build tables") as counts:
        tables, plays, latest = build_lake(songs, events, on_built=lambda name, table: table.cache())
        rows = count_rows(tables)
        for name in TABLES:
            report.tables[name] = {"rows": rows[name]}
            counts[name] = rows[name]
    return tables, plays, latest


def transform_increment(spark: SparkSession, settings: Settings, report: RunReport, intakes: Mapping[str, TreeIntake],
                        clean: Mapping[str, DataFrame], paths: Mapping[str, str]) -> Increment:
    """The new tables from the state (read where paths say) and the fresh records, what changed, and the
    partitions it touches."""
    with phase(report, "build tables") as counts:
        dead = sum(intake.previous[name].records for intake in intakes.values() for name in intake.dead)
        fresh = sum(report.input.get(key, 0) for key in ("song_records", "log_events"))
        small = fresh + dead <= BROADCAST_RECORDS
        if small and ADAPTIVE not in dict(spark.sparkContext.getConf().getAll()):
            # A daily run's frames are small and its joins planned (broadcasts named): adaptive execution
            # would run each of its many small shuffles as a job of its own (101 jobs against 36, measured).
            spark.conf.set(ADAPTIVE, "false")
        increment = build_increment(spark, settings, intakes, clean, small, paths)
        find_touched(increment.changes)
        rows = count_rows(increment.tables)
        for name in TABLES:
            report.tables[name] = {"rows": rows[name]}
            counts[name] = rows[name]
        counts["partitions touched"] = sum(len(change.touched) for change in increment.changes)
    return increment


def count_state(spark: SparkSession, paths: Mapping[str, str], names: Sequence[str]) -> Dict[str, int]:
    """The rows of each named state folder, in one job (a count reads the parquet footers only)."""
    parts = [spark.read.schema("_any string").parquet(paths[name]).select(F.lit(name).alias("folder"))
             for name in names]
    return {row["folder"]: row["count"] for row in reduce(DataFrame.unionByName, parts).groupBy("folder").count()
            .collect()}


def read_state(spark: SparkSession, settings: Settings, report: RunReport, intakes: Dict[str, TreeIntake],
               copy: LakeCopy) -> Optional[Dict[str, str]]:
    """Where Spark reads the state a daily run builds on, fetched first if the lake keeps it on S3 and Spark
    has no S3 reader, once each folder's rows are checked against the manifest. A folder that is missing,
    short or unreadable would silently take its rows out of every partition the run rewrites: the run
    becomes a full build instead (the input is all there), said in the log and the report (why_full);
    intakes become a full build's, and None is returned."""
    with phase(report, "check state") as counts:
        paths = state_paths(copy, settings.output_root, intakes)
        expected = state_rows(intakes, report.intake["previous_rows"])
        try:
            fault = state_fault(expected, count_state(spark, paths, sorted(expected)))
        except Exception as exc:  # a folder Spark cannot find, a file it cannot read: the state is not usable
            fault = f"the lake's state cannot be read: {one_line(exc)}"
        if copy.folder:
            counts["state files fetched"] = report.intake["state_files_fetched"] = copy.files
        counts["folders"] = len(expected)
    if fault is None:
        return paths
    LOG.warning("full build instead: %s", fault)
    report.intake.update(mode=FULL, why_full=fault)
    intakes.update({tree: from_nothing(intake) for tree, intake in intakes.items()})
    return None


def run_job(spark: SparkSession, settings: Settings, plan: RunPlan, report: RunReport,
            intakes: Mapping[str, TreeIntake], lock: Optional[Lock] = None) -> bool:
    """Extract, transform, check, stage, publish. If the gate fails only its rejects are kept (held_rejects). A run
    that no longer holds the lake (lock) publishes nothing more."""
    with spool_folder(plan, f"{report.run_id}-lake") as folder:
        return _run_job(spark, settings, plan, report, intakes, LakeCopy(plan.output_store, folder), lock)


def _run_job(spark: SparkSession, settings: Settings, plan: RunPlan, report: RunReport,
             intakes: Mapping[str, TreeIntake], copy: LakeCopy, lock: Optional[Lock]) -> bool:
    store, run_id = plan.output_store, report.run_id
    intakes = dict(intakes)
    paths = read_state(spark, settings, report, intakes, copy) if report.intake["mode"] == INCREMENTAL else None
    whole = report.intake["mode"] == FULL
    clean, rejects, per_file = extract(spark, settings, report, plan, intakes, whole)
    plays = latest = increment = None
    if whole:
        tables, plays, latest = transform(clean[SONG_DATA], clean[LOG_DATA], report)
        songs, events = clean[SONG_DATA], clean[LOG_DATA]
    else:
        increment = transform_increment(spark, settings, report, intakes, clean, cast(Dict[str, str], paths))
        tables, songs, events = increment.tables, increment.songs, increment.events
    with phase(report, "quality gate") as counts:
        pause_point("gate")
        report.checks = quality_gate(tables, songs, events, report, settings, store)
        failed = [check for check in report.checks if not check.passed]
        counts["checks"], counts["failed"] = len(report.checks), len(failed)
    for check in failed:
        LOG.error("check failed: %s (%s)", check.name, check.detail)
    if failed:
        report.error = report.error_line = gate_failure(failed)
    writes = held_rejects(settings, report, intakes, rejects, whole) if failed \
        else reject_writes(spark, copy, settings, intakes, rejects, whole)
    to_publish = [item.unit for item in writes]
    if not failed:
        lake_writes, lake_units = full_output(settings, run_id, tables, clean, plays, latest) if whole \
            else increment_output(settings, run_id, increment, intakes, report)
        writes, to_publish = writes + lake_writes, to_publish + lake_units
        previous = report.intake.get("previous_rows", {})
        report.intake["rows_added"] = {name: report.tables[name]["rows"] - previous.get(name, 0) for name in TABLES}
    with spool_folder(plan, run_id) as spool:
        # S3 output spooled on local disk (lake.plan spools only S3 output): each object PUT once, straight
        # into place (the gate has passed: every write is to be published). Otherwise staged, then published
        # from staging (local renames, or S3 copies under spark-submit).
        direct = DirectPublish(cast(InPlaceStore, store), to_publish, run_id, settings.output_root, lock) \
            if spool else None
        sink = spooled_sink(direct) if direct else None
        if direct:
            # The state first (it goes up while Spark writes the tables), the rejects last.
            writes = sorted(writes, key=lambda item: item.kind == AS_JSON)
        try:
            stage(writes, report, spool, sink)
            if direct:  # nothing after the writes needs Spark: it stops while the PUTs go on
                direct.release()
                spark.stop()
            if not failed:
                store.write_json(join(state_unit(settings, MANIFEST_UNIT).staged(run_id), MANIFEST_FILE),
                                 new_manifest(run_id, JOB_VERSION, settings.partition_by,
                                              rejects_location(settings.output_root, settings.rejected_root),
                                              list(intakes.values()), per_file,
                                              {name: report.tables[name]["rows"] for name in TABLES}))
            if not direct:
                require_staged_data(store, writes, run_id)
            with phase(report, "publish") as counts:
                if direct:
                    direct.finish()
                    counts["files put"], counts["old deleted"] = direct.put, direct.deleted
                else:
                    publish(store, to_publish, run_id, settings.output_root, lock)
                report.published = published_folders(to_publish)
                counts["folders"] = len(to_publish)
        except Exception:
            if direct:
                direct.abort()  # before the commit mark: what was put in place goes again
            raise
    report.status = "failed" if failed else "succeeded"
    return not failed


def catalog_step(settings: Settings, plan: RunPlan, report: RunReport) -> int:
    """After a successful publish: register, and say in the report how it went. The tables stay published."""
    database = settings.catalog_database
    if not database:
        report.catalog = {"status": "off"}
        return 0
    with phase(report, "catalog") as counts:
        try:
            tables = register_catalog(database, settings.output_root, settings.partition_by, plan.output_store,
                                      settings.aws)
        except Exception as exc:  # botocore's errors, or ours: one line, the tables stay as published
            detail = str(exc) if isinstance(exc, EtlError) else one_line(exc)
            report.catalog = {"status": "failed", "database": database, "error": detail}
            return 1
        report.catalog = {"status": "registered", "database": database, "tables": tables}
        counts["partitions"] = sum(entry["partitions"] for entry in tables.values())
    return 0


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines say where it found endpoints
    try:
        settings = resolve_settings(parse_args(sys.argv[1:] if argv is None else argv), os.environ)
        plan = plan_run(settings, os.environ, emr_marker())
        preflight(settings, plan)
    except EtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = RunReport(settings.input_root, settings.output_root, settings.rejected_root, JOB_VERSION,
                       pyspark.__version__)
    lock = plan.output_store.lock(settings.output_root)
    try:
        lock.take(report.run_id)
    except EtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # S3 itself failing, having passed the preflight seconds ago
        print(f"error: cannot lock {settings.output_root}: {one_line(exc)}", file=sys.stderr)
        return 1
    try:
        code = locked_run(settings, plan, report, lock)
    finally:
        try:
            lock.release()
        except Exception as exc:  # S3 gone: the lease goes stale by itself
            LOG.warning("could not release the lease on %s: %s", settings.output_root, one_line(exc))
    if report.error_line:
        print(f"error: {report.error_line}", file=sys.stderr)  # last, so it is the line a user sees
    return code


def locked_run(settings: Settings, plan: RunPlan, report: RunReport, lock: Optional[Lock] = None) -> int:
    """Everything after the lock: recovery, the run, and a report that says at every moment what is true."""
    store, roots = plan.output_store, staging_roots(settings)
    LOG.info("input %s -> output %s, run %s", settings.input_root, settings.output_root, report.run_id)
    LOG.info("Spark set-up: %s", plan.spark.summary)
    try:
        finished = recover(store, roots, settings.output_root, lock)
        open_staging(store, settings.output_root, report.run_id)
        begin_report(store, report, finished)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, EtlError) else one_line(exc)
        print(f"error: cannot prepare {settings.output_root}: {detail}", file=sys.stderr)
        return 1
    started = None
    try:
        with phase(report, "list input") as counts:
            comparable, reason = build_mode(settings, plan)
            if reason:  # a full build needs Spark whatever the listing finds: its JVM starts meanwhile
                started = start_spark_session(plan)
            intakes = take_stock(settings, plan, report, comparable, reason)
            for tree in intakes:
                counts[tree] = ", ".join(f"{value} {key}" for key, value in report.intake["files"][tree].items())
    except Exception as exc:
        stop_unused(started)
        report.error = str(exc) if isinstance(exc, EtlError) else one_line(exc)
        report.error_line = failure_line(report, settings, plan)
        return end_report(store, report, roots, 1, lock)
    if report.intake["mode"] == INCREMENTAL and not any(intake.touched for intake in intakes.values()):
        LOG.info("nothing new since run %s: every table stays as it was published", report.intake["previous_run"])
        report.status, report.intake[NOTHING_NEW] = "succeeded", True
        return end_report(store, report, roots, catalog_step(settings, plan, report), lock)
    LOG.info("%s build: %s", report.intake["mode"],
             report.intake["why_full"] or "from the lake's state and the files added, changed or removed")
    try:
        with phase(report, "start spark"):
            spark = started.result() if started else create_spark_session(plan)
    except Exception as exc:  # no Java, say, or jars missing; nothing has been read or written yet
        report.error = str(exc) if isinstance(exc, EtlError) else f"cannot start Spark: {one_line(exc)}"
        code = end_report(store, report, roots, 2 if isinstance(exc, EtlError) else 1, lock)
        print(f"error: {report.error}", file=sys.stderr)  # last, so it is the line a user sees
        return code
    try:
        code = 0 if run_job(spark, settings, plan, report, intakes, lock) else 1
    except Exception as exc:  # the report must still say the run failed
        report.publish_left = isinstance(exc, PublishCutShort)
        cause = exc.cause if isinstance(exc, PublishCutShort) else exc
        report.error = str(cause) if isinstance(cause, EtlError) else one_line(cause)
        LOG.error("run failed: %s", report.error)
        code = 1
    finally:
        spark.stop()
    if report.error and not report.error_line:  # the gate writes its own
        report.error_line = failure_line(report, settings, plan)
    if code == 0:
        code = catalog_step(settings, plan, report)
    if report.catalog.get("status") == "failed":
        report.error_line = (f"the tables are published, but registering them in the Glue Data Catalog "
                             f"(database {settings.catalog_database}) failed: {report.catalog['error']}")
    return end_report(store, report, roots, code, lock)


def failure_line(report: RunReport, settings: Settings, plan: RunPlan) -> str:
    """What stopped the run, in one line: where it was, and whether anything was published."""
    where = f"the run stopped in '{report.current_phase}'" if report.current_phase else "the run stopped"
    # A failed run may be a lost endpoint: one quick request to each store says so.
    lost = plan.output_store.unreachable(settings.output_root) or plan.input_store.unreachable(settings.input_root)
    published = "publishing was cut short (the next run completes it)" if report.publish_left \
        else "nothing was published"
    return f"{lost}: {where}; {published}" if lost else f"{where}: {report.error}; {published}"


def staging_roots(settings: Settings) -> List[str]:
    return list(dict.fromkeys((settings.output_root, settings.rejected_root)))


if __name__ == "__main__":
    sys.exit(main())
