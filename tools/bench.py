#!/usr/bin/env python3
"""The benchmark behind README's "Speed": `make bench` (or `python tools/bench.py --help`).

Generates tier 1 and tier 2 input (once, deterministic for a seed), then runs, side by side in one
invocation: our job on tier 1 in the contract layout and with songs partitioned by year only, the naive
baseline (tools/baseline_etl.py) on the same tier-1 data, and our job on tier 2. Each run gets its own
process; wall time includes JVM start-up. Results go to a JSON file the README quotes.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 42
SONGS_BY_YEAR = "[LAYOUT]\nSONGS_PARTITION_BY = year\n"


PROBE = r"""
import json, os, subprocess, sys, threading, time

def tree_rss_kb(root):
    # The JVM is a grandchild (python -> spark-submit -> java): sum the resident set of the whole tree.
    parents, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        parents[int(pid)] = int(fields["PPid"])
        rss[int(pid)] = int(fields.get("VmRSS", "0 kB").split()[0])
    def under(pid):
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False
    return sum(kb for pid, kb in rss.items() if under(pid))

start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
peak = 0
while child.poll() is None:
    peak = max(peak, tree_rss_kb(child.pid))
    time.sleep(0.25)
print(json.dumps({"code": child.returncode, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak / 1024}))
"""


def measure(command, log_path):
    """Runs command in a child that reports wall seconds and the peak resident memory of its process tree."""
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", PROBE, *map(str, command)], stdout=subprocess.PIPE,
                              stderr=log, text=True, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        sys.exit(f"bench: {command[1]} failed with status {result['code']}; see {log_path}")
    return {"wall_s": round(result["wall_s"], 1), "peak_rss_mb": round(result["peak_rss_mb"])}


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
    phases = report["phases_s"]
    return {"name": name, **figures, "phases_s": {"process start": round(figures["wall_s"] - sum(phases.values()), 1),
                                                  **phases},
            "input": report["input"], "tables": {k: v["rows"] for k, v in report["tables"].items()},
            "records_per_s": round(records / figures["wall_s"])}


def run_baseline(data, work):
    out = work / "out" / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    figures = measure([sys.executable, ROOT / "tools" / "baseline_etl.py", data, out], work / "baseline.log")
    return {"name": "tier1-naive-baseline", **figures}


def machine():
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    import pyspark
    return {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "java": java, "spark": pyspark.__version__,
            "platform": platform.platform()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/sparkify-bench", help="generated data and outputs (default %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--skip-baseline", action="store_true", help="the baseline takes minutes")
    parser.add_argument("--skip-tier2", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    tier1 = generate(work, 1)
    runs = [run_ours("tier1-contract-layout", tier1, work), run_ours("tier1-songs-by-year", tier1, work, SONGS_BY_YEAR)]
    print(json.dumps(runs[-2:], indent=1), flush=True)
    if not args.skip_baseline:
        runs.append(run_baseline(tier1, work))
        print(json.dumps(runs[-1]), flush=True)
    if not args.skip_tier2:
        runs.append(run_ours("tier2-contract-layout", generate(work, 2), work))
        print(json.dumps(runs[-1], indent=1), flush=True)

    by_name = {run["name"]: run for run in runs}
    ours = by_name["tier1-contract-layout"]
    ratios = {}
    if "tier1-naive-baseline" in by_name:
        ratios["tier1 baseline / ours (contract layout)"] = round(by_name["tier1-naive-baseline"]["wall_s"] / ours["wall_s"], 1)
        ratios["tier1 baseline / ours (songs by year)"] = round(
            by_name["tier1-naive-baseline"]["wall_s"] / by_name["tier1-songs-by-year"]["wall_s"], 1)
    if "tier2-contract-layout" in by_name:
        big = by_name["tier2-contract-layout"]
        ratios["tier2 / tier1 wall time"] = round(big["wall_s"] / ours["wall_s"], 1)
        ratios["tier2 / tier1 events"] = round(big["input"]["log_events"] / ours["input"]["log_events"], 1)
    results = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": SEED,
               "machine": machine(), "runs": runs, "ratios": ratios}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(ratios, indent=1))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
