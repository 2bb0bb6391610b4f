"""The tables in the Glue Data Catalog, against moto's real Glue and S3 APIs on loopback."""
import json
import os
from pathlib import Path

import boto3
import pytest

import etl
from conftest import SAMPLE, free_port, read_tables
from lake.catalog import register_catalog
from lake.report import REPORT_NAME
from lake.stores import S3Store

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIACATALOGTEST", "AWS_SECRET_ACCESS_KEY": "catalog-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
DATABASE = "sparkify_test"


@pytest.fixture(scope="module")
def aws(s3_endpoint, monkeypatch_module):
    """boto3 finds the test server the standard way, as a user's would find AWS."""
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch_module.setenv(key, value)
    return {"s3": boto3.client("s3"), "glue": boto3.client("glue")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    # The process environment only (never boto3 or etl): what a user's shell would export.
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def upload(client, local_root, bucket, prefix):
    """Puts a published output on S3 as the job leaves it: every table file under <prefix>/<table>/."""
    for path in Path(local_root).rglob("*"):
        if path.is_file() and path.relative_to(local_root).parts[0] in etl.TABLES:
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_root).as_posix()}")


def partition_folders(table_root, depth):
    """The folders the job wrote that hold data files, depth levels below the table's root."""
    return {path.parent.relative_to(table_root).as_posix() for path in Path(table_root).rglob("*.parquet")
            if len(path.relative_to(table_root).parts) == depth + 1}


def glue_partitions(glue, table):
    pages = glue.get_paginator("get_partitions").paginate(DatabaseName=DATABASE, TableName=table)
    return {tuple(p["Values"]): p["StorageDescriptor"]["Location"] for page in pages for p in page["Partitions"]}


@pytest.fixture(scope="module")
def register(aws, sample_output):
    """Registers the sample's tables, published on S3, in the catalog; returns what register_catalog says."""
    aws["s3"].create_bucket(Bucket="catalog-lake")
    upload(aws["s3"], sample_output, "catalog-lake", "lake")
    # s3a:// as a user may give it; the catalog must say s3:// for Athena.
    aws = etl.resolve_aws({}, os.environ)
    store = S3Store(aws)
    return lambda: register_catalog(DATABASE, "s3a://catalog-lake/lake", etl.PARTITION_BY, store, aws)


def test_tables_columns_types_and_partitions_match_what_was_published(spark, aws, register, sample_output):
    registered = register()
    glue = aws["glue"]
    assert glue.get_database(Name=DATABASE)["Database"]["Name"] == DATABASE
    written = read_tables(spark, sample_output)
    for name in etl.TABLES:
        table = glue.get_table(DatabaseName=DATABASE, Name=name)["Table"]
        keys = [(c["Name"], c["Type"]) for c in table["PartitionKeys"]]
        columns = [(c["Name"], c["Type"]) for c in table["StorageDescriptor"]["Columns"]]
        # Parquet's own schema (Spark's type names are Athena's) is the reference, partition columns last.
        assert columns + keys == [(f.name, f.dataType.simpleString()) for f in written[name].schema.fields]
        assert [key for key, _ in keys] == list(etl.PARTITION_BY[name])
        assert table["TableType"] == "EXTERNAL_TABLE"
        assert table["StorageDescriptor"]["Location"] == f"s3://catalog-lake/lake/{name}/"
        assert table["StorageDescriptor"]["SerdeInfo"]["SerializationLibrary"].endswith("ParquetHiveSerDe")
        folders = partition_folders(Path(sample_output) / name, len(keys)) if keys else set()
        locations = glue_partitions(glue, name)
        assert set(locations.values()) == {f"s3://catalog-lake/lake/{name}/{folder}/" for folder in folders}
        assert registered[name] == {"partitions": len(folders), "added": len(folders), "removed": 0}
    # The sample is November 2018 only.
    assert list(glue_partitions(glue, "songplays")) == [("2018", "11")]


def test_a_rerun_changes_nothing_and_a_vanished_partition_is_removed(aws, register):
    register()
    before = glue_partitions(aws["glue"], "songs")
    assert register()["songs"] == {"partitions": len(before), "added": 0, "removed": 0}
    assert glue_partitions(aws["glue"], "songs") == before

    gone = sorted(before)[0]
    folder = before[gone][len("s3://catalog-lake/"):]
    keys = [item["Key"] for item in aws["s3"].list_objects_v2(Bucket="catalog-lake", Prefix=folder)["Contents"]]
    aws["s3"].delete_objects(Bucket="catalog-lake", Delete={"Objects": [{"Key": key} for key in keys]})
    assert register()["songs"] == {"partitions": len(before) - 1, "added": 0, "removed": 1}
    assert glue_partitions(aws["glue"], "songs") == {k: v for k, v in before.items() if k != gone}


def test_a_glue_failure_is_one_line_and_the_tables_stay_published(run_etl, aws, tmp_path):
    config = tmp_path / "dl.cfg"
    # Songs by year only: a few folders instead of 69, to keep this S3 run short (README, "Layout").
    config.write_text(f"[CATALOG]\nDATABASE = {DATABASE}\n[LAYOUT]\nSONGS_PARTITION_BY = year\n")
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_etl("--input", SAMPLE, "--output", "s3://catalog-lake/failed-catalog",
                     config=config, env={"AWS_ENDPOINT_URL_GLUE": dead})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the tables are published, but registering them in the Glue Data Catalog "
                           f"(database {DATABASE}) failed: EndpointConnectionError: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    report = json.loads(aws["s3"].get_object(Bucket="catalog-lake",
                                             Key=f"failed-catalog/{REPORT_NAME}")["Body"].read())
    assert report["status"] == "succeeded" and report["catalog"]["status"] == "failed"
    assert report["catalog"]["error"].startswith("EndpointConnectionError")
    assert len(report["published"]) == 2 + len(etl.TABLES)
    listed = aws["s3"].list_objects_v2(Bucket="catalog-lake", Prefix="failed-catalog/songplays/")
    assert any(item["Key"].endswith(".parquet") for item in listed["Contents"])


@pytest.mark.check  # `make check`: a setting, refused before Spark starts
@pytest.mark.parametrize("database, output, message", [
    (DATABASE, "local-out", f"[CATALOG] DATABASE = {DATABASE} needs an S3 output root (Athena reads only S3)"),
    ("Sparkify-DB", "s3://catalog-lake/x", "DATABASE in [CATALOG] of"),
], ids=["local-output", "bad-name"])
def test_catalog_settings_are_checked_before_spark_starts(run_etl, tmp_path, database, output, message):
    config = tmp_path / "dl.cfg"
    config.write_text(f"[CATALOG]\nDATABASE = {database}\n")
    target = output if "://" in output else tmp_path / output
    result = run_etl("--input", SAMPLE, "--output", target, config=config)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
