"""tools/emr.py, the EMR launcher, against moto's real S3 and EMR APIs on loopback (no AWS account)."""
import configparser
import io
import json
import os
import subprocess
import sys
import zipfile

import boto3
import pytest

import etl
from conftest import ROOT
from lake.report import REPORT_NAME

LAUNCHER = str(ROOT / "tools" / "emr.py")
SECRET = "sEcReT-emr-launcher-never-upload"
ACCESS_KEY = "AKIANEVERUPLOADED"
CODE = "s3://emr-code/sparkify"
ARGS = ["--code", f"{CODE}/", "--input", "s3://udacity-dend/", "--output", "s3://emr-lake/lake/"]


@pytest.fixture(scope="module")
def aws_env(s3_endpoint):
    """What a user's shell has: credentials, a region, and (here) the endpoint of the test server."""
    return {"AWS_ACCESS_KEY_ID": "launcher", "AWS_SECRET_ACCESS_KEY": "launcher", "AWS_DEFAULT_REGION": "us-west-2",
            "AWS_ENDPOINT_URL": s3_endpoint}


@pytest.fixture(scope="module")
def clients(aws_env):
    session = boto3.session.Session(aws_access_key_id="launcher", aws_secret_access_key="launcher",
                                    region_name="us-west-2")
    s3 = session.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"])
    for bucket in ("emr-code", "emr-lake"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    return {"s3": s3, "emr": session.client("emr", endpoint_url=aws_env["AWS_ENDPOINT_URL"])}


@pytest.fixture
def config(tmp_path):
    """A user's dl.cfg with real-looking keys in it, and the launcher's own [EMR] section."""
    path = tmp_path / "dl.cfg"
    path.write_text(f"[AWS]\nAWS_ACCESS_KEY_ID = {ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY = {SECRET}\n"
                    f"AWS_SESSION_TOKEN = {SECRET}-token\nREGION = us-west-2\n"
                    "[CATALOG]\nDATABASE = sparkify\n"
                    "[EMR]\nRELEASE_LABEL = emr-7.2.0\nINSTANCE_TYPE = m6g.xlarge\nINSTANCE_COUNT = 4\n")
    return path


def launch(*args, env, wait_for_output=False):
    command = [sys.executable, LAUNCHER, *map(str, args)]
    if wait_for_output:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env})
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def expected_step(on_failure):
    return {"Name": "sparkify-etl", "ActionOnFailure": on_failure, "HadoopJarStep": {
        "Jar": "command-runner.jar", "Properties": {}, "Args": [
            "spark-submit", "--deploy-mode", "cluster", "--files", f"{CODE}/dl.cfg", "--py-files", f"{CODE}/lake.zip",
            f"{CODE}/etl.py", "--config", "dl.cfg", "--input", "s3://udacity-dend/", "--output", "s3://emr-lake/lake/"]}}


def step_of(emr, cluster_id, step_id):
    found = emr.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
    return {key: found[key] for key in ("Name", "ActionOnFailure")} | {"HadoopJarStep": found["Config"]}


