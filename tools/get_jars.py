#!/usr/bin/env python3
"""Resolve the S3A connector and Spark's cloud committer with Spark's own resolver (Ivy) into .ivy2/.

Usage: python tools/get_jars.py [IVY_DIR]       (run by `make setup`, in the project venv; default .ivy2)
       python tools/get_jars.py --jars          (prints the resolved jar files, comma-separated, for --jars)
       python tools/get_jars.py --coordinates   (prints the Maven coordinates, for --packages)

What a Spark user with internet would add to pyspark, at exactly the versions pyspark ships with:
- org.apache.hadoop:hadoop-aws at the Hadoop version of pyspark's hadoop-client-api jar, with the AWS
  SDK bundle (and other runtime dependencies) that hadoop-aws declares;
- org.apache.spark:spark-hadoop-cloud_<scala> at pyspark's own version, without its dependencies: they
  are Hadoop's connectors for other clouds, and Hadoop's client, which pyspark already has.
Both versions are read from the installed pyspark, never written down. A local Spark session resolves
them from Maven Central as Spark's `ADD JAR ivy://...` does (spark-hadoop-cloud with `?transitive=false`,
which --packages cannot say), its Ivy cache and the retrieved jars in IVY_DIR (spark.jars.ivy). The jars
are listed in IVY_DIR/sparkify-jars.txt; spark-submit then gets them with --jars and needs no network.

* Idempotent: does nothing if IVY_DIR already holds every jar of the current resolution.
* A failed download is one line naming the artifact, and exit 1.
Standard library only (Python 3.9+), and pyspark (in a child process, for the resolution).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IVY_DIR = ROOT / ".ivy2"
MANIFEST = "sparkify-jars.txt"  # the jars this resolution put in IVY_DIR/jars, one per line
# Spark's JVM here lives a minute at most: C1 alone is enough (tests/conftest.py says why). C1 alone also
# shrinks the JIT's code cache to 48 MB by default, which a JVM that lives longer (a pytest session, the soak)
# fills: the JIT then stops for good ("CodeCache is full. Compiler has been disabled") and every later job
# runs interpreted, several times slower. The cache is only reserved address space; 256 MB never fills here.
C1_ONLY = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m"
# Run in a child process, whose output (Ivy's report, Spark's start-up lines) is kept for a failure's line.
# SparkContext.addJar resolves an ivy:// URI with Spark's Ivy settings into spark.jars.ivy, retrieves the
# jars into its jars/ folder, and lists each one it added under its file name.
RESOLVE = """
import sys
from pyspark.sql import SparkSession

ivy_dir, uris = sys.argv[1], sys.argv[2:]
spark = (SparkSession.builder.master("local[1]").appName("get_jars").config("spark.jars.ivy", ivy_dir)
         .config("spark.ui.enabled", "false").getOrCreate())
try:
    context = spark.sparkContext._jsc.sc()
    for uri in uris:
        context.addJar(uri)
    added = context.listJars()
    for i in range(added.size()):
        print("resolved-jar", added.apply(i).rsplit("/", 1)[-1], flush=True)
finally:
    spark.stop()
"""


class Failure(Exception):
    pass


def pyspark_jars_dir() -> Path:
    try:
        import pyspark
    except ImportError:
        raise Failure("pyspark is not installed; run inside the project venv") from None
    return Path(pyspark.__file__).parent / "jars"


def bundled_version(jars_dir: Path, artifact: str) -> str:
    """The version in pyspark's own jar of that artifact, e.g. hadoop-client-api-3.3.4.jar -> 3.3.4."""
    pattern = re.compile(rf"^{re.escape(artifact)}-(\d[^-]*)\.jar$")
    found = [m.group(1) for m in map(pattern.match, os.listdir(jars_dir)) if m]
    if len(found) != 1:
        raise Failure(f"expected one {artifact} jar in {jars_dir}, found {len(found)}")
    return found[0]


def coordinates():
    """(group, artifact, version) of hadoop-aws and spark-hadoop-cloud, matching the installed pyspark."""
    jars_dir = pyspark_jars_dir()
    hadoop = bundled_version(jars_dir, "hadoop-client-api")
    scala = ".".join(bundled_version(jars_dir, "scala-library").split(".")[:2])
    spark = bundled_version(jars_dir, f"spark-core_{scala}")
    return ("org.apache.hadoop", "hadoop-aws", hadoop), ("org.apache.spark", f"spark-hadoop-cloud_{scala}", spark)


