"""How this run reads and writes, decided once at start, and Spark's set-up to match.

plan_run turns how the job was started (python or spark-submit), where (EMR or not) and what it touches
(local paths or S3) into a RunPlan: the stores for input and output, which input trees are listed by the
driver and fetched inside the plan, whether S3 output is spooled on local disk, and the session's
settings and jars. Nothing else in the job asks whether a path is on S3.
"""
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Protocol

from lake.aws import AwsSettings
from lake.errors import EtlError
from lake.paths import is_s3
from lake.stores import S3_REQUESTS_IN_FLIGHT, LocalStore, S3Store, Store

SONG_DATA = "song_data"
LOG_DATA = "log_data"
APP_NAME = "sparkify-etl"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files every EMR node carries; EMR's own tooling reads them too.
EMR_MARKERS = ("/mnt/var/lib/info/job-flow.json", "/emr/instance-controller/lib/info/instance.json")
# `make setup` builds our java.nio local file system into .jars/ (tools/build_jar.py).
JARS_DIR = os.path.join(HERE, ".jars")
NIO_JAR = os.path.join(JARS_DIR, "sparkify-hadoop.jar")
NIO_FILE_SYSTEM = "sparkify.NioLocalFileSystem"
LOG4J_CONF = os.path.join(HERE, "conf", "log4j2.properties")
S3A_FILE_SYSTEM = "org.apache.hadoop.fs.s3a.S3AFileSystem"
CLOUD_COMMIT_PROTOCOL = "org.apache.spark.internal.io.cloud.PathOutputCommitProtocol"
S3A_SCHEMES = ("s3", "s3a", "s3n")
# S3A's committers, bound to Spark as Spark's cloud-integration guide says.
S3A_COMMITTER_BINDING = {
    "spark.sql.sources.commitProtocolClass": CLOUD_COMMIT_PROTOCOL,
    "spark.sql.parquet.output.committer.class": "org.apache.spark.internal.io.cloud.BindingParquetOutputCommitter",
    # s3:// and s3n:// are S3A too off EMR (s3a_options), so they get its committer as well.
    **{f"spark.hadoop.mapreduce.outputcommitter.factory.scheme.{scheme}":
       "org.apache.hadoop.fs.s3a.commit.S3ACommitterFactory" for scheme in S3A_SCHEMES},
}
# spark-submit writes S3 output through S3A's magic committer: the master may be a cluster, whose tasks share
# no disk with the driver, and the magic committer keeps its bookkeeping in S3 itself. It costs ~10 requests
# per file (.pending files, listings and probes of __magic paths), against 2 for python etl.py's spool. The
# run writes into a fresh _staging/<run id>/ prefix.
S3A_COMMIT_THREADS = 64
MAGIC_COMMITTER = {
    # Hadoop 3.3.4 commits one task's uploads one after another, tasks in parallel: many write tasks
    # (write_table makes one per shuffle partition) give the job commit S3A_COMMIT_THREADS requests in flight.
    "spark.sql.shuffle.partitions": str(S3A_COMMIT_THREADS),
    **S3A_COMMITTER_BINDING,
    "spark.hadoop.fs.s3a.committer.threads": str(S3A_COMMIT_THREADS),
    # The job's own uploads are aborted by abortJob; listing the bucket's uploads on top costs a request
    # per write (a lifecycle rule for stale uploads is advised anyway, docs/s3.md).
    "spark.hadoop.fs.s3a.committer.abort.pending.uploads": "false",
    # No _SUCCESS file per table: the run report says what succeeded, and each marker costs a PUT, its
    # existence probes and a COPY at publish.
    "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    "spark.hadoop.fs.s3a.committer.name": "magic",
    "spark.hadoop.fs.s3a.committer.magic.enabled": "true",
}
SESSION_CONF = {
    # Every time function then works in UTC, whatever the machine's zone.
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.debug.maxToStringFields": "100",  # our 19-column schema is not worth a warning
}
S3A_PROVIDERS = {
    "static": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
    "session": "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
    # Environment, profile, container and instance role, in the AWS SDK's own order.
    "chain": "com.amazonaws.auth.DefaultAWSCredentialsProviderChain",
}
# Retries: a reset or a 503 SlowDown is retried with backoff, but an endpoint that is gone fails the run
# within a few minutes (Hadoop 3.3.4's defaults retry for many minutes: 20 SDK attempts inside 7 S3A ones).
S3A_RETRIES = {
    "fs.s3a.attempts.maximum": "5",  # the AWS SDK's own retries of one request
    "fs.s3a.retry.limit": "3",  # S3A's retries around them
    "fs.s3a.retry.interval": "500ms",
    "fs.s3a.retry.throttle.limit": "10",
    "fs.s3a.retry.throttle.interval": "200ms",
    "fs.s3a.connection.establish.timeout": "5000",
    "fs.s3a.connection.timeout": "30000",
}


