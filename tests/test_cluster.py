"""The job distributed: spark-submit to a real Spark standalone cluster, S3 to S3 against the moto server."""
import json
import threading
import urllib.request
from pathlib import Path

import boto3
from pyspark.testing import assertDataFrameEqual

import etl
from conftest import SAMPLE, py_files, read_tables, s3_jars
from lake.plan import APP_NAME
from lake.report import REPORT_NAME
from test_s3 import download, spark_submit

SECRET = "sEcReT-cluster-9d2e41-never-log-me"
DATABASE = "sparkify_cluster"
EXECUTOR_CLASS = b"CoarseGrainedExecutorBackend"


class ExecutorEnvironments(threading.Thread):
    """Reads the environment of every executor process the worker starts, while the job runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen, self.done = {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.3):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if EXECUTOR_CLASS in (proc / "cmdline").read_bytes():
                        names = [entry.split(b"=", 1)[0].decode() for entry in
                                 (proc / "environ").read_bytes().split(b"\0") if entry]
                        self.seen[proc.name] = names
                except OSError:  # gone, or not ours to read
                    continue


def test_spark_submit_on_a_standalone_cluster_equals_a_local_run_and_keeps_secrets_off_the_executors(
        spark, spark_cluster, s3_endpoint, empty_config, sample_output, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "AKIACLUSTERTEST", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint, "SPARK_LOCAL_IP": "127.0.0.1"}
    session = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
    s3, glue = session.client("s3", endpoint_url=s3_endpoint), session.client("glue", endpoint_url=s3_endpoint)
    for bucket in ("cluster-in", "cluster-lake"):
        s3.create_bucket(Bucket=bucket)
    for path in SAMPLE.rglob("*.json"):
        s3.upload_file(str(path), "cluster-in", path.relative_to(SAMPLE).as_posix())
    config = tmp_path / "dl.cfg"
    config.write_text(f"[CATALOG]\nDATABASE = {DATABASE}\n")

    executors = ExecutorEnvironments()
    executors.start()
    try:
        # The keys are in the driver's environment only; etl.py hands them to Hadoop inside the driver's JVM,
        # and Spark ships that configuration to the executors with each job.
        result = spark_submit("--master", spark_cluster["url"], "--conf", "spark.driver.host=127.0.0.1",
                              "--conf", "spark.executor.memory=1g", "--conf", "spark.ui.enabled=false",
                              "--jars", ",".join(s3_jars()), *py_files(), etl.__file__, "--config", config,
                              "--input", "s3://cluster-in/", "--output", "s3://cluster-lake/lake", env=env)
    finally:
        executors.done.set()
        executors.join()
    assert result.returncode == 0, result.output[-3000:]

    with urllib.request.urlopen(f"{spark_cluster['web_ui']}/json/") as response:
        apps = json.load(response)["completedapps"]
    assert [app["name"] for app in apps] == [APP_NAME]  # it ran on the cluster, not in local mode
    assert executors.seen, "no executor process was seen"
    assert all(not name.startswith("AWS_") for names in executors.seen.values() for name in names)

    lake = download(s3, "cluster-lake", "lake/", tmp_path / "lake")
    tables, expected = read_tables(spark, lake), read_tables(spark, sample_output)
    for name in etl.TABLES:
        assertDataFrameEqual(tables[name], expected[name])
    report = json.loads((lake / REPORT_NAME).read_text())
    assert report["status"] == "succeeded" and report["catalog"]["status"] == "registered"
    assert sorted(t["Name"] for t in glue.get_tables(DatabaseName=DATABASE)["TableList"]) == sorted(etl.TABLES)

    logs = [result.output.encode()] + [path.read_bytes() for path in spark_cluster["logs"]]
    logs += [path.read_bytes() for path in Path(spark_cluster["work_dir"]).rglob("std*")]  # executor logs
    logs += [path.read_bytes() for path in lake.rglob("*") if path.is_file()]
    assert len(logs) > 4 and not [log for log in logs if SECRET.encode() in log]
