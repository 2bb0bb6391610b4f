#!/usr/bin/env python3
"""Runs etl.py on Amazon EMR with one command (boto3).

    python tools/emr.py --code s3://my-bucket/code/ --input s3://udacity-dend/ --output s3://my-bucket/lake/

Uploads etl.py, the lake/ package beside it (zipped anew into dist/lake.zip, as `make dist` does) and dl.cfg
(every secret blanked) to the code prefix, starts a transient cluster that runs the job as a Spark step
and terminates (or adds the step to --cluster-id), waits, and prints the run report. Settings: flag, then
dl.cfg [EMR], then the defaults below. AWS credentials and the endpoint come from the standard AWS chain
(profile, environment, AWS_ENDPOINT_URL), never from dl.cfg.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist  # noqa: E402  (tools/dist.py: the package as a zip for --py-files)
import etl  # noqa: E402  (its config reader and constants: one definition of dl.cfg)
from lake.errors import one_line  # noqa: E402
from lake.paths import is_s3, split_s3  # noqa: E402
from lake.report import REPORT_NAME  # noqa: E402

# Defaults: EMR 7 runs Spark 3.5 and Python 3.9, as the job expects; the default roles are what
# `aws emr create-default-roles` makes.
DEFAULTS = {
    "RELEASE_LABEL": "emr-7.5.0",
    "INSTANCE_TYPE": "m5.xlarge",
    "INSTANCE_COUNT": "3",
    "SERVICE_ROLE": "EMR_DefaultRole",
    "INSTANCE_PROFILE": "EMR_EC2_DefaultRole",
    "LOG_URI": "",  # blank: <code prefix>/logs/
    "REGION": "",  # blank: the AWS chain's region
    "CODE": "",
}
CLUSTER_NAME = "sparkify-etl"
STEP_NAME = "sparkify-etl"
JOB_FILE = "etl.py"
PACKAGE_FILE = dist.ZIP.name  # lake.zip
CONFIG_FILE = "dl.cfg"
POLL_SECONDS = 30.0
STEP_DONE = "COMPLETED"
STEP_OVER = ("COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED")
CLUSTER_OVER = ("TERMINATING", "TERMINATED", "TERMINATED_WITH_ERRORS")


class LaunchError(Exception):
    """A problem the user can fix: one line, exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise LaunchError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _ArgumentParser(prog="emr.py", description="Run etl.py on Amazon EMR.")
    parser.add_argument("--code", help="S3 prefix for etl.py, lake.zip and dl.cfg (or [EMR] CODE)")
    parser.add_argument("--input", required=True, help="input root, s3://...")
    parser.add_argument("--output", required=True, help="output root, s3://...")
    parser.add_argument("--config", default=etl.DEFAULT_CONFIG, help="dl.cfg to read [EMR] from and upload")
    parser.add_argument("--cluster-id", help="add the step to this running cluster instead of starting one")
    for key in ("RELEASE_LABEL", "INSTANCE_TYPE", "INSTANCE_COUNT", "SERVICE_ROLE", "INSTANCE_PROFILE",
                "LOG_URI", "REGION"):
        parser.add_argument(f"--{key.lower().replace('_', '-')}", dest=key.lower(),
                            help=f"(dl.cfg [EMR] {key}; default {DEFAULTS[key] or 'see above'})")
    parser.add_argument("--no-wait", action="store_true", help="return once the step is added")
    parser.add_argument("--dry-run", action="store_true", help="print the requests as JSON; call nothing")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, config: Dict[str, Dict[str, str]]) -> Dict[str, str]:
    """Flag, then dl.cfg [EMR], then the default."""
    emr = config.get("EMR", {})
    chosen = {key: getattr(args, key.lower(), None) or emr.get(key) or default for key, default in DEFAULTS.items()}
    chosen["CODE"] = (args.code or chosen["CODE"]).rstrip("/")
    if not chosen["CODE"].startswith("s3://"):
        raise LaunchError("--code must be an s3:// prefix (or set CODE in dl.cfg [EMR])")
    for flag, path in (("--input", args.input), ("--output", args.output)):
        if not is_s3(path):
            raise LaunchError(f"{flag} must be an S3 prefix on EMR: {path}")
    if not chosen["INSTANCE_COUNT"].isdigit() or int(chosen["INSTANCE_COUNT"]) < 1:
        raise LaunchError(f"instance count must be a whole number of at least 1: {chosen['INSTANCE_COUNT']}")
    chosen["LOG_URI"] = chosen["LOG_URI"] or f"{chosen['CODE']}/logs/"
    return chosen


