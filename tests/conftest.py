"""One local SparkSession for the whole suite, and helpers to write input rows by hand."""
import os
import socket
import sys
import time
from pathlib import Path

import pytest

# Python turns collected timestamps into local wall-clock time: pin it, as the job pins Spark.
os.environ["TZ"] = "UTC"
time.tzset()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from get_jars import C1_ONLY  # noqa: E402

# Most JVMs the suite starts live for seconds to a minute, too short for C2's optimised code to pay for its
# compiles; on two cores its compiler threads take the CPU from the job (a sample run took about half as long
# with C1 alone). Only speed changes. spark-submit (pyspark's too) gives SPARK_SUBMIT_OPTS to the driver JVM,
# which in local mode is the only one, and prints nothing about it; a developer's own setting is kept.
os.environ.setdefault("SPARK_SUBMIT_OPTS", C1_ONLY)

from pyspark.sql import SparkSession  # noqa: E402

import dist  # noqa: E402  (tools/dist.py: the package zipped for --py-files, as `make dist` does)
import etl  # noqa: E402
import get_jars  # noqa: E402  (tools/get_jars.py: where `make setup` put the S3 jars)


@pytest.fixture(scope="session")
def spark():
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkify-etl-tests")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("WARN")
    yield session
    session.stop()


def _rows(schema, records):
    """Hand-written records name only the fields a test is about; the rest are null."""
    return [tuple(record.get(name) for name in schema.fieldNames()) for record in records]


@pytest.fixture
def song_records(spark):
    def make(*records):
        return spark.createDataFrame(_rows(etl.SONG_SCHEMA, records), etl.SONG_SCHEMA)
    return make


@pytest.fixture
def event_records(spark):
    def make(*records):
        return spark.createDataFrame(_rows(etl.LOG_SCHEMA, records), etl.LOG_SCHEMA)
    return make


ETL = str(ROOT / "etl.py")
SAMPLE = ROOT / "data"
JARS_MANIFEST = get_jars.IVY_DIR / get_jars.MANIFEST  # tools/get_jars.py writes it; the Makefile reads it


def s3_jars():
    """The jars `make setup` resolved (Spark's Ivy, in .ivy2/), for spark-submit's --jars (README, "spark-submit")."""
    return get_jars.jar_paths()


def py_files():
    """spark-submit's --py-files with the lake/ package beside etl.py, zipped anew as `make submit` passes it."""
    return ["--py-files", str(dist.build())]


@pytest.fixture(scope="session")
def empty_config(tmp_path_factory):
    """Runs under test ignore whatever a developer has put in their own dl.cfg."""
    path = tmp_path_factory.mktemp("config") / "dl.cfg"
    path.write_text("[AWS]\n[PATHS]\n")
    return str(path)


@pytest.fixture(scope="session")
def run_etl(empty_config):
    """Runs etl.py as a user would, in its own process; returns the CompletedProcess."""
    import subprocess

    def run(*args, env=None, config=empty_config):
        command = [sys.executable, ETL, *(["--config", config] if config else []), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=600)
    return run


@pytest.fixture(scope="session")
def sample_run(run_etl, tmp_path_factory):
    """One run of the job on the bundled sample, shared by the tests that only read it or its log."""
    out = tmp_path_factory.mktemp("sample") / "output"
    result = run_etl("--input", SAMPLE, "--output", out)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="session")
def sample_output(sample_run):
    return sample_run[0]


def glue_two_new_plays(root):
    """A day file under root holding one line: two plays of known users, new to the sample, glued together
    as `cat a.json b.json` glues them when a.json lacks its final newline (the sample's files do)."""
    import json
    import subprocess

    sample_day = SAMPLE / "log_data" / "2018" / "11" / "2018-11-30-events.json"
    day = Path(root) / "log_data" / "2018" / "12" / "2018-12-01-events.json"
    day.parent.mkdir(parents=True)
    parts = []
    for number, line in enumerate(sample_day.read_text().splitlines()[:2]):
        event = json.loads(line)
        parts.append(day.parent / f"{number}.part")
        parts[-1].write_text(json.dumps({**event, "ts": event["ts"] + 86_400_000}) + ("\n" if number else ""))
    with open(day, "wb") as glued:
        subprocess.run(["cat", *parts], stdout=glued, check=True)
    for part in parts:
        part.unlink()
    return day


