"""`nbs/train_model.ipynb` run as a person runs it, in a real JupyterLab 4 and Notebook 7 page
(headless Debian Chromium), checking what that person sees:

- JupyterLab, cell by cell: the batch inspector shows streamlines (coloured pixels on its canvas),
  the live chart's traces grow while the training cell runs and every panel has data at the end,
  the inspector's controls redraw without an error, and the page logs no console error;
- Notebook 7 (/notebooks/): Run All Cells; the chart has data, the inspector has pixels;
- the saved notebook, reopened with no kernel: the chart is a plain plotly figure with data and the
  inspector shows its last frame (the fallback image);
- `jupyter nbconvert --to html` of the saved notebook, opened from file:// with the network blocked:
  the curves and the inspector's last frame are there.

One training run per UI (module-scoped fixtures): the tests below share it, in file order.
Failures leave full-page screenshots in build/frontend-artifacts/ (or $DWIML_FRONTEND_ARTIFACTS).
"""
import re
import subprocess
import sys
import time

import pytest

from jupyter_ui import (ANY_PLOT, CHART, INSPECTOR_CANVAS, INSPECTOR_FALLBACK, OPEN_PAGES, REPO, JupyterServer,
                        NotebookPage, coloured_pixels, notebook_with_parameters, save_screenshots,
                        unexpected_console_errors)

# 16 epochs of at most 25 batches of 20 streamlines of the 4-subject phantom: ~10 s of training
# cell on an idle 2-core machine, of which the chart shows ~4 s live (the rest is set-up and the
# widget's first render). The live-chart test polls the page every 0.5 s, and a poll itself takes
# ~0.8 s, more on a busy machine: with 8 epochs a busy CI run saw the chart only twice.
TRAINING = dict(max_epochs=16, max_batches_per_epoch=25, batch_size=20, overwrite=True)
TRAINING_CELL_TIMEOUT = 600      # a busy 2-core CI machine is slow
CELL_TIMEOUT = 300
MIN_STREAMLINE_PIXELS = 500      # a 480x480 canvas of one batch has ~10,000 coloured pixels

# Notebook 7.6.5's own start-up errors; the page works and no code of ours is on their stacks:
# - always, even on a bare notebook page with every third-party extension disabled: its keyboard
#   shortcuts plugin (on `pluginChanged`) reads `plugins[id].schema` of a settings plugin that the
#   notebook page does not load;
# - sometimes, as the page starts: its default file browser's restore handler runs
#   `filebrowser:open-path`, a command that the notebook page does not register.
NOTEBOOK7_CONSOLE = [(r"^pageerror: Cannot read properties of undefined \(reading 'schema'\)$",
                      'Notebook 7.6 shortcuts-extension reading the schema of a plugin it did not load'),
                     (r"^pageerror: Command 'filebrowser:open-path' not registered\.$",
                      'Notebook 7.6 file browser restore on a notebook page (no file browser commands)')]


@pytest.fixture(scope='module')
def demo_hdf5(tmp_path_factory):
    from dwiml_nb.data import make_demo_dataset
    out = tmp_path_factory.mktemp('demo')
    return make_demo_dataset(out, which='phantom', nb_subjects=4, progress=False).hdf5_files['phantom']


def _notebook(jupyter_root, demo_hdf5, name):
    return notebook_with_parameters(REPO / 'nbs' / 'train_model.ipynb', jupyter_root / f'{name}.ipynb',
                                    hdf5_file=str(demo_hdf5), experiments_path=str(jupyter_root / 'experiments'),
                                    experiment_name=name, **TRAINING)


class Run:
    "What one UI showed while the notebook ran."
    def __init__(self, nb):
        self.nb, self.samples, self.times = nb, [], {}

    def sample_chart(self):
        "Record the live chart's point counts (trace name -> points) now, if it is on the page."
        try:
            plots = self.nb.plots(CHART)
        except Exception:
            return
        if plots:
            self.samples.append((time.monotonic(), {t['name']: t['n'] for p in plots for t in p['traces']}))

    def cell_of(self, text):
        return self.nb.cell(self.nb.cell_index(text))


