"""Regenerate the README's pictures from a real demo run: a training batch in 3D and the training curves.

    .venv/bin/python tools/make_readme_images.py [--out docs/images] [--max_epochs 4]

Builds the phantom demo data in a temporary folder, trains the example model briefly with the
training notebook (papermill) for two learning rates, then writes
  docs/images/batch_3d.png          one augmented training batch over an input slice (FURY, offscreen)
  docs/images/training_curves.png   the two runs compared (dwiml_nb.viz_training, headless Chromium)
Needs Mesa's Vulkan driver (3D) and Chromium (curves); takes a few minutes on 2 cores.
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=REPO / 'docs' / 'images', help='where the PNG files go')
    parser.add_argument('--max_epochs', type=int, default=4)
    parser.add_argument('--max_batches_per_epoch', type=int, default=12)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

    import papermill as pm
    from dwiml_nb.data import make_demo_dataset
    from dwiml_nb.dataset import MultiSubjectDataset
    from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput
    from dwiml_nb.viz_batch import render_batch_png
    from dwiml_nb.viz_training import logs_figure, save_figure

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='dwiml_readme_') as d:
        d = Path(d)
        hdf5 = make_demo_dataset(d / 'demo', which='phantom', progress=False).hdf5_files['phantom']

        dataset = MultiSubjectDataset(hdf5).load_data(progress=False)
        sampler = BatchStreamlinesSamplerOneInput(dataset.training_set, 'streamlines', 'input', batch_size=150,
                                                  seed=1234, step_size=1.0, split_ratio=0.3, reverse_ratio=0.5,
                                                  noise_gaussian_size=0.1)
        render_batch_png(sampler, args.out / 'batch_3d.png', size=(700, 700), color_by='direction',
                         slice_axis='z', slice_index=None)
        print(f"wrote {args.out / 'batch_3d.png'}")

        runs = []
        for name, lr in (('lr_3e-3', 3e-3), ('lr_3e-4', 3e-4)):
            pm.execute_notebook(str(REPO / 'nbs' / 'train_model.ipynb'), str(d / f'{name}.ipynb'),
                                kernel_name='python3', cwd=str(d), progress_bar=False,
                                parameters=dict(hdf5_file=str(hdf5), experiments_path=str(d / 'exp'),
                                                experiment_name=name, learning_rate=lr, max_epochs=args.max_epochs,
                                                max_batches_per_epoch=args.max_batches_per_epoch, batch_size=100))
            runs.append(d / 'exp' / name)
        fig = logs_figure(runs, smooth=5, title='two learning rates on the phantom demo data')
        save_figure(fig, args.out / 'training_curves.png', size=(1400, 800))
        print(f"wrote {args.out / 'training_curves.png'}")


if __name__ == '__main__':
    sys.exit(main())
