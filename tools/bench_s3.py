#!/usr/bin/env python3
"""S3 to S3 at a round trip per request: `make bench-s3` (or `python tools/bench_s3.py --help`).

Starts moto's S3 server and tools/s3_proxy.py in front of it (--delay-ms per request, 20 by default), each
in its own process, uploads the sample and tier 1 (tools/generate_data.py, seed 42) straight to the server,
then, side by side in one invocation, for each input (with --rounds N, ours and the floor N times in turn,
the fastest of each compared):
- ours: `python etl.py` S3 to S3 through the proxy: wall time (JVM start included), peak memory of the whole
  process tree, requests by S3 operation per phase (from the proxy's journal and the job's phase lines);
- the endpoint's floor: a plain boto3 client with 64 requests in flight lists the input flat, GETs every
  input file and PUTs as many small objects as our run left in the lake;
- the naive baseline (tools/baseline_etl.py) on the same endpoint, capped by --baseline-timeout.
Results go to bench/results-s3.json; a Markdown table is printed for the README.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (generate, machine, the memory probe)
import get_jars  # noqa: E402  (the S3 jars `make setup` resolved)
from s3_proxy import WRITES  # noqa: E402

ROOT = bench.ROOT
PY = sys.executable
IN_FLIGHT = 64
FLOOR_OBJECT = b"x" * 1024
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
PHASE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (\S.*?)\s+(\d+\.\d)s ")


def start_servers(delay_ms):
    """moto's server and the proxy, each in its own process; returns (server url, proxy url, processes)."""
    port = bench_port()
    moto = subprocess.Popen([str(Path(PY).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(server, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    proxy = subprocess.Popen([PY, str(ROOT / "tools" / "s3_proxy.py"), server, "--delay-ms", str(delay_ms),
                              "--journal"], stdout=subprocess.PIPE, text=True)
    return server, proxy.stdout.readline().split()[-1], [moto, proxy]


def bench_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(endpoint):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                        aws_secret_access_key="bench",
                        config=Config(max_pool_connections=IN_FLIGHT, retries={"max_attempts": 10, "mode": "standard"}))


def upload(s3, root, bucket, prefix):
    files = [path for path in Path(root).rglob("*") if path.is_file()]
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(lambda path: s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}"),
                      files))


def keys(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def clear(s3, bucket, prefix):
    """Every key below prefix deleted, straight at the server: the next run of ours is a first run again."""
    found = keys(s3, bucket, prefix)
    for start in range(0, len(found), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in found[start:start + 1000]]})


def best(rounds):
    """The fastest round's record, with every round's wall time: ratios are best against best."""
    fastest = min(rounds, key=lambda run: run["wall_s"])
    return {**fastest, "rounds_wall_s": [run["wall_s"] for run in rounds]}


def control(proxy, command, method="GET"):
    with urllib.request.urlopen(urllib.request.Request(f"{proxy}/__proxy__/{command}", method=method),
                                timeout=60) as answer:
        return json.load(answer)


def measure(command, log_path, env, timeout_s=None):
    """bench.measure with a time limit: wall seconds and peak memory of the process tree, or None on timeout."""
    with open(log_path, "w") as log:
        probe = subprocess.Popen([PY, "-c", bench.PROBE, *map(str, command)], stdout=subprocess.PIPE, stderr=log,
                                 text=True, env={**os.environ, **env}, start_new_session=True)
        try:
            out, _ = probe.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(probe.pid, signal.SIGKILL)
            probe.wait()
            return None
    result = json.loads(out.strip().splitlines()[-1])
    if result["code"] != 0:
        sys.exit(f"bench-s3: {command[1]} failed with status {result['code']}; see {log_path}")
    return {"wall_s": round(result["wall_s"], 1), "peak_rss_mb": round(result["peak_rss_mb"])}