@pytest.fixture(scope='module')
def lab_run(browser, jupyter_server, jupyter_root, demo_hdf5):
    "The notebook run cell by cell in JupyterLab (Shift+Enter on each code cell)."
    _notebook(jupyter_root, demo_hdf5, 'lab')
    page = browser.new_page()
    OPEN_PAGES['lab'] = page
    nb = NotebookPage(page, jupyter_server, 'lab.ipynb', ui='lab').open()
    run = Run(nb)
    training = nb.cell_index('train_and_validate(')
    try:
        for i in nb.code_cell_indices():
            run.times[i] = nb.run_cell(i, timeout=TRAINING_CELL_TIMEOUT if i == training else CELL_TIMEOUT,
                                       poll=run.sample_chart if i == training else None)
    except Exception:
        save_screenshots('lab_run-failed')
        raise
    yield run
    OPEN_PAGES.pop('lab', None)


def _panels_without_data(plots):
    empty = []
    for k, p in enumerate(plots):
        for subplot in p['subplots'] or ['xy']:
            if not any(t['n'] > 0 for t in p['traces'] if t['subplot'] == subplot):
                empty.append(f'plot {k} panel {subplot}')
    return empty


def _inspector_png(run, path=None):
    canvas = run.cell_of('BatchInspector(').locator(INSPECTOR_CANVAS)
    assert canvas.count() == 1, f'{canvas.count()} inspector canvases ({INSPECTOR_CANVAS}) in the inspector cell'
    return run.nb.output_screenshot(canvas.first, path)


# ---------------------------------------------------------------- JupyterLab, cell by cell

def test_lab_inspector_shows_streamlines(lab_run):
    assert coloured_pixels(_inspector_png(lab_run)) > MIN_STREAMLINE_PIXELS


def test_lab_live_chart_grows_while_training(lab_run):
    samples = lab_run.samples
    assert samples, f'no live chart ({CHART}) on the page while the training cell ran'
    totals = [sum(counts.values()) for _, counts in samples]
    assert all(b >= a for a, b in zip(totals, totals[1:])), f'the chart lost points: {totals}'
    assert len(set(totals)) >= 3, f'the chart did not grow while training ran (point totals seen: {totals})'
    first, last = samples[0][1], samples[-1][1]
    assert any(last[name] > first.get(name, 0) for name in last)


def test_lab_chart_has_data_in_every_panel_at_the_end(lab_run):
    plots = lab_run.nb.wait_plots(ANY_PLOT)
    assert plots, 'no plotly figure on the page after training'
    assert not _panels_without_data(plots), _panels_without_data(plots)


def test_lab_inspector_controls_redraw(lab_run):
    cell = lab_run.cell_of('BatchInspector(')
    before = _inspector_png(lab_run)
    select = cell.locator('.widget-dropdown').filter(has_text=re.compile(r'colou?r')).locator('select')
    assert select.count() == 1, 'no "colour by" dropdown in the inspector'
    options = select.first.evaluate('s => [...s.options].map(o => o.value)')
    current = select.first.input_value()
    new = 'direction' if 'direction' in options and current != 'direction' else next(o for o in options if o != current)
    select.first.select_option(new)
    deadline = time.monotonic() + 60
    while _inspector_png(lab_run) == before:
        assert time.monotonic() < deadline, f'the canvas did not change after "colour by" -> {new}'
        lab_run.nb.page.wait_for_timeout(500)
    lab_run.nb.page.wait_for_timeout(1500)    # let the last frame arrive
    assert coloured_pixels(_inspector_png(lab_run)) > MIN_STREAMLINE_PIXELS
    text = cell.locator('.jp-OutputArea').first.inner_text()
    assert 'could not draw' not in text and 'Error' not in text, text[-2000:]


def test_lab_page_logs_no_console_error(lab_run):
    assert not unexpected_console_errors(lab_run.nb.page.console_errors)


# ---------------------------------------------------------------- the saved notebook, no kernel

@pytest.fixture(scope='module')
def saved_lab_notebook(lab_run, jupyter_root):
    "The JupyterLab notebook saved (Ctrl+S) with its kernel then shut down."
    lab_run.nb.save()
    lab_run.nb.shutdown_kernel()
    return jupyter_root / 'lab.ipynb'


@pytest.fixture(scope='module')
def no_kernel_page(saved_lab_notebook, browser, jupyter_root, tmp_path_factory):
    "The saved notebook reloaded in JupyterLab from a server that has no kernel to start."
    with JupyterServer(jupyter_root, tmp_path_factory.mktemp('jupyter_nokernel'), kernels=False) as server:
        page = browser.new_page()
        OPEN_PAGES['no_kernel'] = page
        nb = NotebookPage(page, server, saved_lab_notebook.name).open(kernel=False)
        nb.choose_no_kernel()      # the page asks which kernel to start: none
        page.wait_for_timeout(2000)  # let the outputs render
        yield nb
        OPEN_PAGES.pop('no_kernel', None)


