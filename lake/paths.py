"""How paths are spelt: local folders or s3:// prefixes, and which files a reader sees."""
import os
from typing import Iterator, Tuple

S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEMES)


def split_s3(path: str) -> Tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return bucket, key.strip("/")


def s3_uri(path: str) -> str:
    """Athena and Glue know s3:// only; s3a:// and s3n:// name the same objects."""
    return "s3://" + path.split("://", 1)[1]


def normalize_root(path: str) -> str:
    """Local roots become absolute, so the job means the same folder wherever Spark runs it."""
    if is_remote(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def is_visible(name: str) -> bool:
    """Spark skips names starting with '.' or '_' (.DS_Store, __MACOSX); so do our checks."""
    return not name.startswith((".", "_"))


def is_visible_file(relative_path: str) -> bool:
    """A file readers see: no part of its path below a folder starts with '.' or '_' (not a folder marker)."""
    parts = relative_path.split("/")
    return parts[-1] != "" and all(is_visible(part) for part in parts)


def is_input_file(relative_path: str) -> bool:
    """The contract's input rule for a path below a tree: a visible *.json file."""
    return relative_path.endswith(".json") and is_visible_file(relative_path)


def visible_files(folder: str) -> Iterator[str]:
    """Paths, relative to a local folder and "/"-separated, of the files below it that readers see."""
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if is_visible(d))
        below = os.path.relpath(parent, folder)
        for name in sorted(filter(is_visible, files)):
            yield name if below == "." else f"{below.replace(os.sep, '/')}/{name}"
