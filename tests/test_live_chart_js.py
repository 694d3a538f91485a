"""The live chart's JavaScript (`LIVE_CHART_ESM`) in headless Chromium, with no kernel and no Jupyter: a stand-in
model feeds it as anywidget would (traits, custom messages); the plot must grow, follow its controls and the width
of its container. (The widget inside a real JupyterLab is checked by the frontend suite.)"""
import json
import shutil
from importlib.resources import files

import numpy as np
import pandas as pd
import pytest

from dwiml_nb.viz_training import LIVE_CHART_ESM, ExperimentLogs, chart_data

FAKE_MODEL = """
window.FakeModel = class {
  constructor(state) { this.state = state; this.handlers = {}; this.saved = []; }
  get(k) { return this.state[k]; }
  set(k, v) { this.state[k] = v; this.emit('change:' + k); }
  save_changes() { this.saved.push(Object.keys(this.state)); }
  send(m) {}
  on(e, f) { (this.handlers[e] ??= []).push(f); }
  off(e, f) { this.handlers[e] = (this.handlers[e] || []).filter(g => f && g !== f); }
  emit(e, ...a) { (this.handlers[e] || []).forEach(f => f(...a)); }
};
"""

START = """async ([esm, state]) => {
  const url = URL.createObjectURL(new Blob([esm], {type: 'text/javascript'}));
  const widget = (await import(url)).default;
  window.model = new FakeModel(state);
  window.cleanup = widget.initialize({model: window.model});
  await widget.render({model: window.model, el: document.getElementById('out')});
}"""

TRACES = """() => { const gd = document.querySelector('.dwiml-live-chart .js-plotly-plot');
  return {width: gd.getBoundingClientRect().width, xtitle: gd.layout.xaxis.title.text,
          loss: gd.layout.annotations[0].text,
          traces: Object.fromEntries(gd.data.filter(t => t.showlegend === false).map(t => [t.name, [t.x, t.y]]))}; }"""


def _toy_run(n_epochs=3, per_epoch=4):
    rng = np.random.default_rng(0)
    n = n_epochs * per_epoch
    train = pd.DataFrame(dict(epoch=np.repeat(np.arange(n_epochs), per_epoch), batch=np.tile(np.arange(per_epoch), n_epochs),
                              loss=rng.uniform(0.1, 0.9, n), grad_norm=rng.uniform(1, 2, n), grad_norm_clipped=np.ones(n),
                              learning_rate=np.full(n, 1e-3), streamlines_per_s=rng.uniform(900, 1100, n),
                              elapsed_s=np.arange(1, n + 1) * 0.5))
    epochs = pd.DataFrame(dict(epoch=np.arange(n_epochs), train_loss=rng.uniform(0.1, 0.9, n_epochs),
                               valid_loss=rng.uniform(0.1, 0.9, n_epochs)))
    return chart_data(ExperimentLogs('toy', train, epochs))


@pytest.fixture
def page():
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None:
        pytest.skip('Chromium is not installed (Debian: apt-get install chromium)')
    sync_api = pytest.importorskip('playwright.sync_api', reason='the playwright Python package is not installed')
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=['--no-sandbox', '--disable-gpu',
                                                                '--disable-background-networking', '--no-first-run'])
        page = browser.new_page(viewport={'width': 1200, 'height': 900})
        page.route('**/*', lambda r: r.abort())   # nothing from the network
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.set_content('<html><body><div id="box" style="width:1000px"><div id="out"></div></div></body></html>')
        page.add_script_tag(content=FAKE_MODEL)
        yield page
        browser.close()
        assert not errors, errors


def _wait_for(page, js, timeout=20_000):
    page.wait_for_function(js, timeout=timeout)


