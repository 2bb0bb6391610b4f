"""The write-once S3 publish (lake.publish.DirectPublish) without Spark, against a real S3 API server (moto's)
behind tools/s3_proxy.py, which counts requests by operation: a daily run's many partition units listed
with one LIST per 1,000 keys of each table's folder, a publish rolled back key for key, and one rolled
forward with one PUT per object and one DeleteObjects per 1,000 old keys."""
import math
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.config import Config

from conftest import LatencyProxy
from lake.aws import AwsSettings
from lake.publish import PUBLISH_JOURNAL, DirectPublish, recover
from lake.stores import STAGING_DIR, S3Store, Unit

BUCKET = "direct-publish"
RUN_ID = "20261129T120000Z-0a1b2c3d"
ARTISTS = 1_200  # songs partitions: more than 1,000 keys, so the folder's listing takes two pages
WRITES = ("PUT", "COPY", "DELETE", "BULK_DELETE")


def s3_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test", config=Config(max_pool_connections=32))


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    proxy = LatencyProxy(s3_endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture
def lake(proxy, s3_endpoint, request):
    """Yesterday's lake under a prefix of its own (put straight into the server, not counted): songs in
    ARTISTS partition folders, the state's plays in one. Returns (root, store, client)."""
    client, prefix = s3_client(s3_endpoint), request.node.name
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=b"old"), old_keys()))
    store = S3Store(AwsSettings("test", "test", region="us-east-1", endpoint=proxy.url))
    return f"s3://{BUCKET}/{prefix}", store, client


def old_keys():
    return [f"songs/year=2005/artist_id=AR{n:04d}/part-00000.parquet" for n in range(ARTISTS)] + \
        ["_state/plays/year=2018/month=11/part-00000.parquet"]


def keys(client, root):
    prefix = root.split("/", 3)[3]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", []))


def daily_units(root):
    """A daily run's units: most songs partitions rewritten, a few dropped, and a state partition."""
    return [Unit(root, f"songs/year=2005/artist_id=AR{n:04d}", drop=n % 100 == 0) for n in range(ARTISTS)] + \
        [Unit(root, "_state/plays/year=2018/month=11")]


def spool(tmp_path, units):
    """Spark's output as the spool holds it: the songs table's folder and the state's, one file per
    partition that is not dropped."""
    folders = {"songs": tmp_path / "0-songs", "_state/plays": tmp_path / "1-plays"}
    for unit in units:
        if not unit.drop:
            table, below = unit.name.rsplit("/", 2)[0], "/".join(unit.name.rsplit("/", 2)[1:])
            path = folders[table] / below / "part-00000-new.snappy.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"new")
    return folders


def test_the_old_keys_of_many_partition_units_come_from_one_listing_per_table_folder(lake, proxy):
    root, store, _ = lake
    units = daily_units(root)
    before = proxy.counts()["requests"].get("LIST", 0)
    found = store.published_keys(units)
    lists = proxy.counts()["requests"].get("LIST", 0) - before
    assert lists == math.ceil(ARTISTS / 1000) + 1, lists  # songs' folder in two pages, the state's in one
    assert found[7] == ["part-00000.parquet"] and found[-1] == ["part-00000.parquet"]


def uploading(lake, tmp_path, tables=("songs", "_state/plays")):
    """A daily run's publish with its spooled tables handed over: (the publish, its units)."""
    root, store, _ = lake
    units = daily_units(root)
    folders = spool(tmp_path, units)
    publish = DirectPublish(store, units, RUN_ID, root)
    for table in tables:
        publish.upload(Unit(root, table), str(folders[table]))
    return publish, units


def test_a_publish_that_fails_after_its_puts_is_undone_key_for_key(lake, tmp_path):
    root, store, client = lake
    publish, _ = uploading(lake, tmp_path)
    publish.wait()  # the PUTs are done
    assert len(keys(client, root)) > len(old_keys())
    publish.abort()  # the run failed before its commit mark
    assert keys(client, root) == sorted(old_keys())


def test_a_publish_killed_before_its_commit_mark_is_undone_by_the_next_runs_recovery(lake, tmp_path):
    root, store, client = lake
    publish, _ = uploading(lake, tmp_path, ["songs"])
    publish.wait()  # killed here: the journal and the songs PUTs are in S3
    assert any(key.endswith(f"{STAGING_DIR}/{RUN_ID}/{PUBLISH_JOURNAL}") for key in keys(client, root))
    recover(store, [root], root)
    assert keys(client, root) == sorted(old_keys())


def test_a_committed_publish_puts_each_object_once_and_deletes_the_old_in_batches(lake, proxy, tmp_path):
    root, store, client = lake
    before = proxy.counts()["requests"]
    publish, units = uploading(lake, tmp_path)
    publish.finish()
    after = proxy.counts()["requests"]
    done = {operation: after.get(operation, 0) - before.get(operation, 0) for operation in after}
    new = sorted(f"{unit.name}/{RUN_ID}-part-00000-new.snappy.parquet" for unit in units if not unit.drop)
    left = keys(client, root)
    assert [key for key in left if not key.startswith(STAGING_DIR)] == new
    objects = len(new)
    assert publish.put == objects and done["PUT"] == objects + 2, done  # and the journal, its commit mark
    assert done.get("COPY", 0) == 0 and done["BULK_DELETE"] == math.ceil(ARTISTS / 1000) + 1, done
    assert sum(done.get(operation, 0) for operation in WRITES) <= 1.2 * objects, done

    recover(store, [root], root)  # a run after it: the publish is complete, only its staging goes
    assert keys(client, root) == new


def spooled_files(folder):
    return [path for path in folder.rglob("*") if path.is_file()]


def put_by_the_run(client, root):
    """The keys the run has put in place (not its staging)."""
    return [key for key in keys(client, root) if RUN_ID in key and not key.startswith(STAGING_DIR)]


def test_a_folder_readers_see_is_held_until_release(lake, tmp_path):
    root, _, client = lake
    publish, _ = uploading(lake, tmp_path)
    publish.wait()  # the state's PUTs are done; songs, which readers see, waits for Spark's last write
    assert put_by_the_run(client, root) == [f"_state/plays/year=2018/month=11/{RUN_ID}-part-00000-new.snappy.parquet"]
    publish.release()
    publish.wait()
    # and every songs partition that is not dropped
    assert len(put_by_the_run(client, root)) == 1 + ARTISTS - ARTISTS // 100
    publish.abort()


def test_a_spooled_file_leaves_the_spool_once_it_is_up(lake, tmp_path):
    publish, _ = uploading(lake, tmp_path)
    publish.wait()
    assert spooled_files(tmp_path / "1-plays") == []  # up
    assert len(spooled_files(tmp_path / "0-songs")) == ARTISTS - ARTISTS // 100  # held: still all there
    publish.abort()
