"""The run report: what a run read, built, checked and published, written while it runs and at its end.

<output>/_run_report.json is the latest run's ("running" while it runs); <output>/_runs/<run id>.json keeps
every run's final report, so the last completed run is the newest there.
"""
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from lake.errors import one_line
from lake.lock import Lock
from lake.paths import join
from lake.publish import clear_staging
from lake.stores import Store

LOG = logging.getLogger(__name__)
REPORT_NAME = "_run_report.json"
RUNS_DIR = "_runs"


@dataclass
class Check:
    """One check of the quality gate, as the report shows it."""
    name: str
    passed: bool
    detail: str
    value: Optional[float] = None  # what this run measured
    threshold: Optional[float] = None  # the limit the value is held to; the detail says which way
    previous: Optional[float] = None  # for a drift check, the same measure at the last successful run


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class RunReport:
    input_root: str
    output_root: str
    rejected_root: str
    job_version: str
    spark_version: str
    run_id: str = field(default_factory=new_run_id)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    status: str = "running"
    error: Optional[str] = None
    input: Dict[str, int] = field(default_factory=dict)
    rejected: Dict[str, int] = field(default_factory=dict)
    tables: Dict[str, Dict[str, int]] = field(default_factory=dict)
    checks: List[Check] = field(default_factory=list)
    phases: Dict[str, float] = field(default_factory=dict)
    published: List[str] = field(default_factory=list)
    catalog: Dict[str, object] = field(default_factory=dict)  # the Glue Data Catalog step, once it has run
    quality: Dict[str, object] = field(default_factory=dict)  # what the quality gate measured
    # Full or incremental, and why; files added, changed and removed; partitions rewritten; rows added.
    intake: Dict[str, object] = field(default_factory=dict)
    current_phase: Optional[str] = None  # the phase running now: where a failed run stopped
    error_line: Optional[str] = None  # what main tells the user, last, if the run failed
    publish_left: bool = False  # a publish cut short: its journal and staging stay for the next run

    def document(self) -> dict:
        return {
            "status": self.status,
            "error": self.error,
            "run_id": self.run_id,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round((datetime.now(timezone.utc) - self.started_at).total_seconds(), 3),
            "job_version": self.job_version,
            "spark_version": self.spark_version,
            "input_root": self.input_root,
            "output_root": self.output_root,
            "input": self.input,
            "intake": {key: value for key, value in self.intake.items() if key != "previous_rows"},
            "rejected": {**self.rejected, "path": self.rejected_root},
            # Only what this run made visible: a run that stopped early claims nothing.
            "published": self.published,
            "catalog": self.catalog,
            "tables": self.tables,
            "checks": [vars(check) for check in self.checks],
            "quality": self.quality,
            "phases_s": self.phases,
        }


@contextmanager
def phase(report: RunReport, name: str) -> Iterator[Dict[str, object]]:
    """Times a phase; the caller fills in counts to be logged on the same line."""
    counts: Dict[str, object] = {}
    start = time.perf_counter()
    report.current_phase = name
    yield counts
    report.current_phase = None
    seconds = time.perf_counter() - start
    report.phases[name] = round(seconds, 3)
    details = ", ".join(f"{value} {key}" for key, value in counts.items())
    LOG.info("%-16s %6.1fs  %s", name, seconds, details)


def begin_report(store: Store, report: RunReport, finished: Mapping[str, List[str]]) -> None:
    """A run in progress says so; a previous run that never finished is filed as interrupted, with the
    folders recovery published for it, if it had got as far as its publish."""
    latest = join(report.output_root, REPORT_NAME)
    previous = store.read_json(latest)
    if previous and previous.get("status") == "running":
        previous.update(status="interrupted", error="the run stopped before it finished (killed?)")
        if previous.get("run_id") in finished:
            previous.update(published=finished[previous["run_id"]], published_by=report.run_id)
        store.write_json(join(report.output_root, RUNS_DIR, f"{previous.get('run_id')}.json"), previous)
    store.write_json(latest, report.document())


def end_report(store: Store, report: RunReport, staging_roots: Sequence[str], code: int,
               lock: Optional[Lock] = None) -> int:
    """Clears this run's staging, then files the final report; returns the exit code. A run that lost the
    lake to another run files its report under _runs/ only: the latest report is the new holder's."""
    if report.status == "running":
        report.status = "failed"
    document = report.document()
    try:
        if report.publish_left:
            LOG.warning("the publish of run %s was cut short: its journal and staging are left for the next run",
                        report.run_id)
        else:
            clear_staging(store, staging_roots, report.output_root, report.run_id)
        store.write_json(join(report.output_root, RUNS_DIR, f"{report.run_id}.json"), document)
        if not (lock and lock.lost):
            store.write_json(join(report.output_root, REPORT_NAME), document)
    except Exception as exc:
        LOG.error("could not finish the run report in %s: %s", report.output_root, one_line(exc))
        return code or 1
    LOG.info("run %s; report at %s", report.status, join(report.output_root, REPORT_NAME))
    return code
