"""Random deliveries over several days (tools/soak.py): after every daily run the lake equals a fresh full
build of the same input (tables, rejects, state) and DuckDB's reference; a day that fails the gate leaves it
as it was. The short, fixed-seed version: every kind of change on every day, every hole type of issue 26 on.
`make soak SEED=... DAYS=...` runs long sequences (docs/testing.md)."""
import subprocess
import sys
from collections import Counter

import duckdb

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import compare_tables  # noqa: E402
import soak  # noqa: E402

SOAK = str(ROOT / "tools" / "soak.py")
SEED, DAYS = 1, 4  # day 1 the first delivery, day 2 every change, day 3 a failed gate, day 4 put right


def test_daily_runs_equal_a_full_build_under_random_deliveries(tmp_path):
    command = [sys.executable, SOAK, "--seed", str(SEED), "--days", str(DAYS), "--busy", "--holes", "all",
               "--workdir", str(tmp_path / "soak")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAIL", "  "))]
    assert result.returncode == 0, "\n".join(failures) or result.stderr[-3000:]


def test_the_state_comparison_sees_one_changed_row():
    """The soak's own comparison (no Spark): a row changed in one side of the state is reported, by part."""
    daily = {"users": Counter({(("level", "free"), ("user_id", 7)): 1}), "manifest log_data": {"a": ("1-2", "3")}}
    full = {"users": Counter({(("level", "paid"), ("user_id", 7)): 1}), "manifest log_data": {"a": ("1-2", "3")}}
    found = soak.differences("state", daily, full)
    assert len(found) == 1 and found[0].startswith("state users: 1 rows only in the daily lake, 1 only in the full")


def test_a_null_partition_value_reads_as_null_whoever_wrote_it(tmp_path):
    """Spark names the folder of a null partition value __HIVE_DEFAULT_PARTITION__, DuckDB's writer NULL: the
    comparison reads both as null, and still tells a null from a value."""
    roots = {}
    for who, folder in (("spark", "__HIVE_DEFAULT_PARTITION__"), ("duckdb", "NULL"), ("other", "AR1")):
        roots[who] = tmp_path / who
        for table, spec in compare_tables.SPECS.items():
            data = [c for c in spec.column_names if c not in spec.partition_by]
            values = {"year": "1999", "month": "11", "artist_id": folder}
            path = roots[who].joinpath(table, *(f"{c}={values[c]}" for c in spec.partition_by))
            path.mkdir(parents=True)
            row = ", ".join(f"NULL::{spec.type_of(c).replace('string', 'VARCHAR')} AS {c}" for c in data)
            duckdb.execute(f"COPY (SELECT {row}) TO '{path}/part.parquet' (FORMAT parquet)")
    assert compare_tables.differences(roots["spark"], roots["duckdb"]) == {}
    assert compare_tables.differences(roots["spark"], roots["other"]) == {
        "songs": "1 rows only in A, 1 only in B (of 1 and 1)"}
