"""The job on generated data: a period across New Year, with the junk real downloads carry."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, read_tables
from lake.report import REPORT_NAME

GENERATOR = str(ROOT / "tools" / "generate_data.py")
ARGS = ["--songs", "300", "--events", "3000", "--cross-year", "--junk", "--seed", "7"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated") / "input"
    subprocess.run([sys.executable, GENERATOR, str(root), *ARGS], check=True, capture_output=True)
    return root


def test_generator_is_deterministic_for_a_seed(generated, tmp_path):
    again = tmp_path / "again"
    subprocess.run([sys.executable, GENERATOR, str(again), *ARGS], check=True, capture_output=True)
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((generated / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_job_on_generated_data_across_new_year(spark, run_etl, generated, tmp_path):
    out = tmp_path / "output"
    result = run_etl("--input", generated, "--output", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    # --junk plants two bad song files and three bad event lines; hidden files are never read.
    assert (report["rejected"]["song_data"], report["rejected"]["log_data"]) == (2, 3)
    assert all(check["passed"] for check in report["checks"])
    tables = read_tables(spark, out)
    months = sorted(tuple(row) for row in tables["songplays"].select("year", "month").distinct().collect())
    assert months == [(2018, 12), (2019, 1)]
    new_years_eve = tables["time"].filter("year = 2018 and month = 12 and day = 31")
    assert new_years_eve.select("week").distinct().collect()[0][0] == 1
    assert tables["songplays"].filter("song_id is not null").count() > 100  # the generator plants catalogue plays
