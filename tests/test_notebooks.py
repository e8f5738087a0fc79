"""Every notebook in experiments/ runs top to bottom (small budget), so none of them rots."""

import os
import shutil

import pytest
from refdata import REPO, reference_dir

NOTEBOOKS = sorted((REPO / "experiments").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (reference_dir() / "paper_student_fp16.pt").is_file():
        pytest.skip("reference student not found")
    work = tmp_path / path.name
    shutil.copy(path, work)
    monkeypatch.setenv("MTDISTILL_BUDGET", "small")
    monkeypatch.setenv("MTDISTILL_REFERENCE_DIR", str(reference_dir().resolve()))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    nb = nbformat.read(work, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "normalized score" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the bar chart
    assert any("text/html" in o.get("data", {}) and "video" in o["data"]["text/html"] for o in outputs)
    assert (tmp_path / "quickstart_out" / "quickstart.json").is_file()
