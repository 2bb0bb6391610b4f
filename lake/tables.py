"""The five tables, each stated once: name, typed columns, key and partition columns.

The builders' final select, the writer, the quality gate and the Glue catalog all read this spec.
Types are Spark SQL's names, which are also Hive's, Glue's and Athena's.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

SONGPLAYS = "songplays"
USERS = "users"
SONGS = "songs"
ARTISTS = "artists"
TIME = "time"


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: Tuple[Tuple[str, str], ...]  # (column, type), in the table's order
    key: str  # one row per value of this column
    partition_by: Tuple[str, ...]  # the contract's layout; [LAYOUT] in dl.cfg may change it

    @property
    def column_names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def type_of(self, column: str) -> str:
        return dict(self.columns)[column]


SPECS: Dict[str, TableSpec] = {spec.name: spec for spec in (
    TableSpec(SONGPLAYS, (("songplay_id", "string"), ("start_time", "timestamp"), ("user_id", "bigint"),
                          ("level", "string"), ("song_id", "string"), ("artist_id", "string"),
                          ("session_id", "bigint"), ("location", "string"), ("user_agent", "string"),
                          ("year", "int"), ("month", "int")),
              key="songplay_id", partition_by=("year", "month")),
    TableSpec(USERS, (("user_id", "bigint"), ("first_name", "string"), ("last_name", "string"),
                      ("gender", "string"), ("level", "string")),
              key="user_id", partition_by=()),
    TableSpec(SONGS, (("song_id", "string"), ("title", "string"), ("artist_id", "string"), ("year", "int"),
                      ("duration", "double")),
              key="song_id", partition_by=("year", "artist_id")),
    TableSpec(ARTISTS, (("artist_id", "string"), ("name", "string"), ("location", "string"),
                        ("latitude", "double"), ("longitude", "double")),
              key="artist_id", partition_by=()),
    TableSpec(TIME, (("start_time", "timestamp"), ("hour", "int"), ("day", "int"), ("week", "int"),
                     ("month", "int"), ("year", "int"), ("weekday", "int")),
              key="start_time", partition_by=("year", "month")),
)}
# Dimensions first: a reader who sees a new songplays table can join it.
TABLES = (SONGS, ARTISTS, USERS, TIME, SONGPLAYS)
PARTITION_BY: Dict[str, Tuple[str, ...]] = {name: SPECS[name].partition_by for name in TABLES}