class Roots(Protocol):
    """What plan_run needs of the settings (etl.Settings)."""
    input_root: str
    output_root: str
    rejected_root: str
    aws: AwsSettings
    catalog_database: Optional[str]


@dataclass(frozen=True)
class SparkSetup:
    """The session's settings and jars."""
    conf: Mapping[str, str] = field(default_factory=dict)  # for the session builder: never a secret
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # set on the live Hadoop configuration
    # Classes the run needs that spark-submit's own classpath must provide: checked once the JVM is up.
    needed_classes: Mapping[str, str] = field(default_factory=dict)
    summary: str = "local paths"
    # Set in this process's environment before the session starts: what PySpark reads when the driver
    # creates the context, not from the session's settings.
    environ: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """How this run reads and writes; made by plan_run, the one place that decides it."""
    input_store: Store
    output_store: Store  # the output root and the rejects root alike
    # Trees listed by the driver in one listing and fetched inside the plan (etl.read_listed); the others
    # are read by Spark's own readers.
    listed_trees: FrozenSet[str] = frozenset()
    # S3 output under python etl.py: Spark writes to a local folder, whose files are then uploaded.
    spool: bool = False
    spark: SparkSetup = field(default_factory=SparkSetup)


def emr_marker() -> Optional[str]:
    return next((path for path in EMR_MARKERS if os.path.exists(path)), None)


def open_store(root: str, aws: AwsSettings) -> Store:
    return S3Store(aws) if is_s3(root) else LocalStore()


def plan_run(settings: Roots, environ: Mapping[str, str], marker: Optional[str], nio_jar: str = NIO_JAR) -> RunPlan:
    input_on_s3, output_on_s3 = is_s3(settings.input_root), is_s3(settings.output_root)
    if is_s3(settings.rejected_root) != output_on_s3:
        raise EtlError(f"the rejects root {settings.rejected_root} and the output root {settings.output_root} "
                       f"must both be local or both on S3")
    if settings.catalog_database and not output_on_s3:
        raise EtlError(f"[CATALOG] DATABASE = {settings.catalog_database} needs an S3 output root (Athena reads "
                       f"only S3); output is {settings.output_root}")
    spark = spark_setup(environ, marker, settings.aws, input_on_s3, output_on_s3, nio_jar)
    stores = open_store(settings.input_root, settings.aws), open_store(settings.output_root, settings.aws)
    if marker:  # EMR: Spark's own readers and writers, through EMRFS
        return RunPlan(*stores, spark=spark)
    # Local song files are many and tiny: listed by one walk and read in the plan. Local event logs are few
    # and day-sized: Spark's line reader. S3 input off EMR: both listed flat and fetched in the plan.
    listed = frozenset((SONG_DATA, LOG_DATA) if input_on_s3 else (SONG_DATA,))
    # python etl.py runs Spark in this process (local mode): its tasks write to this machine's disk, so S3
    # output is spooled there and uploaded by boto3, one PUT per file, many at once. No S3A at all.
    spool = output_on_s3 and not _submitted(environ)
    return RunPlan(*stores, listed_trees=listed, spool=spool, spark=spark)


def _submitted(environ: Mapping[str, str]) -> bool:
    """spark-submit starts the JVM before Python runs, so jars and the driver's classpath are already fixed."""
    return "PYSPARK_GATEWAY_PORT" in environ


