#!/usr/bin/env python3
"""Resolve the S3A connector and Spark's cloud committer from Maven Central into DEST_DIR.

Usage: python tools/get_jars.py DEST_DIR        (run by `make setup`, in the project venv)
       python tools/get_jars.py --coordinates   (prints the Maven coordinates, for --packages)

What a Spark user with internet would add to pyspark, at exactly the versions pyspark ships with:
- org.apache.hadoop:hadoop-aws at the Hadoop version of pyspark's hadoop-client-api jar, with the AWS
  SDK bundle (and other runtime dependencies) that hadoop-aws declares;
- org.apache.spark:spark-hadoop-cloud_<scala> at pyspark's own version, without its dependencies: they
  are Hadoop's connectors for other clouds, and Hadoop's client, which pyspark already has.
Both versions are read from the installed pyspark, never written down. Maven resolves them (its local
repository is .maven/ in the project) and copies the jars into DEST_DIR; the job then needs no network.

* Idempotent: does nothing if DEST_DIR already holds every jar of the current resolution.
* A failed download is one line naming the artifact, and exit 1.
Standard library only (Python 3.9+).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_REPOSITORY = ROOT / ".maven"
MANIFEST = "maven-jars.txt"  # the jars this resolution put in DEST_DIR, one per line
POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sparkify</groupId><artifactId>sparkify-jars</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>{aws[0]}</groupId><artifactId>{aws[1]}</artifactId><version>{aws[2]}</version></dependency>
    <dependency><groupId>{cloud[0]}</groupId><artifactId>{cloud[1]}</artifactId><version>{cloud[2]}</version>
      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
  </dependencies>
</project>
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


def resolve(aws, cloud, dest: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Failure("Maven (mvn) not found; install it (Debian: apt-get install maven)")
    with tempfile.TemporaryDirectory(prefix="sparkify-jars-") as tmp:
        Path(tmp, "pom.xml").write_text(POM.format(aws=aws, cloud=cloud))
        out = Path(tmp, "jars")
        command = [mvn, "-B", "-q", "-f", str(Path(tmp, "pom.xml")), f"-Dmaven.repo.local={LOCAL_REPOSITORY}",
                   "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={out}"]
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if proc.returncode != 0:
            raise Failure(download_error(proc.stdout, aws, cloud))
        jars = sorted(out.glob("*.jar"))
        dest.mkdir(parents=True, exist_ok=True)
        for jar in jars:
            # Copy then rename: a crash never leaves a truncated jar that looks complete.
            shutil.copyfile(jar, dest / (jar.name + ".part"))
            os.replace(dest / (jar.name + ".part"), dest / jar.name)
    (dest / MANIFEST).write_text("".join(f"{jar.name}\n" for jar in jars))


def download_error(output: str, *wanted) -> str:
    """Maven's many lines, cut to one that names what could not be had."""
    names = [":".join(c) for c in wanted]
    failing = [name for name in names if name.split(":")[1] in output and name.split(":")[2] in output]
    what = " and ".join(failing or names)
    reason = next((line.strip() for line in output.splitlines() if "[ERROR]" in line), "no output from mvn")
    return f"cannot download {what} from Maven Central ({reason[:300]})"


def up_to_date(dest: Path, aws, cloud) -> bool:
    manifest = dest / MANIFEST
    if not manifest.is_file():
        return False
    names = manifest.read_text().split()
    wanted = {f"{a}-{v}.jar" for _, a, v in (aws, cloud)}
    return wanted <= set(names) and all((dest / name).is_file() for name in names)


def main(argv) -> int:
    aws, cloud = coordinates()
    if argv[1:] == ["--coordinates"]:
        print(",".join(":".join(c) for c in (aws, cloud)))
        return 0
    if len(argv) != 2:
        raise Failure("usage: get_jars.py DEST_DIR | --coordinates")
    dest = Path(argv[1]).resolve()
    if up_to_date(dest, aws, cloud):
        print(f"get_jars: {dest} is up to date")
        return 0
    resolve(aws, cloud, dest)
    print(f"get_jars: {', '.join(':'.join(c) for c in (aws, cloud))} and their runtime dependencies in {dest}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (Failure, OSError) as exc:
        sys.exit(f"get_jars: error: {exc}")