def blank_secrets(config: Dict[str, Dict[str, str]]) -> str:
    """The dl.cfg to upload: every setting kept, every secret blank, so the cluster's role is used."""
    out = io.StringIO()
    out.write("# Uploaded by tools/emr.py: secrets are blank; EMR's instance role provides credentials.\n")
    for section, values in config.items():
        out.write(f"\n[{section}]\n")
        for key, value in values.items():
            out.write(f"{key} = {'' if key in etl.SECRET_CONFIG_KEYS.get(section, ()) else value}\n")
    return out.getvalue()


def s3_location(uri: str) -> Dict[str, str]:
    bucket, key = split_s3(uri)
    return {"Bucket": bucket, "Key": key}


def step(chosen: Dict[str, str], args: argparse.Namespace, on_failure: str) -> dict:
    """spark-submit in cluster mode: dl.cfg travels with --files and is found in the driver's folder; the
    package travels with --py-files and is on the driver's (and executors') Python path. S3 is EMRFS's."""
    code = chosen["CODE"]
    return {
        "Name": STEP_NAME,
        "ActionOnFailure": on_failure,
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": [
            "spark-submit", "--deploy-mode", "cluster", "--files", f"{code}/{CONFIG_FILE}",
            "--py-files", f"{code}/{PACKAGE_FILE}", f"{code}/{JOB_FILE}",
            "--config", CONFIG_FILE, "--input", args.input, "--output", args.output]},
    }


def requests(args: argparse.Namespace, chosen: Dict[str, str], config_text: str, package: str) -> List[dict]:
    """Every call the launch makes, as {service, operation, params}: boto3's client.<operation>(**params)."""
    code = chosen["CODE"]
    calls = [
        {"service": "s3", "operation": "upload_file",
         "params": {"Filename": os.path.join(etl.HERE, JOB_FILE), **s3_location(f"{code}/{JOB_FILE}")}},
        {"service": "s3", "operation": "upload_file",
         "params": {"Filename": package, **s3_location(f"{code}/{PACKAGE_FILE}")}},
        {"service": "s3", "operation": "put_object",
         "params": {**s3_location(f"{code}/{CONFIG_FILE}"), "Body": config_text}},
    ]
    if args.cluster_id:
        # A shared cluster outlives a failed step.
        calls.append({"service": "emr", "operation": "add_job_flow_steps",
                      "params": {"JobFlowId": args.cluster_id, "Steps": [step(chosen, args, "CONTINUE")]}})
        return calls
    calls.append({"service": "emr", "operation": "run_job_flow", "params": {
        "Name": CLUSTER_NAME,
        "ReleaseLabel": chosen["RELEASE_LABEL"],
        "Applications": [{"Name": "Spark"}],
        "LogUri": chosen["LOG_URI"],
        "Instances": {
            "MasterInstanceType": chosen["INSTANCE_TYPE"],
            "SlaveInstanceType": chosen["INSTANCE_TYPE"],
            "InstanceCount": int(chosen["INSTANCE_COUNT"]),
            # Transient: the cluster ends when its step has run, whatever the outcome.
            "KeepJobFlowAliveWhenNoSteps": False,
            "TerminationProtected": False,
        },
        # In the same request: a transient cluster without a step would terminate before one is added.
        "Steps": [step(chosen, args, "TERMINATE_CLUSTER")],
        "JobFlowRole": chosen["INSTANCE_PROFILE"],
        "ServiceRole": chosen["SERVICE_ROLE"],
        "VisibleToAllUsers": True,
    }})
    return calls


def check_cluster(emr, cluster_id: str) -> None:
    """Before uploading anything: a cluster that is gone or going cannot take the step."""
    try:
        state = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]
    except emr.exceptions.ClientError as exc:  # AWS (and moto 5.2): InvalidRequestException
        raise LaunchError(f"cannot use cluster {cluster_id}: {exc.response['Error']['Code']}") from None
    if state in CLUSTER_OVER:
        raise LaunchError(f"cluster {cluster_id} is {state}: start a new one (leave out --cluster-id)")


