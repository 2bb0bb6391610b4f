"""The Glue Data Catalog: the published tables registered for Athena, with every partition."""
import urllib.parse
from typing import Dict, List, Mapping, Sequence, Tuple

from lake.aws import AwsSettings, glue_client
from lake.errors import EtlError
from lake.paths import is_visible_file, join, s3_uri
from lake.stores import S3Store
from lake.tables import SPECS, TABLES

# Athena's rule for database names: lower case letters, digits and underscores.
DATABASE_PATTERN = r"^[a-z0-9_]{1,255}$"
PARQUET_STORAGE = {
    "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
    "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
    "SerdeInfo": {"SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
                  "Parameters": {"serialization.format": "1"}},
}
# Glue's limits per request: BatchCreatePartition takes 100 partitions, BatchDeletePartition 25.
GLUE_CREATE_BATCH = 100
GLUE_DELETE_BATCH = 25


def published_partitions(store: S3Store, table_path: str, columns: Sequence[str]) -> Dict[Tuple[str, ...], str]:
    """{partition values: folder} for every folder holding a data file of the published table.

    Listed from storage rather than taken from the DataFrame: the catalog must point at the folders that
    exist, spelt as Spark escaped them (a "/" in a value is "%2F" in the folder name), and a listing is
    one request per 1,000 files.
    """
    partitions: Dict[Tuple[str, ...], str] = {}
    for key in store.keys(table_path):
        *folders, _ = key.split("/")
        if not is_visible_file(key) or len(folders) != len(columns):
            continue  # a folder marker, _SUCCESS, or a file that is not a partition's data
        names_values = [folder.partition("=") for folder in folders]
        if [name for name, _, _ in names_values] != list(columns):
            continue
        values = tuple(urllib.parse.unquote(value) for _, _, value in names_values)
        partitions[values] = "/".join(folders)
    return partitions


def glue_table_input(name: str, location: str, partition_by: Sequence[str]) -> dict:
    spec = SPECS[name]

    def columns(names: Sequence[str]) -> List[Dict[str, str]]:
        return [{"Name": column, "Type": spec.type_of(column)} for column in names]

    return {
        "Name": name,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {"EXTERNAL": "TRUE", "classification": "parquet", "parquet.compression": "SNAPPY"},
        "PartitionKeys": columns(partition_by),
        "StorageDescriptor": {"Columns": columns([c for c in spec.column_names if c not in partition_by]),
                              "Location": location + "/", **PARQUET_STORAGE},
    }


def _glue_checked(response: dict, what: str) -> None:
    """Glue's batch calls answer 200 and list the entries they could not do."""
    errors = response.get("Errors") or []
    if errors:
        detail = errors[0].get("ErrorDetail", {})
        raise EtlError(f"Glue could not {what} ({len(errors)} failed; first: {detail.get('ErrorCode')}: "
                       f"{detail.get('ErrorMessage')})")


def _put_glue_table(glue, database: str, table_input: dict) -> None:
    """Creates the table or updates it in place; a table whose partition keys changed is made anew."""
    try:
        current = glue.get_table(DatabaseName=database, Name=table_input["Name"])["Table"]
    except glue.exceptions.EntityNotFoundException:
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return
    if current.get("PartitionKeys", []) != table_input["PartitionKeys"]:
        glue.delete_table(DatabaseName=database, Name=table_input["Name"])  # its partitions go with it
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return
    glue.update_table(DatabaseName=database, TableInput=table_input)


def _sync_glue_partitions(glue, database: str, table: str, location: str,
                          wanted: Mapping[Tuple[str, ...], str]) -> Dict[str, int]:
    """Makes the table's partitions in Glue exactly the published folders: adds, moves and removes."""
    pages = glue.get_paginator("get_partitions").paginate(DatabaseName=database, TableName=table)
    existing = {tuple(p["Values"]): p["StorageDescriptor"].get("Location") for page in pages
                for p in page["Partitions"]}
    locations = {values: f"{location}/{folder}/" for values, folder in wanted.items()}
    stale = [values for values in existing if existing[values] != locations.get(values)]
    new = [values for values in locations if existing.get(values) != locations[values]]
    for start in range(0, len(stale), GLUE_DELETE_BATCH):
        batch = [{"Values": list(values)} for values in stale[start:start + GLUE_DELETE_BATCH]]
        _glue_checked(glue.batch_delete_partition(DatabaseName=database, TableName=table,
                                                  PartitionsToDelete=batch), f"remove partitions of {table}")
    for start in range(0, len(new), GLUE_CREATE_BATCH):
        batch = [{"Values": list(values), "StorageDescriptor": {"Location": locations[values], **PARQUET_STORAGE}}
                 for values in new[start:start + GLUE_CREATE_BATCH]]
        _glue_checked(glue.batch_create_partition(DatabaseName=database, TableName=table,
                                                  PartitionInputList=batch), f"add partitions of {table}")
    return {"partitions": len(locations), "added": len(new), "removed": len(set(stale) - set(locations))}


def register_catalog(database: str, output_root: str, partition_by: Mapping[str, Sequence[str]],
                     store: S3Store, aws: AwsSettings) -> Dict[str, Dict[str, int]]:
    """Registers the five published tables and all their partitions in Glue, so Athena can query them with
    no crawler and no MSCK REPAIR. Idempotent: a rerun updates in place and drops vanished partitions."""
    glue = glue_client(aws)
    try:
        glue.get_database(Name=database)
    except glue.exceptions.EntityNotFoundException:
        glue.create_database(DatabaseInput={"Name": database, "Description": "Sparkify star schema (etl.py)"})
    registered = {}
    for name in TABLES:
        path, columns = join(output_root, name), partition_by[name]
        location = s3_uri(path)
        _put_glue_table(glue, database, glue_table_input(name, location, columns))
        wanted = published_partitions(store, path, columns) if columns else {}
        registered[name] = _sync_glue_partitions(glue, database, name, location, wanted)
    return registered
