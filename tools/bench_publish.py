#!/usr/bin/env python3
"""Times the publish step alone, table by table: how long a reader could see a table mixing two runs.

Usage: python tools/bench_publish.py LAKE [--s3] [--endpoint URL]

LAKE is a finished run's output folder (say tier 1's, from `make bench`). Its five tables are staged
again as a new run would stage them, then published over themselves with the job's own code (etl.py's
LocalStore or S3Store and finish_publish), one table at a time, so each table's window is timed.
- Locally, a table is swapped in by renames: its window is the one rename exchange.
- With --s3, the lake is uploaded to a moto server on 127.0.0.1 (or to --endpoint) as the published
  version and as a staged one, and each table is published by server-side copies and batched deletes:
  from the first COPY to the last DELETE a reader may see old and new files side by side.
Prints one JSON document: per table, objects and seconds.
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import etl  # noqa: E402
from lake.publish import finish_publish  # noqa: E402
from lake.stores import S3_REQUESTS_IN_FLIGHT, STAGING_DIR, LocalStore, S3Store, Unit  # noqa: E402

BUCKET = "publish-bench"
RUN_ID = "bench"


def time_publish(store, root):
    """Publishes each staged table of RUN_ID over the current one; returns {table: seconds}."""
    seconds = {}
    for name in etl.TABLES:
        unit = Unit(root, name)
        journal = {"run_id": RUN_ID, "units": [{**vars(unit), **store.plan_publish(unit, RUN_ID)}]}
        started = time.perf_counter()
        finish_publish(store, journal)
        seconds[name] = round(time.perf_counter() - started, 4)
    return seconds


def local(lake):
    work = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    try:
        root = str(work / "lake")
        for name in etl.TABLES:  # the published version, and the same tables staged as a new run's
            shutil.copytree(Path(lake) / name, Unit(root, name).final())
            shutil.copytree(Path(lake) / name, Unit(root, name).staged(RUN_ID))
        return time_publish(LocalStore(), root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def s3(lake, endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
    client.create_bucket(Bucket=BUCKET)
    # Checksum files (.crc) are a local file system's; S3A writes none.
    files = [path for name in etl.TABLES for path in (Path(lake) / name).rglob("*")
             if path.is_file() and not path.name.startswith(".")]
    uploads = [(path, f"lake/{path.relative_to(lake).as_posix()}") for path in files]
    uploads += [(path, f"lake/{STAGING_DIR}/{RUN_ID}/{path.relative_to(lake).as_posix()}") for path in files]
    with ThreadPoolExecutor(S3_REQUESTS_IN_FLIGHT) as pool:
        list(pool.map(lambda item: client.upload_file(str(item[0]), BUCKET, item[1]), uploads))
    aws = etl.AwsSettings("bench", "bench", region="us-east-1", endpoint=endpoint)
    return time_publish(S3Store(aws), f"s3://{BUCKET}/lake")


def moto_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lake")
    parser.add_argument("--s3", action="store_true", help="publish on S3 (moto on 127.0.0.1 unless --endpoint)")
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto")
    args = parser.parse_args()
    objects = {name: sum(1 for p in (Path(args.lake) / name).rglob("*") if p.is_file() and not p.name.startswith("."))
               for name in etl.TABLES}
    if not args.s3:
        seconds = local(args.lake)
    elif args.endpoint:
        seconds = s3(args.lake, args.endpoint)
    else:
        server, endpoint = moto_server()
        try:
            seconds = s3(args.lake, endpoint)
        finally:
            server.stop()
    print(json.dumps({"where": "s3" if args.s3 else "local", "objects": objects, "seconds": seconds,
                      "total_s": round(sum(seconds.values()), 3)}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
