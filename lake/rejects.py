"""One lake to a rejects root: each run publishes its rejects trees whole, so two lakes sharing a root
(REJECTED_DATA: one quarantine bucket for a team) would each replace the other's rejects."""
import os

from lake.errors import EtlError
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
        owner = store.create_json(path, {"output": lake}).get("output")
    except OSError as exc:
        raise EtlError(f"cannot claim the rejects root {rejected_root} for this lake: {exc.strerror or exc}") from None
    if owner != lake:
        raise EtlError(f"the rejects root {rejected_root} belongs to the lake at {owner or 'an unknown output'} "
                       f"(its claim {path}), and a lake replaces its rejects whole: give this lake its own "
                       f"REJECTED_DATA; only if that lake moved to {output_root}, delete the claim")


def _canonical(root: str) -> str:
    """A root as the claim names it: s3a:// and s3n:// name the same objects as s3://."""
    return s3_uri(root) if is_s3(root) else os.path.abspath(root)
