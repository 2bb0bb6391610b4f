"""S3 as over a network (issue 9): the job through tools/s3_proxy.py, which delays every request, injects
faults and counts requests by S3 operation, in front of the real S3 API server (moto) on loopback."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from pyspark.testing import assertDataFrameEqual

import etl
from conftest import ETL, SAMPLE, LatencyProxy, read_tables, s3_with_sample
from s3_proxy import WRITES, Proxy
from test_s3 import CREDENTIALS, download

DELAY_MS = 5
# The budgets: reading at most 1.1 requests per input file; writing about 1 per output object (issue 17):
# python etl.py spools S3 output on local disk and PUTs each file once, straight into place, and the old
# keys go in one DeleteObjects per 1,000. Each run also writes a few requests whatever its size, counted
# here (preflight probe, lease take and its renewal at each check, run marker, journal and commit mark,
# manifest, reports, clean-up): FIXED_WRITES at most. Tier 1 (make bench-s3) shows the ratio without them.
READ_BUDGET_PER_FILE = 1.1
WRITE_BUDGET_PER_OBJECT = 1.2
FIXED_WRITES = 50
RESET_EVERY, SLOWDOWN_EVERY = 25, 50
DEAD_WITHIN_S = 180
# Rejects whose names Spark's readers spell differently: as a path (binaryFile) and as a URI (line reader).
BAD_FILES = {"song_data/Z/Z/Z/bad song.json": b"not json\n", "log_data/2018/11/bad day.json": b"{\"ts\": \"x\"}\n"}
JUNK = {"song_data/.DS_Store": b"\x00\x00\x00\x01Bud1", "song_data/A/__MACOSX/._y.json": b"\x00\x05"}


@pytest.fixture(scope="module")
def latency_input(s3_endpoint):
    """The sample, two files with a bad line each, and junk that must not be read, in a bucket of its own."""
    client = s3_with_sample(s3_endpoint, "latency-in", "latency-lake", {**BAD_FILES, **JUNK})
    return client, len(list(SAMPLE.rglob("*.json"))) + len(BAD_FILES)


def start_job(proxy, output, input_root="s3://latency-in/"):
    command = [sys.executable, ETL, "--input", input_root, "--output", output]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url})


class CutOffRun:
    """The job through a proxy of its own, which disappears once every input file is read; the job's end is
    awaited in a thread, which notes when it came."""

    def __init__(self, s3_endpoint, input_files):
        self.proxy = LatencyProxy(s3_endpoint, "--delay-ms", DELAY_MS)
        self.job = start_job(self.proxy, "s3a://latency-lake/gone")
        self.input_files = input_files
        self.gone = self.ended = None
        self.stderr = ""
        self._waiter = threading.Thread(target=self._wait, daemon=True)

    def cut_once_the_input_is_read(self):
        """Gone once every input file is read: the tables are built and staged next, and the upload meets no S3."""
        try:
            while self.proxy.counts()["by_bucket"].get("latency-in", {}).get("GET", 0) < self.input_files:
                if self.job.poll() is not None:  # it ended before that: the test says so
                    return
                time.sleep(0.2)
            self.proxy.die()
            self.gone = time.monotonic()
        finally:
            self._waiter.start()

    def _wait(self):
        try:
            _, self.stderr = self.job.communicate(timeout=DEAD_WITHIN_S + 60)
        except subprocess.TimeoutExpired:
            self.job.kill()
            _, self.stderr = self.job.communicate()
        self.ended = time.monotonic()

    def result(self):
        """The job's stderr, once it has ended."""
        self._waiter.join()
        return self.stderr

    def stop(self):
        if self.job.poll() is None:
            self.job.kill()
        self.result()
        self.proxy.stop()


@pytest.fixture(scope="module", autouse=True)
def cut_off_run(latency_input, s3_endpoint):
    """Started before the module's first test, which runs while this run, its endpoint gone, fails: its
    retries are mostly waiting."""
    run = CutOffRun(s3_endpoint, latency_input[1])
    try:
        run.cut_once_the_input_is_read()
        yield run
    finally:
        run.stop()


def test_the_proxy_resets_s3_connections_only_never_a_tests_own_calls_for_its_counts(latency_proxy):
    """With every connection doomed, an S3 request is reset, and the counts are still answered: a test's
    call is never the Nth connection that gets reset, however many the job opened before it."""
    import http.client
    import urllib.request

    proxy = latency_proxy("--reset-every", 1)
    assert proxy.counts()["total"] == 0
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        urllib.request.urlopen(f"{proxy.url}/latency-in?list-type=2", timeout=10).close()
    assert proxy.counts()["faults"] == {"reset": 1}