def test_saved_notebook_without_kernel_shows_the_chart(no_kernel_page):
    plots = no_kernel_page.wait_plots(ANY_PLOT)
    assert plots, 'no plotly figure in the saved notebook'
    assert not _panels_without_data(plots), _panels_without_data(plots)
    chart_cell = no_kernel_page.page.locator('.jp-Cell', has=no_kernel_page.page.locator(ANY_PLOT)).first
    assert 'Error displaying widget' not in chart_cell.inner_text()


def test_saved_notebook_without_kernel_shows_the_inspector_last_frame(no_kernel_page):
    cell = no_kernel_page.cell(no_kernel_page.cell_index('BatchInspector('))
    image = cell.locator(INSPECTOR_FALLBACK)
    assert image.count() >= 1, f'no inspector fallback image ({INSPECTOR_FALLBACK})'
    assert image.first.is_visible(), 'the inspector fallback image is hidden'
    assert coloured_pixels(no_kernel_page.output_screenshot(image.first)) > MIN_STREAMLINE_PIXELS


def test_saved_notebook_without_kernel_logs_no_unexpected_console_error(no_kernel_page):
    assert not unexpected_console_errors(no_kernel_page.page.console_errors)


# ---------------------------------------------------------------- nbconvert HTML, offline

@pytest.fixture(scope='module')
def html_page(saved_lab_notebook, browser, tmp_path_factory):
    out = tmp_path_factory.mktemp('html')
    subprocess.run([sys.executable, '-m', 'jupyter', 'nbconvert', '--to', 'html', '--output-dir', str(out),
                    str(saved_lab_notebook)], check=True, capture_output=True, timeout=300)
    page = browser.new_page(offline=True)
    OPEN_PAGES['html'] = page
    page.goto((out / f'{saved_lab_notebook.stem}.html').as_uri(), wait_until='load')
    page.wait_for_timeout(3000)
    yield page
    OPEN_PAGES.pop('html', None)


def test_html_export_shows_the_curves_offline(html_page):
    plots = html_page.locator(ANY_PLOT).evaluate_all(
        "plots => plots.map(gd => (gd.data || []).map(t => t.x ? t.x.length : 0))")
    assert plots and all(sum(p) > 0 for p in plots), f'no curves with data in the HTML page: {plots}'


def test_html_export_shows_the_inspector_last_frame_offline(html_page):
    image = html_page.locator(INSPECTOR_FALLBACK)
    assert image.count() >= 1, f'no inspector fallback image ({INSPECTOR_FALLBACK}) in the HTML page'
    image.first.scroll_into_view_if_needed()
    assert coloured_pixels(image.first.screenshot()) > MIN_STREAMLINE_PIXELS


# ---------------------------------------------------------------- Notebook 7

@pytest.fixture(scope='module')
def notebook7_run(browser, jupyter_server, jupyter_root, demo_hdf5):
    "The notebook run with Run > Run All Cells in Notebook 7 (alone: the JupyterLab run's kernel is shut down)."
    jupyter_server.shutdown_kernels()
    _notebook(jupyter_root, demo_hdf5, 'notebook7')
    page = browser.new_page()
    OPEN_PAGES['notebook7'] = page
    nb = NotebookPage(page, jupyter_server, 'notebook7.ipynb', ui='notebook').open()
    run = Run(nb)
    try:
        nb.run_all_from_menu(timeout=TRAINING_CELL_TIMEOUT + CELL_TIMEOUT, poll=run.sample_chart)
    except Exception:
        save_screenshots('notebook7_run-failed')
        raise
    yield run
    OPEN_PAGES.pop('notebook7', None)


def test_notebook7_chart_has_data(notebook7_run):
    assert notebook7_run.samples, f'no live chart ({CHART}) while the notebook ran'
    plots = notebook7_run.nb.wait_plots(ANY_PLOT)
    assert plots and not _panels_without_data(plots), _panels_without_data(plots)


def test_notebook7_inspector_shows_streamlines(notebook7_run):
    assert coloured_pixels(_inspector_png(notebook7_run)) > MIN_STREAMLINE_PIXELS


def test_notebook7_page_logs_no_console_error(notebook7_run):
    assert not unexpected_console_errors(notebook7_run.nb.page.console_errors, NOTEBOOK7_CONSOLE)
