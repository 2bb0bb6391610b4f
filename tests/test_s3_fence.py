"""A run that lost the lake cannot publish, however late its writes come: the fenced publish on S3 (lake.publish),
played out step by step against a real S3 API server (moto's), without Spark.

A stale writer is a real run of DirectPublish in its own process, paused (SPARKIFY_PAUSE_AT) after the last
check of its lease, right before its commit mark; meanwhile its lease lapses and the next holder takes the lake
over and recovers it."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, bucket_client
from lake.aws import AwsSettings
from lake.lock import LEASE_NAME, LeaseLost, S3Lease
from lake.publish import PAUSE_ENV, PUBLISH_JOURNAL, RETIRED_KEPT_S, recover
from lake.stores import STAGING_DIR, S3Store, spooled_key

BUCKET = "fenced-publish"
STALE_RUN = "20261201T000000Z-5ta1e000"
PARTITIONS = ("songs/year=2005/artist_id=AR0", "songs/year=2005/artist_id=AR1")
OLD_KEYS = sorted([f"{partition}/part-00000-old.parquet" for partition in PARTITIONS]
                  + ["songs/year=2006/artist_id=AR2/part-00000-old.parquet"])  # a partition the run leaves alone
PAUSE_TIMEOUT_S = 120
# The stale writer: takes the lease, puts its new partitions in place and commits; paused (PAUSE_ENV) after a
# check of its lease: before its journal, or before its commit mark.
STALE_WRITER = """
import sys

import boto3

from lake.aws import AwsSettings
from lake.lock import S3Lease
from lake.publish import DirectPublish, open_staging
from lake.stores import S3Store, Unit

endpoint, root, run_id, spool, *partitions = sys.argv[1:]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="fence",
                      aws_secret_access_key="fence")
store = S3Store(AwsSettings("fence", "fence", region="us-east-1", endpoint=endpoint))
lease = S3Lease(client, root)
lease.take(run_id)
open_staging(store, root, run_id)  # the run's first write, as etl.py's
publish = DirectPublish(store, [Unit(root, partition) for partition in partitions], run_id, root, lease)
publish.upload(Unit(root, "songs"), spool)
try:
    publish.finish()
except Exception as exc:  # as etl.run_job does
    publish.abort()
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
finally:
    lease.release()
print("committed", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def client(s3_endpoint):
    return bucket_client(s3_endpoint, BUCKET)


@pytest.fixture
def root(client, request):
    """Yesterday's lake under a prefix of its own."""
    prefix = request.node.name
    for key in OLD_KEYS:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=b"old")
    return f"s3://{BUCKET}/{prefix}"


def lake_keys(client, root):
    """The lake's data keys (not its lease, nor its staging)."""
    prefix = root.split("/", 3)[3]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(key for key in (item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", []))
                  if not key.startswith((STAGING_DIR, LEASE_NAME)))


def read(client, root, key):
    return json.loads(client.get_object(Bucket=BUCKET, Key=f"{root.split('/', 3)[3]}/{key}")["Body"].read())


def stale_writer(s3_endpoint, root, tmp_path, pause):
    """The stale writer's process, paused at pause (its lease checked just now)."""
    spool = tmp_path / "spool"
    for partition in PARTITIONS:
        path = spool / partition.split("/", 1)[1] / "part-00000-new.parquet"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"new")
    process = subprocess.Popen([sys.executable, "-c", STALE_WRITER, s3_endpoint, root, STALE_RUN, str(spool),
                                *PARTITIONS], cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), PAUSE_ENV: pause})
    try:
        line = process.stderr.readline()  # blocks until the pause, or the end of the process
        assert line.strip() == f"paused at {pause}", line + process.stderr.read()
    except BaseException:
        process.kill()
        raise
    return process


def resume(process):
    """The stale writer goes on: (exit status, stderr)."""
    try:
        _, stderr = process.communicate("\n", timeout=PAUSE_TIMEOUT_S)
    finally:
        process.kill()
    return process.returncode, stderr


def overtaken(client, s3_endpoint, root, tmp_path, meanwhile=None, pause="commit"):
    """The stale writer, paused right before its commit mark (or its journal), is overtaken: its lease lapses
    (its expiry put in the past, as time would) and the next run takes the lake over and recovers it, as
    etl.py does; then meanwhile() (the lake as that run left it), and the stale writer goes on. Returns (its
    exit status, its stderr, the store)."""
    process = stale_writer(s3_endpoint, root, tmp_path, pause)
    prefix = root.split("/", 3)[3]
    lease = read(client, root, LEASE_NAME)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_NAME}",
                      Body=json.dumps({**lease, "expires_at": time.time() - 1}))
    store = S3Store(AwsSettings("fence", "fence", region="us-east-1", endpoint=s3_endpoint))
    successor = S3Lease(client, root)
    successor.take("20261201T000500Z-5ucce550")
    recover(store, [root], root, successor)
    if meanwhile:
        meanwhile()
    status, stderr = resume(process)  # its commit mark comes after the takeover
    successor.release()
    return status, stderr, store


def next_holder_recovers(client, store, root):
    """A run after that: takes the (released) lake, recovers it, releases it."""
    lease = S3Lease(client, root)
    lease.take("20261202T000000Z-00000e27")
    recover(store, [root], root, lease)
    lease.release()