def test_a_frozen_proxy_holds_the_nth_write_and_every_request_after_it(s3_endpoint):
    """The soak's kill at a request (tools/soak_s3.py): the 2nd write and a read after it never reach the
    server, and the bucket holds what the writes before them left."""
    import boto3
    from botocore.config import Config

    proxy = Proxy(s3_endpoint).start()
    client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1", aws_access_key_id="a",
                          aws_secret_access_key="b", config=Config(retries={"total_max_attempts": 1}))
    client.create_bucket(Bucket="frozen")
    client.put_object(Bucket="frozen", Key="before", Body=b"1")
    proxy.freeze_at_write(2)
    client.get_object(Bucket="frozen", Key="before")  # a read is no write: it goes through
    client.put_object(Bucket="frozen", Key="first", Body=b"2")
    outcomes = []

    def attempt(call):
        try:
            call()
            outcomes.append("answered")
        except Exception as exc:  # the reset, as boto3 reports it
            outcomes.append(type(exc).__name__)
    writer = threading.Thread(target=attempt, args=(lambda: client.put_object(Bucket="frozen", Key="held", Body=b"3"),))
    writer.start()
    assert proxy.frozen.wait(30) and proxy.held_request == "PUT held"
    reader = threading.Thread(target=attempt, args=(lambda: client.list_objects_v2(Bucket="frozen"),))
    reader.start()
    reader.join(1)
    assert reader.is_alive() and writer.is_alive()  # both held, neither answered
    proxy.thaw()
    writer.join(30)
    reader.join(30)
    proxy.die()
    assert len(outcomes) == 2 and "answered" not in outcomes
    upstream = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="a",
                            aws_secret_access_key="b")
    assert sorted(item["Key"] for item in upstream.list_objects_v2(Bucket="frozen")["Contents"]) == ["before", "first"]


def test_sample_round_trip_with_latency_and_faults_meets_the_request_budget_and_equals_a_local_run(
        spark, latency_input, latency_proxy, sample_output, tmp_path):
    client, input_files = latency_input
    proxy = latency_proxy("--delay-ms", DELAY_MS, "--reset-every", RESET_EVERY, "--slowdown-every", SLOWDOWN_EVERY,
                          "--journal")
    job = start_job(proxy, "s3a://latency-lake/lake")
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert "S3 input listed flat and fetched in the plan" in stderr

    counts = proxy.counts()
    # Both kinds of fault happened, and were retried: the tables below are still exact.
    assert counts["faults"].get("reset", 0) > 0 and counts["faults"].get("503", 0) > 0, counts

    lake = download(client, "latency-lake", "lake/", tmp_path / "lake")
    tables, expected = read_tables(spark, lake), read_tables(spark, sample_output)
    for name in etl.TABLES:
        assertDataFrameEqual(tables[name], expected[name])
    rejects = [json.loads(line) for tree in (etl.SONG_DATA, etl.LOG_DATA)
               for path in (lake / etl.REJECTED_DIR / tree).glob("*part-*") for line in path.read_text().splitlines()]
    assert sorted(reject["source_file"] for reject in rejects) == [
        "s3://latency-in/log_data/2018/11/bad%20day.json", "s3://latency-in/song_data/Z/Z/Z/bad song.json"]

    # Requests that reached the server, by bucket: the input's are the reading, the lake's the writing.
    reading, writing = (counts["by_bucket"][bucket] for bucket in ("latency-in", "latency-lake"))
    assert reading.get("HEAD", 0) == 0 and reading["GET"] == input_files, reading
    assert sum(reading.values()) <= READ_BUDGET_PER_FILE * input_files, reading
    # Every object of the tables, rejects and state was written once, by one PUT to its own key (none was
    # COPYed there), but the manifest, which the commit copies in from staging.
    objects = [path.relative_to(lake).as_posix() for path in lake.rglob("*") if path.is_file()]
    data = [key for key in objects if key.split("/", 1)[0] in (*etl.TABLES, etl.REJECTED_DIR, etl.STATE_DIR)
            and key != f"{etl.MANIFEST_UNIT}/{etl.MANIFEST_FILE}"]
    journal = [(operation, key[len("lake/"):]) for _, operation, bucket, key in proxy.journal()
               if bucket == "latency-lake" and operation in ("PUT", "COPY")]
    assert all(journal.count(("PUT", key)) == 1 and ("COPY", key) not in journal for key in data), journal
    assert [key for operation, key in journal if operation == "COPY"] == [f"{etl.MANIFEST_UNIT}/{etl.MANIFEST_FILE}"]
    written = sum(writing.get(operation, 0) for operation in WRITES)
    print(f"write requests: {written} for {len(objects)} objects ({len(data)} data), {writing}")
    assert written <= WRITE_BUDGET_PER_OBJECT * len(objects) + FIXED_WRITES, (len(objects), writing)
    assert written - len(data) <= FIXED_WRITES, (len(data), writing)


def test_an_endpoint_gone_mid_run_fails_it_quickly_in_one_line_and_publishes_nothing(latency_input, cut_off_run):
    client, _ = latency_input
    job, proxy, stderr = cut_off_run.job, cut_off_run.proxy, cut_off_run.result()
    assert cut_off_run.gone is not None, stderr[-3000:]  # the endpoint went once the input was read
    assert cut_off_run.ended - cut_off_run.gone <= DEAD_WITHIN_S
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert job.returncode == 1 and errors == [stderr.strip().splitlines()[-1]], stderr[-3000:]
    assert errors[0].startswith(f"error: cannot reach S3 at {proxy.url}: the run stopped")
    assert errors[0].endswith("; nothing was published")
    assert "Traceback" not in stderr and "\tat " not in stderr
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="latency-lake", Prefix="gone/").get("Contents", [])]
    assert not [key for key in keys if key.split("/")[1] in etl.TABLES], keys
