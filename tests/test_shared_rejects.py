"""Two lakes, one rejects root (REJECTED_DATA: one quarantine bucket for a team). A lake publishes its
rejects trees whole, so a second lake there would replace the first's: it is refused with one line
before it reads or writes anything, and the first lake's rejects stay as they were (lake.rejects)."""
import json
import os
import shutil
import subprocess
import sys

import boto3
import pytest

from conftest import ETL
from lake.aws import AwsSettings
from lake.errors import EtlError
from lake.rejects import REJECTS_CLAIM, claim_rejects_root
from lake.stores import LocalStore, S3Store
from test_crash import make_input

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIASHAREDREJECTS", "AWS_SECRET_ACCESS_KEY": "shared-secret",
               "AWS_REGION": "us-east-1"}


def small_input(root):
    """One day of the sample, and one song file that is not JSON: a rejected line for the lake to keep."""
    make_input(root, days=["01"])
    (root / "song_data" / "bad-song.json").write_text("not json\n")
    return root


def rejected_files(files):
    """The source file names of the rejected lines among {relative path: content} (part files: locally
    part-*, on S3 <run id>-part-*)."""
    return sorted(json.loads(line)["source_file"].rsplit("/", 1)[-1] for name, content in files.items()
                  if "part-" in name.rsplit("/", 1)[-1] for line in content.splitlines())


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def local_files(folder):
    return {path.relative_to(folder).as_posix(): path.read_text() for path in folder.rglob("*") if path.is_file()}


def test_a_second_lake_on_a_local_rejects_root_is_refused_and_the_first_lakes_rejects_survive(
        run_etl, empty_config, tmp_path):
    shared = tmp_path / "quarantine"
    env = {"REJECTED_DATA": str(shared)}
    first = run_etl("--input", small_input(tmp_path / "in-one"), "--output", tmp_path / "one", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = local_files(shared)
    assert rejected_files(before) == ["bad-song.json"], before

    second_input, second_output, trace = small_input(tmp_path / "in-two"), tmp_path / "two", tmp_path / "trace"
    strace = shutil.which("strace")
    assert strace, "strace is needed: `make setup` installs it (apt-get install strace)"
    second = subprocess.run([strace, "-f", "-qq", "-o", str(trace), "-e", "trace=%file", sys.executable, ETL,
                             "--config", empty_config, "--input", str(second_input), "--output", str(second_output)],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = error_lines(second.stderr)
    assert len(errors) == 1 and str(shared / REJECTS_CLAIM) in errors[0], second.stderr
    touched = [line for line in trace.read_text().splitlines()
               if str(second_input) in line or str(second_output) in line]
    assert touched == []  # nothing read, nothing written: not even a look at its input
    assert local_files(shared) == before


@pytest.fixture
def s3(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="setup", aws_secret_access_key="setup")
    for bucket in ("shared-in", "lakes", "quarantine"):
        client.create_bucket(Bucket=bucket)
    return client


def s3_objects(client):
    return {(bucket, item["Key"]): client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for bucket in ("lakes", "quarantine")
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])}


def test_a_second_lake_on_an_s3_rejects_root_is_refused_and_the_first_lakes_rejects_survive(
        run_etl, s3, s3_endpoint, latency_proxy, tmp_path):
    for lake in ("one", "two"):
        for path in small_input(tmp_path / lake).rglob("*.json"):
            s3.upload_file(str(path), "shared-in", f"{lake}/{path.relative_to(tmp_path / lake).as_posix()}")
    env = {**CREDENTIALS, "REJECTED_DATA": "s3a://quarantine/team", "AWS_ENDPOINT_URL": s3_endpoint}
    first = run_etl("--input", "s3://shared-in/one", "--output", "s3://lakes/one", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = s3_objects(s3)
    rejects = {key: body.decode() for (bucket, key), body in before.items() if bucket == "quarantine"}
    assert rejected_files(rejects) == ["bad-song.json"], rejects

    proxy = latency_proxy()
    second = run_etl("--input", "s3://shared-in/two", "--output", "s3://lakes/two",
                     env={**env, "AWS_ENDPOINT_URL": proxy.url})
    assert second.returncode == 2, second.stderr[-3000:]
    errors = error_lines(second.stderr)
    assert len(errors) == 1 and f"s3a://quarantine/team/{REJECTS_CLAIM}" in errors[0], second.stderr
    # One read of the claim; no write, and not a request to the input or the lakes.
    assert proxy.counts()["by_bucket"] == {"quarantine": {"GET": 1}}, proxy.counts()
    assert s3_objects(s3) == before


def test_a_lake_keeps_its_claim_and_a_moved_root_spelled_otherwise_is_the_same_lake(s3, s3_endpoint, tmp_path):
    """The claim is made once and holds for every later run of that lake: on S3, through s3:// or s3a://."""
    local = LocalStore()
    for _ in range(2):
        claim_rejects_root(local, str(tmp_path / "one"), str(tmp_path / "quarantine"))
    with pytest.raises(EtlError, match="belongs to the lake at"):
        claim_rejects_root(local, str(tmp_path / "two"), str(tmp_path / "quarantine"))
    store = S3Store(AwsSettings(CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                None, "us-east-1", s3_endpoint))
    claim_rejects_root(store, "s3a://lakes/one", "s3://quarantine/team")
    claim_rejects_root(store, "s3://lakes/one", "s3a://quarantine/team")
    with pytest.raises(EtlError, match="belongs to the lake at s3://lakes/one"):
        claim_rejects_root(store, "s3://lakes/two", "s3://quarantine/team")
