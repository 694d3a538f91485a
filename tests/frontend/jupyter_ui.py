"""Drive a real Jupyter front end (JupyterLab 4 or Notebook 7) from Python, as a person would.

Used by the front-end tests (`tests/frontend/`) and by `tools/make_readme_images.py`.

- `JupyterServer`: a `jupyter lab` server from this Python's environment (so the kernel is the venv's
  `python3` kernelspec) on a free port, with a token, a temporary root dir and temporary Jupyter
  config/data/runtime dirs (no user settings leak in); `stop()` shuts its kernels down and kills
  whatever is left of the server's process tree. The same server also serves Notebook 7 (`/notebooks/`).
- `Browser`: Debian's `chromium` (never a downloaded browser) driven by playwright, headless, with
  the console errors of every page collected.
- `NotebookPage`: open a notebook, run its code cells one by one (wait for each to finish), read the
  plotly traces drawn in the page, screenshot elements and count their coloured pixels.

The page contract the tests rely on (shared with the notebooks' authors):
  live chart      : an element with class `dwiml-live-chart` holding a plotly `.js-plotly-plot`
                    (`gd.data[i].x.length` = points of trace i); replaced by a plain plotly figure
                    when training ends.
  batch inspector : the jupyter_rfb canvas (`.renderview-wrapper img`) and its ipywidgets controls;
                    for saved notebooks, a fallback image (class or id `dwiml-inspector-fallback-*`)
                    that is shown only when the live widget is not.
"""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHART = '.dwiml-live-chart .js-plotly-plot'
# plotly.js marks its plots .js-plotly-plot; JupyterLab's plotly mime renderer draws into .jp-RenderedPlotly itself
ANY_PLOT = '.js-plotly-plot, .jp-RenderedPlotly'
INSPECTOR_CANVAS = '.renderview-wrapper img'
INSPECTOR_FALLBACK = ('[class*="dwiml-inspector-fallback"] img, img[class*="dwiml-inspector-fallback"], '
                      '[id^="dwiml-inspector-fallback"] img, img[id^="dwiml-inspector-fallback"]')
ERROR_OUTPUT = '[data-mime-type="application/vnd.jupyter.error"]'

CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-quic']

# Console errors that every healthy page logs and that are not ours, as (regex, why it is benign).
# JupyterLab 4.6 pages here log none; add one only with the reason (and a test's own list for a UI).
BENIGN_CONSOLE = []


def free_port():
    "A TCP port that nobody listens on now (the OS picks it; `JupyterServer.start` retries if it gets taken)."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