def test_a_writer_that_loses_the_lease_between_its_check_and_its_commit_mark_cannot_commit(
        client, s3_endpoint, root, tmp_path):
    status, stderr, _ = overtaken(client, s3_endpoint, root, tmp_path)
    assert status == 1 and "committed" not in stderr.splitlines(), stderr
    assert "lost the lake: the run that holds it now has retired its publish journal" in stderr, stderr
    journal = read(client, root, f"{STAGING_DIR}/{STALE_RUN}/{PUBLISH_JOURNAL}")
    assert journal["retired"] and not journal["committed"]


def test_a_writer_that_loses_the_lease_between_its_check_and_its_journal_cannot_create_it(
        client, s3_endpoint, root, tmp_path):
    status, stderr, _ = overtaken(client, s3_endpoint, root, tmp_path, pause="journal")
    assert status == 1 and "lost the lake: the run that holds it now has retired its publish journal" in stderr, \
        stderr
    assert read(client, root, f"{STAGING_DIR}/{STALE_RUN}/{PUBLISH_JOURNAL}") == {
        "run_id": STALE_RUN, "units": [], "retired": True, "retired_at": pytest.approx(time.time(), abs=60)}
    assert lake_keys(client, root) == OLD_KEYS


def test_no_put_once_the_lease_has_lapsed_by_the_runs_own_clock(client, s3_endpoint, root, tmp_path):
    lease = S3Lease(client, root, ttl_s=1e-6)  # lapsed, by this machine's clock, before take() returns
    lease.take("20261201T000000Z-1a95ed00")
    (tmp_path / "part-00000.parquet").write_bytes(b"new")
    store = S3Store(AwsSettings("fence", "fence", region="us-east-1", endpoint=s3_endpoint))
    with pytest.raises(LeaseLost, match="could not renew its lease"):
        store.move_files(str(tmp_path), f"{root}/songs/year=2005/artist_id=AR0", "20261201T000000Z-1a95ed00",
                         lease.still_held)
    assert lake_keys(client, root) == OLD_KEYS


def test_the_next_holders_recovery_leaves_the_old_version_with_no_live_key_deleted(client, s3_endpoint, root, tmp_path):
    _, _, store = overtaken(client, s3_endpoint, root, tmp_path)
    next_holder_recovers(client, store, root)
    assert lake_keys(client, root) == OLD_KEYS


def test_a_put_landing_after_the_takeover_is_withdrawn_by_the_next_holder(client, s3_endpoint, root, tmp_path):
    def late_put():
        assert lake_keys(client, root) == OLD_KEYS  # the stale writer's keys withdrawn
        # A PUT of the stale writer's that was in flight at the takeover lands now, after that recovery.
        late = f"{PARTITIONS[0]}/{spooled_key('part-00001-new.parquet', STALE_RUN)}"
        client.put_object(Bucket=BUCKET, Key=f"{root.split('/', 3)[3]}/{late}", Body=b"late")

    _, _, store = overtaken(client, s3_endpoint, root, tmp_path, late_put)
    next_holder_recovers(client, store, root)
    assert lake_keys(client, root) == OLD_KEYS


def test_a_retired_runs_tombstone_goes_once_its_puts_can_no_longer_land(client, s3_endpoint, root, tmp_path):
    _, _, store = overtaken(client, s3_endpoint, root, tmp_path)
    path = f"{root.split('/', 3)[3]}/{STAGING_DIR}/{STALE_RUN}/{PUBLISH_JOURNAL}"
    tombstone = read(client, root, f"{STAGING_DIR}/{STALE_RUN}/{PUBLISH_JOURNAL}")
    # As a run would find it RETIRED_KEPT_S later.
    client.put_object(Bucket=BUCKET, Key=path,
                      Body=json.dumps({**tombstone, "retired_at": tombstone["retired_at"] - RETIRED_KEPT_S - 1}))
    next_holder_recovers(client, store, root)
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=f"{root.split('/', 3)[3]}/{STAGING_DIR}/")["KeyCount"] == 0
    assert lake_keys(client, root) == OLD_KEYS


# --------------------------------------------------------------------------- the preflight's probe

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fence", "AWS_SECRET_ACCESS_KEY": "fence", "AWS_REGION": "us-east-1"}


def all_keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_the_probe_of_conditional_writes_costs_three_requests_and_leaves_nothing(client, latency_proxy):
    proxy = latency_proxy("--delay-ms", 0)
    S3Store(AwsSettings("fence", "fence", region="us-east-1", endpoint=proxy.url)).require_fenced_writes(
        f"s3://{BUCKET}/probed")
    assert proxy.counts()["requests"] == {"PUT": 2, "DELETE": 1}
    assert all_keys(client, "probed") == []


def test_etl_refuses_an_endpoint_that_ignores_conditional_writes_before_writing_anything(
        client, latency_proxy, run_etl):
    proxy = latency_proxy("--delay-ms", 0, "--ignore-conditions")
    for key in ("in/song_data/A/song.json", "in/log_data/2018/11/events.json"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"{}\n")
    result = run_etl("--input", f"s3://{BUCKET}/in", "--output", f"s3://{BUCKET}/ignored",
                     env={**CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: S3 at {proxy.url} ignores conditional writes (If-None-Match/If-Match: a second create of one key "
        f"succeeded), which the lease that keeps two runs from writing s3://{BUCKET}/ignored at once needs"]
    assert all_keys(client, "ignored") == []  # the probe cleaned up; no lease, no table
