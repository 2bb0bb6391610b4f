"""The prototype notebook runs top to bottom against the current etl.py."""
import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_notebook_executes_without_error():
    notebook = nbformat.read(str(ROOT / "etl_prototype.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # the three plots
    text = "".join(output.get("text", "") for output in outputs)
    assert "71 song records (0 rejected)" in text and "FAIL" not in text
