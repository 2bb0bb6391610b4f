"""The prototype notebook runs top to bottom against the current etl.py."""
import shutil

import nbformat
from nbclient import NotebookClient

import etl
from conftest import ROOT


def test_notebook_executes_without_error():
    shutil.rmtree(ROOT / "notebook-output", ignore_errors=True)  # what it shows must be this run's
    notebook = nbformat.read(str(ROOT / "etl_prototype.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # the three plots
    text = "".join(output.get("text", "") for output in outputs)
    assert "71 song records (0 rejected)" in text and "FAIL" not in text
    # The trial run's tables on local disk, one read back.
    assert "6820 songplays read back from notebook-output/songplays" in text
    assert all((ROOT / "notebook-output" / name / "_SUCCESS").is_file() for name in etl.TABLES)
