#!/usr/bin/env python3
"""Do two output roots hold the same five tables, row for row? Used by `make bench` and the tests.

    python tools/compare_tables.py ROOT_A ROOT_B

Each table is read with its partition columns (from the folder names) and compared as a multiset of rows,
columns by name; exit status 1 and one line per table that differs.
"""
import argparse
import sys
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lake.intake import DEFAULT_PARTITION  # noqa: E402
from lake.tables import SPECS  # noqa: E402  (the contract's columns, stated once)


def _column(table, name):
    """A column as a reader of the table sees it: a partition value of null, empty or Hive's default is null
    (Spark names the folder of a null or empty value DEFAULT_PARTITION, DuckDB's writer names it NULL)."""
    if name not in SPECS[table].partition_by:
        return name
    return f"NULLIF(NULLIF(CAST({name} AS VARCHAR), '{DEFAULT_PARTITION}'), '') AS {name}"


def _rows(root, table):
    columns = ", ".join(_column(table, name) for name in SPECS[table].column_names)
    return f"SELECT {columns} FROM read_parquet('{root}/{table}/**/*.parquet', hive_partitioning = true)"


def differences(root_a, root_b):
    """{table: "n rows only in A, m only in B (of x and y)"} for each table that differs."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    found = {}
    for table in SPECS:
        a, b = _rows(root_a, table), _rows(root_b, table)
        counts = con.execute(f"SELECT (SELECT count(*) FROM ({a})), (SELECT count(*) FROM ({b})), "
                             f"(SELECT count(*) FROM ({a} EXCEPT ALL {b})), "
                             f"(SELECT count(*) FROM ({b} EXCEPT ALL {a}))").fetchone()
        rows_a, rows_b, only_a, only_b = counts
        if only_a or only_b:
            found[table] = f"{only_a} rows only in A, {only_b} only in B (of {rows_a} and {rows_b})"
    con.close()
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root_a")
    parser.add_argument("root_b")
    args = parser.parse_args()
    found = differences(args.root_a, args.root_b)
    for table, detail in found.items():
        print(f"{table}: {detail}")
    if not found:
        print("the five tables are identical, row for row")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
