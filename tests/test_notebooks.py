"""The research notebooks run top to bottom on small settings (MEDTRANSFER_FAST=1)."""
from pathlib import Path

import pytest

from conftest import shared_data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    needs = nb.metadata.get("medtransfer", {}).get("needs_shared_data")
    if needs:
        monkeypatch.setenv("MEDTRANSFER_SHARED_DATA", str(shared_data(needs).parent))  # skips when absent
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be stripped in git"
    monkeypatch.setenv("MEDTRANSFER_FAST", "1")
    monkeypatch.setenv("MEDTRANSFER_NB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
