#!/usr/bin/env python3
"""The daily-run benchmark behind docs/performance.md: `make bench-daily` (or `python tools/bench_daily.py --help`).

A lake the size of tier 2 (100,000 song files, 60 days, about 1M events) is built once; then one new day
arrives: one log file and 1% new song files. Side by side, in one invocation: the daily run (etl.py on that
lake: it reads what is new), a fresh full build of the same input (etl.py --full into an empty folder), and
DuckDB's full build of the same input (tools/duckdb_etl.py, the reference a user would otherwise pick). The
daily run's tables must equal the full build's row for row (tools/compare_tables.py), or the bench fails.
With --rounds N the three cases take turns N times (the lake is put back as it was before the new day
between rounds) and each figure is the median. Writes bench/results-daily.json.

--s3: the same on S3 at tier 1 (14,896 song files, 30 days), S3 to S3 under python etl.py, through
tools/s3_proxy.py at --delay-ms per request (tools/bench_s3.py's servers): the daily run against a full
build of the same input into an empty prefix, with requests by S3 operation and phase. Writes
bench/results-daily-s3.json.
"""
import argparse
import json
import random
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402  (measure, machine, median_run: the same probe as `make bench`)
import compare_tables  # noqa: E402

SEED = 42
SONGS, EVENTS, DAYS = 100_000, 1_000_000, 60  # tier 2's songs and events, over 60 days
NEW_SONG_SHARE = 0.01
DEFAULT_RESULTS = str(ROOT / "bench" / "results-daily.json")


def generate(work, songs, events, days):
    """days + 1 days of logs and songs * (1 + NEW_SONG_SHARE) song files; the last day and a random 1% of the
    song files are held back in <work>/new/, to arrive after the lake is built."""
    full = work / "generated"
    if not (full / "log_data").is_dir():
        subprocess.run([sys.executable, ROOT / "tools" / "generate_data.py", full,
                        "--songs", str(round(songs * (1 + NEW_SONG_SHARE))),
                        "--events", str(round(events * (days + 1) / days)), "--days", str(days + 1),
                        "--seed", str(SEED)], check=True)
    return full


def split_input(full, work):
    """<work>/input: everything but the new day; <work>/new: the new day's files, same relative paths."""
    data, new = work / "input", work / "new"
    if (data / "log_data").is_dir() and new.is_dir():
        return data, new
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)
    songs = sorted(full.glob("song_data/**/*.json"))
    held = set(random.Random(SEED).sample(songs, round(len(songs) * NEW_SONG_SHARE / (1 + NEW_SONG_SHARE))))
    last_day = sorted(full.glob("log_data/**/*.json"))[-1]
    for path in songs + sorted(full.glob("log_data/**/*.json")):
        target = (new if path in held or path == last_day else data) / path.relative_to(full)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return data, new