def by_phase(journal, log_path):
    """Requests by operation in each of the job's phases (windows from its log lines), the rest apart."""
    windows = []
    for line in Path(log_path).read_text().splitlines():
        match = PHASE_LINE.match(line)
        if match:
            end = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            windows.append((match.group(2), end - float(match.group(3)), end))
    phases = {}
    for moment, operation, *_ in journal:
        name = next((name for name, start, end in windows if start - 0.05 <= moment <= end + 0.05),
                    "outside phases (preflight, lock, report)")
        phases.setdefault(name, {}).setdefault(operation, 0)
        phases[name][operation] += 1
    return phases


# The folders readers see: the tables and the rejects.
READ_FOLDERS = (*(f"{name}/" for name in ("songs", "artists", "users", "time", "songplays")),
                "_rejected/song_data/", "_rejected/log_data/")


def two_versions(journal, prefix):
    """From the proxy's journal, the window in which a reader may see two runs' files: from the first request
    that makes a new file visible (PUT or COPY into a table's or rejects' folder) to the last delete of an
    old one there (a DeleteObjects is journaled by its first key). None if nothing old was deleted."""
    visible = [(moment, operation) for moment, operation, bucket, key in journal
               if bucket == "bench-lake" and key.startswith(prefix) and key[len(prefix):].startswith(READ_FOLDERS)]
    first = min((moment for moment, operation in visible if operation in ("PUT", "COPY")), default=None)
    last = max((moment for moment, operation in visible if operation in ("DELETE", "BULK_DELETE")), default=None)
    return round(last - first, 1) if first and last else None


def run_ours(name, proxy, s3, work, rebuild=False):
    """python etl.py into {name}-ours; rebuild: again, with --full, over the lake the first run left (the
    publish then deletes a whole old version: the two-version window)."""
    output = f"s3a://bench-lake/{name}-ours"
    config = work / "empty.cfg"
    config.write_text("[AWS]\n[PATHS]\n")
    control(proxy, "reset", "POST")
    label = f"{name}-ours-rebuild" if rebuild else f"{name}-ours"
    figures = measure([PY, ROOT / "etl.py", "--config", config, "--input", f"s3://bench-in/{name}/",
                       "--output", output, *(["--full"] if rebuild else [])], work / f"{label}.log",
                      {**KEYS, "AWS_ENDPOINT_URL": proxy})
    counts, journal = control(proxy, "counts"), control(proxy, "journal")["journal"]
    report = json.loads(s3.get_object(Bucket="bench-lake", Key=f"{name}-ours/_run_report.json")["Body"].read())
    objects = len(keys(s3, "bench-lake", f"{name}-ours/"))
    files = report["input"]["song_files"] + report["input"]["log_files"]
    reading = counts["by_bucket"].get("bench-in", {})
    writing = counts["by_bucket"].get("bench-lake", {})
    return {"name": label, **figures, "phases_s": report["phases_s"], "input_files": files,
            "objects_written": objects, "requests": counts["requests"], "reading": reading, "writing": writing,
            "reading_per_input_file": round(sum(reading.values()) / files, 3),
            "writing_per_output_object": round(sum(writing.values()) / objects, 3),
            "write_requests_per_output_object": round(sum(writing.get(op, 0) for op in WRITES) / objects, 3),
            "two_version_window_s": two_versions(journal, f"{name}-ours/"),
            "requests_by_phase": by_phase(journal, work / f"{label}.log")}


def run_floor(name, proxy, objects):
    """The endpoint's own floor: list flat, GET every input file, PUT `objects` small objects, 64 in flight."""
    s3 = client(proxy)
    start = time.perf_counter()
    found = [key for key in keys(s3, "bench-in", f"{name}/") if key.endswith(".json")]
    listed = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(lambda key: s3.get_object(Bucket="bench-in", Key=key)["Body"].read(), found))
        got = time.perf_counter()
        list(pool.map(lambda i: s3.put_object(Bucket="bench-lake", Key=f"{name}-floor/{i:06d}", Body=FLOOR_OBJECT),
                      range(objects)))
    put = time.perf_counter()
    return {"name": f"{name}-floor", "wall_s": round(put - start, 1), "list_s": round(listed - start, 1),
            "get_s": round(got - listed, 1), "put_s": round(put - got, 1), "files": len(found), "puts": objects}


