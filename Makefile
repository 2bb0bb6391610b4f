# `make run` and `make test` are all a newcomer needs; both set up the venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Spark's console logging at WARN under spark-submit (conf/log4j2.properties says why).
QUIET  := --driver-java-options "-Dlog4j.configurationFile=conf/log4j2.properties"
JARS    = $(shell sed 's|^|.jars/|' .jars/maven-jars.txt | paste -sd, -)

.PHONY: setup run submit emr test bench bench-s3 bench-daily clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt tools/get_jars.py tools/build_jar.py $(wildcard tools/java/sparkify/*.java)
	@command -v java >/dev/null || { echo "error: Java 17 (or 11) is needed for Spark; install a JDK first" >&2; exit 1; }
	@command -v mvn >/dev/null || { echo "error: Maven (mvn) is needed to fetch the S3A jars; install it first (apt-get install maven)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 9))' || { echo "error: Python 3.9+ is needed (set PYTHON=...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) tools/get_jars.py .jars
	$(PY) tools/build_jar.py .jars
	touch $(STAMP)

run: setup
	$(PY) etl.py

# The same job under spark-submit, with the jars `make setup` resolved; ARGS go to etl.py.
submit: setup
	PYSPARK_PYTHON=$(PY) $(VENV)/bin/spark-submit $(QUIET) --jars $(JARS) etl.py $(ARGS)

# The job on Amazon EMR (tools/emr.py, boto3): ARGS="--code s3://... --input s3://... --output s3://..."
emr: setup
	$(PY) tools/emr.py $(ARGS)

test: setup
	$(PY) -m pytest

clean:
	rm -rf output .pytest_cache

# Not part of `make test`: minutes of generated data and runs. Writes bench/results.json.
bench: setup
	$(PY) tools/bench.py

# Not part of `make test`: S3 to S3 through tools/s3_proxy.py at 20 ms per request, against the endpoint's
# own floor and the naive baseline (capped). Writes bench/results-s3.json.
bench-s3: setup
	$(PY) tools/bench_s3.py

# Not part of `make test`: a tier-2-sized lake (100,000 song files, 60 days) and one new day, the daily run
# against a fresh full build and DuckDB's, side by side. Writes bench/results-daily.json.
bench-daily: setup
	$(PY) tools/bench_daily.py
