"""Regenerate the README's pictures: screenshots of JupyterLab running the training notebook.

    .venv/bin/python tools/make_readme_images.py [--out docs/images] [--max_epochs 6] [--max_batches_per_epoch 20]

Builds the phantom demo data in a temporary folder, starts JupyterLab and headless Chromium with the
front-end tests' harness (tests/frontend/jupyter_ui.py), runs nbs/train_model.ipynb cell by cell as a
person would, then saves element screenshots of what the page shows:
  docs/images/batch_3d.png          the batch inspector (its controls and the live FURY canvas)
  docs/images/training_curves.png   the training chart once training has ended
Needs Mesa's Vulkan driver and Debian's chromium (tools/run.sh setup installs both); about a minute
on 2 cores.
"""
import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_jupyter_ui():
    "The front-end tests' harness (tests/frontend/jupyter_ui.py), loaded from its file."
    spec = importlib.util.spec_from_file_location('jupyter_ui', REPO / 'tests' / 'frontend' / 'jupyter_ui.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['jupyter_ui'] = module   # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


_ui = _load_jupyter_ui()
ANY_PLOT, INSPECTOR_CANVAS, Browser, JupyterServer = _ui.ANY_PLOT, _ui.INSPECTOR_CANVAS, _ui.Browser, _ui.JupyterServer
NotebookPage, coloured_pixels, notebook_with_parameters = _ui.NotebookPage, _ui.coloured_pixels, _ui.notebook_with_parameters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=REPO / 'docs' / 'images', help='where the PNG files go')
    parser.add_argument('--max_epochs', type=int, default=6)
    parser.add_argument('--max_batches_per_epoch', type=int, default=20)
    parser.add_argument('--width', type=int, default=1300, help='browser window width (pixels)')
    args = parser.parse_args(argv)

    from dwiml_nb.data import make_demo_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='dwiml_readme_') as d:
        d = Path(d)
        hdf5 = make_demo_dataset(d / 'demo', which='phantom', progress=False).hdf5_files['phantom']
        root = d / 'jupyter_root'
        root.mkdir()
        notebook_with_parameters(REPO / 'nbs' / 'train_model.ipynb', root / 'train_model.ipynb',
                                 hdf5_file=str(hdf5), experiments_path=str(d / 'experiments'), experiment_name='demo',
                                 max_epochs=args.max_epochs, max_batches_per_epoch=args.max_batches_per_epoch,
                                 overwrite=True)
        with JupyterServer(root, d / 'jupyter') as server, Browser(viewport=(args.width, 1000)) as browser:
            page = browser.new_page()
            nb = NotebookPage(page, server, 'train_model.ipynb').open()
            start = time.monotonic()
            for i in nb.code_cell_indices():
                nb.run_cell(i, timeout=900)
            print(f'ran the notebook in JupyterLab in {time.monotonic() - start:.0f} s')
            page.wait_for_timeout(1500)   # the last canvas frame and chart redraw

            inspector = nb.output_with(INSPECTOR_CANVAS, nb.cell_index('BatchInspector(')).first
            pictures = {'batch_3d.png': nb.output_screenshot(inspector),
                        'training_curves.png': nb.output_screenshot(nb.output_with(ANY_PLOT).last)}
            if coloured_pixels(pictures['batch_3d.png']) < 500:
                raise SystemExit('the batch inspector shows no streamlines: pictures not written')
            for name, png in pictures.items():
                (args.out / name).write_bytes(png)
                print(f'wrote {args.out / name}')
            if page.console_errors:
                print('console errors of the page:\n  ' + '\n  '.join(page.console_errors), file=sys.stderr)


if __name__ == '__main__':
    sys.exit(main())