def run_baseline(name, proxy, work, timeout_s):
    jars = ",".join(get_jars.jar_paths())
    conf = {"fs.s3a.endpoint": proxy, "fs.s3a.path.style.access": "true", "fs.s3a.connection.ssl.enabled": "false"}
    submit = " ".join([f"--jars {jars}", *(f"--conf spark.hadoop.{k}={v}" for k, v in conf.items()), "pyspark-shell"])
    figures = measure([PY, ROOT / "tools" / "baseline_etl.py", f"s3a://bench-in/{name}/", f"s3a://bench-lake/{name}-baseline/"],
                      work / f"{name}-baseline.log", {**KEYS, "PYSPARK_SUBMIT_ARGS": submit}, timeout_s)
    if figures is None:
        return {"name": f"{name}-baseline", "wall_s": None, "timed_out_after_s": timeout_s}
    return {"name": f"{name}-baseline", **figures}


def table(runs):
    rows = ["| input | ours | floor (boto3, 64 in flight) | ours / floor | write requests per object | "
            "rebuild over the lake (--full) | its two-version window | naive baseline | baseline / ours |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in ("sample", "tier1"):
        ours, floor, base, again = (runs.get(f"{name}-{kind}")
                                    for kind in ("ours", "floor", "baseline", "ours-rebuild"))
        if not ours:
            continue
        if base and base["wall_s"]:
            base_text, ratio = f"{base['wall_s']} s", f"{base['wall_s'] / ours['wall_s']:.1f}x"
        elif base:
            base_text = f"> {base['timed_out_after_s']} s"
            ratio = f"> {base['timed_out_after_s'] / ours['wall_s']:.1f}x"
        else:
            base_text = ratio = "not run"
        rebuild = f"{again['wall_s']} s ({again['wall_s'] / floor['wall_s']:.2f}x)" if again else "not run"
        window = f"{again['two_version_window_s']} s" if again else "not run"
        rows.append(f"| {name} | {ours['wall_s']} s | {floor['wall_s']} s | {ours['wall_s'] / floor['wall_s']:.2f}x "
                    f"| {ours.get('write_requests_per_output_object')} | {rebuild} | {window} "
                    f"| {base_text} | {ratio} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/sparkify-bench", help="generated data and logs (default %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results-s3.json"))
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--baseline-timeout", type=float, default=600.0, help="seconds (default %(default)s)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--only", choices=("sample", "tier1"), help="one input only")
    parser.add_argument("--rounds", type=int, default=1,
                        help="turns of ours and the floor, taken alternately; the fastest of each is compared")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = {"sample": ROOT / "data", "tier1": bench.generate(work, 1)}
    if args.only:
        inputs = {args.only: inputs[args.only]}
    server, proxy, processes = start_servers(args.delay_ms)
    try:
        direct = client(server)
        for bucket in ("bench-in", "bench-lake"):
            direct.create_bucket(Bucket=bucket)
        runs = {}
        for name, root in inputs.items():
            upload(direct, root, "bench-in", name)
            ours, floors = [], []
            for _ in range(args.rounds):  # ours and the floor take turns: this machine's speed drifts
                clear(direct, "bench-lake", f"{name}-ours/")
                ours.append(run_ours(name, proxy, direct, work))
                print(json.dumps(ours[-1], indent=1), flush=True)
                floors.append(run_floor(name, proxy, ours[-1]["objects_written"]))
                print(json.dumps(floors[-1]), flush=True)
            runs[f"{name}-ours"], runs[f"{name}-floor"] = best(ours), best(floors)
            runs[f"{name}-ours-rebuild"] = run_ours(name, proxy, direct, work, rebuild=True)
            print(json.dumps(runs[f"{name}-ours-rebuild"], indent=1), flush=True)
            if not args.skip_baseline:
                runs[f"{name}-baseline"] = run_baseline(name, proxy, work, args.baseline_timeout)
                print(json.dumps(runs[f"{name}-baseline"]), flush=True)
    finally:
        for process in processes:
            process.kill()
    results = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": bench.SEED,
               "delay_ms": args.delay_ms, "rounds": args.rounds, "machine": bench.machine(), "runs": runs,
               "table": table(runs)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
