"""S3 in, S3 out: the real S3A connector against a real S3 API server (moto) on loopback."""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyspark
import pytest
from pyspark.testing import assertDataFrameEqual

import etl
from conftest import JARS_MANIFEST, SAMPLE, free_port, py_files, read_tables, s3_jars, s3_with_sample
from lake.report import REPORT_NAME
from lake.stores import PREFLIGHT_PROBE

SECRET = "sEcReT-7f3a9c-never-log-me"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATESTINGSPARKIFY", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_REGION": "us-east-1"}
JUNK = {"song_data/.DS_Store": b"\x00\x00\x00\x01Bud1", "__MACOSX/song_data/A/._x.json": b"\x00\x05\x16\x07",
        "song_data/A/__MACOSX/._y.json": b"\x00\x05\x16\x07", "log_data/2018/11/._z.json": b"\x00\x05\x16\x07"}


def bundled_version(artifact):
    jars = Path(pyspark.__file__).parent / "jars"
    (version,) = [m.group(1) for m in (re.match(rf"{artifact}-(\d[^-]*)\.jar$", p.name) for p in jars.iterdir()) if m]
    return version


def test_hadoop_aws_has_the_hadoop_version_of_pyspark():
    """Hadoop's S3A documentation: hadoop-aws must match hadoop-common exactly."""
    names = JARS_MANIFEST.read_text().split()  # as Spark's Ivy names them: <group>_<artifact>-<version>.jar
    aws = [name for name in names if "_hadoop-aws-" in name]
    assert aws == [f"org.apache.hadoop_hadoop-aws-{bundled_version('hadoop-client-api')}.jar"]
    assert f"org.apache.spark_spark-hadoop-cloud_2.12-{pyspark.__version__}.jar" in names
    assert all(Path(jar).is_file() for jar in s3_jars())
    # spark-hadoop-cloud alone: none of its dependencies (other clouds' connectors, Hadoop's client again).
    assert not [name for name in names if re.search(r"azure|aliyun|gcs-connector|openstack|hadoop-client", name)]


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """A boto3 client on the test server, with the sample (and its junk) uploaded to in-bucket."""
    client = s3_with_sample(s3_endpoint, "in-bucket", "lake-bucket", JUNK)
    for path in (SAMPLE / "log_data").rglob("*.json"):
        client.upload_file(str(path), "in-bucket", "logs-only/" + path.relative_to(SAMPLE).as_posix())
    return client


def spark_submit(*args, env):
    """spark-submit as the README gives it: the venv's Python on both sides, quiet console logging."""
    command = [os.path.join(os.path.dirname(sys.executable), "spark-submit"),
               "--driver-java-options", f"-Dlog4j.configurationFile={etl.HERE}/conf/log4j2.properties", *args]
    # Out of the repository: nothing Spark leaves in its working directory lands there.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir(),
                            env={**os.environ, **env, "PYSPARK_PYTHON": sys.executable})
    # spark-submit passes the Python process's stderr on through its own stdout.
    result.output = result.stdout + result.stderr
    return result


