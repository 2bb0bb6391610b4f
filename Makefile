# `make run` and `make test` are all a newcomer needs; both set up the venv on first use.
# Prerequisites: Python 3.9+ and a JDK (17 or 11), nothing else: pip brings Spark, and Spark's own resolver
# (Ivy) brings the S3 jars.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The S3A connector and the cloud committer (tools/get_jars.py): resolved once by Spark's Ivy from Maven
# Central (about 275 MB, mostly the AWS SDK bundle) into .ivy2/, and listed there; spark-submit then gets
# them with --jars and no network. `make setup`, `make test` and `make submit` wait for them. `make run`
# (local files, python etl.py) needs none of them, so it does not: a slow download never holds it up.
JARS_MANIFEST := .ivy2/sparkify-jars.txt
JARS    = $(shell $(PY) tools/get_jars.py --jars)
# The lake/ package beside etl.py, for spark-submit's --py-files (tools/dist.py).
DIST   := dist/lake.zip
# Spark's console logging at WARN under spark-submit (conf/log4j2.properties says why).
QUIET  := --driver-java-options "-Dlog4j.configurationFile=conf/log4j2.properties"

.PHONY: setup strace run submit emr dist lint check test soak bench bench-s3 bench-daily bench-daily-s3 clean

setup: $(STAMP) $(JARS_MANIFEST) strace

# The crash tests kill the job at each rename of its publish with strace's fault injection (tests/test_crash.py).
strace:
	@command -v strace >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing strace (the crash tests need it)"; \
	    apt-get update -qq && apt-get install -y -qq strace >/dev/null; \
	  else \
	    echo "error: strace is needed by the crash tests; install it (sudo apt-get install strace)" >&2; exit 1; \
	  fi; }

$(STAMP): requirements.txt requirements-dev.txt tools/build_jar.py $(wildcard tools/java/sparkify/*.java)
	@command -v java >/dev/null || { echo "error: Java 17 (or 11) is needed for Spark; install a JDK first" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 9))' || { echo "error: Python 3.9+ is needed (set PYTHON=...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) tools/build_jar.py .jars
	touch $(STAMP)

# get_jars does nothing if .ivy2/ already holds this pyspark's jars; the touch keeps make from asking again.
$(JARS_MANIFEST): $(STAMP) tools/get_jars.py
	$(PY) tools/get_jars.py .ivy2
	touch $(JARS_MANIFEST)

run: $(STAMP)
	$(PY) etl.py

# The same job under spark-submit, with the jars `make setup` resolved and the package; ARGS go to etl.py.
submit: setup dist
	PYSPARK_PYTHON=$(PY) $(VENV)/bin/spark-submit $(QUIET) --jars $(JARS) --py-files $(DIST) etl.py $(ARGS)

# The job on Amazon EMR (tools/emr.py, boto3; it zips lake/ itself): ARGS="--code s3://... --input s3://... --output s3://..."
emr: $(STAMP)
	$(PY) tools/emr.py $(ARGS)

# Built anew each time (milliseconds): a file removed from lake/ never lingers in the zip.
dist:
	$(PYTHON) tools/dist.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The fast lane (rules, CLI, settings: tests marked `check`), under 2 minutes. `make test` runs everything.
# Its tests need neither the S3 jars nor strace, so it does not wait for them (`setup`'s other two parts).
check: $(STAMP) lint
	$(PY) -m pytest -m check

test: setup lint
	$(PY) -m pytest

# Not part of `make test` (which runs a short fixed-seed version): random delivery sequences, SEQUENCES of
# them from SEED on, DAYS daily runs each, every run checked against a fresh full build and DuckDB's
# (tools/soak.py, docs/testing.md). HOLES: all, none, or some of glued,ctime,partition,rejects,state.
SEED      ?= 1
DAYS      ?= 12
SEQUENCES ?= 1
HOLES     ?= all
# CRASH_DAY=n: on day n also kill the run at each rename of its local publish (strace), as tests/test_crash.py.
CRASH_DAY ?= 0
# S3_DAY=n: on day n also kill the run on S3 (moto) at each write request, and take its lease away at each step.
S3_DAY    ?= 0
S3_FAULTS ?= kills,lease
soak: setup
	$(PY) tools/soak.py --seed $(SEED) --days $(DAYS) --sequences $(SEQUENCES) --holes $(HOLES) \
	  --crash-day $(CRASH_DAY) --s3-day $(S3_DAY) --s3-faults $(S3_FAULTS)

clean:
	rm -rf output dist soak .pytest_cache .ruff_cache

# Not part of `make test`: minutes of generated data and runs. Writes bench/results.json.
bench: setup
	$(PY) tools/bench.py

# Not part of `make test`: S3 to S3 through tools/s3_proxy.py at 20 ms per request, against the endpoint's
# own floor (two turns each, alternately; fastest against fastest) and the naive baseline (capped). Writes
# bench/results-s3.json.
bench-s3: setup
	$(PY) tools/bench_s3.py --rounds 2

# Not part of `make test`: a tier-2-sized lake (100,000 song files, 60 days) and one new day, the daily run
# against a fresh full build and DuckDB's, side by side. Writes bench/results-daily.json.
bench-daily: setup
	$(PY) tools/bench_daily.py

# The same on S3: tier 1, S3 to S3 through the latency proxy at 20 ms per request. Writes
# bench/results-daily-s3.json.
bench-daily-s3: setup
	$(PY) tools/bench_daily.py --s3
