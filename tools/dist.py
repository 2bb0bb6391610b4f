#!/usr/bin/env python3
"""Zip the package beside etl.py (lake/) into dist/lake.zip, for spark-submit's --py-files.

Usage: python tools/dist.py        (run by `make dist`; tools/emr.py and the tests call build())

Only the package's .py files go in, under lake/, so `import lake` finds them on the zip. Built anew each
time (it takes milliseconds), written to a temporary name and renamed: a crash never leaves a half zip,
and a file deleted from lake/ never lingers in it.
Standard library only (Python 3.9+).
"""
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lake"
ZIP = ROOT / "dist" / "lake.zip"


class Failure(Exception):
    pass


def sources(package: Path = PACKAGE) -> list:
    return sorted(path for path in package.rglob("*.py") if "__pycache__" not in path.parts)


def build(package: Path = PACKAGE, target: Path = ZIP) -> Path:
    if not (package / "__init__.py").is_file():
        raise Failure(f"no package to zip: {package / '__init__.py'} not found")
    files = sources(package)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, path.relative_to(package.parent).as_posix())
    os.replace(partial, target)
    return target


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        target = build()
    except (Failure, OSError) as exc:
        print(f"dist: error: {exc}", file=sys.stderr)
        return 1
    print(f"dist: wrote {target.relative_to(ROOT)} ({len(sources())} files from {PACKAGE.name}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