@pytest.mark.slow
def test_the_live_chart_grows_and_follows_its_controls(page):
    run = _toy_run()
    plotly_js = files('plotly').joinpath('package_data', 'plotly.min.js').read_text(encoding='utf-8')
    state = dict(_plotly_js=plotly_js, _uid='test', runs=[run], smooth=2, x_axis='step', log_y=False,
                 loss_as_angle=False, time_available=True, title='training toy', height=500)
    page.evaluate(START, [LIVE_CHART_ESM, state])
    _wait_for(page, "() => document.querySelector('.dwiml-live-chart .js-plotly-plot')?.data?.length > 0")
    shown = page.evaluate(TRACES)
    assert abs(shown['width'] - 1000) < 2   # the container's width, not plotly's 700 px default
    lengths = {name: len(xy[0]) for name, xy in shown['traces'].items()}
    assert lengths['toy: train loss (per batch)'] == 12 and lengths['toy: validation loss (epoch)'] == 3
    assert all(n > 0 for name, n in lengths.items()), lengths   # every panel has data
    assert shown['traces']['toy: learning rate'][0] == list(range(1, 13))   # x in steps
    assert shown['traces']['toy: validation loss (epoch)'][0] == [4, 8, 12]   # an epoch ends with its last batch

    # New batches arrive as messages while the kernel trains.
    more = dict(type='append', run=0, batches=dict(epoch=[3, 3], batch=[0, 1], loss=[0.2, 0.3], grad_norm=[1, 1],
                                                    grad_norm_clipped=[1, 1], learning_rate=[1e-3, 1e-3],
                                                    streamlines_per_s=[1000, 1000], t=[6.5, 7.0]), epochs={})
    page.evaluate("m => window.model.emit('msg:custom', m)", more)
    _wait_for(page, "() => document.querySelector('.dwiml-live-chart .js-plotly-plot').data[0].x.length === 14")

    # The controls recompute the curves in the page, and tell the kernel (read when it is idle).
    page.select_option('.dwiml-live-chart select[name=smooth]', '5')
    _wait_for(page, "() => document.querySelector('.dwiml-live-chart .js-plotly-plot').data[1].name.includes('mean of 5')")
    smoothed = page.evaluate(TRACES)['traces']['toy: train loss (mean of 5 batches)'][1]
    losses = run['batches']['loss'] + [0.2, 0.3]
    np.testing.assert_allclose(smoothed, [np.mean(losses[max(0, i - 4):i + 1]) for i in range(14)])
    page.select_option('.dwiml-live-chart select[name=x_axis]', 'time')
    page.check('.dwiml-live-chart input[name=loss_as_angle]')
    _wait_for(page, "() => document.querySelector('.dwiml-live-chart .js-plotly-plot').layout.annotations[0].text"
                    ".startsWith('angular')")
    shown = page.evaluate(TRACES)
    assert shown['xtitle'] == 'training time (s)'
    x, y = shown['traces']['toy: train loss (per batch)']
    np.testing.assert_allclose(x, [0.5 * i for i in range(1, 13)] + [6.5, 7.0])
    np.testing.assert_allclose(y, np.degrees(np.arccos(1 - np.array(losses))))
    state = page.evaluate("() => [window.model.get('smooth'), window.model.get('x_axis'), window.model.get('loss_as_angle'),"
                          " window.model.saved.length]")
    assert state == [5, 'time', True, 3]
    page.select_option('.dwiml-live-chart select[name=x_axis]', 'epoch')

    # A full refresh of the `runs` trait replaces what the page holds; the plot follows the output's width.
    page.evaluate("r => window.model.set('runs', r)", [run])
    _wait_for(page, "() => document.querySelector('.dwiml-live-chart .js-plotly-plot').data[0].x.length === 12")
    page.evaluate("() => { document.getElementById('box').style.width = '640px'; }")
    _wait_for(page, "() => Math.abs(document.querySelector('.dwiml-live-chart .js-plotly-plot')"
                    ".getBoundingClientRect().width - 640) < 2")
    assert json.dumps(page.evaluate("() => document.querySelector('.dwiml-live-chart-status').textContent")) \
        == json.dumps('12 batches, 3 epochs')
