"""The soak's S3 leg (tools/soak.py --s3-day n): on one day, today's daily run against a lake on S3 is killed
at every request that changes the bucket, and robbed of its lease at every step; after each, the next run
must leave the lake equal to a fresh full build of the same input on S3.

The S3 server is moto's, on loopback, behind tools/s3_proxy.py (no delay): the proxy holds the n-th write
request of the run and every request after it, none reaching the server, and the run's process group is
then killed, which leaves the bucket as a kill at that moment would. A kill between two writes leaves the
bucket as a kill at any read between them does, so a kill at every write visits every state a kill can
leave. The input stays local (file:), the lake is s3://soak/lake.

The lease: the run pauses at each of its steps in turn (SPARKIFY_PAUSE_AT); there another run takes its
lease over (as one would that found it stale), and the run goes on. Robbed before its commit mark, it must
stop with one `error:` line on its lease and leave the lake's keys as they were; after it, it may finish
(what it committed is the lake's) or stop so. Then the other run's lease runs out, and a daily run must
leave the lake equal to the full build.
"""
import fnmatch
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

import etl
from lake.lock import LEASE_NAME
from lake.publish import PAUSE_ENV
from lake.stores import STAGING_DIR
from s3_proxy import Proxy

ETL = Path(__file__).resolve().parents[1] / "etl.py"

BUCKET = "soak"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIASOAKTEST", "AWS_SECRET_ACCESS_KEY": "soak-secret",
               "AWS_REGION": "us-east-1"}
# The lake proper: what a reader or the next run reads (not the lease, the reports or the staging).
LAKE_TOPS = (*etl.TABLES, etl.REJECTED_DIR, etl.STATE_DIR)
THIEF = {"run_id": "20261207T000000Z-50a450a4", "host": "elsewhere", "pid": 1, "token": "thief"}
PAUSE_TIMEOUT_S = 900
RUN_ID = re.compile(r"\b\d{8}T\d{6}Z-[0-9a-f]{8}\b")
PAUSES_AT_MOST = 10000  # far more pause points than a run passes
FAULTS = ("kills", "lease")  # a kill at every write request; the lease taken at every step


