"""Fixtures of the front-end tests: a Jupyter server, a headless Chromium, screenshots on failure.

Every test here is marked `frontend` (deselect with `-m "not frontend"`) and put in the xdist group
`frontend`: under `pytest -n 2 --dist loadscope` (tools/run.sh test) or `--dist loadgroup` they all
run in one worker and share one server, one browser and one training run per UI (module-scoped
fixtures). Screenshots of the open pages of a failed test go to build/frontend-artifacts/
($DWIML_FRONTEND_ARTIFACTS).
"""
import re
from pathlib import Path

import pytest

# pytest puts this folder (it has no __init__.py) on the import path before loading this file.
from jupyter_ui import Browser, JupyterServer, save_screenshots


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.frontend)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group('frontend'))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and Path(__file__).resolve().parent in Path(str(item.fspath)).resolve().parents:
        shots = save_screenshots(re.sub(r'[^\w.-]+', '_', f'{item.name}-{report.when}'))
        if shots:
            report.sections.append(('front-end screenshots', '\n'.join(map(str, shots))))


@pytest.fixture(scope='module')
def browser():
    with Browser() as b:
        yield b


@pytest.fixture(scope='module')
def jupyter_root(tmp_path_factory):
    return tmp_path_factory.mktemp('jupyter_root')


@pytest.fixture(scope='module')
def jupyter_server(jupyter_root, tmp_path_factory):
    "JupyterLab (and Notebook 7 at /notebooks/) serving `jupyter_root`; stopped with its kernels at the end."
    server = JupyterServer(jupyter_root, tmp_path_factory.mktemp('jupyter_work'))
    server.start()
    try:
        yield server
    finally:
        server.stop()