def arrive(new, data):
    """The new day lands in the input root: copies (new mtimes), so the lake sees them as added."""
    count = 0
    for path in sorted(p for p in new.rglob("*.json")):
        target = data / path.relative_to(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        count += 1
    return count


def leave(new, data):
    for path in new.rglob("*.json"):
        (data / path.relative_to(new)).unlink(missing_ok=True)


def etl_case(name, work, data, out, *flags):
    config = work / "bench.cfg"
    config.write_text("[PATHS]\n")
    figures = bench.measure([sys.executable, ROOT / "etl.py", "--config", config, "--input", data, "--output", out,
                             *flags], work / f"{name}.log")
    report = json.loads((out / "_run_report.json").read_text())
    return {"name": name, **figures, "phases_s": bench.with_outside(figures["wall_s"], report["phases_s"]),
            "input": report["input"], "intake": report["intake"],
            "tables": {k: v["rows"] for k, v in report["tables"].items()}}


def s3_case(name, proxy, s3, work, data, output):
    """etl.py S3 to S3 through the proxy: wall time, and requests by bucket, operation and phase."""
    import bench_s3

    config = work / "empty.cfg"
    config.write_text("[AWS]\n[PATHS]\n")
    bench_s3.control(proxy, "reset", "POST")
    log = work / f"{name.replace(' ', '-')}.log"
    figures = bench_s3.measure([sys.executable, ROOT / "etl.py", "--config", config, "--input", data, "--output",
                                f"s3://bench-lake/{output}"], log, {**bench_s3.KEYS, "AWS_ENDPOINT_URL": proxy})
    counts, journal = bench_s3.control(proxy, "counts"), bench_s3.control(proxy, "journal")["journal"]
    report = json.loads(s3.get_object(Bucket="bench-lake", Key=f"{output}/_run_report.json")["Body"].read())
    return {"name": name, **figures, "phases_s": report["phases_s"], "input": report["input"],
            "intake": report["intake"], "requests": counts["requests"], "by_bucket": counts["by_bucket"],
            "requests_by_phase": bench_s3.by_phase(journal, log)}


def main_s3(args):
    """Tier 1 on S3 through the latency proxy: build the lake, deliver a day, the daily run and a full build."""
    import bench_s3

    work = Path(args.work + "-s3")
    work.mkdir(parents=True, exist_ok=True)
    data, new = split_input(generate(work, 14_896, 8_000, 30), work)
    server, proxy, processes = bench_s3.start_servers(args.delay_ms)
    try:
        s3 = bench_s3.client(server)
        for bucket in ("bench-in", "bench-lake"):
            s3.create_bucket(Bucket=bucket)
        bench_s3.upload(s3, data, "bench-in", "daily")
        built = s3_case("build the lake", proxy, s3, work, "s3://bench-in/daily", "lake")
        print(json.dumps(built), flush=True)
        bench_s3.upload(s3, new, "bench-in", "daily")
        arrived = sum(1 for _ in new.rglob("*.json"))
        daily = s3_case("daily run", proxy, s3, work, "s3://bench-in/daily", "lake")
        print(json.dumps(daily), flush=True)
        full = s3_case("full build", proxy, s3, work, "s3://bench-in/daily", "full")
        print(json.dumps(full), flush=True)
        local = work / "compare"
        shutil.rmtree(local, ignore_errors=True)
        for prefix in ("lake", "full"):
            for key in bench_s3.keys(s3, "bench-lake", f"{prefix}/"):
                if any(f"/{table}/" in f"/{key}" for table in bench.TABLE_NAMES) and not key.endswith("/"):
                    target = local / key
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file("bench-lake", key, str(target))
        differs = compare_tables.differences(local / "lake", local / "full")
        if differs:
            sys.exit(f"bench: the daily run's tables differ from the full build's: {differs}")
    finally:
        for process in processes:
            process.kill()
    lake_in = daily["by_bucket"].get("bench-in", {})
    written = sum(n for phase in daily["requests_by_phase"].values() for op, n in phase.items() if op == "PUT")
    results = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": SEED,
        "delay_ms": args.delay_ms, "machine": bench.machine(), "new_day": {"files": arrived},
        "runs": [built, daily, full], "tables_equal": True,
        "daily": {"requests": sum(daily["requests"].values()), "input_requests": sum(lake_in.values()),
                  "lake_requests": sum(daily["by_bucket"].get("bench-lake", {}).values()),
                  "put_requests": written},
        "ratios": {"daily / full build, wall": round(daily["wall_s"] / full["wall_s"], 3),
                   "daily / full build, requests": round(sum(daily["requests"].values())
                                                         / sum(full["requests"].values()), 3)},
    }
    path = Path(args.results).with_name("results-daily-s3.json") if args.results == DEFAULT_RESULTS \
        else Path(args.results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=1))
    print(f"results written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "daily"),
                        help="generated data, lakes and logs, git-ignored (default %(default)s)")
    parser.add_argument("--results", default=DEFAULT_RESULTS)
    parser.add_argument("--rounds", type=int, default=1, help="turns per case; figures are medians (default 1)")
    parser.add_argument("--songs", type=int, default=SONGS)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--days", type=int, default=DAYS)
    parser.add_argument("--s3", action="store_true", help="tier 1 on S3 through the latency proxy instead")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="with --s3 (default %(default)s)")
    args = parser.parse_args()
    if args.s3:
        return main_s3(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    data, new = split_input(generate(work, args.songs, args.events, args.days), work)
    leave(new, data)
    lake, before, fresh, duck = (work / name for name in ("lake", "lake-before-new-day", "full", "duckdb"))
    if not (before / "_state").is_dir():  # yesterday's lake, built once and kept
        shutil.rmtree(lake, ignore_errors=True)
        built = etl_case("build the lake", work, data, lake)
        print(json.dumps(built), flush=True)
        shutil.rmtree(before, ignore_errors=True)
        shutil.copytree(lake, before, symlinks=True)
    arrived = arrive(new, data)

    def daily():
        shutil.rmtree(lake, ignore_errors=True)
        shutil.copytree(before, lake, symlinks=True)
        return etl_case("daily run", work, data, lake)

    def full():
        shutil.rmtree(fresh, ignore_errors=True)
        return etl_case("full build", work, data, fresh, "--full")

    def duckdb():
        shutil.rmtree(duck, ignore_errors=True)
        figures = bench.measure([sys.executable, ROOT / "tools" / "duckdb_etl.py", data, duck, "--threads",
                                 bench.DUCKDB_THREADS], work / "duckdb.log")
        return {"name": "duckdb full build", **figures}

    cases = {"daily run": daily, "full build": full, "duckdb full build": duckdb}
    names, done = list(cases), {name: [] for name in cases}
    for turn in range(args.rounds):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            done[name].append(cases[name]())
            print(json.dumps(done[name][-1]), flush=True)
    for other in (fresh, duck):
        differs = compare_tables.differences(lake, other)
        if differs:
            sys.exit(f"bench: the daily run's tables differ from {other.name}'s: {differs}")
    runs = {name: bench.median_run(found) for name, found in done.items()}
    daily_s, full_s, duck_s = (runs[name]["wall_s"] for name in names)
    results = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": SEED, "rounds": args.rounds,
        "machine": bench.machine(),
        "lake": {"song_files": args.songs, "events": args.events, "days": args.days},
        "new_day": {"files": arrived, "log_files": 1, "song_files": arrived - 1},
        "runs": list(runs.values()), "tables_equal": True,
        "ratios": {"daily / full build, wall": round(daily_s / full_s, 3),
                   "daily / full build, CPU": round(runs["daily run"]["cpu_s"] / runs["full build"]["cpu_s"], 3),
                   "daily / duckdb full build, wall": round(daily_s / duck_s, 3),
                   "full build / duckdb, wall": round(full_s / duck_s, 2)},
    }
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=1))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