def read_tables(spark, root):
    return {name: spark.read.parquet(str(Path(root) / name)) for name in etl.TABLES}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API server (moto's) on loopback, for S3A and boto3 alike."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


# A standalone cluster: one worker sized like a small EMR core node's share of this 2-core machine.
WORKER_CORES = 2
WORKER_MEMORY = "1536m"
DAEMON_MEMORY = "256m"  # the master and worker JVMs themselves
CLUSTER_START_TIMEOUT_S = 120


def _cluster_ready(web_ui):
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{web_ui}/json/", timeout=2) as response:
            state = json.load(response)
    except OSError:
        return False
    return any(worker["state"] == "ALIVE" for worker in state.get("workers", []))


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A Spark standalone master and one worker from the installed pyspark, on loopback with free ports.

    The daemons (and so the executors they start) get an environment with no AWS_* variable: credentials
    must reach the executors some other way. Each daemon leads its own process group, killed afterwards.
    """
    import signal
    import subprocess

    import pyspark

    spark_class = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class")
    base = tmp_path_factory.mktemp("cluster")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_DAEMON_MEMORY=DAEMON_MEMORY, PYSPARK_PYTHON=sys.executable,
               SPARK_DAEMON_JAVA_OPTS=C1_ONLY)  # the master and worker JVMs: C1 alone, as the drivers
    port, ui_port, worker_ui_port = free_port(), free_port(), free_port()
    url, web_ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    commands = {
        "master": ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                   "--webui-port", str(ui_port)],
        "worker": ["org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--cores", str(WORKER_CORES),
                   "--memory", WORKER_MEMORY, "--webui-port", str(worker_ui_port), "--work-dir", str(base / "work")],
    }
    processes, logs = {}, {name: base / f"{name}.log" for name in commands}
    try:
        for name, args in commands.items():
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen([spark_class, *args], stdout=log, stderr=subprocess.STDOUT,
                                                   env=env, start_new_session=True)
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while not _cluster_ready(web_ui):
            dead = [name for name, process in processes.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"Spark cluster did not start ({dead or 'timeout'}): "
                            + "".join(log.read_text()[-2000:] for log in logs.values()))
            time.sleep(0.5)
        yield {"url": url, "web_ui": web_ui, "work_dir": base / "work", "logs": list(logs.values()),
               "worker_pid": processes["worker"].pid}
    finally:
        for process in processes.values():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=15)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


def bucket_client(endpoint, bucket):
    """A boto3 client on the test server, and a bucket of its own created on it."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    client.create_bucket(Bucket=bucket)
    return client


def s3_with_sample(endpoint, input_bucket, lake_bucket, extra):
    """A boto3 client on the test server, with the sample and the extra {key: bytes} in input_bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="setup", aws_secret_access_key="setup")
    for bucket in (input_bucket, lake_bucket):
        client.create_bucket(Bucket=bucket)
    for path in SAMPLE.rglob("*.json"):
        client.upload_file(str(path), input_bucket, path.relative_to(SAMPLE).as_posix())
    for key, body in extra.items():
        client.put_object(Bucket=input_bucket, Key=key, Body=body)
    return client


PROXY = ROOT / "tools" / "s3_proxy.py"


class LatencyProxy:
    """tools/s3_proxy.py in its own process, in front of the test server: delay, faults, counts."""

    def __init__(self, upstream, *args):
        import subprocess

        self.process = subprocess.Popen([sys.executable, str(PROXY), upstream, *map(str, args)],
                                        stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().split()[-1]

    def _call(self, method, command):
        import json
        import urllib.request

        request = urllib.request.Request(f"{self.url}/__proxy__/{command}", method=method)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    def counts(self):
        return self._call("GET", "counts")

    def journal(self):
        """[(time, operation, bucket, key), ...] of every request, if started with --journal."""
        return self._call("GET", "journal")["journal"]

    def die(self):
        self._call("POST", "die")

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def latency_proxy(s3_endpoint):
    """Starts proxies in front of the module's S3 server: latency_proxy("--delay-ms", 5, ...)."""
    started = []

    def start(*args):
        started.append(LatencyProxy(s3_endpoint, *args))
        return started[-1]
    yield start
    for proxy in started:
        proxy.stop()
