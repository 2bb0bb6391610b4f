"""The S3 lease under races, each played out step by step against a real S3 API server (moto's): two runs
taking over one stale lease, a renewal and a release after a takeover, and a run that lost its lease
reaching its publish. Every change to the lease is a compare-and-swap on its ETag."""
import json
import socket
import time

import pytest

from conftest import bucket_client
from lake.aws import AwsSettings
from lake.errors import EtlError
from lake.lock import LEASE_NAME, LeaseLost, S3Lease, is_stale
from lake.publish import PUBLISH_JOURNAL, publish
from lake.stores import STAGING_DIR, S3Store, Unit

BUCKET = "lease-races"
DEAD = {"run_id": "20261124T000000Z-deadbeef", "host": "elsewhere", "pid": 1}


@pytest.fixture(scope="module")
def client(s3_endpoint):
    return bucket_client(s3_endpoint, BUCKET)


@pytest.fixture
def root(client, request):
    """A lake prefix of its own, holding a lease that expired a second ago."""
    prefix = request.node.name.replace("[", "-").replace("]", "")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_NAME}",
                      Body=json.dumps({**DEAD, "expires_at": time.time() - 1}))
    return f"s3://{BUCKET}/{prefix}"


def holder(client, root):
    body = client.get_object(Bucket=BUCKET, Key=f"{root.split('/', 3)[3]}/{LEASE_NAME}")["Body"].read()
    return json.loads(body)["run_id"]


def test_of_two_runs_taking_over_one_stale_lease_only_one_wins(client, root):
    first, second = S3Lease(client, root), S3Lease(client, root)
    seen_by_second = second.inspect()  # both read the same stale lease...
    first.take("run-first")  # ...the first replaces it...
    with pytest.raises(EtlError) as refusal:  # ...and the second's compare-and-swap fails
        second.claim("run-second", seen_by_second)
    assert str(refusal.value) == (f"another run took the lease of {root} just now (run run-first on "
                                  f"{socket.gethostname()}); wait for it to finish")
    assert holder(client, root) == "run-first"
    first.check()  # the winner still holds it
    first.release()


def test_a_lease_created_by_two_runs_at_once_goes_to_one(client, root):
    client.delete_object(Bucket=BUCKET, Key=f"{root.split('/', 3)[3]}/{LEASE_NAME}")
    first, second = S3Lease(client, root), S3Lease(client, root)
    seen_by_second = second.inspect()
    assert seen_by_second == (None, None)
    first.take("run-first")
    with pytest.raises(EtlError, match="took the lease .* just now"):
        second.claim("run-second", seen_by_second)
    assert holder(client, root) == "run-first"
    first.release()


def test_a_renewal_after_a_takeover_fails_and_the_run_stops_before_publishing(client, root, s3_endpoint):
    # The first run's lease lapses at once (a run stalled past its TTL, say): the second may take it over.
    stalled, successor = S3Lease(client, root, ttl_s=0.01), S3Lease(client, root)
    stalled.take("run-stalled")
    time.sleep(0.05)
    successor.take("run-successor")

    stalled.renew()
    assert stalled.lost and "run run-successor" in stalled.lost
    assert holder(client, root) == "run-successor"  # the failed renewal did not overwrite it

    # The stalled run reaches its publish: nothing is written, not even the journal.
    store = S3Store(AwsSettings("lease", "lease", region="us-east-1", endpoint=s3_endpoint))
    prefix = root.split("/", 3)[3]
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{STAGING_DIR}/run-stalled/songs/part-0.parquet", Body=b"new")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/songs/part-old.parquet", Body=b"old")
    with pytest.raises(LeaseLost):
        publish(store, [Unit(root, "songs")], "run-stalled", root, stalled)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")["Contents"]]
    assert f"{prefix}/songs/part-old.parquet" in keys and f"{prefix}/songs/part-0.parquet" not in keys
    assert not [key for key in keys if key.endswith(PUBLISH_JOURNAL)]
    successor.release()


def test_a_release_after_a_takeover_leaves_the_new_holders_lease(client, root):
    stalled, successor = S3Lease(client, root, ttl_s=0.01), S3Lease(client, root)
    stalled.take("run-stalled")
    time.sleep(0.05)
    successor.take("run-successor")
    stalled.release()  # its DELETE's If-Match names its own lease, which is gone
    assert holder(client, root) == "run-successor"
    successor.release()
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=f"{root.split('/', 3)[3]}/{LEASE_NAME}")["KeyCount"] == 0


def test_a_live_lease_is_refused_and_a_renewal_keeps_it(client, root):
    holder_run, other = S3Lease(client, root), S3Lease(client, root)
    holder_run.take("run-holder")
    holder_run.renew()
    holder_run.check()
    with pytest.raises(EtlError, match=f"another run is writing to {root} \\(run run-holder on "):
        other.take("run-other")
    holder_run.release()


def test_staleness_by_a_dead_pid_needs_the_same_host_boot_and_pid_namespace(client, root):
    mine = S3Lease(client, root)
    mine.take("run-mine")
    lease, _ = mine.inspect()
    assert not is_stale(lease)  # this process lives
    dead_pid = {**lease, "pid": 2 ** 22 + 1}  # above any pid this kernel hands out
    assert is_stale(dead_pid)
    # A container on this host may share its name and boot, never its pid namespace: its pids mean nothing here.
    assert not is_stale({**dead_pid, "pid_namespace": "pid:[1]"})
    assert not is_stale({**dead_pid, "boot_id": "another-boot"})
    assert not is_stale({**dead_pid, "host": "elsewhere"})
    mine.release()