class JupyterServer:
    """`jupyter lab` on a free port with a token, serving `root_dir`; use as a context manager.

    Parameters
    ----------
    root_dir : Path
        What the server shows (notebooks are copied there).
    work_dir : Path, optional
        Where its config, data, runtime and logs go (default: a new temporary folder).
    kernels : bool
        False: the server knows no kernelspec, so a notebook opens with no kernel (a saved notebook
        as someone without the environment sees it).
    """
    def __init__(self, root_dir, work_dir=None, *, kernels=True, startup_timeout=120):
        self.root_dir = Path(root_dir)
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix='dwiml_jupyter_'))
        self.kernels, self.startup_timeout = kernels, startup_timeout
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.proc, self._pids = None, set()

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    def page_url(self, path, ui='lab'):
        "The URL of notebook `path` (relative to root_dir) in JupyterLab (`ui='lab'`) or Notebook 7."
        prefix = {'lab': 'lab/tree', 'notebook': 'notebooks'}[ui]
        return f'{self.url}/{prefix}/{path}?token={self.token}'

    def _settings(self, config):
        "User settings: no news or update checks (no network), every cell attached to the DOM."
        user = config / 'lab' / 'user-settings' / '@jupyterlab'
        _write_json(user / 'apputils-extension' / 'notification.jupyterlab-settings',
                    {'fetchNews': 'false', 'checkForUpdates': False, 'doNotDisturbMode': True})
        _write_json(user / 'notebook-extension' / 'tracker.jupyterlab-settings', {'windowingMode': 'none'})

    def env(self):
        w = self.work_dir
        env = dict(os.environ)
        for name, sub in (('JUPYTER_CONFIG_DIR', 'config'), ('JUPYTER_DATA_DIR', 'data'),
                          ('JUPYTER_RUNTIME_DIR', 'runtime'), ('IPYTHONDIR', 'ipython')):
            env[name] = str(w / sub)
            (w / sub).mkdir(parents=True, exist_ok=True)
        # Mesa's Vulkan driver (FURY's headless rendering in the kernel) wants a private runtime dir.
        xdg = w / 'xdg'
        xdg.mkdir(mode=0o700, exist_ok=True)
        env['XDG_RUNTIME_DIR'] = str(xdg)
        env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
        env.pop('JUPYTER_PATH', None)
        env.setdefault('PYTHONWARNINGS', 'ignore:pkg_resources is deprecated:UserWarning')
        self._settings(w / 'config')
        return env

    def start(self, attempts=3):
        "Start the server and wait until it answers; a new free port when another process took the port."
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            if self._start_once():
                return self
            if 'is not available' not in self.log_tail() or attempt == attempts - 1:
                raise RuntimeError(f'jupyter lab exited at start-up:\n{self.log_tail()}')
            self.port = free_port()

    def _start_once(self):
        args = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
                f'--ServerApp.port={self.port}', '--ServerApp.port_retries=0',
                f'--IdentityProvider.token={self.token}', f'--ServerApp.root_dir={self.root_dir}',
                '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.news_url=',
                '--LabApp.extension_manager=readonly', '--ServerApp.log_level=WARN']
        if not self.kernels:
            args.append('--KernelSpecManager.allowed_kernelspecs=["dwiml-no-kernel"]')
        self.log_path = self.work_dir / f'server-{self.port}.log'
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(args, cwd=self.root_dir, env=self.env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                self.proc = None
                return False
            try:
                self.api('GET', 'api/status')
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f'jupyter lab did not answer in {self.startup_timeout} s:\n{self.log_tail()}') from None
                time.sleep(0.3)

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_text(errors='replace')[-n:]
        except OSError:
            return ''

    def api(self, method, path, body=None, timeout=10):
        "Call the server's REST API; the decoded JSON answer (None when empty)."
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f'{self.url}/{path}', data=data, method=method,
                                     headers={'Authorization': f'token {self.token}',
                                              'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
        return json.loads(text) if text else None

    def kernel_state(self, path):
        "`execution_state` of the kernel of notebook `path` ('idle', 'busy', ...), None when it has none."
        for s in self.api('GET', 'api/sessions'):
            if s.get('path') == path or s.get('path', '').endswith('/' + path):
                return (s.get('kernel') or {}).get('execution_state')
        return None

    def shutdown_kernels(self):
        for k in self.api('GET', 'api/kernels'):
            try:
                self.api('DELETE', f"api/kernels/{k['id']}", timeout=30)
            except urllib.error.HTTPError:
                pass

    def _remember_children(self):
        try:
            import psutil
            self._pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except Exception:
            pass

    def stop(self):
        "Shut the kernels and the server down; kill what is left of its process tree (always)."
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            try:
                self.shutdown_kernels()
                self.api('POST', 'api/shutdown', timeout=5)
                self.proc.wait(15)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for pid in self._pids:   # kernels run in their own sessions: not in the server's process group
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Browser:
    """Headless Debian Chromium driven by playwright; `new_page()` pages record their console errors."""
    def __init__(self, viewport=(1400, 1000)):
        chromium = shutil.which('chromium') or shutil.which('chromium-browser')
        if chromium is None:
            raise RuntimeError('no chromium on PATH (apt-get install chromium; tools/run.sh setup does it)')
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        except Exception:
            self._pw.stop()
            raise
        self.viewport = viewport

    def new_page(self, offline=False):
        """A page in a fresh context; `page.console_errors` lists its console errors and page errors.

        offline : block every request that is not file:// or the local server (no CDN, no network).
        """
        context = self.browser.new_context(viewport=dict(zip(('width', 'height'), self.viewport)),
                                           device_scale_factor=1)
        if offline:
            context.route(re.compile(r'^(?!file:|data:|blob:|http://127\.0\.0\.1[:/]).*'),
                          lambda route: route.abort())
        page = context.new_page()
        page.console_errors = []
        page.on('console', lambda m: m.type == 'error' and page.console_errors.append(
            f'console.error: {m.text} ({m.location.get("url", "")})'))
        page.on('pageerror', lambda e: page.console_errors.append(f'pageerror: {e}'))
        return page

    def close(self):
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Where screenshots of failed tests go, and the pages open now (name -> playwright page) to screenshot.
ARTIFACTS = Path(os.environ.get('DWIML_FRONTEND_ARTIFACTS', REPO / 'build' / 'frontend-artifacts'))
OPEN_PAGES = {}


def save_screenshots(stem, folder=None):
    "A screenshot of every page in OPEN_PAGES into `folder` (default ARTIFACTS); the paths written."
    folder = Path(folder or ARTIFACTS)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, page in list(OPEN_PAGES.items()):
        path = folder / f'{stem}-{name}.png'
        try:
            page.screenshot(path=str(path), full_page=True, timeout=20000)
            written.append(path)
        except Exception:
            pass
    return written


def unexpected_console_errors(messages, extra=()):
    "The messages not matched by `BENIGN_CONSOLE` (nor by `extra`: (regex, reason) pairs)."
    allow = [p for p, _ in BENIGN_CONSOLE] + [re.compile(p) if isinstance(p, str) else p for p, _ in extra]
    return [m for m in messages if not any(p.search(m) for p in allow)]


def coloured_pixels(png, min_chroma=60):
    "How many pixels of a PNG (bytes) are clearly coloured (max - min channel >= min_chroma)."
    import numpy as np
    from PIL import Image
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) >= min_chroma).sum())


