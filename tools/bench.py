#!/usr/bin/env python3
"""The benchmark behind README's "Speed": `make bench` (or `python tools/bench.py --help`).

Generates tier 1 and tier 2 input (once, deterministic for a seed), then runs, side by side in one
invocation, on each tier: our job, DuckDB building the same tables (tools/duckdb_etl.py, the reference a
user would pick instead, 2 threads), and the physical floor (cat every input file, cp every output file
of our tables); on tier 1 also our job with songs partitioned by year only and the naive baseline
(tools/baseline_etl.py). With --rounds N the cases of a tier take turns N times, in rotating order, and
each figure is the median. Each run gets its own process; wall time includes JVM start-up. DuckDB's tables
must equal ours row for row (tools/compare_tables.py), or the bench fails. Ratios come from this one
invocation; results go to a JSON file the README quotes.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import compare_tables  # noqa: E402

SEED = 42
DUCKDB_THREADS = 2  # this machine's cores, as our job's local[*] uses them
# The floor: read every input byte and write every output byte, one file at a time, with no work between.
FLOOR = 'find "$1" -name "*.json" -print0 | xargs -0 cat > /dev/null && mkdir -p "$3" && cp -r "$2"/. "$3"'
TABLE_NAMES = tuple(compare_tables.SPECS)
SONGS_BY_YEAR = "[LAYOUT]\nSONGS_PARTITION_BY = year\n"


PROBE = r"""
import json, os, subprocess, sys, threading, time

TICK_S = 1 / os.sysconf("SC_CLK_TCK")

def tree(root):
    # {pid: (resident kB, CPU seconds so far)} of root and its descendants: the JVM is a grandchild
    # (python -> spark-submit -> java), so the whole tree counts.
    parents, figures = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            with open(f"/proc/{pid}/stat") as stat:
                ticks = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(pid)] = int(fields["PPid"])
        # utime and stime: fields 14 and 15 of stat, 12 and 13 after the command name.
        figures[int(pid)] = (int(fields.get("VmRSS", "0 kB").split()[0]), (int(ticks[11]) + int(ticks[12])) * TICK_S)
    def under(pid):
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False
    return {pid: values for pid, values in figures.items() if under(pid)}

start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
peak, cpu = 0, {}
while child.poll() is None:
    now = tree(child.pid)
    peak = max(peak, sum(rss for rss, _ in now.values()))
    cpu.update({pid: seconds for pid, (_, seconds) in now.items()})
    time.sleep(0.25)
# CPU time is sampled: what a process spent in its last quarter second is missed. Contention from other
# work on the machine stretches wall time much more than CPU time.
print(json.dumps({"code": child.returncode, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak / 1024,
                  "cpu_s": sum(cpu.values())}))
"""


def with_outside(wall_s, phases):
    """A run's phases, led by the wall time outside them: the interpreter's start, the lease, recovery, the
    report, Spark's stop and the exit."""
    return {"outside phases": round(wall_s - sum(phases.values()), 1), **phases}


def measure(command, log_path):
    """Runs command in a child that reports wall seconds, CPU seconds and the peak resident memory of its
    process tree."""
    # Every case writes thousands of files: flush what earlier cases (and their clean-up) left unwritten,
    # so no case pays for its predecessor's writeback. Without this, the same DuckDB run took 2.5 to 13 s.
    os.sync()
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", PROBE, *map(str, command)], stdout=subprocess.PIPE,
                              stderr=log, text=True, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        sys.exit(f"bench: {command[:3]} failed with status {result['code']}; see {log_path}")
    return {"wall_s": round(result["wall_s"], 1), "cpu_s": round(result["cpu_s"], 1),
            "peak_rss_mb": round(result["peak_rss_mb"])}


def generate(work, tier):
    target = work / f"tier{tier}"
    if not (target / "log_data").is_dir():
        subprocess.run([sys.executable, ROOT / "tools" / "generate_data.py", target, "--tier", str(tier),
                        "--seed", str(SEED)], check=True)
    return target


def run_ours(name, data, work, config_text=""):
    out = work / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    config = work / f"{name}.cfg"
    config.write_text("[PATHS]\n" + config_text)
    figures = measure([sys.executable, ROOT / "etl.py", "--config", config, "--input", data, "--output", out],
                      work / f"{name}.log")
    report = json.loads((out / "_run_report.json").read_text())
    records = report["input"]["song_records"] + report["input"]["log_events"]
    return {"name": name, **figures, "phases_s": with_outside(figures["wall_s"], report["phases_s"]),
            "input": report["input"], "tables": {k: v["rows"] for k, v in report["tables"].items()},
            "records_per_s": round(records / figures["wall_s"])}


def run_duckdb(name, data, work):
    out = work / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    figures = measure([sys.executable, ROOT / "tools" / "duckdb_etl.py", data, out, "--threads", DUCKDB_THREADS],
                      work / f"{name}.log")
    return {"name": name, **figures}


def run_floor(name, data, tables_from, work):
    """cat and cp at the sizes and file counts of the real run: what no ETL on this disk can beat."""
    out = work / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    tables = work / "out" / f"{name}-tables"
    shutil.rmtree(tables, ignore_errors=True)
    tables.mkdir(parents=True)
    for table in TABLE_NAMES:  # the tables only: not our reports and rejects
        shutil.copytree(tables_from / table, tables / table)
    figures = measure(["sh", "-c", FLOOR, "floor", data, tables, out], work / f"{name}.log")
    files = sum(len(names) for _, _, names in os.walk(tables))
    shutil.rmtree(tables)
    return {"name": name, **figures, "output_files": files}


