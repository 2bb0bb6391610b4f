#!/usr/bin/env python3
"""Fetch the two jars Spark needs for s3a:// into DEST_DIR.

Usage: python tools/get_s3a_jars.py DEST_DIR

Maven Central is unreachable here (so spark.jars.packages cannot work), but
PyPI is, and AWS's sagemaker_pyspark 1.4.5 sdist vendors hadoop-aws-3.3.1 and
aws-java-sdk-bundle-1.11.901, which work with pyspark 3.5.x (Hadoop 3.3.4).
Only the sdist is downloaded; nothing is installed.
"""
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sagemaker_pyspark==1.4.5"
# Digests observed in the sdist whose own sha256 matches PyPI's index
# (05ca2d5081d7138ce29a8fb0a9cba077f28c825288ed07aed46a82e63c0bf1fb).
JARS = {
    "hadoop-aws-3.3.1.jar": "6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e",
    "aws-java-sdk-bundle-1.11.901.jar": "b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead",
}


class Failure(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_good(path):
    return path.is_file() and sha256(path) == JARS[path.name]


def download_sdist(workdir):
    # --no-binary forces the sdist (the jars are not in any wheel); --no-deps
    # stops pip chasing sagemaker_pyspark's pin on pyspark==3.3.0. pip still
    # runs the sdist's setup.py to read its metadata, in an isolated env.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--no-binary", ":all:", SDIST, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise Failure(f"pip download {SDIST} failed: {lines[-1]}")
    found = sorted(workdir.glob("*.tar.gz"))
    if len(found) != 1:
        raise Failure(f"expected one sdist in {workdir}, found {len(found)}")
    return found[0]


def extract(sdist, dest, names):
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()
                   if m.isfile() and "/deps/jars/" in m.name}
        for name in names:
            if name not in members:
                raise Failure(f"{name} not found in {sdist.name}")
            # Write under a temporary name and rename only once the digest
            # matches, so DEST_DIR never holds a truncated or wrong jar.
            part = dest / (name + ".part")
            with tar.extractfile(members[name]) as src, open(part, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            if sha256(part) != JARS[name]:
                part.unlink()
                raise Failure(f"{name} from {sdist.name} has an unexpected sha256")
            os.replace(part, dest / name)
            print(f"{dest / name}: extracted, sha256 ok")


def main(argv):
    if len(argv) != 2:
        raise Failure(f"usage: {Path(argv[0]).name} DEST_DIR")
    dest = Path(argv[1])
    dest.mkdir(parents=True, exist_ok=True)

    missing = [name for name in JARS if not is_good(dest / name)]
    for name in JARS:
        if name not in missing:
            print(f"{dest / name}: present, sha256 ok")
    if not missing:
        return

    # The sdist is ~180 MB; keep it next to DEST_DIR rather than in /tmp,
    # which may be a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=".get_s3a_jars-", dir=dest) as tmp:
        extract(download_sdist(Path(tmp)), dest, missing)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (Failure, OSError, tarfile.TarError) as exc:
        sys.exit(f"get_s3a_jars: error: {exc}")
