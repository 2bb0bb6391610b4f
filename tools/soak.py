#!/usr/bin/env python3
"""The lake's promise under random deliveries: after every daily run, the lake equals a fresh full build.

    python tools/soak.py [--seed 1] [--days 12] [--sequences 1] [--holes all|none|glued,ctime,...]

Each sequence (one per seed, from --seed on) starts from an empty input and an empty lake and, day after
day, changes the input the way real deliveries do, runs the job's daily mode (`etl.main`, in this process:
one JVM for the whole soak), and then checks:

- the daily run succeeded (or, on a day made to fail the quality gate, failed with the gate's error line and
  left the tables and the state byte for byte as they were, and the rejects row for row);
- the five tables, the rejects tree and the state (records of every segment, plays, users, the manifest's
  files, versions and counts) equal those of a fresh `--full` build of the same input, row for row;
- the five tables equal DuckDB's reference (tools/duckdb_etl.py).

A failure prints the seed, the day, what that day delivered, and briefly what differed; the sequence stops
there (its lake has left the promise) and the next seed starts. The exit status is 1 if any sequence failed.

What a day may do (tools/generate_data.py makes the records): a new day of events (with bad lines now and
then), song files arriving late (after plays that match them), log files replaced, corrected in place,
removed, re-added and renamed, events delivered again in a file of their own, songs without an artist id,
and a day whose file empties a required field so that the quality gate fails (put right the next day).
Some deliveries break promises issue 26 lists as holes; each kind is switched on by --holes:

    glued      two events on one line (a lost newline; `cat a b` of files without a trailing newline)
    ctime      a file corrected in place with the same size and its old mtime put back (os.utime)
    partition  songs whose artist_id is "" beside songs whose artist_id is null, in one year
    rejects    a bad line in the file of a day whose gate fails
    state      a state segment deleted before a run: the run must fail closed (then --full puts it right),
               or build in full and say so
"""
import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import duckdb  # noqa: E402

import compare_tables  # noqa: E402
import duckdb_etl  # noqa: E402
import generate_data as gen  # noqa: E402
import get_jars  # noqa: E402
from lake.publish import PAUSE_ENV, PUBLISH_JOURNAL  # noqa: E402
from lake.report import RUNS_DIR  # noqa: E402

HOLES = ("glued", "ctime", "partition", "rejects", "state")
START = dt.date(2018, 11, 1)
# Small data: a day's file holds about this many events; the catalogue starts with a few dozen songs.
EVENTS_PER_DAY = 40
USERS = 24
FIRST_SONGS = 30
SONGS_PER_DAY = 3
# The gate's other checks compare with the last run: a day that removes files may lose a tenth of a
# table's rows, which a full build (with no last run) never sees. Only the required fields are judged.
CONFIG = """[AWS]
[PATHS]
[QUALITY]
MAX_ROWS_FALL = 1
MAX_MATCH_RATE_FALL = 1
MAX_REJECTED_SHARE_RISE = 1
"""
# What the lake keeps that is no part of the promise: each run's own report, and the lease.
RUN_RECORDS = ("_runs", "_run_report.json", "_lock")
GATE_ERROR = "the quality gate failed"


class Mismatch(Exception):
    """The lake broke its promise on this day."""


# --------------------------------------------------------------------------- the deliveries


