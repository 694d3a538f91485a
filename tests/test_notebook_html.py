"""The training notebook run by papermill: the live chart leaves a plain Plotly figure in its cell, the
executed notebook stays small, and `jupyter nbconvert --to html` of it shows the curves offline in Chromium."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.viz_training import export_notebook_html

REPO = Path(__file__).resolve().parents[1]
PLOTLY_MIME = 'application/vnd.plotly.v1+json'
WIDGET_VIEW_MIME = 'application/vnd.jupyter.widget-view+json'
MAX_NOTEBOOK_BYTES = 6_000_000


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


def _code_cells(nb_path):
    return [c for c in json.loads(Path(nb_path).read_text())['cells'] if c['cell_type'] == 'code']


def _outputs(nb_path):
    return [o for c in _code_cells(nb_path) for o in c.get('outputs', [])]


def _chart_cell(nb_path):
    "The cell whose output is the chart's figure (it trained: the chart showed in its output)."
    cells = [c for c in _code_cells(nb_path)
             if any(PLOTLY_MIME in o.get('data', {}) and 'training' in json.dumps(o['data'][PLOTLY_MIME].get('layout', {}))
                    for o in c.get('outputs', []))]
    assert len(cells) == 1, f'{len(cells)} cells hold the training chart figure'
    return cells[0]


@pytest.mark.slow
def test_the_live_chart_grew_while_the_notebook_trained(executed_notebook):
    text = ''.join(''.join(o.get('text', '')) for o in _outputs(executed_notebook) if o.get('output_type') == 'stream')
    lengths = json.loads(re.search(r'live chart points: (\{.*\})', text).group(1))
    # 2 epochs of 3 training batches: every batch and every epoch reached the chart.
    assert lengths['train loss (per batch)'] == 6
    assert lengths['validation loss (epoch)'] == 2
    assert lengths['gradient norm after clipping'] == 6


def test_the_chart_cell_keeps_a_plain_plotly_figure(executed_notebook):
    cell = _chart_cell(executed_notebook)
    data = [o['data'] for o in cell['outputs'] if 'data' in o]
    assert not any(WIDGET_VIEW_MIME in d for d in data), 'the live widget was not replaced by the figure'
    figure = next(d for d in data if PLOTLY_MIME in d)
    traces = {t['name']: t for t in figure[PLOTLY_MIME]['data']}
    loss = [t for name, t in traces.items() if name.endswith(': train loss (per batch)')]
    assert len(loss) == 1 and len(loss[0]['x']) == len(loss[0]['y']) == 6
    valid = [t for name, t in traces.items() if name.endswith(': validation loss (epoch)')]
    assert len(valid) == 1 and len(valid[0]['x']) == 2
    # The same figure as HTML, with plotly.js inline: what nbconvert exports.
    page = ''.join(figure.get('text/html', ''))   # nbformat keeps text as a list of lines
    assert 'window.Plotly' in page and 'src="https://cdn.plot.ly' not in page


def test_the_executed_notebook_stays_small(executed_notebook):
    text = executed_notebook.read_text()
    assert len(text.encode()) < MAX_NOTEBOOK_BYTES, f'{len(text.encode()) / 1e6:.1f} MB'
    # plotly.js (its licence header) at most once; no live widget state carrying data or plotly.js.
    assert text.count('plotly.js v') <= 1
    state = json.loads(text).get('metadata', {}).get('widgets', {}).get('application/vnd.jupyter.widget-state+json', {})
    for model in state.get('state', {}).values():
        assert not model['state'].get('_plotly_js') and not model['state'].get('runs')


# --- the HTML page, in a real (headless) browser, without network ----------------------------------------


def _chromium():
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None:
        pytest.skip('Chromium is not installed (Debian: apt-get install chromium): no browser to open the page')
    return exe


def _nbconvert(notebook, out_dir):
    jupyter = Path(sys.executable).parent / 'jupyter'
    run = subprocess.run([str(jupyter), 'nbconvert', '--to', 'html', str(notebook), '--output-dir', str(out_dir)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out_dir / (notebook.stem + '.html')


def _open_offline(html_file):
    "What the page shows in headless Chromium with every non-file request refused."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'])
        try:
            page = browser.new_page(viewport={'width': 1300, 'height': 900})
            blocked = []
            page.route('**/*', lambda r: r.continue_() if r.request.url.startswith(('file:', 'data:', 'blob:'))
                       else (blocked.append(r.request.url), r.abort()))
            page.goto(Path(html_file).resolve().as_uri(), wait_until='load', timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some(gd => gd.data)",
                                   timeout=60_000)
            return page.evaluate("""() => ({
                plots: [...document.querySelectorAll('.js-plotly-plot')].map(gd => ({
                    width: gd.getBoundingClientRect().width,
                    traces: (gd.data || []).map(t => [t.name, (t.x || []).length]),
                    paths: gd.querySelectorAll('.scatterlayer path.js-line').length})),
                headings: [...document.querySelectorAll('h1, h2')].map(h => h.textContent.trim()),
                rawMarkdown: [...document.querySelectorAll('pre')].some(p => /^#+ /m.test(p.textContent))})""")
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.parametrize('how', ['jupyter nbconvert', 'export_notebook_html'])
def test_the_html_export_shows_the_curves_offline(executed_notebook, tmp_path, how):
    _chromium()
    pytest.importorskip('playwright.sync_api', reason='the playwright Python package is not installed')
    if how == 'jupyter nbconvert':
        page = _nbconvert(executed_notebook, tmp_path)
    else:
        page = export_notebook_html(executed_notebook, tmp_path / 'train.html')
    shown = _open_offline(page)
    losses = [n for plot in shown['plots'] for n in plot['traces'] if n[0].endswith(': train loss (per batch)')]
    assert losses and all(length == 6 for _, length in losses), shown['plots']
    chart = next(plot for plot in shown['plots'] if any(n[0].endswith(': train loss (per batch)') for n in plot['traces']))
    assert chart['paths'] > 0 and chart['width'] > 600   # drawn, across the page
    assert any('Train a tractography model' in h for h in shown['headings']), shown['headings']   # markdown rendered