def ivy_file_name(coordinate) -> str:
    """The name Spark's Ivy retrieval gives an artifact's jar: [organisation]_[artifact]-[revision].jar."""
    return "{}_{}-{}.jar".format(*coordinate)


def resolve(aws, cloud, ivy_dir: Path) -> list:
    """Resolves both with Spark's Ivy; returns the file names of the jars retrieved into ivy_dir/jars."""
    uris = [f"ivy://{':'.join(aws)}", f"ivy://{':'.join(cloud)}?transitive=false"]
    env = {**os.environ, "SPARK_SUBMIT_OPTS": os.environ.get("SPARK_SUBMIT_OPTS", C1_ONLY)}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, str(ivy_dir), *uris], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, env=env, cwd=str(ivy_dir.parent))
    names = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("resolved-jar ")]
    if proc.returncode != 0 or not names:
        raise Failure(download_error(proc.stdout, aws, cloud))
    missing = [name for name in names if not (ivy_dir / "jars" / name).is_file()]
    if missing:
        raise Failure(f"Spark resolved {', '.join(missing)} but left no such file in {ivy_dir / 'jars'}")
    return names


def download_error(output: str, *wanted) -> str:
    """Ivy's and Spark's many lines, cut to one that names what could not be had."""
    names = [":".join(c) for c in wanted]
    unresolved = re.findall(r"unresolved dependency: ([^#\s]+)#([^;\s]+);([^:\s\]]+)", output)
    failing = [":".join(found) for found in unresolved]
    what = " and ".join(sorted(set(failing), key=failing.index) or names)
    lines = [line.strip(" \t:") for line in output.splitlines() if line.strip(" \t:")]
    reason = next((line for marker in ("unresolved dependency", "Exception", "Error") for line in lines
                   if marker in line), lines[-1] if lines else "no output from Spark")
    return f"cannot download {what} from Maven Central ({reason[:300]})"


def manifest_names(ivy_dir: Path = IVY_DIR) -> list:
    path = ivy_dir / MANIFEST
    if not path.is_file():
        raise Failure(f"{path} not found: run `make setup`")
    return path.read_text().split()


def jar_paths(ivy_dir: Path = IVY_DIR) -> list:
    """The jars `make setup` resolved, as paths: what spark-submit's --jars takes (comma-separated)."""
    return [str(ivy_dir / "jars" / name) for name in manifest_names(ivy_dir)]


def up_to_date(ivy_dir: Path, aws, cloud) -> bool:
    try:
        names = manifest_names(ivy_dir)
    except Failure:
        return False
    wanted = {ivy_file_name(aws), ivy_file_name(cloud)}
    return wanted <= set(names) and all((ivy_dir / "jars" / name).is_file() for name in names)


def main(argv) -> int:
    if argv[1:] == ["--jars"]:
        print(",".join(jar_paths()))
        return 0
    aws, cloud = coordinates()
    if argv[1:] == ["--coordinates"]:
        print(",".join(":".join(c) for c in (aws, cloud)))
        return 0
    if len(argv) > 2 or argv[1:2] and argv[1].startswith("-"):
        raise Failure("usage: get_jars.py [IVY_DIR] | --jars | --coordinates")
    ivy_dir = Path(argv[1]).resolve() if len(argv) == 2 else IVY_DIR
    if up_to_date(ivy_dir, aws, cloud):
        print(f"get_jars: {ivy_dir} is up to date")
        return 0
    ivy_dir.mkdir(parents=True, exist_ok=True)
    names = resolve(aws, cloud, ivy_dir)
    # Written last, whole, then renamed: a crash never leaves a manifest naming jars that are not there.
    partial = ivy_dir / (MANIFEST + ".part")
    partial.write_text("".join(f"{name}\n" for name in names))
    os.replace(partial, ivy_dir / MANIFEST)
    print(f"get_jars: {', '.join(':'.join(c) for c in (aws, cloud))} (the first with its runtime dependencies) "
          f"in {ivy_dir / 'jars'}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (Failure, OSError) as exc:
        sys.exit(f"get_jars: error: {exc}")