def test_uploads_the_job_its_package_and_a_config_without_secrets_and_starts_a_transient_cluster(clients, aws_env,
                                                                                                  config):
    result = launch(*ARGS, "--config", config, "--instance-count", "5", "--no-wait", env=aws_env)
    assert result.returncode == 0, result.stderr
    cluster_id, step_id = result.stdout.split()[1].rstrip(":"), result.stdout.split()[3]

    s3 = clients["s3"]
    uploaded_job = s3.get_object(Bucket="emr-code", Key="sparkify/etl.py")["Body"].read()
    assert uploaded_job == (ROOT / "etl.py").read_bytes()
    # The package as `make dist` zips it, built anew: every module of lake/, each as it is now.
    uploaded_zip = s3.get_object(Bucket="emr-code", Key="sparkify/lake.zip")["Body"].read()
    uploaded_package = zipfile.ZipFile(io.BytesIO(uploaded_zip))
    modules = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "lake").rglob("*.py")
                     if "__pycache__" not in path.parts)
    assert sorted(uploaded_package.namelist()) == modules and "lake/__init__.py" in modules
    assert all(uploaded_package.read(name) == (ROOT / name).read_bytes() for name in modules)
    uploaded_config = s3.get_object(Bucket="emr-code", Key="sparkify/dl.cfg")["Body"].read().decode()
    assert SECRET not in uploaded_config and ACCESS_KEY not in uploaded_config
    parsed = configparser.ConfigParser()
    parsed.read_string(uploaded_config)
    assert {key: parsed["AWS"][key] for key in parsed["AWS"]} == {
        "aws_access_key_id": "", "aws_secret_access_key": "", "aws_session_token": "", "region": "us-west-2"}
    assert parsed["CATALOG"]["DATABASE"] == "sparkify"  # every other setting travels
    expected = etl.read_config(str(config))
    expected["AWS"].update({key: "" for key in etl.SECRET_CONFIG_KEYS["AWS"]})
    assert etl.read_config(_saved(uploaded_config, config)) == expected

    emr = clients["emr"]
    cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
    # A flag wins over dl.cfg [EMR], which wins over the defaults.
    assert (cluster["ReleaseLabel"], cluster["LogUri"], cluster["ServiceRole"]) == (
        "emr-7.2.0", f"{CODE}/logs/", "EMR_DefaultRole")
    assert cluster["Ec2InstanceAttributes"]["IamInstanceProfile"] == "EMR_EC2_DefaultRole"
    assert cluster["AutoTerminate"] is True and [a["Name"] for a in cluster["Applications"]] == ["Spark"]
    groups = emr.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]
    assert sorted((g["InstanceGroupType"], g["InstanceType"], g["RequestedInstanceCount"]) for g in groups) == [
        ("CORE", "m6g.xlarge", 4), ("MASTER", "m6g.xlarge", 1)]
    assert step_of(emr, cluster_id, step_id) == expected_step("TERMINATE_CLUSTER")


def _saved(text, beside):
    path = beside.parent / "uploaded.cfg"
    path.write_text(text)
    return str(path)


def test_a_step_that_does_not_complete_is_a_non_zero_exit_with_the_run_report(clients, aws_env, config):
    """moto runs no step: the step stays RUNNING until the cluster goes away, which is what the test does,
    as an operator (or a lost instance) would. A failed run's report is already in the output prefix."""
    emr = clients["emr"]
    cluster_id = emr.run_job_flow(Name="shared", ReleaseLabel="emr-7.5.0", JobFlowRole="EMR_EC2_DefaultRole",
                                  ServiceRole="EMR_DefaultRole", Instances={
                                      "MasterInstanceType": "m5.xlarge", "InstanceCount": 1,
                                      "KeepJobFlowAliveWhenNoSteps": True})["JobFlowId"]
    clients["s3"].put_object(Bucket="emr-lake", Key=f"lake/{REPORT_NAME}",
                             Body=json.dumps({"status": "failed", "error": "killed"}).encode())
    process = launch(*ARGS, "--config", config, "--cluster-id", cluster_id, "--poll-seconds", "0.2",
                     env=aws_env, wait_for_output=True)
    try:
        added = process.stdout.readline()
        step_id = added.split()[3]
        assert added.startswith(f"cluster {cluster_id}: step s-"), added
        assert step_of(emr, cluster_id, step_id) == expected_step("CONTINUE")
        emr.terminate_job_flows(JobFlowIds=[cluster_id])
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert f"step {step_id}: RUNNING" in out and f"cluster {cluster_id}: TERMINATED" in out
    assert json.loads(out[out.index("{"):]) == {"status": "failed", "error": "killed"}
    assert err.strip().splitlines() == [f"error: cluster {cluster_id} TERMINATED while step {step_id} was RUNNING"]
    assert [c["Id"] for c in emr.list_clusters()["Clusters"] if c["Name"] == "shared"] == [cluster_id]


