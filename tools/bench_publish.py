#!/usr/bin/env python3
"""Times the publish step alone: how long a reader could see two runs' files at once.

Usage: python tools/bench_publish.py LAKE [--s3] [--delay-ms 20] [--results FILE]

LAKE is a finished run's output folder (say tier 1's, from `make bench`). Its five tables and its rejects
are published over a copy of themselves with the job's own code (lake.publish.publish), as a new run
would publish them.
- Locally, each folder is swapped in by renames: a reader sees the old folder or the new one, never both.
  Printed: seconds per folder.
- With --s3, a moto server on 127.0.0.1 behind tools/s3_proxy.py (--delay-ms per request, as a network
  would add) holds the lake as the published version, and both ways of publishing run through the proxy
  in this one invocation:
  - "copy", the spark-submit path: the new files are staged under _staging/<run id>/ first (not timed),
    then COPYed into place and the old ones deleted, folder by folder;
  - "put", the python etl.py path (lake.publish.DirectPublish): the new files are PUT from local disk
    straight into place under names of the run, folder by folder, then the commit mark is written and the
    old files are deleted. In a real run the PUTs of a table start as soon as Spark has written it, so
    its window there also holds the writes of the tables after it (tools/bench_s3.py measures that one).
  The window is read off the proxy's journal of requests, as they reach the server: from the first
  request that makes a new file visible (PUT or COPY into a table's folder) to the last DELETE of an old
  one; per folder and for the whole lake.
Prints one JSON document (and writes it to --results).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_s3  # noqa: E402  (the servers, the proxy's control)
import etl  # noqa: E402
from lake.aws import AwsSettings  # noqa: E402
from lake.paths import is_visible_file  # noqa: E402
from lake.publish import DirectPublish, publish  # noqa: E402
from lake.stores import S3_REQUESTS_IN_FLIGHT, LocalStore, S3Store, Unit, spooled_key  # noqa: E402

BUCKET = "publish-bench"
RUN_ID = "20261129T000000Z-bench000"
FOLDERS = [(etl.REJECTED_DIR, etl.SONG_DATA), (etl.REJECTED_DIR, etl.LOG_DATA), *(("", name) for name in etl.TABLES)]


def lake_files(lake):
    """(relative path, path) of every file a reader of LAKE's tables and rejects sees."""
    found = []
    for parent, name in FOLDERS:
        folder = Path(lake, parent, name)
        for path in folder.rglob("*"):
            relative = path.relative_to(lake).as_posix()
            if path.is_file() and is_visible_file(path.relative_to(folder).as_posix()):
                found.append((relative, path))
    return found


def staged_key(relative):
    """Where the copy way's run stages a file of the lake (its unit's staging folder, under a new name)."""
    unit = next(unit for unit in units(f"s3://{BUCKET}/copy") if relative.startswith(
        f"{unit.final()[len(f's3://{BUCKET}/copy/'):]}/"))
    below = relative[len(unit.final()) - len(f"s3://{BUCKET}/copy/"):].lstrip("/")
    return f"{unit.staged(RUN_ID)[len(f's3://{BUCKET}/'):]}/{spooled_key(below, RUN_ID)}"


def units(root):
    return [Unit(f"{root}/{parent}".rstrip("/") if parent else root, name) for parent, name in FOLDERS]


def local(lake):
    work = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    try:
        root = str(work / "lake")
        seconds = {}
        for unit in units(root):  # the published version
            shutil.copytree(Path(lake, Path(unit.final()).relative_to(root)), unit.final())
        for unit in units(root):
            # The same folder staged as a new run's, just written (as Spark's files are): each publish clears
            # the staging it publishes from.
            shutil.copytree(Path(lake, Path(unit.final()).relative_to(root)), unit.staged(RUN_ID))
            started = time.perf_counter()
            publish(LocalStore(), [unit], RUN_ID, root)
            seconds[unit.name] = round(time.perf_counter() - started, 4)
            LocalStore().remove(f"{root}/_staging")
        return {"where": "local", "seconds": seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def windows(journal, prefix):
    """From the proxy's journal: per folder and in all, the seconds from the first new file made visible to
    the last old one deleted, and the requests by operation."""
    firsts, lasts = {}, {}
    for moment, operation, _bucket, key in journal:
        if not key.startswith(f"{prefix}/"):
            continue
        relative = key[len(prefix) + 1:]
        folder = next((f"{parent}/{name}".lstrip("/") for parent, name in FOLDERS
                       if relative.startswith(f"{parent}/{name}/".lstrip("/"))), None)
        if folder is None or not is_visible_file(relative[len(folder) + 1:]):
            continue  # staging, the journal, the lease, or a directory marker
        if operation in ("PUT", "COPY"):
            firsts.setdefault(folder, moment)
        elif operation in ("DELETE", "BULK_DELETE"):
            lasts[folder] = moment
    per_folder = {folder: round(lasts.get(folder, firsts[folder]) - firsts[folder], 2) for folder in firsts}
    whole = round(max(lasts.values()) - min(firsts.values()), 2) if firsts and lasts else None
    counts = {}
    for _, operation, _, _ in journal:
        counts[operation] = counts.get(operation, 0) + 1
    return {"window_s": whole, "window_by_folder_s": per_folder, "requests": counts}


def s3(lake, delay_ms):
    import boto3

    server, proxy, processes = bench_s3.start_servers(delay_ms)
    try:
        direct = boto3.client("s3", endpoint_url=server, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")
        direct.create_bucket(Bucket=BUCKET)
        files = lake_files(lake)
        uploads = [(path, f"{way}/{relative}") for way in ("copy", "put") for relative, path in files]
        # Staged under new names, as a new run's files are (Spark names each file after its write job).
        uploads += [(path, staged_key(relative)) for relative, path in files]
        with ThreadPoolExecutor(S3_REQUESTS_IN_FLIGHT) as pool:  # not timed: the set-up, straight to moto
            list(pool.map(lambda item: direct.upload_file(str(item[0]), BUCKET, item[1]), uploads))
        store = S3Store(AwsSettings("bench", "bench", region="us-east-1", endpoint=proxy))
        results = {"where": "s3", "delay_ms": delay_ms, "objects": len(files)}
        for way in ("copy", "put"):
            root = f"s3://{BUCKET}/{way}"
            bench_s3.control(proxy, "reset", "POST")
            started = time.perf_counter()
            if way == "put":  # each folder handed over as Spark would hand it, then the commit and deletes
                direct = DirectPublish(store, units(root), RUN_ID, root)
                for unit in units(root):
                    direct.upload(unit, str(Path(lake, unit.final()[len(root):].lstrip("/"))))
                direct.finish()
            else:
                publish(store, units(root), RUN_ID, root)
            seconds = round(time.perf_counter() - started, 2)
            results[way] = {"publish_s": seconds, **windows(bench_s3.control(proxy, "journal")["journal"], way)}
            print(json.dumps({way: results[way]}), flush=True)
        return results
    finally:
        for process in processes:
            process.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lake")
    parser.add_argument("--s3", action="store_true", help="publish on S3: moto on 127.0.0.1 behind the proxy")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="per request, at the proxy (default %(default)s)")
    parser.add_argument("--results", help="also write the JSON document here")
    args = parser.parse_args()
    results = s3(args.lake, args.delay_ms) if args.s3 else local(args.lake)
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(results, indent=2)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
