"""The example notebooks run top to bottom on this CPU-only machine (their cells assert results)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses and whole-model runs: minutes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["quickstart", "long_context", "bandwidth_tuning"])
def test_notebook_runs(name, tmp_path, smollm_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every code cell ran
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