def test_dry_run_calls_nothing_and_prints_requests_that_can_be_sent_as_they_are(clients, aws_env, config):
    objects_before = clients["s3"].list_objects_v2(Bucket="emr-code").get("KeyCount", 0)
    clusters_before = len(clients["emr"].list_clusters()["Clusters"])
    result = launch(*ARGS, "--config", config, "--dry-run", env=aws_env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout and ACCESS_KEY not in result.stdout
    assert clients["s3"].list_objects_v2(Bucket="emr-code").get("KeyCount", 0) == objects_before
    assert len(clients["emr"].list_clusters()["Clusters"]) == clusters_before

    printed = json.loads(result.stdout)
    operations = [(r["service"], r["operation"]) for r in printed["requests"]]
    assert operations == [("s3", "upload_file"), ("s3", "upload_file"), ("s3", "put_object"), ("emr", "run_job_flow")]
    package = printed["requests"][1]["params"]
    assert (package["Filename"], package["Key"]) == (str(ROOT / "dist" / "lake.zip"), "sparkify/lake.zip")
    step_args = printed["requests"][-1]["params"]["Steps"][0]["HadoopJarStep"]["Args"]
    assert step_args == expected_step("TERMINATE_CLUSTER")["HadoopJarStep"]["Args"]  # --py-files .../lake.zip
    for request in printed["requests"]:  # exactly as printed
        response = getattr(clients[request["service"]], request["operation"])(**request["params"])
    cluster = clients["emr"].describe_cluster(ClusterId=response["JobFlowId"])["Cluster"]
    assert cluster["ReleaseLabel"] == "emr-7.2.0"


@pytest.mark.parametrize("extra, message", [
    (["--cluster-id", "j-NOSUCHCLUSTER"], "error: cannot use cluster j-NOSUCHCLUSTER: InvalidRequestException"),
    (["--instance-count", "three"], "error: instance count must be a whole number of at least 1: three"),
], ids=["unknown-cluster", "bad-count"])
def test_launch_problems_are_one_line_before_anything_is_uploaded(clients, aws_env, config, extra, message):
    clients["s3"].delete_objects(Bucket="emr-code", Delete={"Objects": [{"Key": "sparkify/etl.py"},
                                                                          {"Key": "sparkify/lake.zip"}]})
    result = launch(*ARGS, "--config", config, *extra, env=aws_env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [message], result.stderr
    assert clients["s3"].list_objects_v2(Bucket="emr-code", Prefix="sparkify/etl.py")["KeyCount"] == 0
    assert clients["s3"].list_objects_v2(Bucket="emr-code", Prefix="sparkify/lake.zip")["KeyCount"] == 0


@pytest.mark.parametrize("report, step_failure, code, error", [
    ({"status": "succeeded", "catalog": {"status": "registered"}}, None, 0, None),
    ({"status": "failed", "error": "quality gate"}, None, 1, "error: the run failed: quality gate"),
    ({"status": "succeeded", "catalog": {"status": "failed", "error": "AccessDenied"}}, None, 1,
     "error: the tables are published, but registering them in the Glue Data Catalog failed: AccessDenied"),
    (None, None, 1, "error: the step completed but left no run report under s3://emr-lake/finish/"),
    ({"status": "succeeded"}, "step s-1 FAILED: Step failed", 1, "error: step s-1 FAILED: Step failed"),
], ids=["succeeded", "run-failed", "catalog-failed", "no-report", "step-failed"])
def test_the_end_of_a_launch_prints_the_run_report_and_says_if_the_run_failed(clients, capsys, report, step_failure,
                                                                               code, error):
    """moto never completes a step, so the end of a completed one is tested on its own, on a real report."""
    sys.path.insert(0, str(ROOT / "tools"))
    import emr

    s3 = clients["s3"]
    s3.delete_objects(Bucket="emr-lake", Delete={"Objects": [{"Key": f"finish/{REPORT_NAME}"}]})
    if report is not None:
        s3.put_object(Bucket="emr-lake", Key=f"finish/{REPORT_NAME}", Body=json.dumps(report).encode())
    assert emr.finish(s3, "s3://emr-lake/finish/", step_failure) == code
    out, err = capsys.readouterr()
    assert (json.loads(out) if out else None) == report
    assert err.strip().splitlines() == ([error] if error else [])