_TRACES_JS = """(plots) => plots.filter(gd => gd.data).map(gd => {
    const len = v => v == null ? 0 : typeof v.length === 'number' ? v.length
        : v.shape != null ? (Array.isArray(v.shape) ? v.shape[0] : parseInt(v.shape)) : 0;
    const full = gd._fullData || [];
    return {
        subplots: ((gd._fullLayout || {})._subplots || {}).cartesian || [],
        traces: (gd.data || []).map((t, i) => {
            const f = full.find(f => f.index === i) || {};
            return {name: t.name || '', subplot: (t.xaxis || 'x') + (t.yaxis || 'y'),
                    n: Math.max(len(t.x) || len(t.y), len(f.x) || len(f.y))};
        })};
})"""


class NotebookPage:
    """One notebook open in a playwright page (JupyterLab or Notebook 7: the same cell DOM)."""
    def __init__(self, page, server, path, ui='lab'):
        self.page, self.server, self.path, self.ui = page, server, path, ui

    def open(self, timeout=120, kernel=True):
        "Load the notebook's page; wait for its cells and (with `kernel`) for an idle kernel."
        self.page.goto(self.server.page_url(self.path, self.ui), wait_until='domcontentloaded',
                       timeout=timeout * 1000)
        self.page.locator('.jp-Notebook .jp-Cell').first.wait_for(state='visible', timeout=timeout * 1000)
        if kernel:
            self.wait_kernel_idle(timeout)
        return self

    def choose_no_kernel(self, timeout=20):
        "When the page asks which kernel to start (none can), answer No Kernel; False if it did not ask."
        dialog = self.page.locator('.jp-Dialog')
        try:
            dialog.first.wait_for(state='visible', timeout=timeout * 1000)
        except Exception:
            return False
        dialog.get_by_role('button', name='No Kernel').first.click()
        dialog.first.wait_for(state='hidden', timeout=timeout * 1000)
        return True

    def wait_kernel_idle(self, timeout=120):
        deadline = time.monotonic() + timeout
        while self.server.kernel_state(self.path) != 'idle':
            if time.monotonic() > deadline:
                raise TimeoutError(f'the kernel of {self.path} is not idle after {timeout} s '
                                   f'(state {self.server.kernel_state(self.path)!r})')
            self.page.wait_for_timeout(300)

    @property
    def cells(self):
        return self.page.locator('.jp-Notebook .jp-Cell')

    def cell(self, index):
        return self.cells.nth(index)

    def code_cell_indices(self):
        classes = self.cells.evaluate_all('cells => cells.map(c => c.className)')
        return [i for i, c in enumerate(classes) if 'jp-CodeCell' in c]

    def cell_index(self, text):
        "The index of the first cell whose source contains `text`."
        sources = self.cells.evaluate_all(
            "cells => cells.map(c => (c.querySelector('.jp-InputArea-editor') || c).innerText)")
        for i, s in enumerate(sources):
            if text in s:
                return i
        raise LookupError(f'no cell of {self.path} contains {text!r}')

    def prompt(self, index):
        return self.cell(index).locator('.jp-InputArea-prompt').first.inner_text().strip()

    def run_cell(self, index, timeout=300, poll=None, poll_every=0.5):
        """Select cell `index`, press Shift+Enter, wait until it has run (its prompt shows its
        execution count and the kernel is idle); `poll()` is called meanwhile every `poll_every` s.
        Raises AssertionError when the cell shows an error output."""
        cell = self.cell(index)
        cell.scroll_into_view_if_needed()
        cell.locator('.jp-InputArea-prompt').first.click()
        self.page.keyboard.press('Shift+Enter')
        deadline, started = time.monotonic() + timeout, time.monotonic()
        # the prompt reads [*]: while queued or running, [N]: once done
        while True:
            text = self.prompt(index)
            if re.fullmatch(r'\[\d+\]:?', text) and self.server.kernel_state(self.path) == 'idle':
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f'cell {index} of {self.path} still runs after {timeout} s (prompt {text!r})')
            if poll is not None:
                poll()
            self.page.wait_for_timeout(poll_every * 1000)
        if poll is not None:
            poll()
        self.raise_on_error(index)
        return time.monotonic() - started

    def raise_on_error(self, index):
        errors = self.cell(index).locator(ERROR_OUTPUT)
        if errors.count():
            raise AssertionError(f'cell {index} of {self.path} failed:\n' + errors.first.inner_text()[-3000:])

    def run_all_cells_one_by_one(self, timeout=300, timeouts=None, poll=None):
        "Run every code cell in order; `timeouts` maps a cell index to its own timeout."
        times = {}
        for i in self.code_cell_indices():
            times[i] = self.run_cell(i, timeout=(timeouts or {}).get(i, timeout), poll=poll)
        return times

    def run_all_from_menu(self, timeout=900, poll=None):
        "Run > Run All Cells from the menu bar, then wait for the last code cell to have run."
        self.page.get_by_role('menuitem', name='Run', exact=True).first.click()
        self.page.get_by_role('menuitem', name=re.compile(r'^Run All Cells')).first.click()
        last = self.code_cell_indices()[-1]
        deadline = time.monotonic() + timeout
        while not (re.fullmatch(r'\[\d+\]:?', self.prompt(last)) and self.server.kernel_state(self.path) == 'idle'):
            if time.monotonic() > deadline:
                raise TimeoutError(f'Run All Cells of {self.path} did not finish in {timeout} s')
            if poll is not None:
                poll()
            self.page.wait_for_timeout(500)
        for i in self.code_cell_indices():
            self.raise_on_error(i)

    def save(self):
        "Ctrl+S, then wait until the page says the document is saved (no dirty mark)."
        self.page.locator('.jp-Notebook').first.click(position={'x': 5, 'y': 5})
        self.page.keyboard.press('Escape')
        self.page.keyboard.press('Control+s')
        self.page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30000)
        self.page.wait_for_timeout(500)

    def shutdown_kernel(self, timeout=60):
        "Shut the notebook's kernel down (the server's REST API, as Kernel > Shut Down Kernel does)."
        for s in self.server.api('GET', 'api/sessions'):
            if s.get('path') == self.path:
                self.server.api('DELETE', f"api/sessions/{s['id']}", timeout=timeout)

    def plots(self, selector=CHART):
        "For every plotly plot matching `selector`: its cartesian subplots and traces (name, subplot, n)."
        return self.page.locator(selector).evaluate_all(_TRACES_JS)

    def wait_plots(self, selector=ANY_PLOT, timeout=30):
        """`plots(selector)` once plotly has drawn them: each match is scrolled into view (renderers may
        wait until they are shown) until at least one has data, or `timeout` s have passed."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.page.locator(selector)
            for k in range(found.count()):
                try:
                    found.nth(k).scroll_into_view_if_needed(timeout=5000)
                except Exception:
                    pass
            plots = self.plots(selector)
            if plots or time.monotonic() > deadline:
                return plots
            self.page.wait_for_timeout(500)

    def output_text(self, index):
        "The text of cell `index`'s outputs."
        return self.cell(index).locator('.jp-OutputArea').first.inner_text()

    def output_with(self, selector, cell=None):
        "The output elements (of `cell`, else of the page) that are or contain `selector`."
        scope = self.page if cell is None else self.cell(cell)
        return scope.locator(f'.jp-OutputArea-output:is({selector}), .jp-OutputArea-output:has({selector})')

    def output_screenshot(self, locator, path=None):
        "PNG bytes of an element (scrolled into view), also written to `path` when given."
        locator.scroll_into_view_if_needed()
        return locator.screenshot(path=str(path) if path else None)


def notebook_with_parameters(source, dest, **values):
    """Copy notebook `source` to `dest` with only its `parameters` cell changed: each `name = ...`
    line of `values` is replaced (appended when missing). Outputs and ids are dropped."""
    nb = json.loads(Path(source).read_text())
    cells = [c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    if len(cells) != 1:
        raise ValueError(f'{source} has {len(cells)} cells tagged "parameters", not 1')
    lines = ''.join(cells[0]['source']).split('\n')
    for name, value in values.items():
        new = f'{name} = {value!r}'
        for i, line in enumerate(lines):
            if re.match(rf'{name}\s*=', line):
                comment = re.search(r'\s+#.*$', line)
                lines[i] = new + (comment.group(0) if comment else '')
                break
        else:
            lines.append(new)
    cells[0]['source'] = '\n'.join(lines)
    for c in nb['cells']:
        if c['cell_type'] == 'code':
            c['outputs'], c['execution_count'] = [], None
    Path(dest).write_text(json.dumps(nb, indent=1))
    return Path(dest)
