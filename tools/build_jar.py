#!/usr/bin/env python3
"""Build the job's optional JVM extras (tools/java/) into DEST_DIR/sparkify-hadoop.jar.

Usage: python tools/build_jar.py DEST_DIR

- sparkify.NioLocalFileSystem: file:// without a `chmod` process per file and folder.
No library provides it (Hadoop's own answer is its native library, which pip's pyspark lacks).
Compiled against pyspark's bundled jars.

* Idempotent: does nothing if the jar is newer than the source.
* Optional: if javac is missing, prints one line and exits 0.
* On compile failure prints one line and exits 1.
Standard library only (Python 3.9+).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = sorted((HERE / "java").rglob("*.java"))
JAR_NAME = "sparkify-hadoop.jar"


def pyspark_jars_dir():
    # Imported lazily so the script fails with a clear message, not a traceback.
    try:
        import pyspark
    except ImportError:
        return None
    return Path(os.path.dirname(pyspark.__file__)) / "jars"


def fail(msg):
    print(f"build_jar: {msg}", file=sys.stderr)
    return 1


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    dest = Path(argv[1]).resolve()
    target = dest / JAR_NAME

    if target.exists() and target.stat().st_mtime > max(source.stat().st_mtime for source in SOURCES):
        print(f"build_jar: {target} is up to date")
        return 0

    javac = shutil.which("javac")
    if javac is None:
        print("build_jar: javac not found; the job runs without its JVM extras (README, Speed)")
        return 0

    jars_dir = pyspark_jars_dir()
    if jars_dir is None or not jars_dir.is_dir():
        return fail("pyspark (and its jars directory) not found; run inside the project venv")

    # Spark 3.5 runs on Java 8/11/17; --release 8 keeps the jar loadable on all of them.
    classpath = str(jars_dir / "*")
    with tempfile.TemporaryDirectory(prefix="sparkify-hadoop-") as tmp:
        classes = Path(tmp) / "classes"
        classes.mkdir()
        cmd = [javac, "--release", "8", "-nowarn", "-encoding", "UTF-8",
               "-cp", classpath, "-d", str(classes), *map(str, SOURCES)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if proc.returncode != 0:
            first = next((line for line in proc.stdout.splitlines() if "error" in line),
                         proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "")
            return fail(f"javac failed ({first.strip()})")

        # Write to a temp name and rename, so a crash never leaves a half-written jar
        # that a later run would consider up to date.
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / (JAR_NAME + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\n\r\n")
            for path in sorted(classes.rglob("*.class")):
                zf.write(path, path.relative_to(classes).as_posix())
        os.replace(partial, target)
    print(f"build_jar: wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
