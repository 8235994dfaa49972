"""examples/quickstart.ipynb: committed without outputs, and runs top to bottom on tiny settings."""
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / 'examples' / 'quickstart.ipynb'


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip('nbformat', reason='nbformat is in the test extra: pip install -e .[test]')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip('nbformat', reason='nbformat is in the test extra: pip install -e .[test]')
    nbclient = pytest.importorskip('nbclient', reason='nbclient is in the test extra: pip install -e .[test]')
    monkeypatch.setenv('QUICKSTART_TINY', '1')
    monkeypatch.setenv('QUICKSTART_DIR', str(tmp_path / 'quickstart'))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()   # raises on any cell's error
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert 'test: ' in text and 'operating point: score' in text
    images = sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    assert images >= 4                               # show_batch, the reconstructions, the FROC curves, show_results
    assert (tmp_path / 'quickstart' / 'predicted' / 'predictions.csv').stat().st_size > 0