class Deliveries:
    """One seed's input as it evolves: the events of every day and the catalogue come from
    tools/generate_data.py; each day() changes the input folder and says what it did."""

    def __init__(self, seed, days, holes, input_root, busy=False):
        self.rng, self.holes, self.root = random.Random(seed), set(holes), Path(input_root)
        # Every kind of change every day, the gate failing on day 3, a state segment lost on day 4: the
        # short test's.
        self.busy = busy
        rng = random.Random(seed)  # the world: same seed, same songs and events whatever the days do
        n_songs = FIRST_SONGS + SONGS_PER_DAY * days
        records = gen.build_catalogue(rng, n_songs)
        ids = gen.track_ids(rng, n_songs)
        self.songs = [(f"song_data/{i[2]}/{i[3]}/{i[4]}/{i}.json", json.dumps(r)) for r, i in zip(records, ids)]
        playlist = gen.Playlist(rng, records, 200, 0.5)
        events, start = gen.build_events(rng, EVENTS_PER_DAY * days, START, days, USERS, playlist)
        self.day_lines = gen.by_day(events, start, days)
        self.next_song, self.next_day, self.spare, self.odd = 0, 0, 0, -1
        self.removed = []  # (path, bytes) taken away, to deliver again later
        self.gate_file = None  # the file that failed the gate, put right the next day
        self.today = set()  # files written today: a correction of one is just today's delivery

    # -- files

    def write(self, rel, text):
        self.today.add(str(rel))
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)

    def files(self, tree):
        return sorted(str(p.relative_to(self.root)) for p in (self.root / tree).rglob("*.json"))

    def name(self, stem):
        self.spare += 1
        return f"{stem}-{self.spare}"

    # -- one day

    def day(self, step):
        """Changes the input for day `step` (1-based); returns (what it did, whether the gate must fail)."""
        rng, done = self.rng, []
        self.today = set()
        if self.gate_file:  # yesterday's bad file, delivered again as it should have been
            rel, lines = self.gate_file
            self.write(rel, "\n".join(lines))
            self.gate_file = None
            done.append(f"put right {rel}")
        if step == 1:
            done.append(self.deliver_songs(FIRST_SONGS))
        elif (step == 3 if self.busy else rng.random() < 0.12) and not done:
            return self.gate_day(), True
        done.append(self.new_day())
        if step > 1:
            for chance, action in ((0.6, self.late_songs), (0.25, self.odd_song), (0.3, self.replace_log),
                                   (0.3, self.correct_log), (0.2, self.remove), (0.25, self.readd),
                                   (0.2, self.rename), (0.25, self.redeliver)):
                if self.busy or rng.random() < chance:
                    did = action()
                    if did:
                        done.append(did)
        return [d for d in done if d], False

    def deliver_songs(self, count):
        chosen = self.songs[self.next_song:self.next_song + count]
        self.next_song += len(chosen)
        for rel, text in chosen:
            self.write(rel, text)
        return f"{len(chosen)} song files" if chosen else ""

    def late_songs(self):
        """Song files whose plays may already be in the lake: they must now match."""
        return "late " + self.deliver_songs(self.rng.randint(1, SONGS_PER_DAY)) if self.next_song < len(self.songs) \
            else ""

    def odd_song(self):
        """A song without an artist id: null, or (hole `partition`) "" as well, in one year's folder."""
        rel, text = self.songs[self.rng.randrange(len(self.songs))]
        record = json.loads(text)
        values = [None, ""] if "partition" in self.holes else [None]
        # Busy: null first, then "" (a run then touches the folder through the other value).
        self.odd += 1
        value = values[self.odd % len(values)] if self.busy else self.rng.choice(values)
        record.update(artist_id=value, year=1999, song_id=self.name("SOODD"))
        rel = f"song_data/Z/Z/Z/{self.name('TRODD')}.json"
        self.write(rel, json.dumps(record))
        return f"song {rel} with artist_id {json.dumps(record['artist_id'])}"

    def spoil(self, lines):
        """Now and then a bad line (kept as a reject), and (hole `glued`) two events glued on one line."""
        lines, rng, did = list(lines), self.rng, []
        if lines and rng.random() < 0.3:
            good = lines[rng.randrange(len(lines))]
            bad = rng.choice([good[: len(good) // 2], good.replace('"ts":', '"ts_lost":', 1)])
            lines.insert(rng.randrange(len(lines) + 1), bad)
            did.append("a bad line")
        if "glued" in self.holes and len(lines) > 1 and rng.random() < 0.4:
            at = rng.randrange(len(lines) - 1)
            lines[at:at + 2] = [lines[at] + lines[at + 1]]
            did.append("two events glued")
        return lines, did

    def new_day(self):
        # A day without events delivers no file: the next day with some does (a lake's first day must hold
        # a log file, or the job rightly refuses its input: seed 110's first day had none).
        while self.next_day < len(self.day_lines) and not self.day_lines[self.next_day]:
            self.next_day += 1
        if self.next_day >= len(self.day_lines):
            return ""
        lines, day = self.day_lines[self.next_day], START + dt.timedelta(self.next_day)
        self.next_day += 1
        lines, did = self.spoil(lines)
        rel = f"log_data/{day:%Y}/{day:%m}/{day:%Y-%m-%d}-events.json"
        self.write(rel, "\n".join(lines))  # no trailing newline, as the real export
        return f"day file {rel} ({len(lines)} lines{', ' if did else ''}{', '.join(did)})"

    def gate_day(self):
        """A day file whose every line has an empty page: the gate must fail and leave the lake as it was.
        (hole `rejects`: it also holds a bad line, which must not reach the published rejects.)"""
        day = START + dt.timedelta(self.next_day)
        lines = self.day_lines[self.next_day] if self.next_day < len(self.day_lines) else []
        self.next_day += 1
        # The gate lets fewer than etl.MIN_MISSING_LINES lines without a field pass (noise, not drift): a small
        # day is made up to a dozen lines with events of the first days again (a redelivery, to the job).
        earlier = iter(self.day_lines)
        while len(lines) < 12:
            lines = lines + next(earlier)
        rel = f"log_data/{day:%Y}/{day:%m}/{day:%Y-%m-%d}-events.json"
        if (self.root / rel).exists():
            rel = f"log_data/late/{self.name('gate')}.json"
        emptied = [re.sub(r'"page":"[^"]*"', '"page":""', line, count=1) for line in lines]
        if "rejects" in self.holes:
            emptied.insert(len(emptied) // 2, emptied[0][: len(emptied[0]) // 2])
        self.write(rel, "\n".join(emptied))
        self.gate_file = (rel, lines)
        return [f"gate-failing day file {rel} ({len(lines)} lines with an empty page"
                f"{', a bad line' if 'rejects' in self.holes else ''})"]

    def pick_log(self, taken_in=False):
        """A log file (other than the one failing the gate); taken_in: one the lake has read before."""
        files = [f for f in self.files("log_data") if self.gate_file is None or f != self.gate_file[0]]
        files = [f for f in files if not taken_in or f not in self.today]
        return self.rng.choice(files) if files else None

    def replace_log(self):
        """A log file delivered again, a line more or a line fewer: its size and mtime change."""
        rel = self.pick_log()
        if rel is None:
            return ""
        lines = (self.root / rel).read_text().split("\n")
        if len(lines) > 1 and self.rng.random() < 0.5:
            del lines[self.rng.randrange(len(lines))]
            how = "a line fewer"
        else:
            lines.append(lines[self.rng.randrange(len(lines))])
            how = "an event again"
        self.write(rel, "\n".join(lines))
        return f"replaced {rel} ({how})"

    def correct_log(self):
        """A user's level corrected in one line: same size. Hole `ctime`: the old mtime is put back too."""
        rel = self.pick_log(taken_in=True)
        if rel is None:
            return ""
        path = self.root / rel
        text, before = path.read_text(), path.stat()
        flips = [('"level":"free"', '"level":"paid"'), ('"level":"paid"', '"level":"free"')]
        old, new = self.rng.choice(flips)
        if old not in text:
            old, new = new, old
        at = [i for i in range(len(text)) if text.startswith(old, i)]
        pick = self.rng.choice(at)
        self.write(rel, text[:pick] + new + text[pick + len(old):])
        if "ctime" in self.holes:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            return f"corrected {rel} in place (same size, old mtime)"
        return f"corrected {rel} (same size, new mtime)"

    def remove(self):
        trees = self.files("log_data") + self.files("song_data")
        trees = [f for f in trees if self.gate_file is None or f != self.gate_file[0]]
        if not trees:
            return ""
        rel = self.rng.choice(trees)
        self.removed.append((rel, (self.root / rel).read_bytes()))
        (self.root / rel).unlink()
        return f"removed {rel}"

    def readd(self):
        if not self.removed:
            return ""
        rel, data = self.removed.pop(self.rng.randrange(len(self.removed)))
        if (self.root / rel).exists():
            return ""
        self.write(rel, data)
        return f"re-added {rel}"

    def rename(self):
        """A file moved (mtime and size kept): the old name removed, the new one added."""
        tree = self.rng.choice(["log_data", "song_data"])
        files = [f for f in self.files(tree) if self.gate_file is None or f != self.gate_file[0]]
        if not files:
            return ""
        rel = self.rng.choice(files)
        new = f"{tree}/moved/{self.name(Path(rel).stem)}.json"
        (self.root / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / rel, self.root / new)
        return f"renamed {rel} -> {new}"

    def redeliver(self):
        """Events delivered again: two files as they are, one after the other, in a file of their own. Their
        files end without a newline, so `cat a b` glues two events (hole `glued`); otherwise joined by one."""
        files = [f for f in self.files("log_data") if self.gate_file is None or f != self.gate_file[0]]
        if not files:
            return ""
        picked = [self.rng.choice(files) for _ in range(2)]
        parts = [(self.root / f).read_bytes() for f in picked]
        glue = b"" if "glued" in self.holes else b"\n"
        rel = f"log_data/again/{self.name('redelivered')}.json"
        self.write(rel, glue.join(parts))
        return f"redelivered {' + '.join(picked)} as {rel}{' (cat: glued at the seam)' if not glue else ''}"


# --------------------------------------------------------------------------- the lake, read back


def visible(path):
    return not any(part.startswith(("_", ".")) for part in path.parts)


def parquet_rows(folder, hive=False):
    """A folder's parquet rows as a multiset (columns by name), or an empty one if it holds none."""
    files = sorted(str(p) for p in Path(folder).rglob("*.parquet") if visible(p.relative_to(folder)))
    if not files:
        return Counter()
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    relation = con.execute(f"SELECT * FROM read_parquet({files!r}, hive_partitioning = {str(hive).lower()}, "
                           f"union_by_name = true)")
    names = [d[0] for d in relation.description]
    order = sorted(range(len(names)), key=lambda i: names[i])
    rows = Counter(tuple((names[i], row[i]) for i in order) for row in relation.fetchall())
    con.close()
    return rows


def rejects(lake):
    """Every rejected line the lake keeps, per tree, as a multiset of (file, reason, line)."""
    found = {}
    for tree in ("song_data", "log_data"):
        rows = Counter()
        folder = Path(lake) / "_rejected" / tree
        for path in sorted(folder.rglob("*")) if folder.exists() else ():
            if path.is_file() and visible(path.relative_to(folder)):
                for text in path.read_text().splitlines():
                    if text.strip():
                        row = json.loads(text)
                        rows[(row.get("source_file"), row.get("reason"), row.get("line"))] += 1
        found[tree] = rows
    return found


def state(lake):
    """The state as content: the records of all segments of each tree, the plays, the users, and the
    manifest's files (version, record count), tables, layout and rejects; never run ids."""
    folder = Path(lake) / "_state"
    manifest = json.loads((folder / "manifest" / "manifest.json").read_text())
    found = {key: manifest.get(key) for key in ("state_version", "layout", "rejects", "tables")}
    for tree, entry in manifest["trees"].items():
        found[f"manifest {tree}"] = {name: (text.split(" ")[0], text.split(" ")[2])
                                     for name, text in entry["files"].items()}
        found[f"{tree} records"] = Counter()
        for segment in entry["segments"]:
            found[f"{tree} records"] += parquet_rows(folder / tree / segment)
        listed = {p.name for p in (folder / tree).iterdir()} if (folder / tree).exists() else set()
        found[f"{tree} segments kept but not listed"] = sorted(listed - set(entry["segments"]))
    found["plays"] = parquet_rows(folder / "plays", hive=True)
    found["users"] = parquet_rows(folder / "users")
    return found


def one_event(line):
    """Whether a log line is what the contract takes in: one JSON object, nothing after it, an integer ts."""
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("ts"), int) and not isinstance(value["ts"], bool)


def contract_input(input_root, copy):
    """The input with only the log lines the contract takes in (one event each), for DuckDB's reference:
    its reader takes the first value of two glued on one line, where the contract rejects the line."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(Path(input_root, "song_data"), copy / "song_data")
    for path in sorted(Path(input_root, "log_data").rglob("*.json")):
        target = copy / path.relative_to(input_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(line for line in path.read_text().split("\n") if one_event(line)))
    return copy


def unaccounted_lines(input_root, lake):
    """Nothing lost: every log line that is not one event must be among the rejects, as it arrived, and no
    line that is one event may be. Judged here with Python's json, not by the job."""
    wanted = Counter()
    for path in sorted(Path(input_root, "log_data").rglob("*.json")):
        for line in path.read_text().split("\n"):
            if line.strip() and not one_event(line):
                wanted[(f"file:{os.path.abspath(path)}", line)] += 1
    kept = Counter((source, line) for source, _, line in rejects(lake)["log_data"].elements())
    lines = []
    for what, extra in (("lost: not one event, yet not among the rejects", wanted - kept),
                        ("among the rejects, yet one event", kept - wanted)):
        if extra:
            source, line = next(iter(extra))
            lines.append(f"{sum(extra.values())} log lines {what}, e.g. in {source}: {line[:160]}")
    return lines


def differences(what, a, b):
    """One short line per part of a and b (dicts) that differ."""
    lines = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if left == right:
            continue
        if isinstance(left, Counter) and isinstance(right, Counter):
            only_a, only_b = left - right, right - left
            sample = next(iter(only_a or only_b))
            lines.append(f"{what} {key}: {sum(only_a.values())} rows only in the daily lake, "
                         f"{sum(only_b.values())} only in the full build; e.g. {str(sample)[:300]}")
        elif isinstance(left, dict) and isinstance(right, dict):
            keys = sorted(k for k in set(left) | set(right) if left.get(k) != right.get(k))
            lines.append(f"{what} {key}: {len(keys)} entries differ, e.g. {keys[0]}: "
                         f"{left.get(keys[0])} against {right.get(keys[0])}")
        else:
            lines.append(f"{what} {key}: {str(left)[:200]} against {str(right)[:200]}")
    return lines


def snapshot(lake):
    """The lake's tables and state byte for byte ({path: digest}), and its rejects row for row."""
    files = {}
    for path in sorted(Path(lake).rglob("*")):
        rel = path.relative_to(lake)
        if path.is_file() and rel.parts[0] not in RUN_RECORDS and rel.parts[0] != "_rejected":
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"files": files, **{f"rejects {k}": v for k, v in rejects(lake).items()}}


# --------------------------------------------------------------------------- a kill at every rename

RENAMES = "rename,renameat,renameat2"
RENAME_LINE = re.compile(r'^(rename|renameat|renameat2)\((?:AT_FDCWD, )?"([^"]*)", (?:AT_FDCWD, )?"([^"]*)"')
KILL_TIMEOUT_S = 900


def under_strace(trace, kill_before=None):
    """strace in front of the job, following only its Python driver's main thread (the JVM's renames are
    Spark's own); kill_before=(call, n): SIGKILL as the job enters its n-th call of that system call, which
    therefore never happens (as tests/test_crash.py does)."""
    strace = shutil.which("strace")
    if not strace:
        raise SystemExit("error: --crash-day needs strace (make setup installs it: apt-get install strace)")
    command = [strace, "-qq", "-o", str(trace), "-e", f"trace={RENAMES}"]
    if kill_before:
        command += ["-e", f"inject={kill_before[0]}:signal=KILL:when={kill_before[1]}"]
    return command


def job(config, input_root, lake, prefix, pause=""):
    """python etl.py in its own process group (Python and its JVM), under prefix."""
    return subprocess.Popen([*prefix, sys.executable, str(ROOT / "etl.py"), "--config", str(config), "--input",
                             str(input_root), "--output", str(lake)], env={**os.environ, PAUSE_ENV: pause},
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process, stdin=None):
    """The process's status and stderr; whatever is left of its group is killed."""
    try:
        _, stderr = process.communicate(stdin, timeout=KILL_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stderr


def journaled_run(config, input_root, lake, folder):
    """Today's daily run as a process under strace, copied while it waits with its publish journal written,
    then let finish. Returns (status, stderr, the copy, its renames from the journal's to the last before
    its report, each (call, source, target))."""
    trace, copy = Path(folder) / "trace", Path(folder) / "journaled"
    shutil.rmtree(copy, ignore_errors=True)
    process = job(config, input_root, lake, under_strace(trace), pause="publish")
    for line in process.stderr:
        if line.strip() == "paused at publish":
            shutil.copytree(lake, copy)
            break
    code, stderr = finish(process, "\n")
    steps = [m.groups() for m in map(RENAME_LINE.match, trace.read_text().splitlines()) if m]
    journal = next((n for n, (_, _, target) in enumerate(steps) if target.endswith(PUBLISH_JOURNAL)), None)
    report = next((n for n, (_, _, target) in enumerate(steps) if f"/{RUNS_DIR}/" in target), len(steps))
    return code, stderr, copy, steps[journal:report] if journal is not None and copy.exists() else []


def kill_at_every_rename(run, input_root, lake, full, folder):
    """Today's run (a process, on lake as yesterday left it) copied with its journal written; that journal
    published by the next run's recovery, killed as it enters each of the publish's renames in turn (and
    just after the last); then a daily run. Each lake must then equal the full build. Returns the kills."""
    code, stderr, journaled, steps = journaled_run(run.config, input_root, lake, folder)
    if code != 0 or not steps:
        raise Mismatch(f"the run under strace failed (exit {code}) or wrote no journal: {stderr[-300:]}")
    # The recovery's renames are the publish's after its journal; then the next run's own first (a rename).
    calls = [call for call, _, _ in steps[1:]] + ["rename"]
    for position in range(1, len(calls) + 1):
        # The journal names its folders by path: the copy goes back where the run left it.
        killed = Path(lake)
        shutil.rmtree(killed)
        shutil.copytree(journaled, killed)
        call = calls[position - 1]
        code, stderr = finish(job(run.config, input_root, killed,
                                  under_strace(os.devnull, (call, calls[:position].count(call)))))
        step = " -> ".join(steps[position][1:]) if position < len(steps) else "after the publish"
        if code != -signal.SIGKILL:
            raise Mismatch(f"the run to kill at rename {position} ({step}) was not killed: exit {code}, "
                           f"{stderr[-300:]}")
        code, errors = run(input_root, killed)
        if code != 0:
            raise Mismatch(f"killed at rename {position} ({step}), the next run failed: {errors[-1:]}")
        lines = compare_lakes(killed, full, input_root)
        if lines:
            raise Mismatch(f"killed at rename {position} ({step}), then a daily run: " + "; ".join(lines))
    return len(calls)


# --------------------------------------------------------------------------- runs


class Runner:
    """Runs etl.main in this process, its log in a file and its error lines kept."""

    def __init__(self, workdir):
        self.config = Path(workdir) / "dl.cfg"
        self.config.write_text(CONFIG)
        logging.basicConfig(level=logging.INFO, filename=str(Path(workdir) / "etl.log"),
                            format="%(asctime)s %(levelname)s %(message)s")
        import etl  # after the log's set-up: its main's basicConfig then leaves it be
        self.etl = etl
        self.runs, self.seconds = 0, 0.0

    def __call__(self, input_root, lake, *flags):
        began, stderr = time.perf_counter(), io.StringIO()
        logging.getLogger().info("soak: etl.py %s -> %s %s", input_root, lake, " ".join(flags))
        with contextlib.redirect_stderr(stderr):
            code = self.etl.main(["--config", str(self.config), "--input", str(input_root), "--output", str(lake),
                                  *flags])
        self.runs, self.seconds = self.runs + 1, self.seconds + time.perf_counter() - began
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
        return code, errors


def compare_lakes(lake, full, input_root):
    """What differs between the daily lake and the full build, and any input line lost."""
    lines = [f"table {table}: {detail} (A: the daily lake, B: the full build)"
             for table, detail in compare_tables.differences(lake, full).items()]
    lines += differences("rejects", rejects(lake), rejects(full))
    lines += differences("state", state(lake), state(full))
    return lines + unaccounted_lines(input_root, lake)


def check_day(run, workdir, input_root, lake, gate_fails, hole_state, rng, crash=False, s3=None):
    """One day's daily run and every check on it (s3: an S3Leg whose base is yesterday's lake, for today's
    faults on S3); raises Mismatch with what differed."""
    if hole_state:
        segments = sorted((Path(lake) / "_state" / "log_data").glob("*"))
        if segments:
            shutil.rmtree(rng.choice(segments))
    before = snapshot(lake) if (gate_fails or hole_state) and Path(lake).exists() else None
    if crash:  # the lake as yesterday left it, for today's run again, killed at each of its renames
        before_crash = Path(workdir) / "crash" / "before"
        shutil.rmtree(before_crash.parent, ignore_errors=True)
        shutil.copytree(lake, before_crash)
    code, errors = run(input_root, lake)
    if gate_fails:
        if code == 0 or not errors or GATE_ERROR not in errors[-1]:
            raise Mismatch(f"the gate should have failed: exit {code}, {errors[-1:] or 'no error line'}")
        after = snapshot(lake)
        lines = differences("after the failed gate,", {k: v for k, v in after.items() if k != "files"},
                            {k: v for k, v in before.items() if k != "files"})
        changed = sorted(k for k in set(after["files"]) | set(before["files"])
                         if after["files"].get(k) != before["files"].get(k))
        if changed:
            lines.append(f"after the failed gate, {len(changed)} files of the tables or the state changed, "
                         f"e.g. {changed[0]}")
        if lines:
            raise Mismatch("; ".join(lines))
        return "gate failed, lake as it was"
    said = ""
    if hole_state and code != 0:
        # Failing closed is one answer to a lost segment: the lake as it was, one error line; --full mends it.
        if snapshot(lake)["files"] != before["files"] or len(errors) != 1:
            raise Mismatch(f"a run without a state segment failed ({errors[-1:]}) but left the lake changed "
                           f"or said it in {len(errors)} error lines")
        said = f"failed closed on a lost segment ({errors[0][:120]}); "
        code, errors = run(input_root, lake, "--full")
    elif hole_state:
        report = json.loads((Path(lake) / "_run_report.json").read_text())
        if report.get("intake", {}).get("mode") != "full":
            raise Mismatch("a state segment was lost, yet the run neither failed nor built in full: "
                           f"its report says mode {report.get('intake', {}).get('mode')}")
        said = "rebuilt in full on a lost segment; "
    if code != 0:
        raise Mismatch(f"the daily run failed: exit {code}: {errors[-1] if errors else 'no error line'}")
    full = Path(workdir) / "full"
    shutil.rmtree(full, ignore_errors=True)
    code, errors = run(input_root, full, "--full")
    if code != 0:
        raise Mismatch(f"the full build failed: exit {code}: {errors[-1] if errors else 'no error line'}")
    lines = compare_lakes(lake, full, input_root)
    reference = Path(workdir) / "duckdb"
    shutil.rmtree(reference, ignore_errors=True)
    duckdb_etl.run(str(contract_input(input_root, Path(workdir) / "duckdb-input")), str(reference), 2)
    lines += [f"table {table}: {detail} (A: the daily lake, B: DuckDB's reference)"
              for table, detail in compare_tables.differences(lake, reference).items()]
    if lines:
        raise Mismatch("; ".join(lines))
    if crash:
        kills = kill_at_every_rename(run, input_root, before_crash, full, Path(workdir) / "crash")
        said += f"killed at each of {kills} renames of a publish, each lake then equal to the full build; "
    if s3:
        kills, robberies = s3.kills, s3.robberies
        lines = s3.check(input_root)
        if lines:
            raise Mismatch("; ".join(lines))
        said += (f"on S3, killed at each of {s3.kills - kills} write requests and robbed of its lease at each of "
                 f"{s3.robberies - robberies} steps, each lake then equal to the full build; ")
    return said + "equal to the full build and to DuckDB"


def sequence(run, seed, days, holes, workdir, out, busy=False, crash_day=0, s3_day=0, s3=None):
    """One seed's days; returns None, or (day, what it did, what differed) at the first broken promise."""
    folder = Path(workdir) / f"seed-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    input_root, lake = folder / "input", folder / "lake"
    deliveries = Deliveries(seed, days, holes, input_root, busy)
    rng = random.Random(f"{seed}-state")
    for step in range(1, days + 1):
        s3_base = bool(s3_day) and step >= max(s3_day, 2)
        if s3_base:  # yesterday's lake on S3, built before today's deliveries change the input
            s3.base(input_root)
        did, gate_fails = deliveries.day(step)
        hole_state = "state" in holes and step > 2 and not gate_fails and (step == 4 if busy else rng.random() < 0.15)
        if hole_state:
            did.append("a state segment deleted")
        crash = bool(crash_day) and step >= max(crash_day, 2) and not gate_fails and not hole_state
        crash_day = 0 if crash else crash_day  # a day whose gate fails puts the kills off to the next
        on_s3 = s3_base and not gate_fails and not hole_state
        s3_day = 0 if on_s3 else s3_day
        began = time.perf_counter()
        try:
            outcome = check_day(run, folder, input_root, lake, gate_fails, hole_state, rng, crash,
                                s3 if on_s3 else None)
        except Mismatch as exc:
            print(f"FAIL seed={seed} day={step}: {'; '.join(did)}\n  {exc}", file=out, flush=True)
            return step, did, str(exc)
        print(f"ok   seed={seed} day={step} ({time.perf_counter() - began:.0f} s): {'; '.join(did)}: {outcome}",
              file=out, flush=True)
    return None


def parse_holes(text):
    if text in ("all", ""):
        return list(HOLES)
    if text == "none":
        return []
    holes = [h.strip() for h in text.split(",") if h.strip()]
    unknown = [h for h in holes if h not in HOLES]
    if unknown:
        raise SystemExit(f"error: unknown hole type {unknown[0]!r}; the kinds are {', '.join(HOLES)}")
    return holes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="the first sequence's seed (default 1)")
    parser.add_argument("--days", type=int, default=12, help="daily runs per sequence (default 12)")
    parser.add_argument("--sequences", type=int, default=1, help="sequences, seeds --seed, --seed+1, ...")
    parser.add_argument("--holes", default="all", help=f"'all' (default), 'none', or some of {', '.join(HOLES)}")
    parser.add_argument("--busy", action="store_true",
                        help="every kind of change every day, the gate failing on day 3 (the short test)")
    parser.add_argument("--crash-day", type=int, default=0,
                        help="on this day (from 2; 0: never) also kill today's run at each rename of its local "
                             "publish (strace) and check each lake after the next run")
    parser.add_argument("--s3-day", type=int, default=0,
                        help="on this day (from 2; 0: never) also kill today's run on S3 (moto) at each write "
                             "request and take its lease away at each step, checking each lake after the next run")
    parser.add_argument("--s3-faults", default="kills,lease",
                        help="on the S3 day: 'kills' (at every write request), 'lease' (taken at every step), or both")
    parser.add_argument("--s3-first-kill", type=int, default=1,
                        help="on the S3 day, the first write request to kill at (default 1): to go on with a long leg")
    parser.add_argument("--workdir", default=str(ROOT / "soak"), help="where inputs and lakes go (emptied)")
    args = parser.parse_args(argv)
    holes = parse_holes(args.holes)
    os.environ.setdefault("SPARK_SUBMIT_OPTS", get_jars.C1_ONLY)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    run = Runner(args.workdir)
    s3 = None
    if args.s3_day:
        from soak_s3 import FAULTS, S3Leg

        faults = tuple(f.strip() for f in args.s3_faults.split(",") if f.strip())
        if not faults or set(faults) - set(FAULTS):
            raise SystemExit(f"error: --s3-faults takes some of {', '.join(FAULTS)}, not {args.s3_faults!r}")
        s3 = S3Leg(args.workdir, run.config, compare_lakes, faults, args.s3_first_kill)
    began, failed = time.perf_counter(), []
    print(f"soak: seeds {args.seed}..{args.seed + args.sequences - 1}, {args.days} days each, holes: "
          f"{', '.join(holes) or 'none'}; work in {args.workdir}", flush=True)
    for seed in range(args.seed, args.seed + args.sequences):
        found = sequence(run, seed, args.days, holes, args.workdir, sys.stdout, args.busy, args.crash_day,
                         args.s3_day, s3)
        if found:
            failed.append((seed, found[0]))
    if s3:
        s3.stop()
    print(f"soak: {args.sequences} sequences, {run.runs} runs of etl.py in {time.perf_counter() - began:.0f} s "
          f"({run.seconds / max(run.runs, 1):.1f} s a run); "
          + (f"FAILED: {', '.join(f'seed {s} day {d}' for s, d in failed)}" if failed else "no difference"),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
