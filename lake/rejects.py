"""One lake to a rejects root: each run publishes its rejects trees whole, so two lakes sharing a root
(REJECTED_DATA: one quarantine bucket for a team) would each replace the other's rejects."""
import os
from typing import Optional

from lake.errors import EtlError, one_line
from lake.paths import is_s3, join, s3_uri
from lake.stores import Store

REJECTS_CLAIM = "_LAKE.json"


def claim_rejects_root(store: Store, output_root: str, rejected_root: str) -> None:
    """A rejects root outside the output root belongs to the first lake that used it: its claim
    (<rejects root>/_LAKE.json, created atomically) names that lake's output root, and any other lake is
    refused with one line before it reads or writes anything. The default root, below the output root,
    is the lake's own (a lake copied elsewhere keeps it)."""
    if rejected_root.startswith(output_root.rstrip("/") + "/"):
        return
    lake = _canonical(output_root)
    path = join(rejected_root, REJECTS_CLAIM)
    try:
        owner = _owner(store, path, lake)
    except Exception as exc:  # the disk or S3 refusing the claim itself: one line, nothing read yet
        raise EtlError(f"cannot claim the rejects root {rejected_root} for this lake: {one_line(exc)}") from None
    if owner != lake:
        raise EtlError(f"the rejects root {rejected_root} belongs to the lake at {owner or 'an unknown output'} "
                       f"(its claim {path}), and a lake replaces its rejects whole: give this lake its own "
                       f"REJECTED_DATA; only if that lake moved to {output_root}, delete the claim")


def _owner(store: Store, path: str, lake: str) -> Optional[str]:
    """The output root the claim names (this lake's, where it makes the claim now), or None if the claim
    cannot be read. Read first: every later run of the lake costs one read, and writes nothing."""
    try:
        found = store.read_json(path)
        if found is None and store.write_json_if(path, {"output": lake}, None) is not None:
            return lake
        return (found or store.read_json(path) or {}).get("output")  # another lake's, made just now
    except ValueError:
        return None


def _canonical(root: str) -> str:
    """A root as the claim names it: s3a:// and s3n:// name the same objects as s3://."""
    return s3_uri(root) if is_s3(root) else os.path.abspath(root)
