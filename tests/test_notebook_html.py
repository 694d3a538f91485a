"""The training notebook run by papermill: live chart and batch inspector built, chart data grown during
training, and the executed notebook exported to HTML whose widgets render (headless Chromium) offline."""
import json
import re
import shutil
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.viz_training import WIDGET_STATE_MIME, find_chromium, html_screenshot, notebook_to_html

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def executed_notebook(tmp_path_factory):
    import papermill as pm
    out = tmp_path_factory.mktemp('nb')
    phantom = make_demo_dataset(out / 'demo', which='phantom', nb_subjects=4, progress=False).hdf5_files['phantom']
    pm.execute_notebook(str(REPO / 'nbs' / 'train_model.ipynb'), str(out / 'executed.ipynb'), kernel_name='python3',
                        cwd=str(out), progress_bar=False,
                        parameters=dict(hdf5_file=str(phantom), experiments_path=str(out / 'exp'),
                                        experiment_name='html', batch_size=30, max_batches_per_epoch=3, max_epochs=2))
    return out / 'executed.ipynb'


def _outputs(nb_path):
    nb = json.loads(Path(nb_path).read_text())
    return [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]


def test_the_live_chart_grew_while_the_notebook_trained(executed_notebook):
    text = ''.join(''.join(o.get('text', '')) for o in _outputs(executed_notebook) if o.get('output_type') == 'stream')
    lengths = json.loads(re.search(r'live chart points: (\{.*\})', text).group(1))
    # 2 epochs of 3 training batches: every batch and every epoch reached the widget.
    assert lengths['train loss (per batch)'] == 6
    assert lengths['validation loss (epoch)'] == 2
    assert lengths['gradient norm after clipping'] == 6


def test_the_notebook_saved_the_state_of_its_widgets(executed_notebook):
    states = [o['data'][WIDGET_STATE_MIME] for o in _outputs(executed_notebook) if WIDGET_STATE_MIME in o.get('data', {})]
    assert len(states) == 1
    models = states[0]['state'].values()
    figures = [m for m in models if m['model_module'] == 'anywidget' and '_widget_data' in m['state']]
    assert len(figures) == 1
    data = figures[0]['state']['_widget_data']
    # Arrays travel as binary buffers (base64 in the state): the trace records their shape.
    loss = [t for t in data if t['name'].endswith('train loss (per batch)')]
    assert len(loss) == 1 and loss[0]['x']['shape'] == [6]
    assert figures[0].get('buffers'), 'the curves data buffers were not saved'
    assert any(m['model_name'] == 'ImageModel' for m in models)   # the batch inspector's picture


@pytest.fixture(scope='module')
def html_manager():
    "`embed-amd.js` of @jupyter-widgets/html-manager and `require.js`, put in the venv by `tools/run.sh setup`."
    js = Path(sys.prefix) / 'share' / 'dwiml-nb' / 'js'
    files = {name: js / name for name in ('embed-amd.js', 'require.js')}
    if not all(f.exists() for f in files.values()):
        pytest.skip(f'{js} lacks embed-amd.js / require.js (tools/run.sh setup fetches them with npm)')
    return files


def test_the_exported_html_shows_the_charts_in_chromium(executed_notebook, html_manager, tmp_path):
    if find_chromium() is None:
        pytest.skip('Chromium is not installed (Debian: apt-get install chromium)')
    page = notebook_to_html(executed_notebook, tmp_path / 'train.html', html_manager['embed-amd.js'],
                            html_manager['require.js'])
    html = page.read_text()
    assert WIDGET_STATE_MIME in html
    png = tmp_path / 'train.png'
    html_screenshot(page, png, size=(1300, 6000), wait_ms=20000)
    image = np.asarray(Image.open(png).convert('RGB')).astype(int)
    # plotly draws its curves as SVG paths in the traces' colour (#1f77b4): the live chart rendered.
    blue = (np.abs(image - [0x1f, 0x77, 0xb4]).sum(axis=-1) < 40)
    assert blue.sum() > 500, 'no plotly curve drawn in the exported page'