class S3Leg:
    """A moto server and a proxy for the soak's S3 day. Each check returns lines of what broke (none: held);
    compare(lake, full, input_root) gives what differs between two local lakes."""

    def __init__(self, workdir, config, compare, faults=FAULTS, first_kill=1):
        self.workdir, self.config, self.compare, self.faults = Path(workdir), config, compare, faults
        self.first_kill = first_kill  # to go on with a long leg where an earlier soak stopped
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        upstream = f"http://127.0.0.1:{port}"
        self.proxy = Proxy(upstream).start()
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.proxy.url}
        self.client = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1",
                                   aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        self.client.create_bucket(Bucket=BUCKET)
        self.kills = self.robberies = 0

    def stop(self):
        self.proxy.die()
        self.server.stop()

    # ------------------------------------------------------------------ the bucket

    def keys(self, prefix):
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
            found += [item["Key"] for item in page.get("Contents", [])]
        return found

    def lake_keys(self, prefix):
        return {key[len(prefix) + 1:] for key in self.keys(prefix)
                if key[len(prefix) + 1:].split("/", 1)[0] in LAKE_TOPS}

    def copy(self, source, target):
        """target/ made a copy of source/ (server-side); a journal names its lake, so runs go on in one place."""
        self.clear(target)
        for key in self.keys(source):
            self.client.copy_object(Bucket=BUCKET, Key=f"{target}/{key[len(source) + 1:]}",
                                    CopySource={"Bucket": BUCKET, "Key": key})

    def clear(self, prefix):
        keys = [{"Key": key} for key in self.keys(prefix)]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start:start + 1000]})

    def download(self, prefix, folder):
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        for key in self.keys(prefix):
            if not key.endswith("/"):  # a directory marker
                path = folder / key[len(prefix) + 1:]
                path.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(BUCKET, key, str(path))
        return folder

    # ------------------------------------------------------------------ runs

    def start(self, input_root, prefix, *flags, pause=""):
        """etl.py on s3://soak/<prefix> as a process in its own group; its stderr goes to self.log."""
        self.log = self.workdir / "s3-run.log"
        with open(self.log, "w") as log:
            return subprocess.Popen([sys.executable, str(ETL), "--config", str(self.config), "--input",
                                     str(input_root), "--output", f"s3://{BUCKET}/{prefix}", *flags],
                                    env={**os.environ, **self.env, PAUSE_ENV: pause}, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)

    def finish(self, process):
        """The run's status and stderr, once it ends; whatever is left of its group is killed."""
        try:
            process.communicate(timeout=PAUSE_TIMEOUT_S)
        finally:
            kill_group(process)
        return process.returncode, self.log.read_text()

    def run(self, input_root, prefix, *flags):
        return self.finish(self.start(input_root, prefix, *flags))

    def resume(self, process, times=1):
        process.stdin.write("\n" * times)
        process.stdin.flush()

    def wait_for(self, process, pattern):
        """Whether the run printed a line that matches pattern (a pause) before it ended."""
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while time.monotonic() < deadline:
            ended = process.poll() is not None
            if any(fnmatch.fnmatchcase(line, pattern) for line in self.log.read_text().splitlines()):
                return True
            if ended:
                return False
            time.sleep(0.2)
        return False

    def base(self, input_root):
        """Yesterday's lake on S3: a full build of the input as it is before today's deliveries (the daily
        lake equals it; the soak checks that every day)."""
        code, stderr = self.run(input_root, "base", "--full")
        if code != 0:
            raise RuntimeError(f"the S3 base build failed: exit {code}: {stderr[-300:]}")

    def check(self, input_root):
        """Today's faults, after the base was built and today's input delivered: lines of what broke."""
        code, stderr = self.run(input_root, "full", "--full")
        if code != 0:
            return [f"the S3 full build failed: exit {code}: {stderr[-300:]}"]
        self.full = self.download("full", self.workdir / "s3-full")
        self.copy("base", "lake")
        code, stderr = self.run(input_root, "lake")
        lines = self.after("a daily run on S3", code, stderr, input_root)
        if "kills" in self.faults:
            lines = lines or self.kill_at_every_write(input_root)
        if "lease" in self.faults:
            lines = lines or self.rob_at_every_step(input_root)
        return lines

    def after(self, what, code, stderr, input_root):
        """What is wrong with s3://soak/lake after a run that should have left it equal to the full build."""
        if code != 0:
            return [f"{what}: the run failed: exit {code}: {last_error(stderr)}"]
        lake = self.download("lake", self.workdir / "s3-lake")
        lines = [f"{what}: {line}" for line in self.compare(lake, self.full, input_root)]
        staged = [key for key in self.keys("lake") if key.startswith(f"lake/{STAGING_DIR}/")]
        if staged:
            lines.append(f"{what}: {len(staged)} staged keys left, e.g. {staged[0]}")
        return lines

    def kill_at_every_write(self, input_root):
        """The daily run killed at its 1st, 2nd, ... write request until one runs to its end unkilled."""
        n = self.first_kill - 1
        while True:
            n += 1
            self.copy("base", "lake")
            self.proxy.freeze_at_write(n)
            process = self.start(input_root, "lake")
            while not self.proxy.frozen.wait(0.2) and process.poll() is None:
                pass
            killed = self.proxy.frozen.is_set()
            kill_group(process)
            self.proxy.thaw()
            status, stderr = self.finish(process)
            if not killed:  # it made fewer than n writes: every write has been a kill
                return [] if status == 0 else [f"the run unkilled at {n} writes failed: {last_error(stderr)}"]
            self.kills += 1
            what = f"killed at write {n} ({self.proxy.held_request})"
            logging.getLogger().info("soak on S3: %s", what)
            code, stderr = self.run(input_root, "lake")
            lines = self.after(f"{what}, then a daily run", code, stderr, input_root)
            if lines:
                return lines

    def steps(self, input_root):
        """The pause points a daily run passes, in order: each said and passed at once. Its stdin holds a line
        for every pause beforehand, as two may wait at once (the state's uploads have a thread of their own),
        and two threads reading one stdin may strand a line in its buffer."""
        self.copy("base", "lake")
        process = self.start(input_root, "lake", pause="*")
        process.stdin.write("\n" * PAUSES_AT_MOST)
        process.stdin.flush()
        self.finish(process)
        text = self.log.read_text()
        # Some steps are named by what they put, which is named by the run's id: any run's id, as a pattern.
        run_id = RUN_ID.search(text).group(0)
        return [line[len("paused at "):].replace(run_id, "*") for line in text.splitlines()
                if line.startswith("paused at ")]

    def rob_at_every_step(self, input_root):
        names = self.steps(input_root)
        committed = names.index("committed") if "committed" in names else len(names)
        for position, name in enumerate(names):
            self.copy("base", "lake")
            before = self.lake_keys("lake")
            process = self.start(input_root, "lake", pause=name)
            if not self.wait_for(process, f"paused at {name}"):
                return [f"the run to rob at {name} never paused there: {last_error(self.finish(process)[1])}"]
            self.put_lease(time.time() + 600)
            self.resume(process, times=len(names))  # should the step come again (recovery's, say), on it goes
            code, stderr = self.finish(process)
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            what = f"robbed of its lease at {name}"
            logging.getLogger().info("soak on S3: %s", what)
            self.robberies += 1
            if position < committed and code == 0:
                return [f"{what}, before its commit mark, the run still succeeded"]
            if code != 0 and (len(errors) != 1 or "lost its lease" not in errors[0]):
                return [f"{what}, the run stopped without one error line on its lease: exit {code}, {errors[-3:]}"]
            if position < committed and self.lake_keys("lake") != before:
                changed = sorted(self.lake_keys("lake") ^ before)
                return [f"{what}, the run stopped before its commit mark yet changed {len(changed)} keys, "
                        f"e.g. {changed[0]}"]
            self.put_lease(time.time() - 1)  # the other run's lease runs out: the next run takes it over
            code, stderr = self.run(input_root, "lake")
            lines = self.after(f"{what}, then a daily run", code, stderr, input_root)
            if lines:
                return lines
        return []

    def put_lease(self, expires_at):
        self.client.put_object(Bucket=BUCKET, Key=f"lake/{LEASE_NAME}",
                               Body=json.dumps({**THIEF, "expires_at": expires_at}))


def kill_group(process):
    """SIGKILL to the run's process group (Python and its JVM), if any of it is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_error(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    return errors[-1] if errors else (stderr.strip().splitlines() or ["no output"])[-1][:300]