def spark_setup(environ: Mapping[str, str], marker: Optional[str], aws: Optional[AwsSettings] = None,
                input_on_s3: bool = False, output_on_s3: bool = False, nio_jar: str = NIO_JAR) -> SparkSetup:
    """The session's settings and jars for how the job was started and what it touches, with a summary of why.
    aws matters only where S3 is touched."""
    aws = aws or AwsSettings()
    if marker:
        return SparkSetup(summary=f"EMR ({marker}): S3, committers and local files are left to EMR's own set-up")
    submitted = _submitted(environ)
    conf: Dict[str, str] = {}
    environ_set: Dict[str, str] = {}
    if not submitted and "PYSPARK_PYTHON" not in environ:
        # Input is fetched in Python workers (read_listed), which need what this interpreter has (boto3 for
        # S3), whereas Spark's default worker is whatever `python3` is first on the PATH. PySpark takes the
        # workers' executable from PYSPARK_PYTHON as the context is created (spark.pyspark.python is read
        # only by spark-submit's launcher); a user's own setting, and spark-submit's, stay as they are.
        environ_set["PYSPARK_PYTHON"] = sys.executable
    if submitted:
        nio = "local files through Hadoop's default (spark-submit fixes the driver's classpath before the job runs)"
    elif os.path.isfile(nio_jar):
        # On the JVM's classpath from launch: Spark reads local files through fs.file.impl before spark.jars.
        conf.update({"spark.driver.extraClassPath": nio_jar, "spark.hadoop.fs.file.impl": NIO_FILE_SYSTEM})
        nio = "local files through java.nio (no chmod process per file)"
    else:
        nio = f"local files through Hadoop's default ({nio_jar} not built: run `make setup`)"
    if not (input_on_s3 or output_on_s3):
        return SparkSetup(conf=conf, summary=f"local paths; {nio}", environ=environ_set)
    reads = "S3 input listed flat and fetched in the plan" if input_on_s3 else "local input"
    if not submitted:
        conf.update(_quiet_failures())
        writes = f"S3 output written to local disk, then PUT by boto3 ({S3_REQUESTS_IN_FLIGHT} in flight)" \
            if output_on_s3 else "local output"
        return SparkSetup(conf=conf, summary=f"{reads}; {writes}; credentials from the {aws.source}; {nio}",
                          environ=environ_set)
    conf.update({f"spark.hadoop.{key}": value for key, value in s3a_options(aws).items()})
    conf.update(MAGIC_COMMITTER)
    needed = {S3A_FILE_SYSTEM: "the S3A connector", CLOUD_COMMIT_PROTOCOL: "spark-hadoop-cloud"}
    return SparkSetup(conf=conf, secrets=s3a_secrets(aws), needed_classes=needed,
                      summary=f"{reads}; S3 through S3A and its magic committer, jars from spark-submit's --jars "
                              f"or --packages, credentials from the {aws.source}; {nio}")


def s3a_options(aws: AwsSettings) -> Dict[str, str]:
    """Hadoop settings for S3A, secrets excepted: those never go on a command line."""
    if aws.access_key:
        provider = S3A_PROVIDERS["session" if aws.session_token else "static"]
    else:
        provider = S3A_PROVIDERS["chain"]
    options = {
        "fs.s3.impl": S3A_FILE_SYSTEM,
        "fs.s3n.impl": S3A_FILE_SYSTEM,
        "fs.s3a.aws.credentials.provider": provider,
        # Reading means thousands of small GETs: allow many open connections and upload threads.
        "fs.s3a.connection.maximum": "200",
        "fs.s3a.threads.max": "64",
        "fs.s3a.bucket.probe": "0",  # the preflight has seen the buckets
        # No DELETE of parent "directory" markers after every file written (Hadoop 3.3.4 deletes them).
        "fs.s3a.directory.marker.retention": "keep",
        **S3A_RETRIES,
    }
    if aws.region:
        options["fs.s3a.endpoint.region"] = aws.region
    if aws.endpoint:
        # MinIO, LocalStack and moto serve buckets as paths, often over plain http.
        options["fs.s3a.endpoint"] = aws.endpoint
        options["fs.s3a.path.style.access"] = "true"
        options["fs.s3a.connection.ssl.enabled"] = str(aws.endpoint.startswith("https://")).lower()
    elif aws.region:
        options["fs.s3a.endpoint"] = f"s3.{aws.region}.amazonaws.com"
    return options


def s3a_secrets(aws: AwsSettings) -> Dict[str, str]:
    keys = {"fs.s3a.access.key": aws.access_key, "fs.s3a.secret.key": aws.secret_key,
            "fs.s3a.session.token": aws.session_token}
    return {key: value for key, value in keys.items() if value}


