"""The benchmark's reference (tools/duckdb_etl.py) must build our tables exactly, or its times mean nothing."""
import shutil
import subprocess
import sys

import duckdb

from conftest import ROOT, SAMPLE, glue_two_new_plays

sys.path.insert(0, str(ROOT / "tools"))
import compare_tables  # noqa: E402


def build_with_duckdb(out, source=SAMPLE):
    subprocess.run([sys.executable, ROOT / "tools" / "duckdb_etl.py", source, out], check=True, capture_output=True)
    return out


def test_duckdb_builds_our_tables_row_for_row(sample_output, tmp_path):
    assert compare_tables.differences(sample_output, build_with_duckdb(tmp_path / "duckdb")) == {}


def test_duckdb_loads_neither_of_two_events_glued_on_one_line(sample_output, tmp_path):
    # etl.py rejects the line (tests/test_quality.py): the reference must leave both events out as well.
    root = tmp_path / "input"
    shutil.copytree(SAMPLE, root)
    glue_two_new_plays(root)
    assert compare_tables.differences(sample_output, build_with_duckdb(tmp_path / "duckdb", root)) == {}


def test_the_comparison_sees_one_changed_row(sample_output, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(sample_output, changed)
    users = changed / "users"
    shutil.rmtree(users)
    users.mkdir()
    # One user's level flipped: the kind of slip (which event is the latest) the comparison must catch.
    source = f"'{sample_output}/users/*.parquet'"
    flip_one = f"""CASE WHEN user_id = (SELECT min(user_id) FROM {source})
                        THEN CASE level WHEN 'free' THEN 'paid' ELSE 'free' END ELSE level END"""
    duckdb.execute(f"COPY (SELECT * REPLACE ({flip_one} AS level) FROM {source}) "
                   f"TO '{users}/part.parquet' (FORMAT parquet)")
    assert compare_tables.differences(sample_output, changed) == {
        "users": "1 rows only in A, 1 only in B (of 97 and 97)"}