def download(client, bucket, prefix, target):
    """What an analyst would do to read the lake locally: fetch every object under the prefix."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                path = Path(target) / item["Key"][len(prefix):]
                path.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(path))
    return Path(target)


def test_s3_round_trip_through_environment_variables_equals_local_run(spark, run_etl, s3, s3_endpoint,
                                                                      sample_output, tmp_path):
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    result = run_etl("--input", "s3://in-bucket/", "--output", "s3a://lake-bucket/lake/", env=env)
    assert result.returncode == 0, result.stderr
    assert "S3 input listed flat and fetched in the plan; S3 output written to local disk, then PUT by boto3 " \
           in result.stderr
    assert "credentials from the environment" in result.stderr

    lake = download(s3, "lake-bucket", "lake/", tmp_path / "lake")
    tables, expected = read_tables(spark, lake), read_tables(spark, sample_output)
    for name in etl.TABLES:
        assertDataFrameEqual(tables[name], expected[name])
    report = json.loads((lake / REPORT_NAME).read_text())
    assert report["status"] == "succeeded" and report["input"]["song_files"] == 71
    assert report["rejected"]["path"] == "s3a://lake-bucket/lake/_rejected"
    leftovers = s3.list_objects_v2(Bucket="lake-bucket", Prefix="lake/" + PREFLIGHT_PROBE)
    assert leftovers["KeyCount"] == 0
    # Uploaded from the spool: data files only, no _SUCCESS markers, no upload left open (README, "S3").
    assert not list(lake.rglob("_SUCCESS"))
    assert not s3.list_multipart_uploads(Bucket="lake-bucket").get("Uploads")


def test_credentials_from_config_leave_no_trace_of_the_secret(spark, run_etl, s3, s3_endpoint, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text(f"[AWS]\nAWS_ACCESS_KEY_ID = AKIACONFIGSPARKIFY\nAWS_SECRET_ACCESS_KEY = {SECRET}\n"
                      f"REGION = us-east-1\nS3_ENDPOINT = {s3_endpoint}\n[PATHS]\n")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": ""}
    result = run_etl("--input", "s3a://in-bucket", "--output", "s3://lake-bucket/from-config", env=env,
                     config=config)
    assert result.returncode == 0, result.stderr
    assert "credentials from the dl.cfg" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    lake = download(s3, "lake-bucket", "from-config/", tmp_path / "lake")
    for path in lake.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("args, message", [
    (["--input", "s3://in-bucket/no-such-prefix/", "--output", "s3a://lake-bucket/x/"],
     "no song_data/ under input root s3://in-bucket/no-such-prefix"),
    (["--input", "s3://in-bucket/logs-only/", "--output", "s3a://lake-bucket/x/"],
     "no song_data/ under input root s3://in-bucket/logs-only"),
    (["--input", "s3://no-such-input/", "--output", "s3a://lake-bucket/x/"],
     "bucket not found: no-such-input"),
    (["--input", "s3://in-bucket/", "--output", "s3a://no-such-lake/lake/"],
     "bucket not found: no-such-lake"),
], ids=["missing-input-prefix", "input-without-song-data", "missing-input-bucket", "missing-output-bucket"])
def test_preflight_failures_are_one_clear_line(run_etl, s3, s3_endpoint, args, message):
    result = run_etl(*args, env={**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


def test_unreachable_endpoint_is_one_clear_line(run_etl, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_etl("--input", "s3://in-bucket/", "--output", tmp_path / "out",
                     env={**CREDENTIALS, "AWS_ENDPOINT_URL": dead})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach S3 at {dead} for input s3://in-bucket/song_data/"]


def test_spark_submit_with_jars_runs_the_same_file(spark, s3, s3_endpoint, empty_config, sample_output, tmp_path):
    """spark-submit starts the JVM first, so the jars come from --jars, as the README says."""
    result = spark_submit("--jars", ",".join(s3_jars()), *py_files(), etl.__file__, "--config", empty_config,
                          "--input", "s3://in-bucket", "--output", "s3://lake-bucket/submitted",
                          env={**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint})
    assert result.returncode == 0, result.output[-3000:]
    assert "S3 through S3A and its magic committer, jars from spark-submit's --jars" in result.output
    # The quiet log4j2 file keeps Spark's INFO start-up lines off the console; the job's own remain.
    assert " INFO SparkContext:" not in result.output and "INFO read song_data" in result.output
    lake = download(s3, "lake-bucket", "submitted/", tmp_path / "lake")
    tables, expected = read_tables(spark, lake), read_tables(spark, sample_output)
    for name in etl.TABLES:
        assertDataFrameEqual(tables[name], expected[name])


def test_spark_submit_without_the_s3a_jars_is_one_clear_line(s3, s3_endpoint, empty_config, tmp_path):
    result = spark_submit(*py_files(), etl.__file__, "--config", empty_config, "--input", "s3://in-bucket",
                          "--output", "s3://lake-bucket/no-jars", env={**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint})
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: the S3A connector is not on spark-submit's classpath (org.apache.hadoop.fs.s3a.S3AFileSystem): "
        "pass the jars with --jars or --packages (docs/s3.md, \"spark-submit and the S3 jars\")"], result.output[-3000:]
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- the workers' interpreter

@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory):
    """A python3 of the machine's own that lacks boto3, which the workers need to fetch S3 input: a bare venv
    (no pip, no site packages) of the interpreter the suite's venv was made from, as a system's python3 is."""
    folder = tmp_path_factory.mktemp("foreign") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(folder)],
                   check=True)
    python = folder / "bin" / "python3"
    assert subprocess.run([str(python), "-c", "import boto3"], capture_output=True).returncode != 0
    return str(python)


def run_with_foreign_python3_first(foreign_python, s3_endpoint, config, out, bin_folder, **env):
    """python etl.py on the sample in S3, with a `python3` that lacks boto3 first on the PATH, and
    PYSPARK_PYTHON as env says (unset unless given)."""
    bin_folder.mkdir()
    (bin_folder / "python3").symlink_to(foreign_python)
    environ = {key: value for key, value in os.environ.items() if key != "PYSPARK_PYTHON"}
    environ.update(CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint, PATH=f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
                   **env)
    return subprocess.run([sys.executable, etl.__file__, "--config", config, "--input", "s3://in-bucket/",
                           "--output", str(out)], capture_output=True, text=True, env=environ, timeout=600)


def test_workers_run_the_jobs_python_whatever_python3_is_first_on_the_path(foreign_python, s3, s3_endpoint,
                                                                          empty_config, tmp_path):
    result = run_with_foreign_python3_first(foreign_python, s3_endpoint, empty_config, tmp_path / "out",
                                            tmp_path / "bin")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_workers_failure_ends_with_one_line_naming_its_cause(foreign_python, s3, s3_endpoint, empty_config,
                                                               tmp_path):
    # The user's own PYSPARK_PYTHON is respected: here one without boto3, so every fetch task fails.
    result = run_with_foreign_python3_first(foreign_python, s3_endpoint, empty_config, tmp_path / "out",
                                            tmp_path / "bin", PYSPARK_PYTHON=foreign_python)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last == (
        "error: the run stopped in 'read song_data': ModuleNotFoundError: No module named 'boto3' "
        "(in a Spark task's Python worker); nothing was published"), result.stderr[-3000:]