def send(clients: Dict[str, object], calls: List[dict]) -> tuple:
    """Makes the calls; returns (cluster id, step id)."""
    if calls[-1]["operation"] == "add_job_flow_steps":
        check_cluster(clients["emr"], calls[-1]["params"]["JobFlowId"])
    for call in calls:
        response = getattr(clients[call["service"]], call["operation"])(**call["params"])
    emr = clients["emr"]
    if "JobFlowId" in response:
        cluster_id = response["JobFlowId"]
        step_id = emr.list_steps(ClusterId=cluster_id)["Steps"][0]["Id"]
    else:
        cluster_id, step_id = calls[-1]["params"]["JobFlowId"], response["StepIds"][0]
    return cluster_id, step_id


def wait(emr, cluster_id: str, step_id: str, poll_seconds: float) -> Optional[str]:
    """Prints each state change with the time since the start; returns None if the step completed, else why not."""
    start, seen = time.monotonic(), {}
    while True:
        cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
        status = emr.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]["Status"]
        for what, state in ((f"cluster {cluster_id}", cluster["State"]), (f"step {step_id}", status["State"])):
            if seen.get(what) != state:
                elapsed = int(time.monotonic() - start)
                print(f"[{elapsed // 60:3d}m{elapsed % 60:02d}s] {what}: {state}", flush=True)
                seen[what] = state
        if status["State"] == STEP_DONE:
            return None
        if status["State"] in STEP_OVER:
            details = status.get("FailureDetails", {})
            return f"step {step_id} {status['State']}: {details.get('Reason') or details.get('Message') or ''}" \
                   f"{' (log: ' + details['LogFile'] + ')' if details.get('LogFile') else ''}"
        if cluster["State"] in CLUSTER_OVER:
            reason = cluster.get("StateChangeReason", {}).get("Message", "")
            return f"cluster {cluster_id} {cluster['State']} while step {step_id} was {status['State']}" \
                   f"{': ' + reason if reason else ''}"
        time.sleep(poll_seconds)


def run_report(s3, output: str) -> Optional[dict]:
    try:
        body = s3.get_object(**s3_location(etl.join(output.rstrip("/"), REPORT_NAME)))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def finish(s3, output: str, failure: Optional[str]) -> int:
    """Prints the run report; 0 only if the step completed and the run and its catalog step succeeded."""
    report = run_report(s3, output)
    if report is not None:
        print(json.dumps(report, indent=2))
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    if report is None:
        print(f"error: the step completed but left no run report under {output}", file=sys.stderr)
        return 1
    if report.get("status") != "succeeded":
        print(f"error: the run {report.get('status')}: {report.get('error')}", file=sys.stderr)
        return 1
    catalog = report.get("catalog") or {}
    if catalog.get("status") == "failed":
        print(f"error: the tables are published, but registering them in the Glue Data Catalog failed: "
              f"{catalog.get('error')}", file=sys.stderr)
        return 1
    return 0


def launch(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        config = etl.read_config(args.config)
    except etl.EtlError as exc:
        raise LaunchError(str(exc)) from None
    chosen = settings(args, config)
    try:
        package = str(dist.build())  # anew: never a zip older than lake/
    except (dist.Failure, OSError) as exc:
        raise LaunchError(f"cannot build {dist.ZIP} (`make dist`): {exc}") from None
    calls = requests(args, chosen, blank_secrets(config), package)
    if args.dry_run:
        print(json.dumps({"region": chosen["REGION"] or None, "requests": calls}, indent=2))
        return 0
    import boto3  # only here: --dry-run works without AWS libraries or credentials

    session = boto3.session.Session(region_name=chosen["REGION"] or None)
    clients = {name: session.client(name) for name in ("s3", "emr")}
    cluster_id, step_id = send(clients, calls)
    print(f"cluster {cluster_id}: step {step_id} added ({'running cluster' if args.cluster_id else 'transient'})",
          flush=True)
    if args.no_wait:
        return 0
    return finish(clients["s3"], args.output, wait(clients["emr"], cluster_id, step_id, args.poll_seconds))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return launch(sys.argv[1:] if argv is None else argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # AWS refusing a call (roles, quotas, a bad cluster id): one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
