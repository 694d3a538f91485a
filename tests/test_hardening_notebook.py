"""The training notebook's parameters are type-checked in its first cell after the parameters: papermill's
`-p overwrite false` (the text 'false', which Python takes as true) fails at once and deletes nothing."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
from dwiml_nb.testing import make_toy_trainer  # noqa: E402


def _run(tmp_path, **parameters):
    pm = pytest.importorskip('papermill')
    out = tmp_path / 'executed.ipynb'
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(REPO / 'nbs' / 'train_model.ipynb'), str(out), kernel_name='python3',
                            cwd=str(tmp_path), progress_bar=False,
                            parameters=dict(hdf5_file=str(tmp_path / 'no_such.hdf5'), experiments_path=str(tmp_path / 'exps'),
                                            experiment_name='exp', **parameters))
    cells = [c for c in json.loads(out.read_text())['cells'] if c['cell_type'] == 'code']
    ran = [i for i, c in enumerate(cells) if c.get('execution_count')]
    return err.value, cells, ran


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize('text', ['false', 'no', 'False '])
def test_a_text_overwrite_fails_fast_and_deletes_nothing(tmp_path, text):
    make_toy_trainer(tmp_path / 'exps', 'exp', max_epochs=1).train_and_validate()
    before = _snapshot(tmp_path / 'exps')
    err, cells, ran = _run(tmp_path, overwrite=text)
    assert err.ename == 'ConfigError'
    assert f"parameter overwrite must be True or False, got the text {text!r}" in err.evalue
    assert '-p overwrite False' in err.evalue and '-y "overwrite: false"' in err.evalue
    # It stopped in the first cell after the parameters (parameters, injected parameters, the check).
    assert 'check_notebook_parameters(globals())' in ''.join(cells[ran[-1]]['source'])
    assert len(ran) == 3
    assert _snapshot(tmp_path / 'exps') == before


@pytest.mark.slow
def test_a_text_max_epochs_fails_fast(tmp_path):
    err, cells, ran = _run(tmp_path, max_epochs='ten', resume='True')
    assert err.ename == 'ConfigError'
    assert "parameter max_epochs must be an integer, got the text 'ten'" in err.evalue
    assert "parameter resume must be True or False, got the text 'True'" in err.evalue
    assert len(ran) == 3 and not (tmp_path / 'exps').exists()
