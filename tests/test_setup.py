"""How Spark is set up: the jars `make setup` resolved, and the one function that decides the session."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dist
import etl
from conftest import ROOT
from lake.plan import CLOUD_COMMIT_PROTOCOL, NIO_FILE_SYSTEM, NIO_JAR, S3A_FILE_SYSTEM, SparkSetup, plan_run
from lake.stores import LocalStore, S3Store

pytestmark = pytest.mark.check  # `make check`: Spark's set-up, decided before it starts

SECRET = "sEcReT-setup-never-in-conf"
LOCAL = etl.Settings("/in", "/out", "/out/_rejected")
ON_S3 = etl.Settings("s3://in", "s3a://lake/x", "s3a://lake/x/_rejected",
                     aws=etl.AwsSettings("AKIA", SECRET, region="eu-west-1", source="environment"))
PYTHON, SUBMITTED = {}, {"PYSPARK_GATEWAY_PORT": "4242"}


def plan(settings, environ=PYTHON, marker=None, nio_built=True):
    nio_jar = Path(NIO_JAR) if nio_built else Path("/nowhere/sparkify-hadoop.jar")
    return plan_run(settings, environ, marker, nio_jar=str(nio_jar))


def test_the_package_zip_is_lake_as_it_is_now_and_imports_from_the_zip_alone(tmp_path):
    """`make dist`: spark-submit's --py-files puts dist/lake.zip on the Python path, where `import lake` finds it."""
    built = dist.build(target=tmp_path / "lake.zip")
    names = zipfile.ZipFile(built).namelist()
    assert "lake/__init__.py" in names
    assert names == [path.relative_to(ROOT).as_posix() for path in dist.sources()]
    found = subprocess.run([sys.executable, "-c", "import lake; print(lake.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(built)}, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == str(built / "lake" / "__init__.py"), found.stderr
    # Built anew: a module removed from the package is gone from the zip too.
    package = tmp_path / "src" / "lake"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "old.py").write_text("")
    dist.build(package, tmp_path / "again.zip")
    (package / "old.py").unlink()
    assert zipfile.ZipFile(dist.build(package, tmp_path / "again.zip")).namelist() == ["lake/__init__.py"]


def test_local_run_started_by_python_uses_the_nio_file_system():
    chosen = plan(LOCAL).spark
    assert chosen.conf == {"spark.driver.extraClassPath": NIO_JAR, "spark.hadoop.fs.file.impl": NIO_FILE_SYSTEM}
    assert chosen.environ == {"PYSPARK_PYTHON": sys.executable}  # song files are read in Python workers
    assert chosen.summary == "local paths; local files through java.nio (no chmod process per file)"


def test_an_unbuilt_nio_jar_is_named_as_the_reason():
    chosen = plan(LOCAL, nio_built=False).spark
    assert chosen.conf == {}
    assert "/nowhere/sparkify-hadoop.jar not built: run `make setup`" in chosen.summary


def test_s3_output_under_python_is_spooled_on_local_disk_and_needs_no_s3a():
    assert plan(ON_S3).spool
    chosen = plan(ON_S3).spark
    assert not [key for key in chosen.conf if "s3a" in key or "commit" in key or key == "spark.jars"], chosen.conf
    assert chosen.secrets == {} and chosen.needed_classes == {}
    assert "S3 output written to local disk, then PUT by boto3 (64 in flight)" in chosen.summary
    assert "credentials from the environment" in chosen.summary
    s3_input_only = etl.Settings("s3://in", "/out", "/out/_rejected", aws=ON_S3.aws)
    assert not plan(s3_input_only).spool and not plan(LOCAL).spool and not plan(ON_S3, SUBMITTED).spool


def test_s3_input_off_emr_is_listed_and_fetched_by_workers_running_this_python():
    chosen = plan(ON_S3)
    assert chosen.listed_trees == {"song_data", "log_data"} and isinstance(chosen.input_store, S3Store)
    assert chosen.spark.environ == {"PYSPARK_PYTHON": sys.executable}  # it has boto3: the preflight used it
    assert chosen.spark.summary.startswith("S3 input listed flat and fetched in the plan")
    assert plan(ON_S3, {"PYSPARK_PYTHON": "/opt/py"}).spark.environ == {}  # the user's wins
    assert plan(ON_S3, SUBMITTED).spark.environ == {}
    local_input = etl.Settings("/in", "s3a://lake/x", "s3a://lake/x/_rejected", aws=ON_S3.aws)
    # Local input: only the many tiny song files are listed; the day-sized logs go to Spark's line reader.
    assert plan(local_input).listed_trees == plan(LOCAL).listed_trees == {"song_data"}
    assert isinstance(plan(local_input).input_store, LocalStore)


def test_spark_submit_brings_its_own_jars_which_are_checked_once_spark_is_up():
    chosen = plan(ON_S3, SUBMITTED).spark
    # The master may be a cluster, whose tasks share no disk with the driver: S3A's magic committer writes.
    assert chosen.conf["spark.hadoop.fs.s3a.committer.name"] == "magic"
    assert chosen.conf["spark.sql.sources.commitProtocolClass"] == CLOUD_COMMIT_PROTOCOL
    assert chosen.conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    assert chosen.secrets == {"fs.s3a.access.key": "AKIA", "fs.s3a.secret.key": SECRET}
    assert "spark.jars" not in chosen.conf and "spark.driver.extraClassPath" not in chosen.conf
    assert set(chosen.needed_classes) == {S3A_FILE_SYSTEM, CLOUD_COMMIT_PROTOCOL}
    assert "spark-submit fixes the driver's classpath" in chosen.summary


@pytest.mark.parametrize("settings", [LOCAL, ON_S3], ids=["local", "s3"])
def test_emr_is_left_to_its_own_set_up(settings):
    chosen = plan(settings, marker="/mnt/var/lib/info/job-flow.json")
    assert chosen.spark == SparkSetup(summary="EMR (/mnt/var/lib/info/job-flow.json): S3, committers "
                                                        "and local files are left to EMR's own set-up")
    assert chosen.listed_trees == frozenset() and not chosen.spool  # EMRFS reads and writes


@pytest.mark.parametrize("environ", [PYTHON, SUBMITTED], ids=["python", "spark-submit"])
def test_secrets_never_reach_the_builder_settings_or_the_log(environ):
    chosen = plan(ON_S3, environ).spark
    assert SECRET not in repr(chosen) and SECRET not in chosen.summary
    assert SECRET not in "".join(chosen.conf.values())