def _quiet_failures() -> Dict[str, str]:
    """A lost endpoint fails tasks; Spark logs each failure with its stack trace. conf/log4j2.properties keeps
    traces off the console: the job's own `error:` line says what failed (spark-submit: docs/s3.md)."""
    return {"spark.driver.extraJavaOptions": f"-Dlog4j.configurationFile={LOG4J_CONF}"} \
        if os.path.isfile(LOG4J_CONF) else {}


def tuning(cores: int) -> Dict[str, str]:
    """Settings measured on this job's data (docs/performance.md); a user's own --conf still wins."""
    return {
        # The default of 200 is sized for large clusters; our shuffles are a few MB.
        "spark.sql.shuffle.partitions": str(max(4, 2 * cores)),
        # Song files are ~250 bytes each. At the default open cost (4 MB) Spark plans one task per 32 files,
        # ~470 tasks for 15,000 files; at 8 KB it packs them into one task per core.
        "spark.sql.files.openCostInBytes": str(8 * 1024),
        # Block locations mean nothing for local disks or S3, and asking costs a call per file.
        "spark.sql.sources.ignoreDataLocality": "true",
    }


def create_spark_session(plan: Optional[RunPlan] = None):
    """The session the plan asks for; without a plan (the notebook), a local one."""
    from pyspark.sql import SparkSession

    setup = plan.spark if plan else spark_setup(os.environ, emr_marker())
    os.environ.update(setup.environ)
    builder = SparkSession.builder.appName(APP_NAME)
    for key, value in {**SESSION_CONF, **setup.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _require_classes(spark, setup.needed_classes)
    if plan and plan.spool and not spark.sparkContext.master.startswith("local"):
        # A cluster's tasks would write to their own machines' disks, which this driver cannot upload from.
        master = spark.sparkContext.master
        spark.stop()
        raise EtlError(f"python etl.py writes S3 output through local disk, which needs a local master, not "
                       f"{master}: use spark-submit for a cluster (README, \"Running on a cluster and on EMR\")")
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    for key, value in setup.secrets.items():
        hadoop_conf.set(key, value)
    chosen_by_user = dict(spark.sparkContext.getConf().getAll())
    for key, value in tuning(spark.sparkContext.defaultParallelism).items():
        if key not in chosen_by_user:
            spark.conf.set(key, value)
    no_local_checksum_files(spark)
    return spark


def start_spark_session(plan: RunPlan) -> Future:
    """create_spark_session on a thread of its own: a full build needs Spark whatever its listing finds, so
    the JVM starts while the input is listed (seconds on S3). Its result() is the session, or raises what
    starting it raised. Spark then installs no Ctrl-C handler of its own (it does so on the main thread
    only); Python's KeyboardInterrupt still ends the run, and Spark stops with it."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="start-spark")
    started = pool.submit(create_spark_session, plan)
    pool.shutdown(wait=False)  # the thread ends when the session has started
    return started


def stop_unused(started: Optional[Future]) -> None:
    """A session started ahead (start_spark_session) that the run no longer needs, stopped."""
    if started is None:
        return
    try:
        started.result().stop()
    except Exception:  # it never started: nothing to stop (its error is not this run's)
        pass


def no_local_checksum_files(spark) -> None:
    """Local disk without Hadoop's .crc side files.

    Hadoop's local file system writes a .crc file beside every file (twice the files, the folders' renames
    twice over) and looks for one before reading each input file. Parquet checks its pages itself. No
    setting turns this off: it is a switch on the file system object, which Hadoop caches per JVM, and in
    local mode Spark's tasks run in this JVM and get this same object.
    """
    jvm = spark.sparkContext._jvm
    local = jvm.org.apache.hadoop.fs.FileSystem.getLocal(spark.sparkContext._jsc.hadoopConfiguration())
    local.setWriteChecksum(False)
    local.setVerifyChecksum(False)


def _require_classes(spark, classes: Mapping[str, str]) -> None:
    loader = spark.sparkContext._jvm.Thread.currentThread().getContextClassLoader()
    for name, provider in classes.items():
        try:
            spark.sparkContext._jvm.java.lang.Class.forName(name, False, loader)
        except Exception:
            spark.stop()
            raise EtlError(f"{provider} is not on spark-submit's classpath ({name}): pass the jars with "
                           f"--jars or --packages (docs/s3.md, \"spark-submit and the S3 jars\")") from None
