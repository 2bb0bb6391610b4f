"""EMR 7 runs Python 3.9: the files that run there (etl.py, lake/) or beside it (tools/emr.py and what it imports)
need nothing newer."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.check  # `make check`: a static check, like `make lint`

EMR_PYTHON = "3.9"
VERMIN = [os.path.join(os.path.dirname(sys.executable), "vermin"), f"--target={EMR_PYTHON}-", "--violations",
          "--no-tips", "--no-parse-comments"]


def vermin(*paths):
    return subprocess.run([*VERMIN, *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_etl_and_the_launcher_run_on_python_3_9():
    result = vermin(ROOT / "etl.py", ROOT / "lake", ROOT / "tools" / "emr.py", ROOT / "tools" / "dist.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_catches_python_3_10_code(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 'one'\n")
    result = vermin(newer)
    assert result.returncode != 0 and "3.10" in result.stdout