def run_baseline(data, work):
    out = work / "out" / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    figures = measure([sys.executable, ROOT / "tools" / "baseline_etl.py", data, out], work / "baseline.log")
    return {"name": "tier1-naive-baseline", **figures}


def machine():
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    import pyspark
    return {"cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "java": java, "spark": pyspark.__version__,
            "platform": platform.platform()}


def median_run(runs):
    """One run's record with the median wall time and the largest peak memory of its rounds."""
    middle = sorted(runs, key=lambda run: run["wall_s"])[(len(runs) - 1) // 2]
    return {**middle, "rounds_wall_s": [run["wall_s"] for run in runs],
            "cpu_s": round(statistics.median(run["cpu_s"] for run in runs), 1),
            "wall_s": round(statistics.median(run["wall_s"] for run in runs), 1),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}


def run_tier(tier, data, work, rounds, extra=()):
    """Our job, DuckDB, the floor and any extra cases on one tier, taking turns; then DuckDB's tables are
    compared with ours. Returns {case: median run}."""
    ours, duck, floor = f"tier{tier}-ours", f"tier{tier}-duckdb", f"tier{tier}-floor"
    cases = {ours: lambda: run_ours(ours, data, work), duck: lambda: run_duckdb(duck, data, work),
             floor: lambda: run_floor(floor, data, work / "out" / ours, work), **dict(extra)}
    names = list(cases)
    done = {name: [] for name in names}
    for turn in range(rounds):
        # The first turn starts with ours: the floor copies our tables.
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            done[name].append(cases[name]())
            print(json.dumps(done[name][-1]), flush=True)
    differs = compare_tables.differences(work / "out" / ours, work / "out" / duck)
    if differs:
        sys.exit(f"bench: DuckDB's tables differ from ours on tier {tier}: {differs}")
    return {name: median_run(runs) for name, runs in done.items()}


def ratios_for(tier, by_name):
    ours, duck, floor = (by_name[f"tier{tier}-{case}"]["wall_s"] for case in ("ours", "duckdb", "floor"))
    cpu = {case: by_name[f"tier{tier}-{case}"]["cpu_s"] for case in ("ours", "duckdb")}
    found = {f"tier{tier} ours / duckdb": round(ours / duck, 2),
             f"tier{tier} ours / duckdb, CPU seconds": round(cpu["ours"] / cpu["duckdb"], 2),
             f"tier{tier} ours / floor": round(ours / floor, 1),
             f"tier{tier} duckdb / floor": round(duck / floor, 1)}
    if f"tier{tier}-naive-baseline" in by_name:
        found[f"tier{tier} baseline / ours"] = round(by_name[f"tier{tier}-naive-baseline"]["wall_s"] / ours, 1)
        found[f"tier{tier} baseline / duckdb"] = round(by_name[f"tier{tier}-naive-baseline"]["wall_s"] / duck, 1)
    return found


CASE_LABELS = {"ours": "ours (etl.py), contract layout", "ours-songs-by-year": "ours, `SONGS_PARTITION_BY = year`",
               "duckdb": "DuckDB (`tools/duckdb_etl.py`, 2 threads)",
               "naive-baseline": "naive baseline (`tools/baseline_etl.py`)",
               "floor": "floor: `cat` every input file, `cp` every output file"}


def markdown(results):
    """The README's speed table, from one invocation's results."""
    by_name = {run["name"]: run for run in results["runs"]}
    lines = ["| tier | run | wall | CPU | peak RSS | ours / this (wall) |", "|---|---|---|---|---|---|"]
    for run in results["runs"]:
        tier, case = run["name"].split("-", 1)
        ours = by_name[f"{tier}-ours"]["wall_s"]
        cpu = f"{run['cpu_s']} s" if case != "floor" else "-"
        lines.append(f"| {tier[-1]} | {CASE_LABELS[case]} | {run['wall_s']} s | {cpu} | "
                     f"{run['peak_rss_mb'] / 1024:.1f} GB | {ours / run['wall_s']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"),
                        help="generated data and outputs, git-ignored (default %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--rounds", type=int, default=1, help="turns per case; figures are medians (default 1)")
    parser.add_argument("--skip-baseline", action="store_true", help="the baseline takes minutes")
    parser.add_argument("--tiers", default="1,2", help="which tiers, e.g. 2 (default %(default)s)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    tiers = {int(tier) for tier in args.tiers.split(",")}
    by_name, ratios = {}, {}
    if 1 in tiers:
        tier1 = generate(work, 1)
        extra = [("tier1-ours-songs-by-year", lambda: run_ours("tier1-ours-songs-by-year", tier1, work, SONGS_BY_YEAR))]
        if not args.skip_baseline:
            extra.append(("tier1-naive-baseline", lambda: run_baseline(tier1, work)))
        by_name.update(run_tier(1, tier1, work, args.rounds, extra))
        ratios.update(ratios_for(1, by_name))
    if 2 in tiers:
        by_name.update(run_tier(2, generate(work, 2), work, args.rounds))
        ratios.update(ratios_for(2, by_name))
    results = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": SEED,
               "rounds": args.rounds, "machine": machine(), "runs": list(by_name.values()),
               "tables_equal_duckdb": True, "ratios": ratios}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(ratios, indent=1))
    print(markdown(results))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
